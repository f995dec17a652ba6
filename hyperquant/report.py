"""Human-readable summaries of a compression run (Markdown and terminal tables)."""

from __future__ import annotations

import statistics


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


def fmt_ppl(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value < 1e4 else f"{value:.3g}"


SUMMARY_COLUMNS = ["model", "bytes", "FFN bytes", "bits/FFN weight", "params", "MACs/token", "perplexity"]
# a vision-language model's rows also carry the image-conditioned figures
CAPTION_COLUMNS = ["caption perplexity", "greedy caption agreement"]


def _has_captions(rows: list[dict]) -> bool:
    return any("caption_perplexity" in r for r in rows)


SECOND_DOMAIN_COLUMN = "perplexity (Python docs)"


def _has_second_domain(rows: list[dict]) -> bool:
    return any("perplexity_second_domain" in r for r in rows)


def summary_columns(rows: list[dict]) -> list[str]:
    return SUMMARY_COLUMNS + ([SECOND_DOMAIN_COLUMN] if _has_second_domain(rows) else []) + \
        (CAPTION_COLUMNS if _has_captions(rows) else [])


def _caption_cells(row: dict) -> list[str]:
    agreement = row.get("caption_agreement")
    return [fmt_ppl(row.get("caption_perplexity")),
            "-" if agreement is None else f"{agreement:.1%} tokens, {row.get('caption_exact_match', 0):.0%} exact"]


def summary_rows(rows: list[dict]) -> list[list[str]]:
    """Rows of {'label', 'size' (evals.model_size), 'perplexity'} as table cells (and the caption
    figures, when a row has them)."""
    captions, second = _has_captions(rows), _has_second_domain(rows)
    return [
        [
            r["label"],
            human_bytes(r["size"]["bytes"]),
            human_bytes(r["size"]["ffn_bytes"]),
            f"{r['size']['ffn_bits_per_weight']:.2f}",
            f"{r['size']['params'] / 1e6:.1f} M",
            f"{r['size']['macs_per_token'] / 1e6:.1f} M",
            fmt_ppl(r.get("perplexity")),
            *([fmt_ppl(r.get("perplexity_second_domain"))] if second else []),
            *(_caption_cells(r) if captions else []),
        ]
        for r in rows
    ]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def layer_error_summary(log: list[dict]) -> dict:
    """Means over layers of the relative errors in the per-layer log (those that are present)."""
    keys = ["weight_error_frobenius", "output_error_frobenius", "output_error_activation", "quant_error",
            "quant_error_rtn", "output_error", "output_error_heldout", "quant_error_heldout",
            "output_error_to_original",
            # method="fourier"
            "weight_error_lowrank_float", "weight_error", "output_error_lowrank_float", "output_error_uncalibrated"]
    return {k: statistics.fmean(r[k] for r in log if k in r) for k in keys if any(k in r for r in log)}


def compress_report_md(source: str, config: dict, rows: list[dict], log: list[dict], protocol: dict | None,
                       seconds: float) -> str:
    parts = [
        "# hyperquant compression report",
        "",
        f"Source model: {source}",
        "",
        markdown_table(summary_columns(rows), summary_rows(rows)),
        "",
        "Bytes: the weights as stored (original: fp32; compressed: model.safetensors, packed codes + fp16 "
        "scales + zero points, other weights in " + config["rest_dtype"] + "). MACs/token: every linear layer.",
    ]
    if protocol and "num_tokens" in protocol:
        parts.append(
            f"Perplexity: {protocol['num_tokens']} tokens of held-out Wikipedia text (or the given file), "
            f"context {protocol['context']}, stride {protocol['stride']}."
            + (f" Perplexity (Python docs): the same protocol on the {protocol['second_domain']}, a second domain "
               f"never used for calibration or training." if protocol.get("second_domain") else "")
        )
    if protocol and protocol.get("caption_pairs"):
        parts.append(
            f"Caption perplexity: {protocol['caption_pairs']} image-caption pairs never calibrated or trained on "
            f"({protocol['caption_tokens']} caption tokens), teacher-forced with the image and prompt as context. "
            f"Greedy caption agreement: the share of the original model's greedy caption tokens (up to 24 per "
            f"image) reproduced at the same position, and the share of identical captions."
        )
    parts += ["", f"Compression took {seconds:.1f} s.", "", "## Settings", "", "```",
              *(f"{k}: {v}" for k, v in config.items()), "```", "", "## Mean relative errors over layers", ""]
    summary = layer_error_summary(log)
    parts.append(markdown_table(["error", "mean"], [[k, f"{v:.4g}"] for k, v in summary.items()]))
    parts += ["", ("Output errors are sum_t ||W x_t - W' x_t||^2 / sum_t ||W x_t||^2: output_error on the "
                   "calibration tokens the layer was fitted on (in-sample, so it flatters the fit), "
                   "output_error_heldout on held-out calibration-text tokens it never saw "
                   "(output_error_to_original: against the uncompressed model's layer output at the same token); "
                   "quant_error is relative to the float layer being quantized (quant_error_rtn: RTN on the same "
                   "weights and Hessian; quant_error_heldout: on held-out tokens). Per-layer values: "
                   "quant_log.json."), ""]
    return "\n".join(parts)

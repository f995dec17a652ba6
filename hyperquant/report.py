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


def fmt_figure(value: float | None, stderr: float | None) -> str:
    """A perplexity with its standard error: 27.73 ± 0.84."""
    if value is None:
        return "-"
    return fmt_ppl(value) + (f" ± {fmt_ppl(stderr)}" if stderr else "")


SUMMARY_COLUMNS = ["model", "bytes", "FFN bytes", "bits/FFN weight", "params", "MACs/token", "val: Wikipedia"]
SECOND_DOMAIN_COLUMN = "val: Python docs"
CHAT_COLUMNS = ["chat KL (nats/token)", "chat greedy agreement"]
# a vision-language model's rows also carry the image-conditioned figures
CAPTION_COLUMNS = ["caption perplexity", "greedy caption agreement"]


def _has_captions(rows: list[dict]) -> bool:
    return any("caption_perplexity" in r for r in rows)


def _has_second_domain(rows: list[dict]) -> bool:
    return any("perplexity_second_domain" in r for r in rows)


def _test_domains(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(name for r in rows for name in r.get("test") or {}))


def _has_chat(rows: list[dict]) -> bool:
    return any("chat" in r for r in rows)


def summary_columns(rows: list[dict]) -> list[str]:
    return SUMMARY_COLUMNS + ([SECOND_DOMAIN_COLUMN] if _has_second_domain(rows) else []) + \
        [f"test: {name}" for name in _test_domains(rows)] + (CHAT_COLUMNS if _has_chat(rows) else []) + \
        (CAPTION_COLUMNS if _has_captions(rows) else [])


def _caption_cells(row: dict) -> list[str]:
    agreement = row.get("caption_agreement")
    return [fmt_ppl(row.get("caption_perplexity")),
            "-" if agreement is None else f"{agreement:.1%} tokens, {row.get('caption_exact_match', 0):.0%} exact"]


def _chat_cells(row: dict) -> list[str]:
    chat = row.get("chat")
    return ["-", "-"] if chat is None else [f"{chat['kl']:.3f}", f"{chat['agreement']:.1%}"]


def _test_cells(row: dict, names: list[str]) -> list[str]:
    test = row.get("test") or {}
    return [fmt_figure(test[n]["perplexity"], test[n]["stderr"]) if n in test else "-" for n in names]


def summary_rows(rows: list[dict]) -> list[list[str]]:
    """Rows of {'label', 'size' (evals.model_size), 'perplexity'} as table cells (and the second domain,
    test-set, chat and caption figures, when a row has them)."""
    captions, second, chat, tests = _has_captions(rows), _has_second_domain(rows), _has_chat(rows), _test_domains(rows)
    return [
        [
            r["label"],
            human_bytes(r["size"]["bytes"]),
            human_bytes(r["size"]["ffn_bytes"]),
            f"{r['size']['ffn_bits_per_weight']:.2f}",
            f"{r['size']['params'] / 1e6:.1f} M",
            f"{r['size']['macs_per_token'] / 1e6:.1f} M",
            fmt_figure(r.get("perplexity"), r.get("perplexity_stderr")),
            *([fmt_figure(r.get("perplexity_second_domain"), r.get("perplexity_second_domain_stderr"))]
              if second else []),
            *_test_cells(r, tests),
            *(_chat_cells(r) if chat else []),
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


def protocol_text(protocol: dict) -> str:
    """What the perplexity columns measured, each labelled with its role."""
    text = (f"Validation (val:) columns, text that recipe and default choices were made on: {protocol['num_tokens']} "
            f"tokens of held-out Wikipedia lead paragraphs (or the given file)"
            + (f" and of the {protocol['second_domain']}" if protocol.get("second_domain") else "")
            + f", windows of {protocol['context']} tokens with stride {protocol['stride']}.")
    if protocol.get("test_domains"):
        domains = "; ".join(f"{name}: {d['title']}, {d['source']}, {d['tokens']} tokens"
                            for name, d in protocol["test_domains"].items())
        text += (f" Test (test:) columns, text that no choice has read and that shares no 13-word sequence with "
                 f"the calibration, training or validation text: {domains}; the same windows.")
    text += " ± is the standard error over windows (perplexity × the standard error of the mean NLL)."
    if protocol.get("chat"):
        chat = protocol["chat"]
        text += (f" Chat: the original's greedy replies (up to {chat['max_new_tokens']} tokens, "
                 f"{chat['reply_tokens']} in all) to {chat['prompts']} fixed prompts in {chat['template']}, on "
                 f"which each model is teacher-forced: KL(original || model) per reply token, and the share of "
                 f"reply tokens that are the model's most likely token.")
    return text


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
        parts.append(protocol_text(protocol))
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

"""Render sweep points into a size / accuracy / latency tradeoff report.

``write_report(points, out_dir, meta)`` writes ``points.json``, ``report.md``, a self-contained
``report.html`` (figures inline as base64 PNGs, inline CSS, no scripts, no external resources) and three
PNG figures. The pieces: ``document`` (the block list both writers render), ``figures``, ``reading`` (the
generated sentences) and ``writers`` (Markdown, and HTML through markdown-it-py).

Keys read from each point (see the sweep for the producer): ``id``, ``label``, ``family``, ``method``,
``status``, ``error``, ``metrics.{bytes_on_disk, bits_per_weight, ffn_bits_per_weight, params,
macs_per_token, perplexity, prefill_ms, decode_ms, compress_seconds}``, ``layers[].{name, output_error}``,
optionally ``config.bits`` and ``no_latency_reason``. Anything missing is shown as "–" and never raises.
The fp32 reference is the point with method "original" (else a "dense" one with >= 16 bits); the budget
reference is the "dense" point with ``config.bits == 4``. Only status "ok" points are plotted and tabled.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hyperquant.textsets import TEST_DOMAINS
from hyperquant.tradeoff.document import (
    BYTES,
    CHECK,
    DASH,
    DECODE,
    FIG_BYTES,
    FIG_LATENCY,
    FIG_LAYERS,
    MAX_LAYER_POINTS,
    PPL,
    Doc,
    family_of,
    fmt_num,
    fmt_ppl,
    fp32_reference,
    label_of,
    mb_of,
    md_code,
    md_escape,
    raw_ppl,
    status_of,
)
from hyperquant.tradeoff.figures import frontier_figure, layer_figure, message_figure, styles_for
from hyperquant.tradeoff.frontier import metric
from hyperquant.tradeoff.reading import write_reading
from hyperquant.tradeoff.writers import to_html, to_markdown

__all__ = ["fmt_num", "fmt_ppl", "write_report"]


def json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


TEST_COLUMNS = tuple(TEST_DOMAINS)
TABLE_HEADERS = ["frontier", "label", "family", "MB", "bits/weight", "FFN bits/weight", "params (M)",
                 "MMACs/token", "val: Wikipedia", "val: Python docs", *(f"test: {name}" for name in TEST_COLUMNS),
                 "prefill ms", "decode ms/token", "compress s"]


def _draw_figures(ok: list[Mapping[str, Any]], out_dir: Path, model: str, machine: str,
                  ref: Mapping[str, Any] | None) -> tuple[dict[str, Path], list[int], list[int]]:
    """The three PNGs; returns their paths and the size and latency frontiers (indices into ``ok``)."""
    styles = styles_for(ok)
    paths = {"frontier_bytes": out_dir / FIG_BYTES, "frontier_latency": out_dir / FIG_LATENCY,
             "layer_errors": out_dir / FIG_LAYERS}
    missing = [label_of(p) for p in ok if metric(p, BYTES) is None or metric(p, PPL) is None]
    if len(missing) == len(ok):
        message_figure(paths["frontier_bytes"], f"Perplexity vs size on disk — {model}",
                        "No finished point has both a size on disk and a finite perplexity.")
        front = []
    else:
        note = f"{len(missing)} finished point(s) without size or finite perplexity not shown" if missing else ""
        front = frontier_figure(paths["frontier_bytes"], ok, BYTES, 1e6, "model size on disk (MB = 10⁶ bytes)",
                                 f"Perplexity vs model size on disk — {model}", styles, ref, note)
    timed = [i for i, p in enumerate(ok) if metric(p, DECODE) is not None and metric(p, PPL) is not None]
    latency_title = f"Perplexity vs decode latency — {model}" + (f" ({machine})" if machine else "")
    if timed:
        untimed = [label_of(p) for p in ok if metric(p, DECODE) is None]
        lat_front = frontier_figure(paths["frontier_latency"], ok, DECODE, 1.0,
                                     "ONNX Runtime decode latency (ms per token)", latency_title, styles, ref,
                                     f"{len(untimed)} finished point(s) without a latency not shown" if untimed else "")
    else:
        lat_front = []
        message_figure(paths["frontier_latency"], latency_title,
                        "No point has an ONNX Runtime decode latency (metrics.decode_ms),\n"
                        "so there is nothing to plot here. Sizes and perplexities are in the other figures.")
    with_layers = [i for i, p in enumerate(ok)
                   if any(metric(layer, "output_error") for layer in p.get("layers") or [])]
    chosen = [i for i in front if i in with_layers]
    rest = sorted((i for i in with_layers if i not in chosen),
                  key=lambda i: (metric(ok[i], PPL) is None, metric(ok[i], PPL) or 0.0, i))
    chosen = (chosen + rest)[:MAX_LAYER_POINTS]
    layer_title = (f"Per-layer relative output error on held-out calibration tokens — {model}\n"
                   f"{len(chosen)} of {len(with_layers)} points with layer data, frontier points first")
    if chosen:
        layer_figure(paths["layer_errors"], ok, chosen, layer_title, styles)
    else:
        message_figure(paths["layer_errors"], f"Per-layer relative output error — {model}",
                        "No finished point carries per-layer errors (layers[].output_error).")

    return paths, front, lat_front


def _build_document(ok: list[Mapping[str, Any]], bad: list[Mapping[str, Any]], meta: dict, model: str,
                    machine: str, front: list[int], lat_front: list[int]) -> tuple[Doc, str]:
    """The report as blocks (header, generated reading, notes, figures, tables); returns it and its title."""
    doc = Doc()
    title = f"Size / accuracy / latency tradeoff — {model}"
    doc.h(1, md_escape(title))
    info = [f"**Model:** {md_code(model)}"]
    if meta.get("created"):
        info.append(f"**Created:** {md_escape(meta['created'])}")
    if machine:
        info.append(f"**Machine:** {md_escape(machine)}")
    doc.ul(info)
    if meta.get("command"):
        doc.p("**Command that produced this report:**")
        doc.code(str(meta["command"]))
    protocol = meta.get("protocol") or {}
    if protocol:
        doc.p("**Evaluation protocol:**")
        doc.ul([f"{md_code(k)}: " + (md_code(json.dumps(json_safe(v), ensure_ascii=False))
                                      if isinstance(v, (Mapping, list, tuple)) else md_escape(v))
                for k, v in protocol.items()])

    doc.h(2, "Reading the result")
    doc.p("*Generated from the data below; the notes after it, if any, are written by a person.*")
    write_reading(doc, ok, sum(status_of(p) == "failed" for p in bad), sum(status_of(p) != "failed" for p in bad),
             front, lat_front, machine)
    if meta.get("notes_md"):
        doc.h(3, "Notes")
        doc.md(str(meta["notes_md"]))

    doc.h(2, "Figures")
    doc.img(FIG_BYTES, "Perplexity vs model size on disk",
            "Each marker is one compressed model; colour and shape give the method family. Lower-left is "
            "better. The staircase joins the Pareto-optimal points (ringed and labelled); the dashed line is the "
            "fp32 original's perplexity.")
    doc.img(FIG_LATENCY, "Perplexity vs decode latency",
            "Same as above with ONNX Runtime decode time per token on the x axis; only points with a measured "
            "latency appear.")
    doc.img(FIG_LAYERS, "Per-layer relative output error",
            f"Relative output error of each compressed layer on calibration data, for up to {MAX_LAYER_POINTS} "
            "points (frontier points first). Spikes show which layers a method struggles with.")

    doc.h(2, f"All points ({len(ok)} finished)")
    doc.p(f"Sorted by size on disk. {CHECK} marks the size/perplexity frontier (highlighted rows). "
          "bits/weight counts the whole model's weights; FFN bits/weight only the compressed feed-forward "
          "layers. MB = 10⁶ bytes; MMACs = 10⁶ multiply-accumulates per generated token.")
    order = sorted(range(len(ok)), key=lambda i: (metric(ok[i], BYTES) is None, metric(ok[i], BYTES) or 0.0,
                                                  label_of(ok[i])))
    front_set = set(front)
    rows, highlight = [], set()
    for r, i in enumerate(order):
        p = ok[i]

        def m(key: str, p: Mapping[str, Any] = p) -> float | None:
            return metric(p, f"metrics.{key}")

        params, macs = m("params"), m("macs_per_token")
        bpw, fbpw = m("bits_per_weight"), m("ffn_bits_per_weight")
        rows.append([CHECK if i in front_set else "", md_escape(label_of(p)), md_escape(family_of(p)), fmt_num(mb_of(p)),
                     DASH if bpw is None else f"{bpw:.2f}", DASH if fbpw is None else f"{fbpw:.2f}",
                     fmt_num(None if params is None else params / 1e6),
                     fmt_num(None if macs is None else macs / 1e6), fmt_ppl(raw_ppl(p)),
                     fmt_ppl(m("perplexity_second_domain")),
                     *(fmt_ppl(m(f"test.{name}.perplexity")) for name in TEST_COLUMNS),
                     fmt_num(m("prefill_ms")), fmt_num(m("decode_ms")), fmt_num(m("compress_seconds"))])
        if i in front_set:
            highlight.add(r)
    doc.table(TABLE_HEADERS, rows, numeric=set(range(3, len(TABLE_HEADERS))), highlight=highlight)

    doc.h(2, f"Failed or skipped points ({len(bad)})")
    if bad:
        doc.ul([f"**{md_escape(label_of(p))}** ({md_escape(family_of(p))}) — {md_escape(status_of(p))}: "
                + (md_code(p.get("error")) if p.get("error") else "no error message")
                for p in bad])
    else:
        doc.p("None.")

    return doc, title


def write_report(points: list[dict], out_dir: Path, meta: dict) -> dict[str, Path]:
    """Write the tradeoff report for ``points`` into the existing directory ``out_dir``.

    Returns ``{"points": points.json, "markdown": report.md, "html": report.html,
    "frontier_bytes": ..., "frontier_latency": ..., "layer_errors": ...}`` (all paths inside out_dir).
    Non-finite floats are written to points.json as null, so it stays strict JSON.
    """
    out_dir = Path(out_dir)
    model = str(meta.get("model") or "model")
    machine = str(meta.get("machine") or "")
    ok = [p for p in points if status_of(p) == "ok"]
    bad = [p for p in points if status_of(p) != "ok"]
    fp32 = fp32_reference(ok)
    paths, front, lat_front = _draw_figures(ok, out_dir, model, machine, ok[fp32] if fp32 is not None else None)
    doc, title = _build_document(ok, bad, meta, model, machine, front, lat_front)

    paths["markdown"] = out_dir / "report.md"
    paths["markdown"].write_text(to_markdown(doc), encoding="utf-8")
    images = {name: (out_dir / name).read_bytes() for name in (FIG_BYTES, FIG_LATENCY, FIG_LAYERS)}
    paths["html"] = out_dir / "report.html"
    paths["html"].write_text(to_html(doc, images, title), encoding="utf-8")
    paths["points"] = out_dir / "points.json"
    payload = {"meta": meta, "points": points,
               "frontier_bytes": [ok[i].get("id") for i in front],
               "frontier_latency": [ok[i].get("id") for i in lat_front]}
    paths["points"].write_text(json.dumps(json_safe(payload), indent=2, ensure_ascii=False, allow_nan=False)
                               + "\n", encoding="utf-8")
    return paths

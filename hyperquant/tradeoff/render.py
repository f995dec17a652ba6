"""Render sweep points into a size / accuracy / latency tradeoff report.

``write_report(points, out_dir, meta)`` writes ``points.json``, ``report.md``, a self-contained
``report.html`` (figures inline as base64 PNGs, inline CSS, no scripts, no external resources) and three
PNG figures. Markdown and HTML come from one internal list of blocks, so they always say the same thing.

Keys read from each point (see the sweep for the producer): ``id``, ``label``, ``family``, ``method``,
``status``, ``error``, ``metrics.{bytes_on_disk, bits_per_weight, ffn_bits_per_weight, params,
macs_per_token, perplexity, prefill_ms, decode_ms, compress_seconds}``, ``layers[].{name, output_error}``,
optionally ``config.bits`` and ``no_latency_reason``. Anything missing is shown as "–" and never raises.
The fp32 reference is the point with method "original" (else a "dense" one with >= 16 bits); the budget
reference is the "dense" point with ``config.bits == 4``. Only status "ok" points are plotted and tabled.
"""

from __future__ import annotations

import base64
import html
import itertools
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hyperquant.tradeoff.frontier import best_under_budget, metric, pareto_front

BYTES = "metrics.bytes_on_disk"
PPL = "metrics.perplexity"
DECODE = "metrics.decode_ms"

FIG_BYTES = "frontier_bytes.png"
FIG_LATENCY = "frontier_latency.png"
FIG_LAYERS = "layer_errors.png"
MAX_LAYER_POINTS = 6
MATCH_SLACK = 0.01  # a dense point up to 1 % larger counts as the same size as a PHM point

DASH = "–"
CHECK = "✓"


# --------------------------------------------------------------------------------------------- formatting


def fmt_ppl(value: float | None) -> str:
    """Perplexity with 4 significant digits; scientific (``1.300e8``) from 10 000 up."""
    if value is None:
        return DASH
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "∞" if value > 0 else "-∞"
    text = f"{value:#.4g}"
    if "e" in text:
        mantissa, exponent = text.split("e")
        return f"{mantissa.rstrip('.')}e{int(exponent)}"
    return text.rstrip(".")


def fmt_num(value: float | None, sig: int = 3) -> str:
    """A plain number with about ``sig`` significant digits (never fewer integer digits)."""
    if value is None:
        return DASH
    if not math.isfinite(value):
        return fmt_ppl(value)
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    if magnitude >= 9 or magnitude < -4:
        return fmt_ppl(value)
    return f"{value:.{max(0, sig - 1 - magnitude)}f}"


def _fmt_tick(value: float, _pos: Any = None) -> str:
    if value <= 0:
        return ""
    if 1e-3 <= value < 1e5:
        return f"{value:g}"
    return fmt_ppl(value).replace(".000e", "e")


def _md_code(text: Any) -> str:
    """User text as an inline code span (backticks inside become quotes; no escapes apply in code)."""
    return "`" + " ".join(str(text).split()).replace("`", "'") + "`"


def _md_escape(text: Any) -> str:
    """User text (labels, errors) made literal in Markdown, including inside table cells."""
    text = " ".join(str(text).split())
    return re.sub(r"([\\`*\[\]|<>])", r"\\\1", text)


# -------------------------------------------------------------------------------------------- point access


def _label(p: Mapping[str, Any]) -> str:
    return str(p.get("label") or p.get("id") or "?")


def _family(p: Mapping[str, Any]) -> str:
    return str(p.get("family") or p.get("method") or "other")


def _status(p: Mapping[str, Any]) -> str:
    return str(p.get("status") or "ok")


def _mb(p: Mapping[str, Any]) -> float | None:
    b = metric(p, BYTES)
    return None if b is None else b / 1e6


def _ffn_bits(p: Mapping[str, Any]) -> float | None:
    bits = metric(p, "metrics.ffn_bits_per_weight")
    return bits if bits is not None else metric(p, "metrics.bits_per_weight")


def _raw_ppl(p: Mapping[str, Any]) -> float | None:
    """The perplexity even when infinite/NaN (for display), None when absent."""
    v = (p.get("metrics") or {}).get("perplexity")
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _config_bits(p: Mapping[str, Any]) -> float | None:
    return metric(p, "config.bits")


def _fp32_reference(points: Sequence[Mapping[str, Any]]) -> int | None:
    """The unquantized model: method "original", else a "dense" point with >= 16 bits (config.bits or FFN
    bits/weight). The largest such point with a finite perplexity."""
    def unquantized(p: Mapping[str, Any]) -> bool:
        if p.get("method") == "original":
            return True
        bits = _config_bits(p) or _ffn_bits(p)
        return p.get("method") == "dense" and bits is not None and bits >= 16

    cands = [i for i, p in enumerate(points) if unquantized(p) and metric(p, PPL) is not None]
    return max(cands, key=lambda i: (points[i].get("method") == "original", metric(points[i], BYTES) or 0, -i)) \
        if cands else None


def _dense4_reference(points: Sequence[Mapping[str, Any]]) -> int | None:
    """The dense 4-bit point: method "dense" with config.bits == 4 (else 3.5 <= FFN bits/weight < 5.5);
    of several, the one whose FFN bits/weight is closest to 4.25 (group size 128 with fp16 scales)."""
    dense = [i for i, p in enumerate(points) if p.get("method") == "dense" and metric(p, BYTES) is not None]
    cands = [i for i in dense if _config_bits(points[i]) == 4]
    if not cands:
        cands = [i for i in dense if _config_bits(points[i]) is None and 3.5 <= (_ffn_bits(points[i]) or 0) < 5.5]
    return min(cands, key=lambda i: (abs((_ffn_bits(points[i]) or 4.25) - 4.25), i)) if cands else None


# ------------------------------------------------------------------------------------- document structure


@dataclass
class Doc:
    """Blocks: ("h", level, text), ("p", text), ("ul", [text]), ("code", text),
    ("table", headers, rows, numeric_cols, highlighted_rows), ("img", file, alt, caption), ("md", text).
    Text is inline Markdown (``**bold**``, `` `code` ``, backslash escapes)."""

    blocks: list[tuple] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def ul(self, items: list[str]) -> None:
        if items:
            self.blocks.append(("ul", items))

    def code(self, text: str) -> None:
        self.blocks.append(("code", text))

    def table(self, headers: list[str], rows: list[list[str]], numeric: set[int] = frozenset(),
              highlight: set[int] = frozenset()) -> None:
        self.blocks.append(("table", headers, rows, set(numeric), set(highlight)))

    def img(self, file: str, alt: str, caption: str) -> None:
        self.blocks.append(("img", file, alt, caption))

    def md(self, text: str) -> None:
        self.blocks.append(("md", text))


def to_markdown(doc: Doc) -> str:
    out: list[str] = []
    for block in doc.blocks:
        kind = block[0]
        if kind == "h":
            out.append("#" * block[1] + " " + block[2])
        elif kind == "p":
            out.append(block[1])
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in block[1]))
        elif kind == "code":
            fence = "````" if "```" in block[1] else "```"
            out.append(f"{fence}\n{block[1]}\n{fence}")
        elif kind == "table":
            headers, rows, numeric = block[1], block[2], block[3]
            lines = ["| " + " | ".join(headers) + " |",
                     "|" + "|".join("---:" if j in numeric else "---" for j in range(len(headers))) + "|"]
            lines += ["| " + " | ".join(row) + " |" for row in rows]
            out.append("\n".join(lines))
        elif kind == "img":
            out.append(f"![{block[2]}]({block[1]})\n\n*{block[3]}*")
        elif kind == "md":
            out.append(block[1].strip())
    return "\n\n".join(out) + "\n"


_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "DejaVu Sans", Arial, sans-serif; color: #1d2430;
       max-width: 1320px; margin: 24px auto; padding: 0 24px; line-height: 1.45; background: #fff; }
h1 { font-size: 1.7em; border-bottom: 2px solid #2b6cb0; padding-bottom: 6px; }
h2 { font-size: 1.3em; margin-top: 1.8em; border-bottom: 1px solid #d5dbe3; padding-bottom: 4px; }
h3 { font-size: 1.08em; margin-top: 1.3em; }
code { background: #f1f3f6; padding: 1px 4px; border-radius: 3px; font-size: 0.92em; }
pre { background: #f1f3f6; padding: 10px 12px; border-radius: 4px; overflow-x: auto; white-space: pre-wrap; }
pre code { background: none; padding: 0; }
table { border-collapse: collapse; margin: 10px 0; font-size: 0.88em; }
th, td { border: 1px solid #d5dbe3; padding: 4px 7px; text-align: left; vertical-align: top;
         white-space: nowrap; }
.scroll { overflow-x: auto; }
th { background: #eef2f7; white-space: normal; vertical-align: bottom; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fafbfc; }
tr.hl td { background: #e6f4ea; }
figure { margin: 18px 0; }
figure img { max-width: 100%; border: 1px solid #e2e6ec; }
figcaption { color: #4a5565; font-size: 0.9em; margin-top: 4px; max-width: 1100px; }
blockquote { border-left: 3px solid #d5dbe3; margin-left: 0; padding-left: 12px; color: #4a5565; }
.meta { color: #4a5565; }
"""


def _inline_html(text: str, images: Mapping[str, bytes] | None = None) -> str:
    """Inline Markdown subset -> HTML: backslash escapes, `code`, **bold**, *italic*, [text](url), images."""
    held: list[str] = []

    def hold(token: str) -> str:
        if token.startswith("\\"):
            held.append(html.escape(token[1]))
        else:
            held.append(f"<code>{html.escape(token[1:-1])}</code>")
        return f"\x00{len(held) - 1}\x00"

    # Escapes and code spans, left to right, become placeholders so nothing below touches them.
    tokens = re.split(r"(\\[\\`*_\[\]|<>#!()]|`[^`]+`)", text)
    s = "".join(hold(t) if k % 2 else t for k, t in enumerate(tokens))
    s = html.escape(s, quote=True)

    def image(m: re.Match) -> str:
        alt, url = m.group(1), html.unescape(m.group(2))
        if images and url in images:
            data = base64.b64encode(images[url]).decode()
            return f'<img alt="{alt}" src="data:image/png;base64,{data}">'
        return f'<a href="{html.escape(url)}">{alt or html.escape(url)}</a>'

    def link(m: re.Match) -> str:
        url = html.unescape(m.group(2))
        if url.strip().lower().startswith("javascript:"):
            return m.group(1)
        return f'<a href="{html.escape(url)}">{m.group(1)}</a>'

    s = re.sub(r"!\[([^\]]*)\]\(([^)\s]+)\)", image, s)
    s = re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", link, s)
    s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
    s = re.sub(r"(?<![*\w])\*(?![\s*])(.+?)(?<![\s*])\*(?![*\w])", r"<em>\1</em>", s)
    return re.sub("\x00(\\d+)\x00", lambda m: held[int(m.group(1))], s)


def _md_to_html(md: str, images: Mapping[str, bytes] | None = None) -> str:
    """A small Markdown subset for the human-written notes: headings, paragraphs, lists, fenced code,
    block quotes and pipe tables. Unknown syntax degrades to plain text."""
    lines = md.splitlines()
    out: list[str] = []
    para: list[str] = []

    def flush() -> None:
        if para:
            out.append("<p>" + _inline_html(" ".join(s.strip() for s in para), images) + "</p>")
            para.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith("```"):
            flush()
            fence, body = stripped[:3], []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith(fence):
                body.append(lines[i])
                i += 1
            out.append("<pre><code>" + html.escape("\n".join(body)) + "</code></pre>")
        elif m := re.match(r"(#{1,6})\s+(.*)", stripped):
            flush()
            level = min(6, len(m.group(1)) + 1)  # notes sit under the report's own headings
            out.append(f"<h{level}>{_inline_html(m.group(2).rstrip('#').strip(), images)}</h{level}>")
        elif re.match(r"([-*+]|\d+[.)])\s+", stripped):
            flush()
            ordered = bool(re.match(r"\d", stripped))
            items: list[str] = []
            while i < len(lines) and lines[i].strip():
                s = lines[i].strip()
                if m := re.match(r"([-*+]|\d+[.)])\s+(.*)", s):
                    items.append(m.group(2))
                elif items:
                    items[-1] += " " + s
                i += 1
            tag = "ol" if ordered else "ul"
            out.append(f"<{tag}>" + "".join(f"<li>{_inline_html(t, images)}</li>" for t in items) + f"</{tag}>")
            continue
        elif stripped.startswith("|"):
            flush()
            rows = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append([c.strip() for c in re.split(r"(?<!\\)\|", lines[i].strip().strip("|"))])
                i += 1
            if len(rows) >= 2 and all(re.fullmatch(r":?-+:?", c) for c in rows[1] if c):
                head, body_rows = rows[0], rows[2:]
            else:
                head, body_rows = None, rows
            t = ["<table>"]
            if head:
                t.append("<tr>" + "".join(f"<th>{_inline_html(c, images)}</th>" for c in head) + "</tr>")
            t += ["<tr>" + "".join(f"<td>{_inline_html(c, images)}</td>" for c in r) + "</tr>" for r in body_rows]
            out.append("".join(t) + "</table>")
            continue
        elif stripped.startswith(">"):
            flush()
            quote = []
            while i < len(lines) and lines[i].strip().startswith(">"):
                quote.append(lines[i].strip()[1:])
                i += 1
            out.append("<blockquote>" + _md_to_html("\n".join(quote), images) + "</blockquote>")
            continue
        elif not stripped:
            flush()
        else:
            para.append(line)
        i += 1
    flush()
    return "\n".join(out)


def to_html(doc: Doc, images: Mapping[str, bytes], title: str) -> str:
    body: list[str] = []
    for block in doc.blocks:
        kind = block[0]
        if kind == "h":
            body.append(f"<h{block[1]}>{_inline_html(block[2])}</h{block[1]}>")
        elif kind == "p":
            body.append(f"<p>{_inline_html(block[1])}</p>")
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{_inline_html(t)}</li>" for t in block[1]) + "</ul>")
        elif kind == "code":
            body.append(f"<pre><code>{html.escape(block[1])}</code></pre>")
        elif kind == "table":
            headers, rows, numeric, highlight = block[1:]

            def cls(j: int, numeric: set[int] = numeric) -> str:
                return ' class="num"' if j in numeric else ""

            t = ["<table>", "<tr>" + "".join(f"<th{cls(j)}>{_inline_html(h)}</th>"
                                             for j, h in enumerate(headers)) + "</tr>"]
            for r, row in enumerate(rows):
                tr = '<tr class="hl">' if r in highlight else "<tr>"
                t.append(tr + "".join(f"<td{cls(j)}>{_inline_html(c)}</td>" for j, c in enumerate(row)) + "</tr>")
            body.append('<div class="scroll">' + "\n".join(t) + "</table></div>")
        elif kind == "img":
            file, alt, caption = block[1:]
            if file in images:
                data = base64.b64encode(images[file]).decode()
                body.append(f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
                            f"<figcaption>{_inline_html(caption)}</figcaption></figure>")
        elif kind == "md":
            body.append(_md_to_html(block[1], images))
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


# ------------------------------------------------------------------------------------------------- figures


def _styles(points: Sequence[Mapping[str, Any]]) -> dict[str, tuple[str, str]]:
    """A (colour, marker) per family, in order of first appearance."""
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
               "#7f7f7f", "#bcbd22"]
    markers = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p"]
    styles: dict[str, tuple[str, str]] = {}
    for p in points:
        fam = _family(p)
        if fam not in styles:
            n = len(styles)
            styles[fam] = (colours[n % len(colours)], markers[n % len(markers)])
    return styles


def _nice_log_ticks(lo: float, hi: float) -> list[float]:
    k0, k1 = math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1
    ticks: list[float] = []
    for mults in [(1,), (1, 3), (1, 2, 5), (1, 1.5, 2, 3, 5, 7), (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 9)]:
        ticks = [m * 10.0**k for k in range(k0, k1 + 1) for m in mults if lo <= m * 10.0**k <= hi]
        if len(ticks) >= 4:
            break
    if len(ticks) > 10:
        step = math.ceil(len(ticks) / 10)
        ticks = ticks[::step]
    if len(ticks) < 3:
        from matplotlib.ticker import MaxNLocator

        ticks = [t for t in MaxNLocator(6).tick_values(lo, hi) if lo <= t <= hi and t > 0]
    return ticks


def _set_axis(ax: Any, axis: str, values: list[float], log: bool) -> None:
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    lo, hi = min(values), max(values)
    if log:
        if hi / lo < 1.05:
            lo, hi = lo / 1.1, hi * 1.1
        pad = (hi / lo) ** 0.06
        lo, hi = lo / pad, hi * pad
        getattr(ax, f"set_{axis}scale")("log")
        getattr(ax, f"set_{axis}lim")(lo, hi)
        target = ax.xaxis if axis == "x" else ax.yaxis
        target.set_major_locator(FixedLocator(_nice_log_ticks(lo, hi)))
        target.set_major_formatter(FuncFormatter(_fmt_tick))
        target.set_minor_locator(NullLocator())
    else:
        span = (hi - lo) or max(abs(hi), 1.0) * 0.1
        getattr(ax, f"set_{axis}lim")(max(0.0, lo - 0.06 * span) if lo >= 0 else lo - 0.06 * span,
                                      hi + 0.06 * span)


def _message_figure(path: Path, title: str, message: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=110)
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=12)
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=12, wrap=True, transform=ax.transAxes,
            color="#4a5565")
    ax.set_xticks([])
    ax.set_yticks([])
    for side in ax.spines.values():
        side.set_color("#c0c6cf")
    fig.savefig(path, format="png")


OFF_SCALE = 10.0  # points this many times above the worst frontier perplexity are pinned to the top edge


def _place_labels(fig: Any, ax: Any, items: list[tuple[float, float, str]], avoid: list[tuple[float, float]],
                  lines: list[list[tuple[float, float]]] = (), rings: list[tuple[float, float]] = ()) -> None:
    """Annotate (x, y, text) items with a thin leader line, each at the first of a few offsets that overlaps
    no earlier label, no marker in ``avoid``, no polyline in ``lines`` (data coordinates) and stays inside
    the axes (greedy; falls back to the least crowded offset)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.transforms import Bbox

    canvas = FigureCanvasAgg(fig)
    fig.draw_without_rendering()  # settle the layout so display coordinates are final
    renderer = canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    # (box, cost of covering it): other labels matter most, then markers, then lines.
    taken = [(Bbox.from_extents(px - 7, py - 7, px + 7, py + 7), 5)
             for px, py in (ax.transData.transform(xy) for xy in avoid)]
    taken += [(Bbox.from_extents(px - 11, py - 11, px + 11, py + 11), 30)
              for px, py in (ax.transData.transform(xy) for xy in rings)]
    for line in lines:
        pts = ax.transData.transform(line)
        for (x0, y0), (x1, y1) in itertools.pairwise(pts):
            n = max(1, int(math.hypot(x1 - x0, y1 - y0) / 6))
            taken += [(Bbox.from_extents(x0 + (x1 - x0) * t / n - 2, y0 + (y1 - y0) * t / n - 2,
                                         x0 + (x1 - x0) * t / n + 2, y0 + (y1 - y0) * t / n + 2), 1)
                      for t in range(n + 1)]
    offsets = [(dx * sx, dy * sy, "left" if sx > 0 else "right", "bottom" if sy > 0 else "top")
               for dx, dy in ((12, 10), (22, 24), (34, 40), (20, 56)) for sx, sy in ((-1, -1), (1, -1), (1, 1), (-1, 1))]
    for x, y, text in items:
        best = None
        for dx, dy, ha, va in offsets:
            ann = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                              fontsize=7.5, color="#111", zorder=5, annotation_clip=False,
                              bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8},
                              arrowprops={"arrowstyle": "-", "color": "#777", "lw": 0.6, "shrinkA": 0,
                                          "shrinkB": 7})
            ann.set_in_layout(False)
            box = ann.get_window_extent(renderer)
            cost = sum(weight for t, weight in taken if box.overlaps(t))
            if not (inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1):
                cost += 1000
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, ann, box)
            else:
                ann.remove()
            if cost == 0:
                break
        taken.append((best[2], 50))


def _frontier_figure(path: Path, points: Sequence[Mapping[str, Any]], x_key: str, x_scale: float,
                     x_label: str, title: str, styles: Mapping[str, tuple[str, str]],
                     ref: Mapping[str, Any] | None, note: str = "") -> list[int]:
    """Scatter of perplexity vs ``x_key`` (divided by ``x_scale``), one colour/marker per family, Pareto
    staircase, frontier points ringed and labelled. Returns the frontier indices into ``points``."""
    from matplotlib.figure import Figure

    idx = [i for i, p in enumerate(points) if metric(p, x_key) is not None and metric(p, PPL) is not None]
    front = pareto_front(points, x_key, PPL)
    xy = {i: (metric(points[i], x_key) / x_scale, metric(points[i], PPL)) for i in idx}
    ref_ppl = metric(ref, PPL) if ref is not None else None
    fx, fy = [xy[i][0] for i in front], [xy[i][1] for i in front]

    # Catastrophic points (perplexity 1e8 next to 20) would squash everything else: pin them to the top edge.
    worst_useful = max(fy + ([ref_ppl] if ref_ppl else []))
    cap = worst_useful * OFF_SCALE
    off = [i for i in idx if xy[i][1] > cap]
    if not off:
        cap = None

    fig = Figure(figsize=(11.5, 6.6), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    ax.grid(True, which="major", color="#e3e7ed", linewidth=0.8)
    ax.set_axisbelow(True)
    xs_all = [xy[i][0] for i in idx]
    ys_in = [xy[i][1] for i in idx if i not in off] + ([ref_ppl] if ref_ppl else [])
    log_x = min(xs_all) > 0 and max(xs_all) / min(xs_all) > 3
    _set_axis(ax, "y", ys_in + ([cap] if cap else []), log=True)
    _set_axis(ax, "x", xs_all, log=log_x)
    for fam, (colour, marker) in styles.items():
        fam_in = [i for i in idx if _family(points[i]) == fam and i not in off]
        fam_off = [i for i in idx if _family(points[i]) == fam and i in off]
        if fam_in or fam_off:
            ax.scatter([xy[i][0] for i in fam_in], [xy[i][1] for i in fam_in], c=colour, marker=marker, s=46,
                       alpha=0.9, edgecolors="white", linewidths=0.5,
                       label=f"{fam} ({len(fam_in) + len(fam_off)})", zorder=3)
        for i in fam_off:
            ax.scatter([xy[i][0]], [cap], c=colour, marker=marker, s=46, zorder=3)
            ax.annotate(f"↑ {fmt_ppl(xy[i][1])}", (xy[i][0], cap), xytext=(0, -8), textcoords="offset points",
                        ha="center", va="top", rotation=90, fontsize=7, color=colour)
    right = ax.get_xlim()[1]
    ax.step(fx + [right], fy + [fy[-1]], where="post", color="#222", linewidth=1.3, alpha=0.75,
            label="Pareto frontier", zorder=2)
    ax.scatter(fx, fy, s=170, facecolors="none", edgecolors="#111", linewidths=1.4, zorder=4)
    if ref_ppl is not None:
        ax.axhline(ref_ppl, color="#555", linestyle="--", linewidth=1.1, zorder=1,
                   label=f"fp32 original: perplexity {fmt_ppl(ref_ppl)}")
    ax.set_xlabel(x_label + (" — log scale" if log_x else ""), fontsize=10.5)
    ax.set_ylabel("perplexity (log scale; lower is better)", fontsize=10.5)
    ax.set_title(title + "\nlower-left is better · ringed points form the Pareto frontier (staircase)",
                 fontsize=12)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8.5, frameon=False,
              title="method family (points)", title_fontsize=9)
    notes = [note] if note else []
    if off:
        notes.append(f"{len(off)} point(s) with perplexity above {fmt_ppl(cap)} are drawn at that height, "
                     "their real value written below them after ↑")
    if notes:
        import textwrap

        ax.text(1.02, 0.0, "\n".join(textwrap.fill(n, 34) for n in notes), transform=ax.transAxes, fontsize=8,
                color="#8a2a2a", va="bottom", ha="left")
    stairs = list(zip(fx, fy))
    stairs = [pt for a, b in zip(stairs, stairs[1:] + [(right, fy[-1])]) for pt in (a, (b[0], a[1]))]
    lines = [stairs + [(right, fy[-1])]]
    if ref_ppl is not None:
        lines.append([(ax.get_xlim()[0], ref_ppl), (right, ref_ppl)])
    _place_labels(fig, ax, [(x, y, _label(points[i])) for x, y, i in zip(fx, fy, front)],
                  [xy[i] if i not in off else (xy[i][0], cap) for i in idx], lines, list(zip(fx, fy)))
    fig.savefig(path, format="png")
    return front


def _short_layer_names(names: list[str]) -> list[str]:
    def short(name: str, tail_parts: int) -> str:
        m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
        tail = ".".join(name.split(".")[-tail_parts:])
        if tail_parts == 1 and tail.endswith("_proj"):
            tail = tail[: -len("_proj")]
        return f"{m.group(1)}.{tail}" if m else tail

    for parts in (1, 2, 3):
        out = [short(n, parts) for n in names]
        if len(set(out)) == len(out):
            return out
    return names


def _layer_figure(path: Path, points: Sequence[Mapping[str, Any]], chosen: list[int], title: str,
                  styles: Mapping[str, tuple[str, str]]) -> None:
    """Per-layer errors of the ``chosen`` points: colour = family (as in the frontier figures); points of the
    same family differ by hatch (bars) or line style (lines)."""
    from matplotlib.figure import Figure

    names: list[str] = []
    for i in chosen:
        for layer in points[i].get("layers") or []:
            if layer.get("name") not in names:
                names.append(layer.get("name"))
    short = _short_layer_names([str(n) for n in names])
    pos = {n: j for j, n in enumerate(names)}
    hatches, dashes = ["", "///", "...", "xxx", "\\\\\\", "ooo"], ["-", "--", ":", "-.", (0, (5, 1, 1, 1)), (0, (1, 3))]
    seen: dict[str, int] = {}
    bars = len(names) * len(chosen) <= 72
    width_in = min(16.0, max(11.5, 3 + (0.1 * len(names) * len(chosen) if bars else 0.12 * len(names))))
    fig = Figure(figsize=(width_in, 6.2), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    ax.grid(True, axis="y", color="#e3e7ed")
    ax.set_axisbelow(True)
    all_vals = []
    for k, i in enumerate(chosen):
        p = points[i]
        xs, ys = [], []
        for layer in p.get("layers") or []:
            v = metric(layer, "output_error")
            if v is not None and v > 0:
                xs.append(pos[layer.get("name")])
                ys.append(v)
        all_vals += ys
        legend = f"{_label(p)} — {fmt_num(_mb(p))} MB, ppl {fmt_ppl(_raw_ppl(p))}"
        colour, marker = styles.get(_family(p), ("#555", "o"))
        nth = seen[_family(p)] = seen.get(_family(p), -1) + 1
        if bars:
            w = 0.8 / len(chosen)
            ax.bar([x - 0.4 + w * (k + 0.5) for x in xs], ys, width=w, color=colour, label=legend,
                   hatch=hatches[nth % len(hatches)], edgecolor="white", linewidth=0.4)
        else:
            ax.plot(xs, ys, marker=marker, markersize=3.5, linewidth=1.2, color=colour, label=legend,
                    linestyle=dashes[nth % len(dashes)])
    if all_vals:
        ax.set_yscale("log")
        lo, hi = min(all_vals), max(all_vals)
        _set_axis(ax, "y", [lo, hi], log=True)
        if bars:
            ax.set_ylim(bottom=lo / 2)
    ax.set_xlim(-0.7, len(names) - 0.3)
    step = max(1, math.ceil(len(names) / 48))
    ax.set_xticks(range(0, len(names), step))
    ax.set_xticklabels(short[::step], rotation=90 if len(names) > 10 else 0, fontsize=7.5)
    ax.set_xlabel("compressed layer (block index . projection), in model order", fontsize=10.5)
    ax.set_ylabel("relative output error (log scale; lower is better)", fontsize=10.5)
    ax.set_title(title, fontsize=12)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8.5, frameon=False, title="point",
              title_fontsize=9)
    fig.savefig(path, format="png")


# ------------------------------------------------------------------------------------------ reading text


def _runs(points: Sequence[Mapping[str, Any]], front: list[int], x_key: str, x_scale: float,
          unit: str) -> list[str]:
    """'family holds the frontier from x to y' sentences, walking the frontier left to right."""
    runs: list[list[int]] = []
    for i in front:
        if runs and _family(points[runs[-1][0]]) == _family(points[i]):
            runs[-1].append(i)
        else:
            runs.append([i])
    out = []
    for run in runs:
        fam = _md_escape(_family(points[run[0]]))
        x0, x1 = (metric(points[run[j]], x_key) / x_scale for j in (0, -1))
        p0, p1 = (fmt_ppl(metric(points[run[j]], PPL)) for j in (0, -1))
        if len(run) == 1:
            out.append(f"**{fam}** at {fmt_num(x0)} {unit}: {_md_escape(_label(points[run[0]]))}, "
                       f"perplexity {p0}")
        else:
            out.append(f"**{fam}** from {fmt_num(x0)} to {fmt_num(x1)} {unit} ({len(run)} points, "
                       f"perplexity {p0} → {p1})")
    return out


def _ratio(a: float, b: float) -> str:
    r = a / b
    return f"{r:.2f}×" if 0.01 <= r < 100 else f"{fmt_ppl(r)}×"


def _reading(doc: Doc, ok: list[Mapping[str, Any]], n_failed: int, n_skipped: int, front: list[int],
             lat_front: list[int], machine: str) -> None:
    plotted = [p for p in ok if metric(p, BYTES) is not None and metric(p, PPL) is not None]
    fp32 = _fp32_reference(ok)
    fp32_ppl = metric(ok[fp32], PPL) if fp32 is not None else None
    summary = [(f"{len(ok)} points finished, {n_failed} failed, {n_skipped} skipped. "
                f"{len(front)} of them are on the size/perplexity **Pareto frontier**: no other point is both "
                "no larger on disk and no worse in perplexity. Sizes are bytes on disk, MB = 10⁶ bytes.")]
    if plotted:
        small = min(plotted, key=lambda p: (metric(p, BYTES), metric(p, PPL)))
        best = min(plotted, key=lambda p: (metric(p, PPL), metric(p, BYTES)))
        summary.append(f"Smallest: **{_md_escape(_label(small))}** ({fmt_num(_mb(small))} MB, perplexity "
                       f"{fmt_ppl(metric(small, PPL))}). Lowest perplexity: **{_md_escape(_label(best))}** "
                       f"({fmt_num(_mb(best))} MB, perplexity {fmt_ppl(metric(best, PPL))}).")
    if fp32 is not None:
        summary.append(f"Uncompressed fp32 reference: **{_md_escape(_label(ok[fp32]))}**, "
                       f"{fmt_num(_mb(ok[fp32]))} MB, perplexity {fmt_ppl(fp32_ppl)} (the dashed line in the "
                       "figures).")
    doc.ul(summary)

    doc.h(3, "Who is on the frontier, by size")
    if front:
        doc.p("Walking the frontier from the smallest model to the largest:")
        doc.ul(_runs(ok, front, BYTES, 1e6, "MB"))
    else:
        doc.p("No point has both a size and a finite perplexity, so there is no frontier.")

    doc.h(3, "Best point under a size budget")
    ref4 = _dense4_reference(ok)
    if ref4 is not None:
        ref_bytes = metric(ok[ref4], BYTES)
        budgets = [(ref_bytes, f"dense ~4-bit size ({_md_escape(_label(ok[ref4]))})"),
                   (ref_bytes / 2, "½ of the dense 4-bit size"), (ref_bytes / 4, "¼ of the dense 4-bit size")]
    elif plotted:
        largest = max(plotted, key=lambda p: metric(p, BYTES))
        ref_bytes = metric(largest, BYTES)
        doc.p("There is no dense ~4-bit point in this sweep, so budgets are fractions of the largest point.")
        budgets = [(ref_bytes * f, f"{name} of the largest point ({_md_escape(_label(largest))})")
                   for f, name in ((1, "all"), (1 / 4, "¼"), (1 / 8, "⅛"), (1 / 16, "1/16"))]
    else:
        budgets = []
        doc.p("No finished point has both a size and a finite perplexity.")
    if budgets:
        rows = []
        for budget, what in budgets:
            j = best_under_budget(ok, budget, BYTES, PPL)
            if j is None:
                smallest = min(metric(p, BYTES) for p in plotted)
                rows.append([what, fmt_num(budget / 1e6), f"*nothing fits* (smallest is {fmt_num(smallest / 1e6)} MB)",
                             DASH, DASH, DASH]
                            + ([DASH] if fp32_ppl else []))
                continue
            p = ok[j]
            row = [what, fmt_num(budget / 1e6), f"**{_md_escape(_label(p))}**", _md_escape(_family(p)),
                   fmt_num(_mb(p)), fmt_ppl(metric(p, PPL))]
            if fp32_ppl:
                row.append(_ratio(metric(p, PPL), fp32_ppl))
            rows.append(row)
        headers = ["budget", "budget MB", "best point", "family", "MB", "perplexity"]
        doc.table(headers + (["perplexity ÷ fp32"] if fp32_ppl else []), rows, numeric={1, 4, 5, 6})

    doc.h(3, "PHM vs dense quantization at matched size")
    phm = [p for p in plotted if p.get("method") == "phm" or _family(p).startswith("PHM")]
    dense = [p for p in plotted if p.get("method") == "dense"]
    if not phm or not dense:
        doc.p("Needs at least one finished PHM point and one finished dense point; this sweep has "
              f"{len(phm)} and {len(dense)}.")
    else:
        better = worse = alone = 0
        comparisons = []
        for p in phm:
            # "Matched": up to MATCH_SLACK larger, so that formats whose bytes differ only by their
            # scales and headers (PHM-4 vs dense 2-bit) still meet.
            j = best_under_budget(dense, metric(p, BYTES) * (1 + MATCH_SLACK), BYTES, PPL)
            if j is None:
                alone += 1
            elif metric(p, PPL) < metric(dense[j], PPL):
                better += 1
            else:
                worse += 1
            comparisons.append(j)
        doc.p(f"For each PHM point, the comparison is the best dense point that is at most "
              f"{MATCH_SLACK:.0%} larger on disk. "
              f"Of {len(phm)} PHM points, **{better}** beat that dense point, **{worse}** lose to it and "
              f"**{alone}** are smaller than every dense point. Rows below are the PHM points on the PHM-only "
              "frontier (the others are beaten by a smaller or equal-sized PHM point).")
        rows = []
        for k in pareto_front(phm, BYTES, PPL)[:12]:
            p, j = phm[k], comparisons[k]
            row = [_md_escape(_label(p)), fmt_num(_mb(p)), fmt_ppl(metric(p, PPL))]
            if j is None:
                row += ["*none this small*", DASH, DASH, "PHM only option"]
            else:
                d = dense[j]
                ratio = metric(p, PPL) / metric(d, PPL)
                verdict = "**PHM better**" if ratio < 1 else ("tie" if ratio == 1 else "dense better")
                row += [_md_escape(_label(d)), fmt_num(_mb(d)), fmt_ppl(metric(d, PPL)),
                        f"{_ratio(metric(p, PPL), metric(d, PPL))} — {verdict}"]
            rows.append(row)
        doc.table(["PHM point", "MB", "perplexity", f"best dense point ≤ {1 + MATCH_SLACK:g}× that size", "MB",
                   "perplexity",
                   "PHM ÷ dense perplexity"], rows, numeric={1, 2, 4, 5})

    doc.h(3, "Latency")
    timed = [p for p in plotted if metric(p, DECODE) is not None]
    if not timed:
        doc.p("No point has an ONNX Runtime decode latency (`metrics.decode_ms`), so the latency figure is "
              "empty.")
    else:
        fastest = min(timed, key=lambda p: (metric(p, DECODE), metric(p, PPL)))
        where = f" on {_md_escape(machine)}" if machine else ""
        doc.p(f"{len(timed)} of {len(plotted)} points have an ONNX Runtime decode latency{where}. Fastest: "
              f"**{_md_escape(_label(fastest))}** at {fmt_num(metric(fastest, DECODE))} ms/token (perplexity "
              f"{fmt_ppl(metric(fastest, PPL))}). The latency/perplexity frontier, fastest first:")
        doc.ul(_runs(ok, lat_front, DECODE, 1.0, "ms/token"))
    reasons: dict[str, int] = {}
    for p in plotted:
        if metric(p, DECODE) is None:
            why = str(p.get("no_latency_reason") or "no reason recorded")
            reasons[why] = reasons.get(why, 0) + 1
    if reasons:
        doc.p("Points without a latency, by reason:")
        doc.ul([f"{n} × {_md_escape(why)}" for why, n in sorted(reasons.items(), key=lambda kv: -kv[1])])


# ------------------------------------------------------------------------------------------------ report


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


TABLE_HEADERS = ["frontier", "label", "family", "MB", "bits/weight", "FFN bits/weight", "params (M)",
                 "MMACs/token", "perplexity", "prefill ms", "decode ms/token", "compress s"]


def write_report(points: list[dict], out_dir: Path, meta: dict) -> dict[str, Path]:
    """Write the tradeoff report for ``points`` into the existing directory ``out_dir``.

    Returns ``{"points": points.json, "markdown": report.md, "html": report.html,
    "frontier_bytes": ..., "frontier_latency": ..., "layer_errors": ...}`` (all paths inside out_dir).
    Non-finite floats are written to points.json as null, so it stays strict JSON.
    """
    out_dir = Path(out_dir)
    model = str(meta.get("model") or "model")
    machine = str(meta.get("machine") or "")
    ok = [p for p in points if _status(p) == "ok"]
    bad = [p for p in points if _status(p) != "ok"]
    styles = _styles(ok)
    fp32 = _fp32_reference(ok)
    ref = ok[fp32] if fp32 is not None else None

    # Figures.
    paths = {"frontier_bytes": out_dir / FIG_BYTES, "frontier_latency": out_dir / FIG_LATENCY,
             "layer_errors": out_dir / FIG_LAYERS}
    missing = [_label(p) for p in ok if metric(p, BYTES) is None or metric(p, PPL) is None]
    if len(missing) == len(ok):
        _message_figure(paths["frontier_bytes"], f"Perplexity vs size on disk — {model}",
                        "No finished point has both a size on disk and a finite perplexity.")
        front = []
    else:
        note = f"{len(missing)} finished point(s) without size or finite perplexity not shown" if missing else ""
        front = _frontier_figure(paths["frontier_bytes"], ok, BYTES, 1e6, "model size on disk (MB = 10⁶ bytes)",
                                 f"Perplexity vs model size on disk — {model}", styles, ref, note)
    timed = [i for i, p in enumerate(ok) if metric(p, DECODE) is not None and metric(p, PPL) is not None]
    latency_title = f"Perplexity vs decode latency — {model}" + (f" ({machine})" if machine else "")
    if timed:
        untimed = [_label(p) for p in ok if metric(p, DECODE) is None]
        lat_front = _frontier_figure(paths["frontier_latency"], ok, DECODE, 1.0,
                                     "ONNX Runtime decode latency (ms per token)", latency_title, styles, ref,
                                     f"{len(untimed)} finished point(s) without a latency not shown" if untimed else "")
    else:
        lat_front = []
        _message_figure(paths["frontier_latency"], latency_title,
                        "No point has an ONNX Runtime decode latency (metrics.decode_ms),\n"
                        "so there is nothing to plot here. Sizes and perplexities are in the other figures.")
    with_layers = [i for i, p in enumerate(ok)
                   if any(metric(layer, "output_error") for layer in p.get("layers") or [])]
    chosen = [i for i in front if i in with_layers]
    rest = sorted((i for i in with_layers if i not in chosen),
                  key=lambda i: (metric(ok[i], PPL) is None, metric(ok[i], PPL) or 0.0, i))
    chosen = (chosen + rest)[:MAX_LAYER_POINTS]
    layer_title = (f"Per-layer relative output error — {model}\n"
                   f"{len(chosen)} of {len(with_layers)} points with layer data, frontier points first")
    if chosen:
        _layer_figure(paths["layer_errors"], ok, chosen, layer_title, styles)
    else:
        _message_figure(paths["layer_errors"], f"Per-layer relative output error — {model}",
                        "No finished point carries per-layer errors (layers[].output_error).")

    # Document.
    doc = Doc()
    title = f"Size / accuracy / latency tradeoff — {model}"
    doc.h(1, _md_escape(title))
    info = [f"**Model:** {_md_code(model)}"]
    if meta.get("created"):
        info.append(f"**Created:** {_md_escape(meta['created'])}")
    if machine:
        info.append(f"**Machine:** {_md_escape(machine)}")
    doc.ul(info)
    if meta.get("command"):
        doc.p("**Command that produced this report:**")
        doc.code(str(meta["command"]))
    protocol = meta.get("protocol") or {}
    if protocol:
        doc.p("**Evaluation protocol:**")
        doc.ul([f"{_md_code(k)}: " + (_md_code(json.dumps(_json_safe(v), ensure_ascii=False))
                                      if isinstance(v, (Mapping, list, tuple)) else _md_escape(v))
                for k, v in protocol.items()])

    doc.h(2, "Reading the result")
    doc.p("*Generated from the data below; the notes after it, if any, are written by a person.*")
    _reading(doc, ok, sum(_status(p) == "failed" for p in bad), sum(_status(p) != "failed" for p in bad),
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
                                                  _label(ok[i])))
    front_set = set(front)
    rows, highlight = [], set()
    for r, i in enumerate(order):
        p = ok[i]

        def m(key: str, p: Mapping[str, Any] = p) -> float | None:
            return metric(p, f"metrics.{key}")

        params, macs = m("params"), m("macs_per_token")
        bpw, fbpw = m("bits_per_weight"), m("ffn_bits_per_weight")
        rows.append([CHECK if i in front_set else "", _md_escape(_label(p)), _md_escape(_family(p)), fmt_num(_mb(p)),
                     DASH if bpw is None else f"{bpw:.2f}", DASH if fbpw is None else f"{fbpw:.2f}",
                     fmt_num(None if params is None else params / 1e6),
                     fmt_num(None if macs is None else macs / 1e6), fmt_ppl(_raw_ppl(p)),
                     fmt_num(m("prefill_ms")), fmt_num(m("decode_ms")), fmt_num(m("compress_seconds"))])
        if i in front_set:
            highlight.add(r)
    doc.table(TABLE_HEADERS, rows, numeric=set(range(3, 12)), highlight=highlight)

    doc.h(2, f"Failed or skipped points ({len(bad)})")
    if bad:
        doc.ul([f"**{_md_escape(_label(p))}** ({_md_escape(_family(p))}) — {_md_escape(_status(p))}: "
                + (_md_code(p.get("error")) if p.get("error") else "no error message")
                for p in bad])
    else:
        doc.p("None.")

    paths["markdown"] = out_dir / "report.md"
    paths["markdown"].write_text(to_markdown(doc), encoding="utf-8")
    images = {name: (out_dir / name).read_bytes() for name in (FIG_BYTES, FIG_LATENCY, FIG_LAYERS)}
    paths["html"] = out_dir / "report.html"
    paths["html"].write_text(to_html(doc, images, title), encoding="utf-8")
    paths["points"] = out_dir / "points.json"
    payload = {"meta": meta, "points": points,
               "frontier_bytes": [ok[i].get("id") for i in front],
               "frontier_latency": [ok[i].get("id") for i in lat_front]}
    paths["points"].write_text(json.dumps(_json_safe(payload), indent=2, ensure_ascii=False, allow_nan=False)
                               + "\n", encoding="utf-8")
    return paths

"""The report's document model: constants, number formatting, point accessors and the block list (Doc)
that the Markdown and HTML writers (tradeoff.writers) both render, so they always say the same thing."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hyperquant.tradeoff.frontier import metric

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


def fmt_tick(value: float, _pos: Any = None) -> str:
    if value <= 0:
        return ""
    if 1e-3 <= value < 1e5:
        return f"{value:g}"
    return fmt_ppl(value).replace(".000e", "e")


def md_code(text: Any) -> str:
    """User text as an inline code span (backticks inside become quotes; no escapes apply in code)."""
    return "`" + " ".join(str(text).split()).replace("`", "'") + "`"


def md_escape(text: Any) -> str:
    """User text (labels, errors) made literal in Markdown, including inside table cells."""
    text = " ".join(str(text).split())
    return re.sub(r"([\\`*\[\]|<>])", r"\\\1", text)


# -------------------------------------------------------------------------------------------- point access


def label_of(p: Mapping[str, Any]) -> str:
    return str(p.get("label") or p.get("id") or "?")


def family_of(p: Mapping[str, Any]) -> str:
    return str(p.get("family") or p.get("method") or "other")


def status_of(p: Mapping[str, Any]) -> str:
    return str(p.get("status") or "ok")


def mb_of(p: Mapping[str, Any]) -> float | None:
    b = metric(p, BYTES)
    return None if b is None else b / 1e6


def ffn_bits_of(p: Mapping[str, Any]) -> float | None:
    bits = metric(p, "metrics.ffn_bits_per_weight")
    return bits if bits is not None else metric(p, "metrics.bits_per_weight")


def raw_ppl(p: Mapping[str, Any]) -> float | None:
    """The perplexity even when infinite/NaN (for display), None when absent."""
    v = (p.get("metrics") or {}).get("perplexity")
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def config_bits(p: Mapping[str, Any]) -> float | None:
    return metric(p, "config.bits")


def fp32_reference(points: Sequence[Mapping[str, Any]]) -> int | None:
    """The unquantized model: method "original", else a "dense" point with >= 16 bits (config.bits or FFN
    bits/weight). The largest such point with a finite perplexity."""
    def unquantized(p: Mapping[str, Any]) -> bool:
        if p.get("method") == "original":
            return True
        bits = config_bits(p) or ffn_bits_of(p)
        return p.get("method") == "dense" and bits is not None and bits >= 16

    cands = [i for i, p in enumerate(points) if unquantized(p) and metric(p, PPL) is not None]
    return max(cands, key=lambda i: (points[i].get("method") == "original", metric(points[i], BYTES) or 0, -i)) \
        if cands else None


def dense4_reference(points: Sequence[Mapping[str, Any]]) -> int | None:
    """The dense 4-bit point: method "dense" with config.bits == 4 (else 3.5 <= FFN bits/weight < 5.5);
    of several, the one whose FFN bits/weight is closest to 4.25 (group size 128 with fp16 scales)."""
    dense = [i for i, p in enumerate(points) if p.get("method") == "dense" and metric(p, BYTES) is not None]
    cands = [i for i in dense if config_bits(points[i]) == 4]
    if not cands:
        cands = [i for i in dense if config_bits(points[i]) is None and 3.5 <= (ffn_bits_of(points[i]) or 0) < 5.5]
    return min(cands, key=lambda i: (abs((ffn_bits_of(points[i]) or 4.25) - 4.25), i)) if cands else None


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



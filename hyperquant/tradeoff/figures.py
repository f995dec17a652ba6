"""The report's matplotlib figures: perplexity vs size / latency with the Pareto staircase, and per-layer
errors."""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hyperquant.tradeoff.document import PPL, family_of, fmt_num, fmt_ppl, fmt_tick, label_of, mb_of, raw_ppl
from hyperquant.tradeoff.frontier import metric, pareto_front


def styles_for(points: Sequence[Mapping[str, Any]]) -> dict[str, tuple[str, str]]:
    """A (colour, marker) per family, in order of first appearance."""
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
               "#7f7f7f", "#bcbd22"]
    markers = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p"]
    styles: dict[str, tuple[str, str]] = {}
    for p in points:
        fam = family_of(p)
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
        target.set_major_formatter(FuncFormatter(fmt_tick))
        target.set_minor_locator(NullLocator())
    else:
        span = (hi - lo) or max(abs(hi), 1.0) * 0.1
        getattr(ax, f"set_{axis}lim")(max(0.0, lo - 0.06 * span) if lo >= 0 else lo - 0.06 * span,
                                      hi + 0.06 * span)


def message_figure(path: Path, title: str, message: str) -> None:
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


def frontier_figure(path: Path, points: Sequence[Mapping[str, Any]], x_key: str, x_scale: float,
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
        fam_in = [i for i in idx if family_of(points[i]) == fam and i not in off]
        fam_off = [i for i in idx if family_of(points[i]) == fam and i in off]
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
    _place_labels(fig, ax, [(x, y, label_of(points[i])) for x, y, i in zip(fx, fy, front)],
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


def layer_figure(path: Path, points: Sequence[Mapping[str, Any]], chosen: list[int], title: str,
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
            # the error on held-out calibration tokens where the point has it: in-sample errors flatter
            v = metric(layer, "output_error_heldout")
            v = metric(layer, "output_error") if v is None else v
            if v is not None and v > 0:
                xs.append(pos[layer.get("name")])
                ys.append(v)
        all_vals += ys
        legend = f"{label_of(p)} — {fmt_num(mb_of(p))} MB, ppl {fmt_ppl(raw_ppl(p))}"
        colour, marker = styles.get(family_of(p), ("#555", "o"))
        nth = seen[family_of(p)] = seen.get(family_of(p), -1) + 1
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


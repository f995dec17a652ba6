"""The report's written reading: sentences generated from the measured points (what is on the frontier,
what matches what at equal size, what has no latency and why)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from hyperquant.tradeoff import document as dm
from hyperquant.tradeoff.document import Doc
from hyperquant.tradeoff.frontier import best_under_budget, metric, pareto_front


def _runs(points: Sequence[Mapping[str, Any]], front: list[int], x_key: str, x_scale: float,
          unit: str) -> list[str]:
    """'family holds the frontier from x to y' sentences, walking the frontier left to right."""
    runs: list[list[int]] = []
    for i in front:
        if runs and dm.family_of(points[runs[-1][0]]) == dm.family_of(points[i]):
            runs[-1].append(i)
        else:
            runs.append([i])
    out = []
    for run in runs:
        fam = dm.md_escape(dm.family_of(points[run[0]]))
        x0, x1 = (metric(points[run[j]], x_key) / x_scale for j in (0, -1))
        p0, p1 = (dm.fmt_ppl(metric(points[run[j]], dm.PPL)) for j in (0, -1))
        if len(run) == 1:
            out.append(f"**{fam}** at {dm.fmt_num(x0)} {unit}: {dm.md_escape(dm.label_of(points[run[0]]))}, "
                       f"perplexity {p0}")
        else:
            out.append(f"**{fam}** from {dm.fmt_num(x0)} to {dm.fmt_num(x1)} {unit} ({len(run)} points, "
                       f"perplexity {p0} → {p1})")
    return out


def _ratio(a: float, b: float) -> str:
    r = a / b
    return f"{r:.2f}×" if 0.01 <= r < 100 else f"{dm.fmt_ppl(r)}×"


def write_reading(doc: Doc, ok: list[Mapping[str, Any]], n_failed: int, n_skipped: int, front: list[int],
             lat_front: list[int], machine: str) -> None:
    plotted = [p for p in ok if metric(p, dm.BYTES) is not None and metric(p, dm.PPL) is not None]
    fp32 = dm.fp32_reference(ok)
    fp32_ppl = metric(ok[fp32], dm.PPL) if fp32 is not None else None
    summary = [(f"{len(ok)} points finished, {n_failed} failed, {n_skipped} skipped. "
                f"{len(front)} of them are on the size/perplexity **Pareto frontier**: no other point is both "
                "no larger on disk and no worse in perplexity. Sizes are bytes on disk, MB = 10⁶ bytes.")]
    if plotted:
        small = min(plotted, key=lambda p: (metric(p, dm.BYTES), metric(p, dm.PPL)))
        best = min(plotted, key=lambda p: (metric(p, dm.PPL), metric(p, dm.BYTES)))
        summary.append(f"Smallest: **{dm.md_escape(dm.label_of(small))}** ({dm.fmt_num(dm.mb_of(small))} MB, perplexity "
                       f"{dm.fmt_ppl(metric(small, dm.PPL))}). Lowest perplexity: **{dm.md_escape(dm.label_of(best))}** "
                       f"({dm.fmt_num(dm.mb_of(best))} MB, perplexity {dm.fmt_ppl(metric(best, dm.PPL))}).")
    if fp32 is not None:
        summary.append(f"Uncompressed fp32 reference: **{dm.md_escape(dm.label_of(ok[fp32]))}**, "
                       f"{dm.fmt_num(dm.mb_of(ok[fp32]))} MB, perplexity {dm.fmt_ppl(fp32_ppl)} (the dashed line in the "
                       "figures).")
    doc.ul(summary)

    doc.h(3, "Who is on the frontier, by size")
    if front:
        doc.p("Walking the frontier from the smallest model to the largest:")
        doc.ul(_runs(ok, front, dm.BYTES, 1e6, "MB"))
    else:
        doc.p("No point has both a size and a finite perplexity, so there is no frontier.")

    doc.h(3, "Best point under a size budget")
    ref4 = dm.dense4_reference(ok)
    if ref4 is not None:
        ref_bytes = metric(ok[ref4], dm.BYTES)
        budgets = [(ref_bytes, f"dense ~4-bit size ({dm.md_escape(dm.label_of(ok[ref4]))})"),
                   (ref_bytes / 2, "½ of the dense 4-bit size"), (ref_bytes / 4, "¼ of the dense 4-bit size")]
    elif plotted:
        largest = max(plotted, key=lambda p: metric(p, dm.BYTES))
        ref_bytes = metric(largest, dm.BYTES)
        doc.p("There is no dense ~4-bit point in this sweep, so budgets are fractions of the largest point.")
        budgets = [(ref_bytes * f, f"{name} of the largest point ({dm.md_escape(dm.label_of(largest))})")
                   for f, name in ((1, "all"), (1 / 4, "¼"), (1 / 8, "⅛"), (1 / 16, "1/16"))]
    else:
        budgets = []
        doc.p("No finished point has both a size and a finite perplexity.")
    if budgets:
        rows = []
        for budget, what in budgets:
            j = best_under_budget(ok, budget, dm.BYTES, dm.PPL)
            if j is None:
                smallest = min(metric(p, dm.BYTES) for p in plotted)
                rows.append([what, dm.fmt_num(budget / 1e6), f"*nothing fits* (smallest is {dm.fmt_num(smallest / 1e6)} MB)",
                             dm.DASH, dm.DASH, dm.DASH]
                            + ([dm.DASH] if fp32_ppl else []))
                continue
            p = ok[j]
            row = [what, dm.fmt_num(budget / 1e6), f"**{dm.md_escape(dm.label_of(p))}**", dm.md_escape(dm.family_of(p)),
                   dm.fmt_num(dm.mb_of(p)), dm.fmt_ppl(metric(p, dm.PPL))]
            if fp32_ppl:
                row.append(_ratio(metric(p, dm.PPL), fp32_ppl))
            rows.append(row)
        headers = ["budget", "budget MB", "best point", "family", "MB", "perplexity"]
        doc.table(headers + (["perplexity ÷ fp32"] if fp32_ppl else []), rows, numeric={1, 4, 5, 6})

    doc.h(3, "PHM vs dense quantization at matched size")
    phm = [p for p in plotted if p.get("method") == "phm" or dm.family_of(p).startswith("PHM")]
    dense = [p for p in plotted if p.get("method") == "dense"]
    if not phm or not dense:
        doc.p("Needs at least one finished PHM point and one finished dense point; this sweep has "
              f"{len(phm)} and {len(dense)}.")
    else:
        better = worse = alone = 0
        comparisons = []
        for p in phm:
            # "Matched": up to dm.MATCH_SLACK larger, so that formats whose bytes differ only by their
            # scales and headers (PHM-4 vs dense 2-bit) still meet.
            j = best_under_budget(dense, metric(p, dm.BYTES) * (1 + dm.MATCH_SLACK), dm.BYTES, dm.PPL)
            if j is None:
                alone += 1
            elif metric(p, dm.PPL) < metric(dense[j], dm.PPL):
                better += 1
            else:
                worse += 1
            comparisons.append(j)
        doc.p(f"For each PHM point, the comparison is the best dense point that is at most "
              f"{dm.MATCH_SLACK:.0%} larger on disk. "
              f"Of {len(phm)} PHM points, **{better}** beat that dense point, **{worse}** lose to it and "
              f"**{alone}** are smaller than every dense point. Rows below are the PHM points on the PHM-only "
              "frontier (the others are beaten by a smaller or equal-sized PHM point).")
        rows = []
        for k in pareto_front(phm, dm.BYTES, dm.PPL)[:12]:
            p, j = phm[k], comparisons[k]
            row = [dm.md_escape(dm.label_of(p)), dm.fmt_num(dm.mb_of(p)), dm.fmt_ppl(metric(p, dm.PPL))]
            if j is None:
                row += ["*none this small*", dm.DASH, dm.DASH, "PHM only option"]
            else:
                d = dense[j]
                ratio = metric(p, dm.PPL) / metric(d, dm.PPL)
                verdict = "**PHM better**" if ratio < 1 else ("tie" if ratio == 1 else "dense better")
                row += [dm.md_escape(dm.label_of(d)), dm.fmt_num(dm.mb_of(d)), dm.fmt_ppl(metric(d, dm.PPL)),
                        f"{_ratio(metric(p, dm.PPL), metric(d, dm.PPL))} — {verdict}"]
            rows.append(row)
        doc.table(["PHM point", "MB", "perplexity", f"best dense point ≤ {1 + dm.MATCH_SLACK:g}× that size", "MB",
                   "perplexity",
                   "PHM ÷ dense perplexity"], rows, numeric={1, 2, 4, 5})

    doc.h(3, "Latency")
    timed = [p for p in plotted if metric(p, dm.DECODE) is not None]
    if not timed:
        doc.p("No point has an ONNX Runtime decode latency (`metrics.decode_ms`), so the latency figure is "
              "empty.")
    else:
        fastest = min(timed, key=lambda p: (metric(p, dm.DECODE), metric(p, dm.PPL)))
        where = f" on {dm.md_escape(machine)}" if machine else ""
        doc.p(f"{len(timed)} of {len(plotted)} points have an ONNX Runtime decode latency{where}. Fastest: "
              f"**{dm.md_escape(dm.label_of(fastest))}** at {dm.fmt_num(metric(fastest, dm.DECODE))} ms/token (perplexity "
              f"{dm.fmt_ppl(metric(fastest, dm.PPL))}). The latency/perplexity frontier, fastest first:")
        doc.ul(_runs(ok, lat_front, dm.DECODE, 1.0, "ms/token"))
    reasons: dict[str, int] = {}
    for p in plotted:
        if metric(p, dm.DECODE) is None:
            why = str(p.get("no_latency_reason") or "no reason recorded")
            reasons[why] = reasons.get(why, 0) + 1
    if reasons:
        doc.p("Points without a latency, by reason:")
        doc.ul([f"{n} × {dm.md_escape(why)}" for why, n in sorted(reasons.items(), key=lambda kv: -kv[1])])


"""Pareto frontiers of sweep points (pure functions, no plotting).

Points are dicts. A key is either a top-level key (``"bytes"``) or a dotted path into nested dicts
(``"metrics.bytes_on_disk"``). Both coordinates are minimized. A point whose x or y is missing, None,
not a number, NaN or infinite takes no part.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def metric(point: Mapping[str, Any], key: str) -> float | None:
    """The finite number at ``key`` (dotted path allowed) in ``point``, else None."""
    value: Any = point
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _valid(points: Sequence[Mapping[str, Any]], x_key: str, y_key: str) -> list[tuple[float, float, int]]:
    out = []
    for i, p in enumerate(points):
        x, y = metric(p, x_key), metric(p, y_key)
        if x is not None and y is not None:
            out.append((x, y, i))
    return out


def pareto_front(points: Sequence[Mapping[str, Any]], x_key: str, y_key: str) -> list[int]:
    """Indices of the points that no other point dominates, minimizing both x and y.

    ``a`` dominates ``b`` when ``a.x <= b.x`` and ``a.y <= b.y`` with at least one strict. Of several
    points equal in both coordinates only the first (lowest index) is kept. The indices come back in
    increasing x (hence strictly decreasing y) order, ready to draw as a staircase.
    """
    front: list[int] = []
    best_y = math.inf
    for _x, y, i in sorted(_valid(points, x_key, y_key)):
        if y < best_y:
            front.append(i)
            best_y = y
    return front


def best_under_budget(points: Sequence[Mapping[str, Any]], budget: float, x_key: str,
                      y_key: str) -> int | None:
    """Index of the point with the lowest y among those with ``x <= budget``; None if none fits.

    Ties in y go to the smaller x, then to the lower index.
    """
    fits = [(y, x, i) for x, y, i in _valid(points, x_key, y_key) if x <= budget]
    return min(fits)[2] if fits else None

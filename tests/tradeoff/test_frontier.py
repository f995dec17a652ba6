import math

from hypothesis import given, settings
from hypothesis import strategies as st

from hyperquant.tradeoff import best_under_budget, metric, pareto_front


def pts(*xy):
    return [{"x": x, "y": y} for x, y in xy]


def brute_force_front(points, x_key="x", y_key="y"):
    """O(n^2) reference: valid points that no valid point dominates, first of exact duplicates, by x."""
    valid = [i for i, p in enumerate(points) if metric(p, x_key) is not None and metric(p, y_key) is not None]
    keep = []
    for i in valid:
        xi, yi = metric(points[i], x_key), metric(points[i], y_key)
        dominated = any(
            (xj <= xi and yj <= yi and (xj < xi or yj < yi)) or (xj == xi and yj == yi and j < i)
            for j in valid if j != i
            for xj, yj in [(metric(points[j], x_key), metric(points[j], y_key))]
        )
        if not dominated:
            keep.append(i)
    return sorted(keep, key=lambda i: metric(points[i], x_key))


def test_simple_staircase_in_x_order():
    points = pts((3, 1), (1, 3), (2, 2), (2.5, 2.5), (4, 4))
    assert pareto_front(points, "x", "y") == [1, 2, 0]


def test_single_point_and_empty():
    assert pareto_front(pts((5, 7)), "x", "y") == [0]
    assert pareto_front([], "x", "y") == []


def test_exact_duplicates_keep_first():
    points = pts((2, 2), (1, 5), (2, 2), (1, 5))
    assert pareto_front(points, "x", "y") == [1, 0]


def test_ties_in_one_coordinate_are_dominated():
    # Same x, worse y; same y, larger x: both dominated.
    points = pts((1, 2), (1, 3), (4, 2), (0.5, 9))
    assert pareto_front(points, "x", "y") == [3, 0]


def test_missing_and_non_finite_values_excluded():
    points = [{"x": 1, "y": None}, {"x": float("nan"), "y": 0}, {"x": 0, "y": float("inf")}, {"y": 0},
              {"x": "1", "y": 1}, {"x": True, "y": 0}, {"x": 5, "y": 5}]
    assert pareto_front(points, "x", "y") == [6]
    assert pareto_front(points[:6], "x", "y") == []


def test_dotted_keys_read_nested_metrics():
    points = [{"metrics": {"bytes": 10, "ppl": 5.0}}, {"metrics": {"bytes": 20, "ppl": 4.0}},
              {"metrics": {"bytes": 30, "ppl": 6.0}}, {"metrics": None}]
    assert pareto_front(points, "metrics.bytes", "metrics.ppl") == [0, 1]
    assert metric(points[3], "metrics.bytes") is None


def test_best_under_budget():
    points = pts((10, 5), (20, 3), (30, 1), (20, 3), (5, None), (15, 3))
    assert best_under_budget(points, 25, "x", "y") == 5  # tie at y=3: the smaller x wins
    assert best_under_budget(points, 30, "x", "y") == 2  # budget is inclusive
    assert best_under_budget(points, 10, "x", "y") == 0
    assert best_under_budget(points, 9.9, "x", "y") is None  # the x=5 point has no y
    assert best_under_budget(pts((20, 3), (20, 3)), 20, "x", "y") == 0
    assert best_under_budget([], 1, "x", "y") is None


values = st.one_of(st.integers(0, 6).map(float), st.just(None), st.just(math.nan), st.just(math.inf))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(values, values), max_size=25))
def test_matches_brute_force_on_random_points(xy):
    points = pts(*xy)
    front = pareto_front(points, "x", "y")
    assert front == brute_force_front(points)
    ys = [points[i]["y"] for i in front]
    assert ys == sorted(ys, reverse=True) and len(set(ys)) == len(ys)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(values, values), max_size=25), st.floats(0, 7))
def test_best_under_budget_matches_brute_force(xy, budget):
    points = pts(*xy)
    fits = [i for i, p in enumerate(points)
            if metric(p, "x") is not None and metric(p, "y") is not None and p["x"] <= budget]
    got = best_under_budget(points, budget, "x", "y")
    if not fits:
        assert got is None
    else:
        assert got == min(fits, key=lambda i: (points[i]["y"], points[i]["x"], i))
        # The best point under any budget is always on the frontier.
        assert got in pareto_front(points, "x", "y")

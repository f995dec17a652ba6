import copy
import itertools
import random

import pytest
import torch

import hyperquant
from hyperquant.convert import find_ffn_linears
from hyperquant.errors import HyperquantError
from hyperquant.train import allocate, assign_capacity, fisher_traces
from hyperquant.train.losses import causal_lm_loss
from tests.conftest import tiny_llama


def _rows(seed, count=5, max_bases=4):
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        unit = rng.choice([2, 4, 6])
        err = sorted((rng.uniform(0, 10) for _ in range(max_bases)), reverse=True)
        rows.append({"name": f"l{i}", "fisher": rng.uniform(0.1, 5), "numel": unit * 4, "unit": unit,
                     "errors": {b + 1: err[b] for b in range(max_bases)}})
    return rows


def _cost(rows, chosen):
    return sum(r["fisher"] / r["numel"] * r["errors"][chosen[r["name"]]] for r in rows)


@pytest.mark.parametrize("seed", range(6))
def test_knapsack_is_the_exact_optimum_and_greedy_respects_the_budget(seed):
    rows = _rows(seed)
    budget = sum(r["unit"] for r in rows) * 2 + 3
    best = min(
        (dict(zip([r["name"] for r in rows], combo)) for combo in itertools.product(range(1, 5), repeat=len(rows))
         if sum(r["unit"] * b for r, b in zip(rows, combo)) <= budget),
        key=lambda c: _cost(rows, c),
    )
    exact = allocate(rows, budget, "knapsack", 2, 4)
    assert sum(r["unit"] * exact[r["name"]] for r in rows) <= budget
    assert _cost(rows, exact) == pytest.approx(_cost(rows, best))
    greedy = allocate(rows, budget, "greedy", 2, 4)
    assert sum(r["unit"] * greedy[r["name"]] for r in rows) <= budget
    assert _cost(rows, greedy) >= _cost(rows, exact) - 1e-12


def test_topk_rule_upgrades_the_most_sensitive_layers():
    rows = [{"name": f"l{i}", "fisher": f, "numel": 8, "unit": 2, "errors": {1: 3, 2: 2, 3: 1}}
            for i, f in enumerate([0.5, 3.0, 1.0, 2.0])]
    assert allocate(rows, 10**6, "topk", 2, 3, topk=2) == {"l0": 2, "l1": 3, "l2": 2, "l3": 3}
    # from the budget: 4 layers x 2 bases x 2 params + 2 upgrades of 2 params
    assert allocate(rows, 20, "topk", 2, 3) == {"l0": 2, "l1": 3, "l2": 2, "l3": 3}
    with pytest.raises(HyperquantError):
        allocate(rows, 3, "knapsack", 2, 3)


def test_fisher_trace_is_the_mean_squared_gradient():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    traces = fisher_traces(model, ids)
    name = "model.layers.1.mlp.down_proj"
    w = model.get_submodule(name).weight
    expected = 0.0
    for row in ids:
        loss = causal_lm_loss(model(input_ids=row[None]).logits, row[None])
        expected += float(torch.autograd.grad(loss, w)[0].pow(2).sum())
    assert traces[name] == pytest.approx(expected / 2, rel=1e-5)
    assert set(traces) == set(find_ffn_linears(model)) and all(t > 0 for t in traces.values())
    assert not any(p.requires_grad is False for p in model.parameters())  # restored


@pytest.mark.parametrize("method", ["topk", "knapsack", "greedy"])
def test_plan_feeds_compress_config(method):
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    plan = assign_capacity(model, ids, n=2, num_bases=2, method=method, budget=2 + 1 / 3, bits=4, group_size=16)
    assert plan.total_params <= plan.budget_params
    assert sum(r["bases"] == 3 for r in plan.layers) == 2 if method == "topk" else True
    assert "| layer |" in plan.table() and len(plan.layers) == 6
    cfg = hyperquant.CompressConfig(bits=None, n=2, num_bases=2, layer_bases=plan.layer_bases, init="frobenius")
    out = hyperquant.compress(copy.deepcopy(model), cfg, progress=False)
    for r in plan.layers:
        assert out.get_submodule(r["name"]).num_bases == r["bases"]

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
        cost = sorted((rng.uniform(0, 10) for _ in range(max_bases)), reverse=True)
        rows.append({"name": f"l{i}", "unit": unit, "costs": {b + 1: cost[b] for b in range(max_bases)}})
    return rows


def _cost(rows, chosen):
    return sum(r["costs"][chosen[r["name"]]] for r in rows)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("min_bases", [1, 2])
def test_knapsack_is_the_exact_optimum_and_greedy_respects_the_budget(seed, min_bases):
    rows = _rows(seed)
    budget = sum(r["unit"] for r in rows) * 2 + 3
    best = min(
        (dict(zip([r["name"] for r in rows], combo))
         for combo in itertools.product(range(min_bases, 5), repeat=len(rows))
         if sum(r["unit"] * b for r, b in zip(rows, combo)) <= budget),
        key=lambda c: _cost(rows, c),
    )
    exact = allocate(rows, budget, "knapsack", 2, 4, min_bases=min_bases)
    assert sum(r["unit"] * exact[r["name"]] for r in rows) <= budget
    assert min(exact.values()) >= min_bases
    assert _cost(rows, exact) == pytest.approx(_cost(rows, best))
    greedy = allocate(rows, budget, "greedy", 2, 4, min_bases=min_bases)
    assert sum(r["unit"] * greedy[r["name"]] for r in rows) <= budget and min(greedy.values()) >= min_bases
    assert _cost(rows, greedy) >= _cost(rows, exact) - 1e-12


def test_topk_rule_upgrades_the_most_sensitive_layers():
    rows = [{"name": f"l{i}", "sensitivity": f, "unit": 2, "costs": {1: 3, 2: 2, 3: 1}}
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


def test_measured_kl_is_the_divergence_of_the_model_with_one_layer_replaced():
    """Each cost against a brute-force float64 recomputation: the layer replaced by the activation-aware
    fit of its inputs on the fit rows, KL of the whole model's next-token distributions on the other rows;
    n^2 bases are recorded as 0, and the fit with them is indeed the layer (KL below 1e-9)."""
    from torch.nn import functional as F

    from hyperquant.convert import set_module
    from hyperquant.phm.layer import PHMLinear
    from hyperquant.pipeline import input_covariances
    from hyperquant.train.capacity import measured_kl

    model = tiny_llama()
    g = torch.Generator().manual_seed(1)
    fit, ev = torch.randint(0, 128, (6, 16), generator=g), torch.randint(0, 128, (3, 16), generator=g)
    kl = measured_kl(model, fit, ev, n=2, max_bases=4, batch_size=2)
    assert set(kl) == set(find_ffn_linears(model)) and all(set(v) == {1, 2, 3, 4} for v in kl.values())
    name = "model.layers.1.mlp.up_proj"
    module = model.get_submodule(name)
    cov = input_covariances(model, {name: module}, fit)[name]
    double = copy.deepcopy(model).double()
    original = double.get_submodule(name)
    with torch.no_grad():
        reference = F.log_softmax(double(input_ids=ev).logits, -1)
        for b in (1, 2, 3, 4):
            phm = PHMLinear.from_dense(module, n=2, num_bases=b, input_cov=cov).double()
            set_module(double, name, phm)
            replaced = F.log_softmax(double(input_ids=ev).logits, -1)
            expected = float((reference.exp() * (reference - replaced)).sum(-1).mean())
            if b == 4:
                assert kl[name][4] == 0.0 and expected < 1e-9
            else:
                assert kl[name][b] == pytest.approx(expected, rel=1e-3, abs=1e-7)
            set_module(double, name, original)
    assert all(v[b] > 0 for v in kl.values() for b in (1, 2, 3))


def test_kl_cost_gives_the_bases_to_the_layer_that_needs_them():
    """A layer made the model's bottleneck (its weights scaled 30x, its block's output then rides on it)
    gets the extra bases the kl cost assigns; the plan pins every layer's B as the fisher one does."""
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(30.0)
    g = torch.Generator().manual_seed(2)
    fit, ev = torch.randint(0, 128, (6, 16), generator=g), torch.randint(0, 128, (4, 16), generator=g)
    budget = 2 + 2 / 6  # two more bases over the 6 layers: one layer to n^2
    plan = assign_capacity(model, ev, n=2, num_bases=2, method="knapsack", budget=budget, max_bases=4, bits=4,
                           group_size=16, cost="kl", min_bases=2, fit_ids=fit)
    chosen = {r["name"]: r["bases"] for r in plan.layers}
    assert chosen["model.layers.0.mlp.down_proj"] == 4 and min(chosen.values()) == 2
    assert plan.cost == "kl" and "KL at the base B" in plan.table()
    with pytest.raises(HyperquantError, match="fit_ids"):
        assign_capacity(model, ev, cost="kl")


def test_greedy_adds_no_basis_whose_measured_cost_rises():
    """A basis that makes the measured cost worse (a noisy KL can) is not worth its bytes: greedy stops
    at a negative gain even with budget left."""
    rows = [{"name": "a", "unit": 10, "costs": {1: 1.0, 2: 0.5, 3: 0.6, 4: 0.7}},
            {"name": "b", "unit": 10, "costs": {1: 0.2, 2: 0.3, 3: 0.1, 4: 0.0}}]
    chosen = allocate(rows, 80, "greedy", 1, 4, min_bases=1)
    assert chosen == {"a": 2, "b": 1}

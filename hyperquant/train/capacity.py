"""Capacity assignment: per-FFN-linear empirical Fisher, then the number of PHM bases B per layer
under a parameter budget.

Sensitivity of layer l: the empirical Fisher trace F_l = mean over calibration sequences of
||dL_i/dW_l||^2. The expected loss increase of replacing W_l by its B-basis PHM projection is
approximated by (F_l / numel_l) * ||W_l - P_B(W_l)||_F^2 (a diagonal Fisher that is flat within a
layer). Allocation rules: ``topk`` (the paper's: the K most sensitive layers get one more basis),
``greedy`` (add the basis with the best loss decrease per parameter while the budget allows) and
``knapsack`` (the exact minimum of the summed cost under the budget: a multiple-choice knapsack
solved by dynamic programming over parameter units).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from hyperquant.convert import find_ffn_linears, linear_weight
from hyperquant.errors import HyperquantError
from hyperquant.phm.bases import fixed_bases
from hyperquant.phm.functional import kron_weight
from hyperquant.phm.projection import project_fixed
from hyperquant.train.losses import causal_lm_loss


def fisher_traces(model: nn.Module, ids: torch.Tensor, patterns: list[str] | None = None) -> dict[str, float]:
    """Empirical Fisher trace of each FFN linear's weight: mean over sequences of ||grad||^2."""
    targets = find_ffn_linears(model, patterns)
    weights = {name: m.weight for name, m in targets.items()}
    saved = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
    traces = dict.fromkeys(weights, 0.0)
    was_training = model.training
    model.eval()
    try:
        for row in ids:
            batch = row.reshape(1, -1)
            loss = causal_lm_loss(model(input_ids=batch, use_cache=False).logits, batch)
            grads = torch.autograd.grad(loss, list(weights.values()))
            for name, g in zip(weights, grads):
                traces[name] += float(g.double().pow(2).sum())
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(saved[name])
        model.train(was_training)
    return {name: t / len(ids) for name, t in traces.items()}


def phm_params(out_features: int, in_features: int, n: int, num_bases: int) -> int:
    return num_bases * out_features * in_features // (n * n)


def packed_bytes(out_features: int, in_features: int, n: int, num_bases: int, bits: int | None,
                 group_size: int, symmetric: bool = False) -> int:
    """Bytes of one layer's stored A_cat (codes, fp16 scales, packed zeros), or fp16 factors when bits is None."""
    rows, cols = out_features // n, num_bases * in_features // n
    if bits is None:
        return 2 * rows * cols
    groups = -(-cols // group_size)
    zeros = 0 if symmetric else rows * -(-groups * bits // 8)
    return rows * groups * group_size * bits // 8 + 2 * rows * groups + zeros


def projection_errors(weight: torch.Tensor, n: int, max_bases: int) -> dict[int, float]:
    """||W - P_B(W)||_F^2 of the fixed-bases PHM projection for B = 1..max_bases."""
    w = weight.detach().float()
    errors = {}
    for b in range(1, max_bases + 1):
        bases = fixed_bases(n, b)
        errors[b] = float((w - kron_weight(bases, project_fixed(w, bases))).double().pow(2).sum())
    return errors


@dataclass
class CapacityPlan:
    method: str
    layers: list[dict]  # name, fisher, numel, errors {B: ||dW||^2}, bases, params, bytes
    budget_params: int
    total_params: int
    total_bytes: int
    layer_bases: dict[str, int] = field(default_factory=dict)  # for CompressConfig / TrainConfig

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        lines = ["| layer | Fisher trace | B | params | bytes |", "|---|---:|---:|---:|---:|"]
        for r in self.layers:
            lines.append(f"| {r['name']} | {r['fisher']:.4g} | {r['bases']} | {r['params']} | {r['bytes']} |")
        lines.append(f"| total (budget {self.budget_params} params) | | | {self.total_params} | {self.total_bytes} |")
        return "\n".join(lines)


def _cost(row: dict, b: int) -> float:
    return row["fisher"] / row["numel"] * row["errors"][b]


def allocate(rows: list[dict], budget_params: int, method: str, base_bases: int, max_bases: int,
             topk: int | None = None) -> dict[str, int]:
    """B per layer. ``rows`` need name, fisher, numel, unit (params per basis) and errors {B: err}."""
    if method == "topk":
        order = sorted(rows, key=lambda r: -r["fisher"])
        chosen = {r["name"]: base_bases for r in rows}
        used = sum(r["unit"] * base_bases for r in rows)
        if used > budget_params and topk is None:
            raise HyperquantError(f"the budget of {budget_params} parameters is below B={base_bases} everywhere")
        for upgraded, r in enumerate(order):
            if base_bases + 1 > max_bases:
                break
            if topk is not None and upgraded >= topk:
                break
            if topk is None and used + r["unit"] > budget_params:
                break
            chosen[r["name"]] = base_bases + 1
            used += r["unit"]
        return chosen
    minimum = sum(r["unit"] for r in rows)
    if budget_params < minimum:
        raise HyperquantError(f"the budget of {budget_params} parameters is below one basis per layer ({minimum})")
    if method == "greedy":
        chosen = {r["name"]: 1 for r in rows}
        used = minimum
        while True:
            best, best_gain = None, 0.0
            for r in rows:
                b = chosen[r["name"]]
                if b >= max_bases or used + r["unit"] > budget_params:
                    continue
                gain = (_cost(r, b) - _cost(r, b + 1)) / r["unit"]
                if best is None or gain > best_gain:
                    best, best_gain = r, gain
            if best is None:
                return chosen
            chosen[best["name"]] += 1
            used += best["unit"]
    if method == "knapsack":
        g = 0
        for r in rows:
            g = math.gcd(g, r["unit"])
        cap = (budget_params - minimum) // g  # extra capacity beyond one basis per layer, in units of g
        cap = min(cap, sum(r["unit"] // g * (max_bases - 1) for r in rows))
        if (cap + 1) * len(rows) > 50_000_000:
            raise HyperquantError("the knapsack table is too large for these layer sizes; use capacity: greedy")
        inf = float("inf")
        best = [0.0] + [inf] * cap  # best[c]: minimum cost using exactly c extra units
        choice: list[list[int]] = []
        for r in rows:
            u = r["unit"] // g
            new = [inf] * (cap + 1)
            pick = [0] * (cap + 1)
            for c in range(cap + 1):
                for b in range(1, max_bases + 1):
                    extra = (b - 1) * u
                    if extra > c or best[c - extra] == inf:
                        continue
                    value = best[c - extra] + _cost(r, b)
                    if value < new[c]:
                        new[c], pick[c] = value, b
            best = new
            choice.append(pick)
        c = min(range(cap + 1), key=lambda i: best[i])
        chosen = {}
        for r, pick in zip(reversed(rows), reversed(choice)):
            b = pick[c]
            chosen[r["name"]] = b
            c -= (b - 1) * (r["unit"] // g)
        return chosen
    raise HyperquantError(f"unknown capacity method {method!r}; use topk, greedy or knapsack")


def assign_capacity(model: nn.Module, ids: torch.Tensor, n: int = 2, num_bases: int = 2,
                    method: str = "knapsack", budget: float | None = None, topk: int | None = None,
                    max_bases: int | None = None, bits: int | None = 4, group_size: int = 128,
                    symmetric: bool = False, patterns: list[str] | None = None) -> CapacityPlan:
    """Measure per-layer Fisher on ``ids`` and choose B per FFN linear.

    ``budget``: the mean number of bases per layer the plan may spend (parameters = budget x the
    params of one basis everywhere); default num_bases + 1/3. ``topk`` (method "topk" only): upgrade
    exactly this many layers instead of filling the budget."""
    max_bases = min(max_bases or num_bases + 1, n * n)
    budget = num_bases + 1 / 3 if budget is None else budget
    fisher = fisher_traces(model, ids, patterns)
    rows = []
    for name, module in find_ffn_linears(model, patterns).items():
        w = linear_weight(module)
        out_f, in_f = w.shape
        rows.append({"name": name, "fisher": fisher[name], "numel": w.numel(), "out_features": out_f,
                     "in_features": in_f, "unit": phm_params(out_f, in_f, n, 1),
                     "errors": projection_errors(w, n, max_bases),
                     "weight_norm2": float(w.double().pow(2).sum())})
    budget_params = round(budget * sum(r["unit"] for r in rows))
    chosen = allocate(rows, budget_params, method, num_bases, max_bases, topk)
    for r in rows:
        b = chosen[r["name"]]
        r["bases"] = b
        r["params"] = phm_params(r["out_features"], r["in_features"], n, b)
        r["bytes"] = packed_bytes(r["out_features"], r["in_features"], n, b, bits, group_size, symmetric)
        r["relative_error"] = r["errors"][b] / max(r["weight_norm2"], 1e-30)
    layer_bases = {re.escape(r["name"]) + "$": r["bases"] for r in rows}
    return CapacityPlan(method=method, layers=rows, budget_params=budget_params,
                        total_params=sum(r["params"] for r in rows), total_bytes=sum(r["bytes"] for r in rows),
                        layer_bases=layer_bases)

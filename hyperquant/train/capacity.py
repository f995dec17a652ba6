"""Capacity assignment: the number of PHM bases B per FFN linear under a parameter budget.

Each layer gets a cost per B, the expected loss increase of its B-basis PHM replacement, from one of two
estimates (``cost``):

- ``fisher``: the empirical Fisher trace F_l = mean over calibration sequences of ||dL_i/dW_l||^2 times
  the weight error, (F_l / numel_l) * ||W_l - P_B(W_l)||_F^2 (a diagonal Fisher that is flat within a
  layer). With fixed bases the projection error falls linearly in B, so this cost ranks layers by their
  Fisher trace alone.
- ``kl``: measured. The KL divergence (per token, T = 1) of the model with only layer l replaced by its
  activation-aware B-basis fit from the unchanged model, on calibration rows the fit did not see. On the
  default model it finds what the Fisher trace misses: the first block's FFN linears cost 0.20-0.85 nats
  at B = 2, 4-15x the median layer's 0.055.

Allocation rules: ``topk`` (the paper's: the K most sensitive layers get one more basis), ``greedy`` (add
the basis with the best loss decrease per parameter while the budget allows) and ``knapsack`` (the exact
minimum of the summed cost under the budget: a multiple-choice knapsack solved by dynamic programming
over parameter units), each with B between ``min_bases`` and ``max_bases``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from hyperquant.convert import find_ffn_linears, linear_weight, set_module
from hyperquant.errors import HyperquantError
from hyperquant.phm.bases import fixed_bases
from hyperquant.phm.functional import kron_weight
from hyperquant.phm.projection import project_fixed
from hyperquant.textsets import chooses
from hyperquant.train.config import CAPACITY_COSTS, PAPER_EXTRA_BASES
from hyperquant.train.losses import causal_lm_loss, kd_loss

log = logging.getLogger(__name__)


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


@torch.no_grad()
def measured_kl(model: nn.Module, fit_ids: torch.Tensor, eval_ids: torch.Tensor, n: int, max_bases: int,
                patterns: list[str] | None = None, ridge: float = 1e-4, batch_size: int = 4,
                autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                min_bases: int = 1) -> dict[str, dict[int, float]]:
    """{layer: {B: KL}} for B = min_bases..max_bases: the mean per-token KL(model || model with only this
    FFN linear replaced by its activation-aware B-basis PHM fit) on ``eval_ids``, the fit's input
    statistics taken on ``fit_ids`` (the unchanged model's; every other layer stays as it is). n^2 bases
    span every matrix, so there the layer is its own fit and the cost is 0 (not measured)."""
    from hyperquant.phm.layer import PHMLinear
    from hyperquant.pipeline import input_covariances

    targets = find_ffn_linears(model, patterns)
    start = time.perf_counter()
    measured = [b for b in range(min_bases, max_bases + 1) if b != n * n]
    log.info("capacity: measuring the KL of %d layers x B in %s on %d rows", len(targets), measured, len(eval_ids))
    covs = input_covariances(model, targets, fit_ids)
    batches = [eval_ids[i : i + batch_size] for i in range(0, len(eval_ids), batch_size)]
    was_training = model.training
    model.eval()

    def logits(batch: torch.Tensor) -> torch.Tensor:
        with autocast():
            return model(input_ids=batch, use_cache=False).logits

    result: dict[str, dict[int, float]] = {}
    try:
        reference = [logits(b) for b in batches]
        for index, (name, module) in enumerate(targets.items()):
            result[name] = {}
            for b in range(min_bases, max_bases + 1):
                if b == n * n:
                    result[name][b] = 0.0
                    continue
                phm = PHMLinear.from_dense(module, n=n, num_bases=b, input_cov=covs[name], ridge=ridge)
                set_module(model, name, phm)
                try:
                    kl = sum(float(kd_loss(logits(batch), ref, 1.0)) * len(batch) for batch, ref in zip(batches, reference))
                finally:
                    set_module(model, name, module)
                result[name][b] = kl / len(eval_ids)
            if (index + 1) % 10 == 0 or index + 1 == len(targets):
                log.info("capacity: %d/%d layers measured (%.0f s)", index + 1, len(targets),
                         time.perf_counter() - start)
    finally:
        model.train(was_training)
    return result


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
    # name, numel, errors {B: ||dW||^2}, costs {B: expected loss increase}, sensitivity, fisher (cost
    # "fisher"), bases, params, bytes
    layers: list[dict]
    budget_params: int
    total_params: int
    total_bytes: int
    layer_bases: dict[str, int] = field(default_factory=dict)  # for CompressConfig / TrainConfig
    cost: str = "fisher"

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        measure = "Fisher trace" if self.cost == "fisher" else "KL at the base B (nats/token)"
        lines = [f"| layer | {measure} | B | params | bytes |", "|---|---:|---:|---:|---:|"]
        for r in self.layers:
            lines.append(f"| {r['name']} | {r['sensitivity']:.4g} | {r['bases']} | {r['params']} | {r['bytes']} |")
        lines.append(f"| total (budget {self.budget_params} params) | | | {self.total_params} | {self.total_bytes} |")
        return "\n".join(lines)


def allocate(rows: list[dict], budget_params: int, method: str, base_bases: int, max_bases: int,
             topk: int | None = None, min_bases: int = 1) -> dict[str, int]:
    """B per layer. ``rows`` need name, unit (params per basis), costs {B: expected loss increase} and,
    for ``topk``, sensitivity (the ranking)."""
    if method == "topk":
        order = sorted(rows, key=lambda r: -r["sensitivity"])
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
    if not 1 <= min_bases <= max_bases:
        raise HyperquantError(f"min_bases={min_bases} must be in [1, max_bases={max_bases}]")
    minimum = sum(r["unit"] * min_bases for r in rows)
    if budget_params < minimum:
        raise HyperquantError(f"the budget of {budget_params} parameters is below {min_bases} basis(es) per layer "
                              f"({minimum})")
    if method == "greedy":
        chosen = {r["name"]: min_bases for r in rows}
        used = minimum
        while True:
            best, best_gain = None, 0.0
            for r in rows:
                b = chosen[r["name"]]
                if b >= max_bases or used + r["unit"] > budget_params:
                    continue
                gain = (r["costs"][b] - r["costs"][b + 1]) / r["unit"]
                if gain > best_gain:  # a basis whose measured cost does not fall is not worth its bytes
                    best, best_gain = r, gain
            if best is None:
                return chosen
            chosen[best["name"]] += 1
            used += best["unit"]
    if method == "knapsack":
        g = 0
        for r in rows:
            g = math.gcd(g, r["unit"])
        cap = (budget_params - minimum) // g  # extra capacity beyond min_bases per layer, in units of g
        cap = min(cap, sum(r["unit"] // g * (max_bases - min_bases) for r in rows))
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
                for b in range(min_bases, max_bases + 1):
                    extra = (b - min_bases) * u
                    if extra > c or best[c - extra] == inf:
                        continue
                    value = best[c - extra] + r["costs"][b]
                    if value < new[c]:
                        new[c], pick[c] = value, b
            best = new
            choice.append(pick)
        c = min(range(cap + 1), key=lambda i: best[i])
        chosen = {}
        for r, pick in zip(reversed(rows), reversed(choice)):
            b = pick[c]
            chosen[r["name"]] = b
            c -= (b - min_bases) * (r["unit"] // g)
        return chosen
    raise HyperquantError(f"unknown capacity method {method!r}; use topk, greedy or knapsack")


@chooses("the capacity assignment")
def assign_capacity(model: nn.Module, ids: torch.Tensor, n: int = 2, num_bases: int = 2,
                    method: str = "knapsack", budget: float | None = None, topk: int | None = None,
                    max_bases: int | None = None, bits: int | None = 4, group_size: int = 128,
                    symmetric: bool = False, patterns: list[str] | None = None, cost: str = "fisher",
                    min_bases: int | None = None, fit_ids: torch.Tensor | None = None, ridge: float = 1e-4,
                    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                    ) -> CapacityPlan:
    """Estimate each FFN linear's cost per B on ``ids`` and choose B per layer.

    ``budget``: the mean number of bases per layer the plan may spend (parameters = budget x the
    params of one basis everywhere); default num_bases + 1/3. ``topk`` (method "topk" only): upgrade
    exactly this many layers instead of filling the budget. ``cost``: "fisher" or "kl" (measured on
    ``ids``, each layer fitted on ``fit_ids``, which must be other rows; see the module's docstring).
    ``min_bases``: the fewest bases a layer may get (knapsack and greedy; default 1)."""
    if cost not in CAPACITY_COSTS:
        raise HyperquantError(f"capacity cost {cost!r}: choose one of {list(CAPACITY_COSTS)}")
    if cost == "kl" and fit_ids is None:
        raise HyperquantError("the kl capacity cost needs fit_ids, calibration rows other than the measured ones")
    max_bases = min(max_bases or num_bases + 1, n * n)
    min_bases = 1 if min_bases is None else min_bases
    budget = num_bases + PAPER_EXTRA_BASES if budget is None else budget
    fisher = fisher_traces(model, ids, patterns) if cost == "fisher" else None
    # the costs the allocation can read: B from min_bases (the base B too: topk ranks by it) to max_bases
    kl = measured_kl(model, fit_ids, ids, n, max_bases, patterns, ridge, autocast=autocast,
                     min_bases=min(min_bases, num_bases, max_bases)) if cost == "kl" else None
    rows = []
    for name, module in find_ffn_linears(model, patterns).items():
        w = linear_weight(module)
        out_f, in_f = w.shape
        row = {"name": name, "numel": w.numel(), "out_features": out_f, "in_features": in_f,
               "unit": phm_params(out_f, in_f, n, 1), "errors": projection_errors(w, n, max_bases),
               "weight_norm2": float(w.double().pow(2).sum())}
        if fisher is not None:
            row["fisher"] = fisher[name]
            row["costs"] = {b: fisher[name] / row["numel"] * e for b, e in row["errors"].items()}
            row["sensitivity"] = fisher[name]
        else:
            row["costs"] = kl[name]
            row["sensitivity"] = kl[name][min(num_bases, max_bases)]
        rows.append(row)
    budget_params = round(budget * sum(r["unit"] for r in rows))
    chosen = allocate(rows, budget_params, method, num_bases, max_bases, topk, min_bases)
    for r in rows:
        b = chosen[r["name"]]
        r["bases"] = b
        r["params"] = phm_params(r["out_features"], r["in_features"], n, b)
        r["bytes"] = packed_bytes(r["out_features"], r["in_features"], n, b, bits, group_size, symmetric)
        r["relative_error"] = r["errors"][b] / max(r["weight_norm2"], 1e-30)
    layer_bases = {re.escape(r["name"]) + "$": r["bases"] for r in rows}
    return CapacityPlan(method=method, layers=rows, budget_params=budget_params,
                        total_params=sum(r["params"] for r in rows), total_bytes=sum(r["bytes"] for r in rows),
                        layer_bases=layer_bases, cost=cost)

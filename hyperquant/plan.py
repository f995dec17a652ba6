"""The per-layer plan: {module name: plan entry}, the one vocabulary of what hyperquant does to a model.

CLI flags, YAML files, the training recipe and report points all build a CompressConfig; `resolve_plan`
turns it into the plan for a given model, checked against every layer's shape before any work starts.
The checkpoint stores the plan; `hyperquant info DIR --json` prints it.
"""

from __future__ import annotations

from torch import nn

from hyperquant.config import CompressConfig
from hyperquant.convert import find_ffn_linears, linear_weight
from hyperquant.errors import HyperquantError
from hyperquant.kinds import PlanEntry, entry_from_dict, kind_of_entry

Plan = dict[str, PlanEntry]


def resolve_plan(model: nn.Module, cfg: CompressConfig) -> Plan:
    """The plan entry of every linear ``cfg`` selects, in module order, each checked against its shape."""
    targets = find_ffn_linears(model, cfg.target_patterns, cfg.min_features)
    plan: Plan = {}
    for name, module in targets.items():
        entry = cfg.entry_for(name)
        out_f, in_f = linear_weight(module).shape
        try:
            kind_of_entry(entry).check(entry, out_f, in_f)
        except ValueError as e:
            raise HyperquantError(f"layer {name}: {e}") from None
        plan[name] = entry
    return plan


def plan_needs_calibration(plan: Plan) -> bool:
    return any(kind_of_entry(entry).needs_calibration(entry) for entry in plan.values())


def plan_to_dict(plan: Plan) -> dict[str, dict]:
    return {name: entry.to_dict() for name, entry in plan.items()}


def plan_from_dict(data: dict[str, dict]) -> Plan:
    return {name: entry_from_dict(entry) for name, entry in data.items()}


def plan_label(plan: Plan) -> str:
    """A setting's name for tables and reports: the label of its most common entry, and how many layers
    differ from it."""
    if not plan:
        return "no layers"
    labels = [kind_of_entry(e).describe(e).label for e in plan.values()]
    common = max(dict.fromkeys(labels), key=labels.count)
    others = len(labels) - labels.count(common)
    return common + (f" ({others} layers differ)" if others else "")


def config_label(cfg: CompressConfig) -> str:
    """The label of a config without a model: its default entry, marked when layers vary."""
    entry = cfg.main_entry()
    return kind_of_entry(entry).describe(entry).label + (" (per-layer settings)" if cfg.varies_by_layer else "")


def config_slug(cfg: CompressConfig) -> str:
    """A folder name for a config's output: phm-n2b2-gptq4, dense-rtn4, fourier0.25-4, ..."""
    entry = cfg.main_entry()
    return kind_of_entry(entry).describe(entry).slug

"""The per-layer plan: {module name: plan entry}, the one vocabulary of what hyperquant does to a model.

CLI flags, YAML files, the training recipe and report points all build a CompressConfig; `resolve_plan`
turns it into the plan for a given model, checked against every layer's shape before any work starts.
The checkpoint stores the plan; `hyperquant info DIR --json` prints it.
"""

from __future__ import annotations

import re

from torch import nn

from hyperquant.config import CompressConfig
from hyperquant.convert import (
    FFN_PATTERNS,
    find_attention_and_head,
    find_ffn_linears,
    input_embedding_name,
    linear_weight,
    output_embedding_name,
)
from hyperquant.errors import HyperquantError
from hyperquant.kinds import PlanEntry, entry_from_dict, kind_of_entry

Plan = dict[str, PlanEntry]


PARTS = ("ffn", "attention", "head", "embedding")


def _targets(model: nn.Module, cfg: CompressConfig, parts: tuple[str, ...]) -> dict[str, tuple[nn.Module, str]]:
    """{name: (module, part)}: the embedding first, then the linears in module order; part is "ffn",
    "attention", "head" or "embedding"."""
    from hyperquant.multimodal.towers import find_towers

    if find_towers(model) is None and cfg.towers != ["language"]:
        raise HyperquantError(f"towers {','.join(cfg.towers)}: {type(model).__name__} is not a vision-language "
                              f"model, it has only a language tower; drop --towers")
    ffn = find_ffn_linears(model, cfg.target_patterns, cfg.min_features, towers=tuple(cfg.towers)) \
        if "ffn" in parts else {}
    if cfg.target_patterns is not None or cfg.scope == "ffn":
        return {name: (module, "ffn") for name, module in ffn.items()}
    targets: dict[str, tuple[nn.Module, str]] = {}
    embedding = input_embedding_name(model)
    if embedding is not None:
        targets[embedding] = (model.get_submodule(embedding), "embedding")
    rest = find_attention_and_head(model, cfg.min_features)
    heads = _heads(rest)
    for name, module in model.named_modules():
        if name in ffn:
            targets[name] = (module, "ffn")
        elif name in rest:
            targets[name] = (module, "head" if name in heads else "attention")
    return {name: target for name, target in targets.items() if target[1] in parts}


def _heads(rest: dict[str, nn.Module]) -> set[str]:
    from hyperquant.convert import block_index

    heads = set()
    for name in rest:
        try:
            block_index(name)
        except HyperquantError:
            heads.add(name)
    return heads


def resolve_plan(model: nn.Module, cfg: CompressConfig, parts: tuple[str, ...] = PARTS) -> Plan:
    """The plan entry of every layer ``cfg`` selects, each checked against its shape: the FFN linears,
    and in scope "model" the attention projections, the LM head and the embedding table. ``parts``
    limits it to some of them (training, which replaced the FFN itself, plans the rest)."""
    plan: Plan = {}
    for name, (module, part) in _targets(model, cfg, parts).items():
        entry = cfg.entry_for(name, part)
        if entry is None:
            continue
        out_f, in_f = linear_weight(module).shape
        try:
            kind_of_entry(entry).check(entry, out_f, in_f)
        except ValueError as e:
            raise HyperquantError(f"layer {name}: {e}") from None
        plan[name] = entry
    return _share_tied_embedding(model, cfg, plan)


def _share_tied_embedding(model: nn.Module, cfg: CompressConfig, plan: Plan) -> Plan:
    """A tied model whose embedding and LM head are quantized alike shares the head's codes: the table's
    entry says so and moves last (it is built from the compressed head)."""
    from hyperquant.kinds import DenseQuantPlan, EmbedQuantPlan

    embed_name, head_name = input_embedding_name(model), output_embedding_name(model)
    if not cfg.share_tied_embedding or embed_name not in plan or head_name is None:
        return plan
    entry, head = plan[embed_name], plan.get(head_name)
    tied = getattr(model.get_submodule(head_name), "weight", None) is model.get_submodule(embed_name).weight
    if not (tied and isinstance(entry, EmbedQuantPlan) and isinstance(head, DenseQuantPlan)
            and (entry.bits, entry.group_size, entry.symmetric) == (head.bits, head.group_size, head.symmetric)):
        return plan
    plan = {n: e for n, e in plan.items() if n != embed_name}
    plan[embed_name] = entry.replace(share_head=True)
    return plan


def plan_needs_calibration(plan: Plan) -> bool:
    return any(kind_of_entry(entry).needs_calibration(entry) for entry in plan.values())


def plan_to_dict(plan: Plan) -> dict[str, dict]:
    return {name: entry.to_dict() for name, entry in plan.items()}


def plan_from_dict(data: dict[str, dict]) -> Plan:
    return {name: entry_from_dict(entry) for name, entry in data.items()}


def _common_label(entries: list[PlanEntry]) -> tuple[str, int]:
    """The most common label within the most common family (a capacity plan spreads PHM over several B,
    which must not let a dense minority name the model), and how many entries carry another label."""
    names = [kind_of_entry(e).describe(e) for e in entries]
    families = [n.family for n in names]
    family = max(dict.fromkeys(families), key=families.count)
    labels = [n.label for n in names if n.family == family]
    common = max(dict.fromkeys(labels), key=labels.count)
    return common, len(names) - labels.count(common)


def plan_label(plan: Plan) -> str:
    """A setting's name for tables and reports: the label of the FFN's most common entry (how many FFN
    layers differ from it), then what the rest of the model got, e.g. "PHM n=2 B=2 GPTQ-4 g128 +
    dense GPTQ-4 g128 elsewhere"."""
    if not plan:
        return "no layers"
    patterns = [re.compile(p) for p in set(FFN_PATTERNS.values())]
    ffn = [e for name, e in plan.items() if any(r.search("." + name) for r in patterns)]
    rest = [e for name, e in plan.items() if not any(r.search("." + name) for r in patterns)
            and e.kind not in ("keep", "embed-quant")]
    common, others = _common_label(ffn or rest)
    label = common + (f" ({others} layers differ)" if others else "")
    if ffn and rest:
        rest_label, _ = _common_label(rest)
        label += f" + {rest_label} elsewhere" if rest_label != common else " everywhere"
    return label


def config_label(cfg: CompressConfig) -> str:
    """The label of a config without a model: its default entry, marked when layers vary."""
    entry = cfg.main_entry()
    return kind_of_entry(entry).describe(entry).label + (" (per-layer settings)" if cfg.varies_by_layer else "")


def config_slug(cfg: CompressConfig) -> str:
    """A folder name for a config's output: phm-n2b2-gptq4, dense-rtn4, fourier0.25-4, ..."""
    entry = cfg.main_entry()
    return kind_of_entry(entry).describe(entry).slug

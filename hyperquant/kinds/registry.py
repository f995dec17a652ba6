"""The registry of layer kinds: name -> kind, module type -> kind, plan-entry dicts -> entries."""

from __future__ import annotations

from typing import Any

from torch import nn

from hyperquant.errors import ConfigError, from_known_fields
from hyperquant.kinds.base import LayerKind, PlanEntry

_KINDS: dict[str, LayerKind] = {}


def register_kind(kind: LayerKind | type[LayerKind]) -> LayerKind | type[LayerKind]:
    """Register a kind (an instance, or a class with a no-argument constructor; usable as a decorator).
    Registering a name again replaces the earlier kind."""
    instance = kind() if isinstance(kind, type) else kind
    if not getattr(instance, "name", ""):
        raise ValueError(f"{type(instance).__name__} has no name")
    if getattr(instance.entry_type, "kind", None) != instance.name:
        raise ValueError(f"{type(instance).__name__}: entry_type.kind must be {instance.name!r}")
    _KINDS[instance.name] = instance
    return kind


def unregister_kind(name: str) -> None:
    _KINDS.pop(name, None)


def kind_named(name: str) -> LayerKind:
    try:
        return _KINDS[name]
    except KeyError:
        raise ConfigError(f"unknown layer kind {name!r}; registered kinds: {sorted(_KINDS)}") from None


def registered_kinds() -> dict[str, LayerKind]:
    return dict(_KINDS)


def kind_of(module: nn.Module) -> LayerKind | None:
    """The kind whose module type ``module`` is, or None for a module hyperquant did not make."""
    for kind in _KINDS.values():
        if kind.module_types and type(module) in kind.module_types:
            return kind
    return None


def kind_of_entry(entry: PlanEntry) -> LayerKind:
    return kind_named(entry.kind)


def entry_from_dict(data: dict[str, Any] | PlanEntry) -> PlanEntry:
    """A plan entry from ``{"kind": name, **parameters}`` (YAML, JSON, a checkpoint's plan)."""
    if isinstance(data, PlanEntry):
        return data
    if not isinstance(data, dict) or "kind" not in data:
        raise ConfigError(f"a layer plan entry must be a mapping with a kind, e.g. {{kind: phm-quant, n: 2}}; "
                          f"got {data!r}")
    fields = {k: v for k, v in data.items() if k != "kind"}
    kind = kind_named(data["kind"])
    return from_known_fields(kind.entry_type, fields, f"{kind.name} option")

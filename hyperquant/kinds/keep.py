"""keep: a selected linear left as it is (stored in the checkpoint's rest dtype with the other weights)."""

from __future__ import annotations

from dataclasses import dataclass

from hyperquant.kinds.base import LayerKind, PlanEntry


@dataclass(frozen=True)
class KeepPlan(PlanEntry):
    kind = "keep"


class KeepKind(LayerKind):
    name = "keep"
    entry_type = KeepPlan
    replaces_module = False

    def label(self, entry: KeepPlan) -> str:
        return "kept"

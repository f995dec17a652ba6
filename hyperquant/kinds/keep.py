"""keep: a selected linear left as it is (stored in the checkpoint's rest dtype with the other weights)."""

from __future__ import annotations

from dataclasses import dataclass

from hyperquant.kinds.base import LayerKind, Names, PlanEntry


@dataclass(frozen=True)
class KeepPlan(PlanEntry):
    kind = "keep"


class KeepKind(LayerKind):
    name = "keep"
    entry_type = KeepPlan
    replaces_module = False

    def describe(self, entry: KeepPlan) -> Names:
        return Names("kept", "kept", "kept")

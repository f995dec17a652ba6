"""The layer-kind protocol: everything the rest of hyperquant asks of a compressed-layer kind.

A *plan entry* (a frozen dataclass, one per kind) says how one linear is compressed; a *kind* turns an
entry plus the dense weight and its calibration statistics into a module, and answers for modules of
its type: the constructor arguments the checkpoint stores, bytes, parameters, multiply-adds per token,
and the ONNX stand-in (or the reason there is none). Checkpoint, size accounting, export and the sweep
ask the registry (``hyperquant.kinds``) and nothing else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from hyperquant.errors import HyperquantError


@dataclass(frozen=True)
class PlanEntry:
    """How one module is compressed. Subclasses are frozen dataclasses whose ``kind`` names their kind."""

    kind: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}

    def replace(self, **changes) -> PlanEntry:
        return dataclasses.replace(self, **changes)


class Names(NamedTuple):
    label: str  # "PHM n=2 B=2 GPTQ-4 g128"
    family: str  # "PHM GPTQ"
    slug: str  # "phm-n2b2-gptq4"


@dataclass
class LayerStats:
    """Calibration statistics of one linear's input, float64 sums over the calibration tokens.

    ``input_cov`` = sum_t x_t x_t^T. When the fit targets the uncompressed model's outputs,
    ``cross_cov`` = sum_t x_t xo_t^T and ``original_cov`` = sum_t xo_t xo_t^T pair them with the inputs
    xo_t the original model gave the layer at the same token. ``heldout_cov`` is the same sum over
    held-out tokens that the fit never sees (None without them): errors measured on it are honest.
    """

    input_cov: torch.Tensor
    tokens: int = 0
    cross_cov: torch.Tensor | None = None
    original_cov: torch.Tensor | None = None
    heldout_cov: torch.Tensor | None = None
    heldout_tokens: int = 0


class NoExport(HyperquantError):
    """A kind (or a setting of it) that has no ONNX export; the message says why."""


class LayerKind:
    """One compressed-layer kind. Subclass it, set the class attributes, and ``register_kind`` an instance.

    Modules of ``module_types`` must carry ``in_features``, ``out_features`` and ``bias`` (None or a
    tensor), and their ``state_dict()`` must be exactly what the checkpoint stores (float tensors are
    saved in their own dtype).
    """

    name: ClassVar[str]
    entry_type: ClassVar[type[PlanEntry]]
    module_types: ClassVar[tuple[type[nn.Module], ...]] = ()
    replaces_module: ClassVar[bool] = True  # False: the entry leaves the module as it is ("keep")

    # --- planning and building
    def check(self, entry: PlanEntry, out_features: int, in_features: int) -> None:
        """Raise ValueError (message: problem and fix) if ``entry`` cannot compress a layer of this shape."""

    def needs_calibration(self, entry: PlanEntry) -> bool:
        return False

    def build(self, entry: PlanEntry, weight: torch.Tensor, bias: torch.Tensor | None, stats: LayerStats | None,
              record: dict) -> nn.Module:
        """The replacement of a dense (out, in) ``weight``; adds what it measured to ``record``."""
        raise NotImplementedError

    def describe(self, entry: PlanEntry) -> Names:
        """The entry's names: in tables and reports, as a legend group, and in a default output folder."""
        return Names(self.name, self.name, self.name)

    # --- checkpoint
    def spec(self, module: nn.Module) -> dict[str, Any]:
        """JSON-able constructor arguments of ``module`` beyond in/out features and bias."""
        raise NotImplementedError

    def empty(self, in_features: int, out_features: int, bias: bool, spec: dict[str, Any]) -> nn.Module:
        """An empty module of the spec's shape, whose state the checkpoint's tensors then fill."""
        raise NotImplementedError

    # --- accounting
    def stored_bytes(self, module: nn.Module) -> int:
        """Bytes the checkpoint stores for the module (its state tensors, each in its own dtype)."""
        return sum(t.numel() * t.element_size() for t in module.state_dict().values())

    def parameters(self, module: nn.Module) -> int:
        """The parameters the module represents (packed codes count one per weight)."""
        return sum(t.numel() for t in module.state_dict().values())

    def macs_per_token(self, module: nn.Module) -> int:
        return module.in_features * module.out_features

    # --- export
    def no_export_reason(self, entry_or_module: PlanEntry | nn.Module) -> str | None:
        """None if layers of this entry (or this module) export to ONNX; else why not."""
        return None

    def export_module(self, module: nn.Module, name: str, dtype: torch.dtype) -> nn.Module:
        """The module traced in its place by ``torch.onnx.export`` (custom ops or plain torch)."""
        raise NoExport(f"layer {name}: {self.no_export_reason(module) or f'kind {self.name} has no ONNX export'}")

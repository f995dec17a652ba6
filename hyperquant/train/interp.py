"""Residual interpolation between a frozen dense linear and its PHM replacement, and alpha schedules."""

from __future__ import annotations

import contextlib
import gc
import math
from collections.abc import Iterator

import torch
from torch import nn

from hyperquant.convert import block_index, linear_bias, linear_weight
from hyperquant.phm.functional import phm_forward
from hyperquant.phm.layer import PHMLinear
from hyperquant.train.fakequant import FakeQuantizer


class InterpolatedLinear(nn.Module):
    """y = (1 - alpha) dense(x) + alpha phm(x), with the dense linear frozen.

    alpha = 0 returns dense(x) exactly (the PHM branch is not run); once the dense branch is dropped
    (`drop_dense`, Stage B) the layer is phm(x); with ``keep_teacher`` the frozen dense branch stays for
    the distillation teacher only (`fixed_alpha(model, 0)` runs it; the student never does). While both
    branches run, the reconstruction error ||phm(x) - dense(x)||^2 of the last forward is kept in
    ``last_recon`` (when ``track_recon``).
    A_cat goes through ``quantizer`` (fake quantization for QAT) whenever it is enabled.
    """

    def __init__(self, dense: nn.Module, phm: PHMLinear, quantizer: FakeQuantizer | None = None,
                 layer_index: int = 0) -> None:
        super().__init__()
        for p in dense.parameters():
            p.requires_grad_(False)
        self.dense: nn.Module | None = dense
        self.phm = phm
        self.quantizer = quantizer
        self.layer_index = layer_index
        self.in_features, self.out_features = phm.in_features, phm.out_features
        self.alpha = 0.0
        self.track_recon = False
        self.recon_relative = True
        self.last_recon: torch.Tensor | None = None
        self.teacher_only = False  # Stage B with the dense teacher: dense kept, used only at alpha = 0

    def phm_a_cat(self) -> torch.Tensor:
        a_cat = self.phm.a_cat
        return a_cat if self.quantizer is None else self.quantizer(a_cat)

    def phm_out(self, x: torch.Tensor) -> torch.Tensor:
        return phm_forward(x, self.phm.bases, self.phm_a_cat(), self.phm.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = float(self.alpha)
        self.last_recon = None
        if self.dense is None or (self.teacher_only and alpha > 0.0):
            return self.phm_out(x)
        if self.teacher_only or (alpha <= 0.0 and not (self.track_recon and self.training)):
            return self.dense(x)
        dense_y = self.dense(x)
        phm_y = self.phm_out(x)
        if self.track_recon and self.training:
            diff = (phm_y - dense_y).float().pow(2).mean()
            self.last_recon = diff / dense_y.detach().float().pow(2).mean().clamp_min(1e-12) \
                if self.recon_relative else diff
        if alpha >= 1.0:
            return phm_y
        # At alpha = 0 the PHM branch still feeds the output with weight 0 (the value is dense_y exactly):
        # DDP's unused-parameter search walks back from the outputs, and factors reached only through the
        # recon loss would be marked ready twice (a staggered fade has such layers in every early step).
        return dense_y + alpha * (phm_y - dense_y)

    def drop_dense(self, keep_teacher: bool = False) -> None:
        if keep_teacher and self.dense is not None:
            self.teacher_only = True
        else:
            self.dense, self.teacher_only = None, False
        self.last_recon = None

    @property
    def student_dense(self) -> bool:
        """Whether the student still runs the dense branch (Stage A)."""
        return self.dense is not None and not self.teacher_only

    def extra_repr(self) -> str:
        state = "dropped" if self.dense is None else "teacher only" if self.teacher_only else "kept"
        return f"alpha={float(self.alpha):.3f}, dense={state}"


def interpolated_layers(model: nn.Module) -> dict[str, InterpolatedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, InterpolatedLinear)}


def wrap_linear(dense: nn.Module, n: int, num_bases: int, input_cov: torch.Tensor | None, ridge: float,
                quant: dict | None, layer_index: int, phm: PHMLinear | None = None) -> InterpolatedLinear:
    """The wrapper of one dense linear: PHM initialized by projection (activation-aware with ``input_cov``),
    or the given already fitted ``phm``."""
    if phm is None:
        weight = linear_weight(dense).float()
        phm = PHMLinear.from_dense(weight, n=n, num_bases=num_bases, bias=linear_bias(dense),
                                   input_cov=input_cov, ridge=ridge)
    quantizer = None
    if quant is not None:
        a = phm.a_cat
        quantizer = FakeQuantizer(a.shape[0], a.shape[1], **quant)
    return InterpolatedLinear(dense, phm.to(dense.weight.device), quantizer, layer_index)


def layer_alpha(step: float, layer: int, num_layers: int, fade_steps: int, schedule: str = "linear",
                stagger: float = 0.0) -> float:
    """alpha of layer ``layer`` (0 = bottom) at ``step``: 0 -> 1 over its window inside [0, fade_steps].

    With ``stagger`` s, layer l's window starts at s * fade * l / (L - 1) and lasts (1 - s) * fade, so
    lower layers switch to PHM first and every layer reaches 1 at ``fade_steps``."""
    if fade_steps <= 0:
        return 1.0
    start = stagger * fade_steps * (layer / (num_layers - 1) if num_layers > 1 else 0.0)
    length = (1.0 - stagger) * fade_steps
    t = min(max((step - start) / length, 0.0), 1.0)
    if schedule == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * t))
    return t


def block_of(name: str) -> int:
    try:
        return block_index(name)[1]
    except Exception:  # noqa: BLE001 - a module outside a block list counts as block 0
        return 0


def set_alphas(model: nn.Module, step: float, fade_steps: int, schedule: str, stagger: float) -> float:
    """Set every layer's alpha for ``step``; return the mean alpha."""
    layers = interpolated_layers(model)
    if not layers:
        return 1.0
    num_blocks = max(m.layer_index for m in layers.values()) + 1
    alphas = []
    for m in layers.values():
        m.alpha = 1.0 if not m.student_dense else layer_alpha(step, m.layer_index, num_blocks, fade_steps, schedule, stagger)
        alphas.append(m.alpha)
    return sum(alphas) / len(alphas)


@contextlib.contextmanager
def fixed_alpha(model: nn.Module, alpha: float) -> Iterator[None]:
    """Temporarily run every interpolated layer at ``alpha`` (e.g. 0 = the dense teacher)."""
    layers = list(interpolated_layers(model).values())
    saved = [(m.alpha, m.track_recon) for m in layers]
    try:
        for m in layers:
            m.alpha, m.track_recon = alpha, False
        yield
    finally:
        for m, (a, t) in zip(layers, saved):
            m.alpha, m.track_recon = a, t


def drop_dense(model: nn.Module, keep_teacher: bool = False) -> int:
    """Stage B: the student stops running the dense branches; they are removed for good, or with
    ``keep_teacher`` kept frozen for the teacher's forward (already in memory since Stage A: no second
    copy of the model is ever made). Returns the number of freed parameters."""
    freed = 0
    for m in interpolated_layers(model).values():
        if m.dense is not None:
            if not keep_teacher:
                freed += sum(p.numel() for p in m.dense.parameters())
            m.drop_dense(keep_teacher)
            m.alpha = 1.0
    gc.collect()
    return freed


def has_dense(model: nn.Module) -> bool:
    """Whether the student still runs dense branches (Stage A)."""
    return any(m.student_dense for m in interpolated_layers(model).values())


def has_teacher_dense(model: nn.Module) -> bool:
    """Whether every layer keeps its frozen dense branch, so alpha = 0 gives the original model."""
    layers = interpolated_layers(model).values()
    return bool(layers) and all(m.dense is not None for m in layers)


def reconstruction_loss(model: nn.Module) -> torch.Tensor | None:
    """Mean over PHM layers of the reconstruction error recorded in the last forward."""
    values = [m.last_recon for m in interpolated_layers(model).values() if m.last_recon is not None]
    return torch.stack(values).mean() if values else None

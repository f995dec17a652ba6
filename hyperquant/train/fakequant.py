"""Fake quantization of A_cat for QAT: the same group-wise grid as `rtn_quantize`, straight-through gradients.

Plain mode: forward = RTN-dequantized weight (scales and zeros from `group_qparams`, recomputed each step),
backward = identity (the straight-through estimator). Learned-scale mode (LSQ-like): one scale per
(row, group), initialized from `group_qparams` when QAT starts, zero points fixed then; rounding uses a
straight-through estimator, so both the weights (inside the clipping range) and the scales get gradients.
"""

from __future__ import annotations

import torch
from torch import nn

from hyperquant.quant.qtensor import QuantizedWeight
from hyperquant.quant.rtn import group_qparams, nonzero_scale, rtn_quantize


def _groups(cols: int, group_size: int) -> list[slice]:
    return [slice(g, min(g + group_size, cols)) for g in range(0, cols, group_size)]


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = False) -> torch.Tensor:
    """RTN-dequantized ``w`` (rows, cols) in the forward, identity gradient in the backward."""
    with torch.no_grad():
        deq = rtn_quantize(w, bits, group_size, symmetric).dequantize(torch.float32).to(w.dtype)
    return w + (deq - w).detach()


class FakeQuantizer(nn.Module):
    """Fake-quantizes one (rows, cols) matrix; ``enabled`` is off until QAT starts."""

    def __init__(self, rows: int, cols: int, bits: int, group_size: int, symmetric: bool = False,
                 learn_scales: bool = False) -> None:
        super().__init__()
        self.rows, self.cols, self.bits, self.group_size = rows, cols, bits, group_size
        self.symmetric, self.learn_scales = symmetric, learn_scales
        groups = len(_groups(cols, group_size))
        # the buffer is the checkpointed state; the forward reads a Python copy of it (reading a GPU
        # tensor every step would synchronize the device)
        self.register_buffer("enabled", torch.zeros((), dtype=torch.bool))
        self._on = False
        self._register_load_state_dict_pre_hook(self._read_enabled)
        if learn_scales:
            self.scales = nn.Parameter(torch.ones(rows, groups))
            self.register_buffer("zeros", torch.zeros(rows, groups))

    def _read_enabled(self, state_dict, prefix, *args) -> None:
        if prefix + "enabled" in state_dict:
            self._on = bool(state_dict[prefix + "enabled"])

    @property
    def is_enabled(self) -> bool:
        return self._on

    @torch.no_grad()
    def enable(self, w: torch.Tensor) -> None:
        """Switch fake quantization on; with learned scales, initialize them (and fix zeros) from ``w``."""
        if self.learn_scales:
            from hyperquant.train.sharding import copy_full_

            scales, zeros = torch.empty_like(self.zeros, dtype=self.scales.dtype), self.zeros
            for g, sl in enumerate(_groups(self.cols, self.group_size)):
                scale, zero = group_qparams(w[:, sl].float(), self.bits, self.symmetric)
                scales[:, g] = scale
                zeros[:, g] = zero
            copy_full_(self.scales, scales)  # under FSDP the parameter is this process's shard
        self.enabled.fill_(True)
        self._on = True

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self._on:
            return w
        if not self.learn_scales:
            return fake_quantize(w, self.bits, self.group_size, self.symmetric)
        maxq = 2**self.bits - 1
        parts = []
        for g, sl in enumerate(_groups(self.cols, self.group_size)):
            scale = nonzero_scale(self.scales[:, g : g + 1])  # symmetric grids have signed scales
            # the fp16 value the export stores, with a straight-through gradient: training computes exactly
            # the grid the checkpoint will have (fp32 scales flipped 0.036 % of the codes at export)
            scale = scale + (nonzero_scale(scale.to(torch.float16).float()) - scale).detach()
            zero = self.zeros[:, g : g + 1]
            q = torch.clamp(round_ste(w[:, sl] / scale) + zero, 0, maxq)
            parts.append((q - zero) * scale)
        return torch.cat(parts, dim=1)

    @torch.no_grad()
    def quantized(self, w: torch.Tensor) -> QuantizedWeight:
        """The export of ``w`` on this quantizer's grid: with learned scales their fp16 rounding, else RTN
        (whose dequantization is exactly what the plain fake-quant forward computed)."""
        if not self.learn_scales:
            return rtn_quantize(w, self.bits, self.group_size, self.symmetric)
        w = w.detach().float()
        maxq = 2**self.bits - 1
        groups = _groups(self.cols, self.group_size)
        codes = torch.empty(self.rows, self.cols, dtype=torch.uint8, device=w.device)
        scales = nonzero_scale(nonzero_scale(self.scales.detach().float()).to(torch.float16).float())
        for g, sl in enumerate(groups):
            q = torch.clamp(torch.round(w[:, sl] / scales[:, g : g + 1]) + self.zeros[:, g : g + 1], 0, maxq)
            codes[:, sl] = q.to(torch.uint8)
        return QuantizedWeight(codes, scales, self.zeros.detach().to(torch.uint8), self.bits,
                               self.group_size, self.symmetric)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, group_size={self.group_size}, learn_scales={self.learn_scales}"

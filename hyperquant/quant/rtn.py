"""Round-to-nearest group-wise quantization (pure math)."""

from __future__ import annotations

import torch

from hyperquant.quant.qtensor import QuantizedWeight


def group_qparams(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for each row of ``w`` (rows, group_cols) -> (rows,), (rows,).

    Asymmetric: the grid spans [min(w, 0), max(w, 0)] so zero is exact. Symmetric: GPTQ's convention,
    zero = 2^(bits-1) and scale = 2 max|w| / (2^bits - 1). Scales are rounded to float16 first so the
    stored checkpoint reproduces them exactly.
    """
    maxq = 2**bits - 1
    if symmetric:
        amax = w.abs().amax(dim=1)
        scale = 2 * amax / maxq
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        lo = w.amin(dim=1).clamp(max=0)
        hi = w.amax(dim=1).clamp(min=0)
        scale = (hi - lo) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = scale.to(torch.float16).float().clamp_min(2.0**-24)  # fp16-exact, never zero
    if not symmetric:
        zero = torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes for columns ``w`` (rows, m) with per-row scale/zero (rows,) or (rows, 1)."""
    scale, zero = scale.reshape(-1, 1), zero.reshape(-1, 1)
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q - zero.reshape(-1, 1)) * scale.reshape(-1, 1)


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool = False) -> QuantizedWeight:
    """Group-wise RTN along the input dimension; the last group may be partial."""
    w = weight.detach().float()
    rows, cols = w.shape
    groups = -(-cols // group_size)
    codes = torch.empty(rows, cols, dtype=torch.uint8)
    scales = torch.empty(rows, groups)
    zeros = torch.empty(rows, groups, dtype=torch.uint8)
    for g in range(groups):
        sl = slice(g * group_size, min((g + 1) * group_size, cols))
        scale, zero = group_qparams(w[:, sl], bits, symmetric)
        codes[:, sl] = quantize_codes(w[:, sl], scale, zero, bits).to(torch.uint8)
        scales[:, g], zeros[:, g] = scale, zero.to(torch.uint8)
    return QuantizedWeight(codes, scales, zeros, bits, group_size, symmetric)

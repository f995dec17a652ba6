"""Round-to-nearest group-wise quantization (pure math)."""

from __future__ import annotations

import torch

from hyperquant.quant.qtensor import QuantizedWeight


def nonzero_scale(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` with magnitudes below fp16's smallest subnormal raised to it, keeping the sign."""
    tiny = 2.0**-24
    return torch.where(scale.abs() < tiny, torch.where(scale < 0, -tiny, tiny), scale)


def group_qparams(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for each row of ``w`` (rows, group_cols) -> (rows,), (rows,).

    Asymmetric: the grid spans [min(w, 0), max(w, 0)] so zero is exact. Symmetric: zero = 2^(bits-1) (the
    zero point MatMulNBits assumes without one), so the codes reach 2^(bits-1) steps on one side of zero
    and 2^(bits-1) - 1 on the other. The grid is sign-aware: the scale is the row's largest-magnitude
    weight divided by -2^(bits-1) (negative when that weight is positive), so the long side points at it
    and it is exactly on the grid. GPTQ's 2 max|w| / (2^bits - 1) instead clips a largest positive weight
    to 7/7.5 of its value at 4 bits and 2/3 at 2 bits, and wastes a level below -max|w|. Scales are
    rounded to float16 (magnitude rounded up for symmetric, so the extreme stays inside) so the stored
    checkpoint reproduces them exactly.
    """
    maxq = 2**bits - 1
    if symmetric:
        half = 2 ** (bits - 1)
        extreme = w.gather(1, w.abs().argmax(dim=1, keepdim=True))[:, 0]
        scale = extreme / -half
        zero = torch.full_like(scale, half)
    else:
        lo = w.amin(dim=1).clamp(max=0)
        hi = w.amax(dim=1).clamp(min=0)
        scale = (hi - lo) / maxq
    scale = torch.where(scale != 0, scale, torch.ones_like(scale))
    rounded = scale.to(torch.float16).float()
    if symmetric:  # a magnitude rounded down would clip the extreme: take the next fp16 value outwards
        away = torch.nextafter(rounded.to(torch.float16), (rounded * 2).to(torch.float16)).float()
        rounded = torch.where(rounded.abs() < scale.abs(), away, rounded)
    scale = nonzero_scale(rounded)  # fp16-exact, never zero
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
    # on the weight's device: fake quantization runs this every training step
    codes = torch.empty(rows, cols, dtype=torch.uint8, device=w.device)
    scales = torch.empty(rows, groups, device=w.device)
    zeros = torch.empty(rows, groups, dtype=torch.uint8, device=w.device)
    for g in range(groups):
        sl = slice(g * group_size, min((g + 1) * group_size, cols))
        scale, zero = group_qparams(w[:, sl], bits, symmetric)
        codes[:, sl] = quantize_codes(w[:, sl], scale, zero, bits).to(torch.uint8)
        scales[:, g], zeros[:, g] = scale, zero.to(torch.uint8)
    return QuantizedWeight(codes, scales, zeros, bits, group_size, symmetric)

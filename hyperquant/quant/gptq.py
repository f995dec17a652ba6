"""GPTQ (Frantar et al., 2022) on one weight matrix, given the Hessian of its inputs (pure math).

Minimizes tr(dW H dW^T) column by column: each column is rounded, and its error is spread over the
not-yet-quantized columns through the upper Cholesky factor of H^-1. Groups are contiguous in the
original column order (the layout MatMulNBits reads); with act_order a group's scale and zero point
are fixed when its first column is reached, from the group's current (error-compensated) values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hyperquant.errors import HyperquantError
from hyperquant.linalg import quadratic_form
from hyperquant.quant.qtensor import QuantizedWeight
from hyperquant.quant.rtn import dequantize_codes, group_qparams, quantize_codes, rtn_quantize


@dataclass
class GPTQResult:
    weight: QuantizedWeight
    damp: float  # relative damping that gave a positive-definite H
    error: float  # tr(dW H dW^T) with the undamped H
    rtn_error: float  # the same objective for RTN with the same bits and groups


class HessianNotPositiveDefinite(HyperquantError, RuntimeError):
    """A user-facing failure (too little or degenerate calibration data), reported on one line by the CLI."""


def _inverse_cholesky_upper(h: torch.Tensor, damp: float, max_tries: int) -> tuple[torch.Tensor, float]:
    mean_diag = h.diagonal().mean()
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    for _ in range(max_tries):
        chol, info = torch.linalg.cholesky_ex(h + damp * mean_diag * eye)
        if info == 0:
            hinv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if info == 0:
                return upper, damp
        damp *= 10.0  # escalate: ill-conditioned Hessians (few or collinear inputs) need more
    raise HessianNotPositiveDefinite(
        f"Hessian is not positive definite even with damping {damp / 10:g}; use more calibration tokens"
    )


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool = False,
    act_order: bool = True,
    damp: float = 0.01,
    block_size: int = 128,
    max_damp_tries: int = 10,
) -> GPTQResult:
    w_orig = weight.detach().double()
    rows, cols = w_orig.shape
    h = hessian.detach().double().clone()
    w = w_orig.clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    perm = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(cols)
    w = w[:, perm]
    h_perm = h[perm][:, perm]
    upper, used_damp = _inverse_cholesky_upper(h_perm, damp, max_damp_tries)

    groups = -(-cols // group_size)
    scales = torch.zeros(rows, groups, dtype=torch.float64)
    zeros = torch.zeros(rows, groups, dtype=torch.float64)
    have_params = torch.zeros(groups, dtype=torch.bool)
    pos_of = torch.empty(cols, dtype=torch.long)
    pos_of[perm] = torch.arange(cols)
    codes_perm = torch.zeros(rows, cols, dtype=torch.float64)

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w_blk = w[:, i1:i2].clone()
        err_blk = torch.zeros_like(w_blk)
        u_blk = upper[i1:i2, i1:i2]
        for i in range(i2 - i1):
            g = int(perm[i1 + i]) // group_size
            if not have_params[g]:
                pos = pos_of[g * group_size : min((g + 1) * group_size, cols)]
                # Current values of the group: in-block columns are up to date in w_blk; later ones
                # still miss this block's pending updates, which we apply here.
                current = torch.where(
                    (pos < i2)[None, :],
                    w_blk[:, (pos - i1).clamp(0, i2 - i1 - 1)],
                    w[:, pos] - err_blk[:, :i] @ upper[i1 : i1 + i, pos],
                )
                s, z = group_qparams(current.float(), bits, symmetric)
                scales[:, g], zeros[:, g] = s.double(), z.double()
                have_params[g] = True
            col = w_blk[:, i]
            q = quantize_codes(col[:, None], scales[:, g], zeros[:, g], bits)[:, 0]
            deq = dequantize_codes(q[:, None], scales[:, g], zeros[:, g])[:, 0]
            codes_perm[:, i1 + i] = q
            err = (col - deq) / u_blk[i, i]
            w_blk[:, i:] -= err[:, None] * u_blk[i, i:][None, :]
            err_blk[:, i] = err
        w[:, i2:] -= err_blk @ upper[i1:i2, i2:]

    codes = torch.empty_like(codes_perm)
    codes[:, perm] = codes_perm
    qw = QuantizedWeight(
        codes=codes.to(torch.uint8),
        scales=scales.float(),
        zeros=zeros.to(torch.uint8),
        bits=bits,
        group_size=group_size,
        symmetric=symmetric,
    )
    rtn = rtn_quantize(weight, bits, group_size, symmetric)
    return GPTQResult(
        weight=qw,
        damp=used_damp,
        error=quadratic_form(w_orig - qw.dequantize(torch.float64), hessian),
        rtn_error=quadratic_form(w_orig - rtn.dequantize(torch.float64), hessian),
    )

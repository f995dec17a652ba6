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
from hyperquant.linalg import ROW_CHUNK, quadratic_form
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
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
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
    row_chunk: int = ROW_CHUNK,
) -> GPTQResult:
    """GPTQ codes of ``weight`` (rows, cols) for the input Hessian ``hessian`` (cols, cols).

    Each row's codes depend only on that row and H, so rows are processed ``row_chunk`` at a time with
    the one Cholesky factor: the float64 working copies are of one slice, not of the whole matrix (a
    large LM head's is hundreds of MB per copy)."""
    rows, cols = weight.shape
    h = hessian.detach().double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    perm = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(cols, device=h.device)
    upper, used_damp = _inverse_cholesky_upper(h[perm][:, perm], damp, max_damp_tries)
    parts, error, rtn_error = [], 0.0, 0.0
    for r0 in range(0, rows, row_chunk):
        w_rows = weight.detach()[r0 : r0 + row_chunk]
        qw = _gptq_rows(w_rows, dead, perm, upper, bits, group_size, symmetric, block_size)
        rtn = rtn_quantize(w_rows, bits, group_size, symmetric)
        error += quadratic_form(w_rows, hessian, minus=qw.dequantize(torch.float64))
        rtn_error += quadratic_form(w_rows, hessian, minus=rtn.dequantize(torch.float64))
        parts.append(qw)
    qw = parts[0] if len(parts) == 1 else QuantizedWeight(
        codes=torch.cat([q.codes for q in parts]), scales=torch.cat([q.scales for q in parts]),
        zeros=torch.cat([q.zeros for q in parts]), bits=bits, group_size=group_size, symmetric=symmetric)
    return GPTQResult(weight=qw, damp=used_damp, error=error, rtn_error=rtn_error)


def _gptq_rows(weight: torch.Tensor, dead: torch.Tensor, perm: torch.Tensor, upper: torch.Tensor, bits: int,
               group_size: int, symmetric: bool, block_size: int) -> QuantizedWeight:
    """The column-by-column GPTQ sweep over some rows, with the permuted H^-1's upper Cholesky factor."""
    w = weight.double().clone()
    rows, cols = w.shape
    w[:, dead] = 0.0
    w = w[:, perm]

    groups = -(-cols // group_size)
    on = {"device": w.device}  # on the data's device (a GPU's, when the weight and Hessian are there)
    scales = torch.zeros(rows, groups, dtype=torch.float64, **on)
    zeros = torch.zeros(rows, groups, dtype=torch.float64, **on)
    have_params = [False] * groups  # a Python list: checking a device tensor would sync every column
    pos_of = torch.empty(cols, dtype=torch.long, **on)
    pos_of[perm] = torch.arange(cols, **on)
    codes_perm = torch.zeros(rows, cols, dtype=torch.uint8, **on)  # codes are 0..2^bits-1: exact
    perm_list = perm.tolist()

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w_blk = w[:, i1:i2].clone()
        err_blk = torch.zeros_like(w_blk)
        u_blk = upper[i1:i2, i1:i2]
        for i in range(i2 - i1):
            g = perm_list[i1 + i] // group_size
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
    return QuantizedWeight(codes=codes, scales=scales.float(), zeros=zeros.to(torch.uint8), bits=bits,
                           group_size=group_size, symmetric=symmetric)

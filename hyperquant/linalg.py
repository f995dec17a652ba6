"""Small float64 helpers shared by the projection and quantization math."""

from __future__ import annotations

import torch

ROW_CHUNK = 4096  # rows per slice for the float64 work on large matrices (the LM head)


def quadratic_form(weight: torch.Tensor, hessian: torch.Tensor, minus: torch.Tensor | None = None) -> float:
    """tr(W H W^T), with W = ``weight`` - ``minus`` when given. With H = sum_t x_t x_t^T this is
    sum_t ||W x_t||^2, so for W = dW it is the output error the GPTQ and activation-aware objectives
    minimize. Summed over slices of rows, so that the float64 copies are of a slice (an LM head's whole
    matrix in float64 is hundreds of MB per copy)."""
    h = hessian.double()
    total = 0.0
    for r0 in range(0, weight.shape[0], ROW_CHUNK):
        w = weight.detach()[r0 : r0 + ROW_CHUNK].double()
        if minus is not None:
            w = w - minus.detach()[r0 : r0 + ROW_CHUNK].double()
        total += float(torch.einsum("oi,ij,oj->", w, h, w))
    return total

"""Small float64 helpers shared by the projection and quantization math."""

from __future__ import annotations

import torch


def quadratic_form(weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(W H W^T). With H = sum_t x_t x_t^T this is sum_t ||W x_t||^2, so for W = dW it is the
    output error the GPTQ and activation-aware objectives minimize."""
    w = weight.detach().double()
    return float(torch.einsum("oi,ij,oj->", w, hessian.double(), w))

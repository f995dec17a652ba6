"""Per-output-channel scale fitted in closed form on calibration inputs (pure math, float64 inside)."""

from __future__ import annotations

import torch


def diag_scale(weight: torch.Tensor, approx: torch.Tensor, input_cov: torch.Tensor) -> torch.Tensor:
    """s (out,) minimizing sum_t (w_i . x_t - s_i w'_i . x_t)^2 for every row i, with C = sum_t x_t x_t^T:

        s_i = (w_i^T C w'_i) / (w'_i^T C w'_i)

    Rows whose approximation carries no output energy (w'_i^T C w'_i = 0) keep s_i = 1. The result is
    rounded to float16, the stored precision; since 1 is a float16 value, rounding to nearest never
    makes a row's calibrated error larger than with s_i = 1.
    """
    c = input_cov.detach().double().to(weight.device)
    w, a = weight.detach().double(), approx.detach().double()
    ac = a @ c
    num = (ac * w).sum(dim=1)
    den = (ac * a).sum(dim=1)
    s = torch.where(den > 0, num / den.clamp_min(1e-300), torch.ones_like(num))
    s = torch.where(torch.isfinite(s), s, torch.ones_like(s))
    limit = torch.finfo(torch.float16).max
    return s.clamp(-limit, limit).to(torch.float16)

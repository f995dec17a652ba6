"""Dense -> PHM initialization: closed-form projections (pure math, float64 inside).

Block convention (the one the forward uses): W = sum_b H_b kron A_b, so the block of W at block-row i,
block-column j is W[i*out/n:(i+1)*out/n, j*in/n:(j+1)*in/n] = sum_b H_b[i, j] A_b.
"""

from __future__ import annotations

import torch

from hyperquant.linalg import quadratic_form
from hyperquant.phm.functional import cat_to_factors, kron_weight


def _blocks(weight: torch.Tensor, n: int) -> torch.Tensor:
    """(out, in) -> (n*n, out/n * in/n): row (i, j) is the flattened block W_ij."""
    out_f, in_f = weight.shape
    w4 = weight.reshape(n, out_f // n, n, in_f // n)
    return w4.permute(0, 2, 1, 3).reshape(n * n, -1)


def project_fixed(weight: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
    """Least-squares factors for fixed bases: argmin_A ||W - sum_b H_b kron A_b||_F.

    The problem separates over block entries into one n^2 x B system G A = W_blocks with
    G[(i, j), b] = H_b[i, j].
    """
    num_bases, n, _ = bases.shape
    out_f, in_f = weight.shape
    g = bases.double().permute(1, 2, 0).reshape(n * n, num_bases)
    sol = torch.linalg.lstsq(g, _blocks(weight.double(), n)).solution
    return sol.reshape(num_bases, out_f // n, in_f // n).to(weight.dtype)


def kronecker_svd(weight: torch.Tensor, n: int, num_bases: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimal rank-B Kronecker approximation (Van Loan-Pitsianis): learned bases and factors.

    Rearranging W into R (rows = flattened blocks) turns sum_b H_b kron A_b into the rank-B matrix
    sum_b vec(H_b) vec(A_b)^T, so the truncated SVD of R is optimal. Bases are scaled to
    ||H_b||_F = sqrt(n), like the fixed ones, and the factors carry the magnitude.
    """
    out_f, in_f = weight.shape
    r = _blocks(weight.double(), n)
    u, s, vh = torch.linalg.svd(r, full_matrices=False)
    k = min(num_bases, s.numel())
    scale = n**0.5
    bases = (u[:, :k] * scale).T.reshape(k, n, n)
    factors = (s[:k, None] / scale * vh[:k]).reshape(k, out_f // n, in_f // n)
    if k < num_bases:  # rank-deficient R: pad with zero factors on orthogonal bases
        extra = torch.zeros(num_bases - k, n, n, dtype=torch.float64, device=factors.device)
        bases = torch.cat([bases, extra])
        factors = torch.cat([factors, torch.zeros(num_bases - k, out_f // n, in_f // n, dtype=torch.float64, device=factors.device)])
    return bases.to(weight.dtype), factors.to(weight.dtype)


def mixed_hessian(bases: torch.Tensor, input_cov: torch.Tensor) -> torch.Tensor:
    """Z^T Z = sum_i M_i S M_i^T for S = sum_t x_t x_t^T: the second moment of the mixed inputs z.

    This is the Hessian that GPTQ needs for A_cat, derived from the input covariance alone.
    """
    num_bases, n, _ = bases.shape
    in_f = input_cov.shape[0]
    s4 = input_cov.double().reshape(n, in_f // n, n, in_f // n)
    h = bases.double()
    hz = torch.einsum("bij,cik,jqkr->bqcr", h, h, s4)
    width = num_bases * in_f // n
    return hz.reshape(width, width)


def project_activation_aware(
    weight: torch.Tensor,
    bases: torch.Tensor,
    input_cov: torch.Tensor,
    ridge: float = 1e-4,
    cross_cov: torch.Tensor | None = None,
) -> torch.Tensor:
    """Factors minimizing the layer's output error on calibration inputs, sum_t ||W x_t - phm(x_t)||^2.

    With z_{t,i} the mixed inputs and y_{t,i} = W_i x_t the dense outputs of block-row i, this is
    ridge least squares A_cat = (sum y z^T)(Z^T Z + lam I)^-1, and every sum reduces to S = sum x x^T.
    ``ridge`` is relative to the mean diagonal of Z^T Z.

    ``cross_cov`` = sum_t x_t xo_t^T changes the target to W xo_t, the output the *original* model
    computes from its own input xo_t at the same token, so that the fit also undoes the errors that
    earlier compressed layers left in x_t.
    """
    num_bases, n, _ = bases.shape
    out_f, in_f = weight.shape
    hz = mixed_hessian(bases, input_cov)
    # sum_t z_{t,i} y_{t,i}^T = sum_i M_i C W_i^T with C = sum_t x_t (target input)_t^T; C W^T has
    # blocks [j, q, i, p].
    target_cov = input_cov if cross_cov is None else cross_cov
    sw = (target_cov.double() @ weight.double().T).reshape(n, in_f // n, n, out_f // n)
    zy = torch.einsum("bij,jqip->bqp", bases.double(), sw).reshape(num_bases * in_f // n, out_f // n)
    lam = ridge * hz.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(hz.shape[0], dtype=hz.dtype, device=hz.device)
    a_cat_t = torch.linalg.solve(hz + lam * eye, zy)
    return cat_to_factors(a_cat_t.T, num_bases).to(weight.dtype).contiguous()


def output_error(weight: torch.Tensor, approx: torch.Tensor, input_cov: torch.Tensor) -> float:
    """sum_t ||(W - W') x_t||^2 = tr(dW S dW^T)."""
    return quadratic_form(weight, input_cov, minus=approx)


def relative_output_error(weight: torch.Tensor, approx: torch.Tensor, input_cov: torch.Tensor) -> float:
    # An error is never negative; fp32 per-batch sums make S slightly indefinite, so an error below their
    # precision can come out at -1e-8 (seen with 8 calibration tokens): that reads as 0.
    return max(output_error(weight, approx, input_cov), 0.0) / max(quadratic_form(weight, input_cov), 1e-30)


def relative_error_to_original(
    weight: torch.Tensor, approx: torch.Tensor, input_cov: torch.Tensor, cross_cov: torch.Tensor,
    original_cov: torch.Tensor,
) -> float:
    """sum_t ||W xo_t - W' x_t||^2 / sum_t ||W xo_t||^2 from the three second moments of (x, xo)."""
    w, a = weight.double(), approx.double()
    reference = quadratic_form(w, original_cov)
    cross = float(torch.einsum("oi,ij,oj->", a, cross_cov.double(), w))
    err = reference - 2 * cross + quadratic_form(a, input_cov)
    return err / max(reference, 1e-30)


def relative_weight_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    return float((weight.double() - approx.double()).norm() ** 2 / weight.double().norm().clamp_min(1e-30) ** 2)


__all__ = [
    "kron_weight",
    "kronecker_svd",
    "mixed_hessian",
    "output_error",
    "project_activation_aware",
    "project_fixed",
    "quadratic_form",
    "relative_output_error",
    "relative_weight_error",
]


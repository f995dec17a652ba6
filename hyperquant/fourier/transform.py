"""Fourier-domain low-rank factorization of a real weight (pure math).

F = FFT2(W) with norm="ortho" is a unitary change of basis on both sides of W (F = D_out W D_in with
unitary DFT matrices), so F has exactly W's singular values. The rank-r truncation of F is therefore
D_out W_r D_in with W_r the rank-r SVD truncation of W: in float, the Fourier domain changes nothing
about the truncation error. It changes what the factors look like (complex, spread evenly over
frequencies), which is what PolarQuant then quantizes.
"""

from __future__ import annotations

import torch


def _complex_of(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def fourier_lowrank(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors of FFT2(W): F ~= P Q^H with P (out, r) and Q (in, r) complex.

    sqrt of the singular values is folded into both sides, so P and Q carry equal energy per component.
    Computed in float64; returned in the complex dtype matching ``weight`` (complex128 for float64,
    else complex64).
    """
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    if not 1 <= rank <= min(out_f, in_f):
        raise ValueError(f"rank={rank} must be in [1, min(out, in) = {min(out_f, in_f)}]")
    f = torch.fft.fft2(weight.detach().to(torch.float64), norm="ortho")
    u, s, vh = torch.linalg.svd(f, full_matrices=False)
    root = s[:rank].sqrt().to(f.dtype)
    p = u[:, :rank] * root
    q = vh[:rank].conj().T * root
    dtype = _complex_of(weight.dtype)
    return p.to(dtype), q.to(dtype)


def reconstruct(p: torch.Tensor, q: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """W' = real(IFFT2(P Q^H)), (out, in), in the real dtype of ``p`` (float64 for complex128)."""
    if p.shape[0] != out_features or q.shape[0] != in_features or p.shape[1] != q.shape[1]:
        raise ValueError(f"factor shapes {tuple(p.shape)}, {tuple(q.shape)} do not give a "
                         f"({out_features}, {in_features}) weight")
    w = torch.fft.ifft2(p @ q.conj().T, norm="ortho").real
    return w.contiguous()


def rank_for_fraction(out_features: int, in_features: int, fraction: float) -> int:
    """Rank whose factors hold ``fraction`` of the dense layer's real parameter count.

    A complex factor entry is stored as two reals (magnitude and phase), so the factors hold
    2 r (out + in) values: r = round(fraction * out * in / (2 (out + in))), at least 1 and at most
    min(out, in).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction} must be in (0, 1]")
    r = round(fraction * out_features * in_features / (2 * (out_features + in_features)))
    return int(min(max(1, r), out_features, in_features))

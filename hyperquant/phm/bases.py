"""Fixed n x n bases for PHM layers.

For n = 2 the four bases are the hypercomplex units used in the paper:
I = identity, J = [[0,-1],[1,0]] (complex unit), K = [[0,1],[1,0]] (hyperbolic unit), L = diag(1,-1).
They are an orthogonal basis of 2x2 matrices, so B = 4 spans every dense matrix.

For general n we use the real "shift x sign" family: S^s @ D_t, where S is the cyclic shift and D_t the
diagonal of row t of a Hadamard matrix (n a power of two) or of an orthonormal DCT scaled by sqrt(n).
All n^2 of them are Frobenius-orthogonal with norm^2 = n, and the first one is always the identity.
"""

from __future__ import annotations

import math

import torch

_N2_BASES = torch.tensor(
    [
        [[1.0, 0.0], [0.0, 1.0]],  # I
        [[0.0, -1.0], [1.0, 0.0]],  # J
        [[0.0, 1.0], [1.0, 0.0]],  # K
        [[1.0, 0.0], [0.0, -1.0]],  # L
    ],
    dtype=torch.float64,
)


def _sign_rows(n: int) -> torch.Tensor:
    """n x n matrix whose rows are orthogonal with squared norm n; row 0 is all ones."""
    if n & (n - 1) == 0:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < n:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        return h
    k = torch.arange(n, dtype=torch.float64)
    dct = torch.cos(math.pi * (k[None, :] + 0.5) * k[:, None] / n)
    dct = dct / dct.norm(dim=1, keepdim=True)
    return dct * math.sqrt(n)


def fixed_bases(n: int, num_bases: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The first ``num_bases`` fixed n x n bases, shape (num_bases, n, n)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 1 <= num_bases <= n * n:
        raise ValueError(f"num_bases must be in [1, n^2 = {n * n}] for n = {n}, got {num_bases}")
    if n == 2:
        return _N2_BASES[:num_bases].to(dtype)
    signs = _sign_rows(n)
    shift = torch.roll(torch.eye(n, dtype=torch.float64), 1, dims=0)
    out = []
    # Order: identity first, then one new shift per basis so that small B already mixes all chunks.
    for t in range(n):
        for s in range(n):
            out.append(torch.linalg.matrix_power(shift, s) @ torch.diag(signs[t]))
    return torch.stack(out[:num_bases]).to(dtype)

"""The PHM forward as plain tensor math, shared by the float and the quantized PHM layers.

W = sum_b H_b kron A_b (out x in) applied to x equals one linear map A_cat = [A_1 | ... | A_B]
(out/n x B*in/n) applied to n mixed vectors per token z_i = [sum_j H_b[i, j] x_j]_b.
"""

from __future__ import annotations

import torch


def mix_inputs(x: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
    """(..., in) -> (..., n, B*in/n): the mixed vectors z_i that A_cat multiplies."""
    num_bases, n, _ = bases.shape
    chunks = x.reshape(*x.shape[:-1], n, x.shape[-1] // n)
    z = torch.einsum("bij,...jq->...ibq", bases.to(x.dtype), chunks)
    return z.reshape(*x.shape[:-1], n, num_bases * chunks.shape[-1])


def factors_to_cat(factors: torch.Tensor) -> torch.Tensor:
    """(B, out/n, in/n) -> A_cat (out/n, B*in/n)."""
    num_bases, rows, cols = factors.shape
    return factors.permute(1, 0, 2).reshape(rows, num_bases * cols)


def cat_to_factors(a_cat: torch.Tensor, num_bases: int) -> torch.Tensor:
    """A_cat (out/n, B*in/n) -> (B, out/n, in/n)."""
    rows, width = a_cat.shape
    return a_cat.reshape(rows, num_bases, width // num_bases).permute(1, 0, 2)


def phm_forward(
    x: torch.Tensor, bases: torch.Tensor, a_cat: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    z = mix_inputs(x, bases)
    y = torch.nn.functional.linear(z, a_cat)
    y = y.reshape(*x.shape[:-1], -1)
    return y if bias is None else y + bias


def kron_weight(bases: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Materialize sum_b H_b kron A_b (out x in). For tests, initialization and error accounting only."""
    return torch.einsum("bij,bpq->ipjq", bases, factors).reshape(
        bases.shape[1] * factors.shape[1], bases.shape[2] * factors.shape[2]
    )


def phm_macs(in_features: int, out_features: int, n: int, num_bases: int) -> dict[str, int]:
    """Multiply-adds per token: the A_cat matmul (B*in*out/n) plus the input mixing (n*B*in)."""
    matmul = num_bases * in_features * out_features // n
    mixing = n * num_bases * in_features
    return {"matmul": matmul, "mixing": mixing, "total": matmul + mixing}

"""Bit packing in the layout onnxruntime's com.microsoft.MatMulNBits reads.

B: uint8 (N, k_blocks, block_size * bits / 8), codes of consecutive K packed least-significant bits
first (for 4 bits: element 0 in the low nibble). Zero points: uint8 (N, ceil(k_blocks * bits / 8)),
packed the same way along the blocks of a row. K is padded to a whole number of blocks.
"""

from __future__ import annotations

import math

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def _pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., m) integer codes with m * bits divisible by 8 -> (..., m * bits / 8) uint8, LSB first."""
    shifts = torch.arange(bits, dtype=torch.int32, device=codes.device)
    bit_planes = (codes.to(torch.int32).unsqueeze(-1) >> shifts) & 1  # (..., m, bits)
    flat = bit_planes.reshape(*codes.shape[:-1], -1, 8)
    return (flat << torch.arange(8, dtype=torch.int32, device=codes.device)).sum(-1).to(torch.uint8)


def _unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of _pack_bits; returns (..., count) uint8 codes."""
    bit_planes = (packed.to(torch.int32).unsqueeze(-1) >> torch.arange(8, dtype=torch.int32, device=packed.device)) & 1
    flat = bit_planes.reshape(*packed.shape[:-1], -1, bits)[..., :count, :]
    return (flat << torch.arange(bits, dtype=torch.int32, device=packed.device)).sum(-1).to(torch.uint8)


def pack_codes(codes: torch.Tensor, bits: int, block_size: int) -> torch.Tensor:
    """(N, K) codes -> (N, k_blocks, block_size * bits / 8) uint8; padding codes are 0."""
    n_rows, k = codes.shape
    k_blocks = -(-k // block_size)
    padded = torch.zeros(n_rows, k_blocks * block_size, dtype=torch.uint8, device=codes.device)
    padded[:, :k] = codes
    return _pack_bits(padded.reshape(n_rows, k_blocks, block_size), bits)


def unpack_codes(packed: torch.Tensor, bits: int, block_size: int, k: int) -> torch.Tensor:
    n_rows, k_blocks, _ = packed.shape
    return _unpack_bits(packed, bits, block_size).reshape(n_rows, k_blocks * block_size)[:, :k]


def pack_zero_points(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """(N, k_blocks) zero points -> (N, ceil(k_blocks * bits / 8)) uint8."""
    n_rows, k_blocks = zeros.shape
    per_byte_group = 8 // math.gcd(bits, 8)  # codes per whole bytes
    padded_len = -(-k_blocks // per_byte_group) * per_byte_group
    padded = torch.zeros(n_rows, padded_len, dtype=torch.uint8, device=zeros.device)
    padded[:, :k_blocks] = zeros
    packed = _pack_bits(padded, bits)
    return packed[:, : -(-k_blocks * bits // 8)].contiguous()


def unpack_zero_points(packed: torch.Tensor, bits: int, k_blocks: int) -> torch.Tensor:
    per_byte_group = 8 // math.gcd(bits, 8)
    padded_bytes = -(-k_blocks // per_byte_group) * per_byte_group * bits // 8
    full = torch.zeros(packed.shape[0], padded_bytes, dtype=torch.uint8, device=packed.device)
    full[:, : packed.shape[1]] = packed
    return _unpack_bits(full, bits, k_blocks)

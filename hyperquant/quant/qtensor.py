"""Group-wise quantized weights: codes, fp16-exact scales and zero points, and their packed form."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hyperquant.quant.packing import pack_codes, pack_zero_points, unpack_codes, unpack_zero_points


@dataclass
class QuantizedWeight:
    """A (rows, cols) weight as integer codes in groups of ``group_size`` along cols.

    w ~= (code - zero) * scale, with scale and zero per (row, group). Scales are float32 values that
    are exactly representable in float16 (they are stored as float16).
    """

    codes: torch.Tensor  # (rows, cols) uint8
    scales: torch.Tensor  # (rows, groups) float32, fp16-exact
    zeros: torch.Tensor  # (rows, groups) uint8
    bits: int
    group_size: int
    symmetric: bool

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        rows, cols = self.codes.shape
        groups = self.scales.shape[1]
        padded = torch.zeros(rows, groups * self.group_size, dtype=torch.float32, device=self.codes.device)
        padded[:, :cols] = self.codes.float()
        grouped = padded.reshape(rows, groups, self.group_size)
        w = (grouped - self.zeros.float().unsqueeze(-1)) * self.scales.unsqueeze(-1)
        return w.reshape(rows, -1)[:, :cols].to(dtype)

    def to_packed(self) -> dict[str, torch.Tensor]:
        """Tensors to store, in MatMulNBits layout. Symmetric weights need no zero points."""
        out = {
            "qweight": pack_codes(self.codes, self.bits, self.group_size),
            "scales": self.scales.to(torch.float16),
        }
        if not self.symmetric:
            out["qzeros"] = pack_zero_points(self.zeros, self.bits)
        return out

    @classmethod
    def from_packed(
        cls, tensors: dict[str, torch.Tensor], bits: int, group_size: int, cols: int, symmetric: bool
    ) -> QuantizedWeight:
        scales = tensors["scales"].float()
        rows, groups = scales.shape
        codes = unpack_codes(tensors["qweight"], bits, group_size, cols)
        if symmetric:
            zeros = torch.full((rows, groups), 2 ** (bits - 1), dtype=torch.uint8, device=scales.device)
        else:
            zeros = unpack_zero_points(tensors["qzeros"], bits, groups)
        return cls(codes=codes, scales=scales, zeros=zeros, bits=bits, group_size=group_size, symmetric=symmetric)

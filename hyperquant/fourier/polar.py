"""PolarQuant: a complex matrix stored as group-wise quantized magnitudes and uniformly quantized phases.

For z = |z| e^{i theta}:

* magnitude: unsigned grid with zero at 0 (magnitudes are >= 0), |z| ~= code * scale, one fp16 scale
  per group of ``group_size`` consecutive entries along a row (scale = max |z| of the group / (2^b - 1));
* phase: uniform grid of 2^b_phase points -pi + k * 2 pi / 2^b_phase over [-pi, pi), no scale, so the
  phase error is at most pi / 2^b_phase (half a step, measured modulo 2 pi).

Codes are packed with the dense layers' MatMulNBits helpers (``pack_codes``, blocks = the magnitude
groups), which take every supported bit width (2, 3, 4, 8) since ``group_size`` is a power of two >= 16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hyperquant.quant.packing import SUPPORTED_BITS, pack_codes, unpack_codes


def _grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """(rows, cols) -> (rows, groups, group_size), zero-padded at the end of each row."""
    rows, cols = x.shape
    groups = -(-cols // group_size)
    padded = torch.zeros(rows, groups * group_size, dtype=x.dtype, device=x.device)
    padded[:, :cols] = x
    return padded.reshape(rows, groups, group_size)


def phase_step(phase_bits: int) -> float:
    return 2 * math.pi / 2**phase_bits


@dataclass
class PolarQuantized:
    """A complex (rows, cols) matrix as magnitude codes with per-group scales and phase codes."""

    mag_codes: torch.Tensor  # (rows, cols) uint8
    mag_scales: torch.Tensor  # (rows, groups) float32, fp16-exact
    phase_codes: torch.Tensor  # (rows, cols) uint8
    mag_bits: int
    phase_bits: int
    group_size: int = 128  # as FourierLinear's default

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.mag_codes.shape
        return rows, cols

    def magnitude(self) -> torch.Tensor:
        """Dequantized magnitudes (rows, cols), float64."""
        rows, cols = self.mag_codes.shape
        grouped = _grouped(self.mag_codes.to(torch.float64), self.group_size)
        mag = grouped * self.mag_scales.to(torch.float64).unsqueeze(-1)
        return mag.reshape(rows, -1)[:, :cols]

    def phase(self) -> torch.Tensor:
        """Dequantized phases (rows, cols) in [-pi, pi), float64."""
        return self.phase_codes.to(torch.float64) * phase_step(self.phase_bits) - math.pi

    def dequantize(self, dtype: torch.dtype = torch.complex64) -> torch.Tensor:
        return torch.polar(self.magnitude(), self.phase()).to(dtype)

    def to_packed(self) -> dict[str, torch.Tensor]:
        """{"mag": (rows, groups, gs*b/8) uint8, "phase": (rows, groups, gs*b_phase/8) uint8,
        "scales": (rows, groups) float16}."""
        return {
            "mag": pack_codes(self.mag_codes, self.mag_bits, self.group_size),
            "phase": pack_codes(self.phase_codes, self.phase_bits, self.group_size),
            "scales": self.mag_scales.to(torch.float16),
        }

    @classmethod
    def from_packed(cls, tensors: dict[str, torch.Tensor], mag_bits: int, phase_bits: int, group_size: int,
                    cols: int) -> PolarQuantized:
        return cls(
            mag_codes=unpack_codes(tensors["mag"].cpu(), mag_bits, group_size, cols),
            mag_scales=tensors["scales"].float().cpu(),
            phase_codes=unpack_codes(tensors["phase"].cpu(), phase_bits, group_size, cols),
            mag_bits=mag_bits, phase_bits=phase_bits, group_size=group_size,
        )


def polar_quantize(z: torch.Tensor, mag_bits: int, phase_bits: int, group_size: int) -> PolarQuantized:
    """Quantize complex ``z`` (rows, cols): magnitudes group-wise along rows, phases on a fixed grid."""
    if not z.is_complex() or z.ndim != 2:
        raise ValueError(f"z must be a complex (rows, cols) matrix, got {z.dtype} {tuple(z.shape)}")
    for name, b in (("mag_bits", mag_bits), ("phase_bits", phase_bits)):
        if b not in SUPPORTED_BITS:
            raise ValueError(f"{name}={b} is not supported; use one of {list(SUPPORTED_BITS)}")
    if group_size < 8 or group_size & (group_size - 1):
        raise ValueError(f"group_size={group_size} must be a power of two >= 8")
    z = z.detach().cpu().to(torch.complex128)
    rows, cols = z.shape
    maxq = 2**mag_bits - 1
    mag = _grouped(z.abs(), group_size)  # (rows, groups, gs)
    scale = mag.amax(dim=-1) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = scale.to(torch.float16).to(torch.float64).clamp_min(2.0**-24)  # fp16-exact, never zero
    mag_codes = torch.clamp(torch.round(mag / scale.unsqueeze(-1)), 0, maxq).reshape(rows, -1)[:, :cols]
    steps = 2**phase_bits
    phase_codes = torch.remainder(torch.round((z.angle() + math.pi) / phase_step(phase_bits)), steps)
    return PolarQuantized(
        mag_codes=mag_codes.to(torch.uint8).contiguous(),
        mag_scales=scale.float(),
        phase_codes=phase_codes.to(torch.uint8).contiguous(),
        mag_bits=mag_bits, phase_bits=phase_bits, group_size=group_size,
    )

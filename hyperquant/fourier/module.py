"""FourierLinear: a linear whose weight is real(IFFT2(P Q^H)), P and Q PolarQuant-ized, times a
per-output-channel scale.

The packed codes and fp16 scales are the registered buffers, so ``state_dict()`` is exactly what the
checkpoint stores. The float weight is rebuilt once, on first use, and cached (not persistent; dropped
when a state dict is loaded), as QuantLinear does.
"""

from __future__ import annotations

import torch
from torch import nn

from hyperquant.fourier.polar import PolarQuantized, polar_quantize
from hyperquant.fourier.transform import reconstruct


class FourierLinear(nn.Module):
    """nn.Linear (out, in) stored as rank-r Fourier factors P (out, r), Q (in, r), complex.

    P^T (r, out) and Q^T (r, in) are quantized with groups of ``group_size`` along the feature axis of
    each rank component (entries of one component share its singular-value scale).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bits: int, phase_bits: int | None = None,
                 group_size: int = 128, bias: bool = False) -> None:
        super().__init__()
        phase_bits = bits if phase_bits is None else phase_bits
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.bits, self.phase_bits, self.group_size = bits, phase_bits, group_size
        for side, cols in (("p", out_features), ("q", in_features)):
            groups = -(-cols // group_size)
            self.register_buffer(f"{side}_mag", torch.zeros(rank, groups, group_size * bits // 8, dtype=torch.uint8))
            self.register_buffer(f"{side}_phase",
                                 torch.zeros(rank, groups, group_size * phase_bits // 8, dtype=torch.uint8))
            self.register_buffer(f"{side}_scales", torch.ones(rank, groups, dtype=torch.float16))
        self.register_buffer("channel_scale", torch.ones(out_features, dtype=torch.float16))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self._weight: torch.Tensor | None = None
        self._register_load_state_dict_pre_hook(self._drop_cache)

    def _drop_cache(self, *args, **kwargs) -> None:
        self._weight = None

    @classmethod
    def from_factors(cls, p: torch.Tensor, q: torch.Tensor, bits: int, phase_bits: int | None = None,
                     group_size: int = 128, bias: torch.Tensor | None = None,
                     channel_scale: torch.Tensor | None = None) -> FourierLinear:
        """PolarQuant-ize float factors P (out, r) and Q (in, r) (F ~= P Q^H) into a new layer."""
        (out_f, rank), (in_f, _) = p.shape, q.shape
        layer = cls(in_f, out_f, rank, bits, phase_bits, group_size, bias=bias is not None)
        for side, factor in (("p", p), ("q", q)):
            packed = polar_quantize(factor.T, bits, layer.phase_bits, group_size).to_packed()
            getattr(layer, f"{side}_mag").copy_(packed["mag"])
            getattr(layer, f"{side}_phase").copy_(packed["phase"])
            getattr(layer, f"{side}_scales").copy_(packed["scales"])
        if channel_scale is not None:
            layer.set_channel_scale(channel_scale)
        if bias is not None:
            layer.bias.data.copy_(bias)
        return layer

    def set_channel_scale(self, scale: torch.Tensor) -> None:
        self.channel_scale.copy_(scale.to(torch.float16))
        self._weight = None

    def polar_factors(self) -> tuple[PolarQuantized, PolarQuantized]:
        """The stored P^T (r, out) and Q^T (r, in)."""
        return tuple(
            PolarQuantized.from_packed(
                {"mag": getattr(self, f"{side}_mag"), "phase": getattr(self, f"{side}_phase"),
                 "scales": getattr(self, f"{side}_scales")},
                self.bits, self.phase_bits, self.group_size, cols)
            for side, cols in (("p", self.out_features), ("q", self.in_features))
        )

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized P (out, r) and Q (in, r), complex128 on CPU."""
        pt, qt = self.polar_factors()
        return pt.dequantize(torch.complex128).T, qt.dequantize(torch.complex128).T

    def _weight_for(self, dtype: torch.dtype) -> torch.Tensor:
        device = self.channel_scale.device
        if self._weight is None or self._weight.dtype != dtype or self._weight.device != device:
            p, q = self.factors()
            w = reconstruct(p, q, self.out_features, self.in_features)  # float64
            w = w * self.channel_scale.cpu().double().unsqueeze(1)
            self._weight = w.to(device=device, dtype=dtype)
        return self._weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self._weight_for(x.dtype), self.bias)

    def effective_weight(self) -> torch.Tensor:
        return self._weight_for(torch.float32)

    def packed_bytes(self) -> int:
        """Bytes of the stored codes, fp16 scales and channel scale (the bias is counted by the caller)."""
        names = [f"{s}_{k}" for s in ("p", "q") for k in ("mag", "phase", "scales")] + ["channel_scale"]
        return sum(getattr(self, k).numel() * getattr(self, k).element_size() for k in names)

    def macs_per_token(self) -> dict[str, int]:
        """The forward materializes W, so it costs in * out multiply-adds. ``factored`` is what applying
        the factors would cost instead, 4 real MACs per complex one over r (in + out), FFTs not counted."""
        macs = self.in_features * self.out_features
        return {"matmul": macs, "mixing": 0, "total": macs,
                "factored": 4 * self.rank * (self.in_features + self.out_features)}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bits={self.bits}, phase_bits={self.phase_bits}, group_size={self.group_size}")

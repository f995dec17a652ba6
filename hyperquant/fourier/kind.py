"""fourier: the Fourier low-rank + PolarQuant comparator as a layer kind (registered on import)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from hyperquant.errors import ConfigError
from hyperquant.fourier.calibration import diag_scale
from hyperquant.fourier.module import FourierLinear
from hyperquant.fourier.transform import fourier_lowrank, rank_for_fraction, reconstruct
from hyperquant.kinds.base import LayerKind, Names, PlanEntry
from hyperquant.kinds.registry import register_kind
from hyperquant.phm.projection import relative_output_error, relative_weight_error
from hyperquant.quant.packing import SUPPORTED_BITS


@dataclass(frozen=True)
class FourierPlan(PlanEntry):
    """Rank-r factors of FFT2(W) keeping ``fraction`` of the dense layer's real parameters, PolarQuant-ized
    at ``bits`` (phases at ``phase_bits``, None = bits), and a per-output-channel scale fitted on
    calibration data (``diag_calibration``)."""

    kind = "fourier"
    fraction: float = 0.25
    bits: int = 4
    phase_bits: int | None = None
    group_size: int = 128
    diag_calibration: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"fourier fraction={self.fraction} must be in (0, 1], e.g. 0.25")
        for name in ("bits", "phase_bits"):
            value = getattr(self, name)
            if (value is not None or name == "bits") and value not in SUPPORTED_BITS:
                raise ConfigError(f"fourier {name}={value} is not supported; use one of {list(SUPPORTED_BITS)}")
        gs = self.group_size
        if not isinstance(gs, int) or gs < 16 or gs & (gs - 1):
            raise ConfigError(f"group_size={gs} must be a power of two >= 16, e.g. 128")


class FourierKind(LayerKind):
    name = "fourier"
    entry_type = FourierPlan
    module_types = (FourierLinear,)

    def needs_calibration(self, entry: FourierPlan) -> bool:
        return entry.diag_calibration

    def build(self, entry: FourierPlan, weight, bias, stats, record) -> nn.Module:
        out_f, in_f = weight.shape
        rank = rank_for_fraction(out_f, in_f, entry.fraction)
        p, q = fourier_lowrank(weight.double(), rank)
        lowrank = reconstruct(p, q, out_f, in_f)
        new = FourierLinear.from_factors(p, q, entry.bits, entry.phase_bits, entry.group_size, bias)
        record.update(rank=rank, weight_error_lowrank_float=relative_weight_error(weight, lowrank))
        if stats is not None:
            record["output_error_lowrank_float"] = relative_output_error(weight, lowrank, stats.input_cov)
            record["output_error_uncalibrated"] = relative_output_error(weight, new.effective_weight(),
                                                                        stats.input_cov)
            if entry.diag_calibration:
                new.set_channel_scale(diag_scale(weight, new.effective_weight(), stats.input_cov))
                scale = new.channel_scale.float()
                record.update(channel_scale_min=float(scale.min()), channel_scale_max=float(scale.max()))
        record["weight_error"] = relative_weight_error(weight, new.effective_weight())
        return new

    def describe(self, entry: FourierPlan) -> Names:
        return Names(f"Fourier low-rank {entry.fraction:g} + PolarQuant-{entry.bits}", "Fourier + PolarQuant",
                     f"fourier{entry.fraction:g}-{entry.bits}")

    def spec(self, module: FourierLinear) -> dict:
        return {"rank": module.rank, "bits": module.bits, "phase_bits": module.phase_bits,
                "group_size": module.group_size}

    def empty(self, in_features, out_features, bias, spec) -> nn.Module:
        return FourierLinear(in_features, out_features, spec["rank"], spec["bits"], spec["phase_bits"],
                             spec["group_size"], bias)

    def parameters(self, module: FourierLinear) -> int:
        # magnitude and phase of every complex entry of P (out, r) and Q (in, r)
        bias = module.bias.numel() if module.bias is not None else 0
        return 2 * module.rank * (module.in_features + module.out_features) + bias

    def no_export_reason(self, entry_or_module) -> str | None:
        return "no ONNX export for Fourier layers (their forward rebuilds W through an inverse 2-D FFT)"


register_kind(FourierKind)

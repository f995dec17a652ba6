"""phm-float and phm-quant: W = sum_b H_b kron A_b, factors in float or A_cat group-wise quantized."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hyperquant.errors import ConfigError
from hyperquant.kinds.base import LayerKind, LayerStats, Names, PlanEntry
from hyperquant.kinds.dense import matmul_nbits_reason
from hyperquant.kinds.quantize import QuantFields, quantize_matrix
from hyperquant.phm.bases import fixed_bases
from hyperquant.phm.functional import factors_to_cat, kron_weight, phm_macs
from hyperquant.phm.layer import PHMLinear, check_phm_shape
from hyperquant.phm.projection import (
    kronecker_svd,
    mixed_hessian,
    project_activation_aware,
    project_fixed,
    relative_output_error,
    relative_weight_error,
)
from hyperquant.quant.modules import QuantPHMLinear

INITS = ("activation", "frobenius")
FIT_TARGETS = ("original", "current")


@dataclass(frozen=True)
class PHMFields:
    n: int = 2
    num_bases: int = 2
    init: str = "activation"  # activation-aware least squares (needs calibration) or Frobenius projection
    ridge: float = 1e-4  # relative ridge of the activation-aware fit
    learn_bases: bool = False  # Kronecker-SVD bases instead of the fixed I, J, K, L family
    # "current": W applied to the layer's own (compressed-upstream) inputs; "original": the uncompressed
    # model's layer output at the same token (measured worse: regression dilution compounds).
    fit_target: str = "current"

    def check_phm_fields(self) -> None:
        if not isinstance(self.n, int) or self.n < 2:
            raise ConfigError(f"n={self.n} must be an integer >= 2 for a PHM layer (n=1 is dense-quant)")
        if not isinstance(self.num_bases, int) or not 1 <= self.num_bases <= self.n * self.n:
            raise ConfigError(f"number of bases {self.num_bases} must be in [1, n^2 = {self.n * self.n}] for n={self.n}")
        if self.init not in INITS:
            raise ConfigError(f"init={self.init!r} is not supported; use one of {list(INITS)}")
        if self.fit_target not in FIT_TARGETS:
            raise ConfigError(f"fit_target={self.fit_target!r} is not supported; use one of {list(FIT_TARGETS)}")
        if self.ridge < 0:
            raise ConfigError(f"ridge={self.ridge} must be >= 0")

    @property
    def fits_original_outputs(self) -> bool:
        return self.init == "activation" and self.fit_target == "original"

    def shape_label(self) -> str:
        return f"PHM n={self.n} B={self.num_bases}"


@dataclass(frozen=True)
class PHMFloatPlan(PHMFields, PlanEntry):
    kind = "phm-float"

    def __post_init__(self) -> None:
        self.check_phm_fields()


@dataclass(frozen=True)
class PHMQuantPlan(PHMFields, QuantFields, PlanEntry):
    kind = "phm-quant"

    def __post_init__(self) -> None:
        self.check_phm_fields()
        self.check_quant_fields()


def fit_phm(entry: PHMFields, weight: torch.Tensor, stats: LayerStats | None,
            record: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Bases (B, n, n) and factors (B, out/n, in/n) of the PHM approximation of ``weight``, logging the
    Frobenius projection's errors and (activation-aware) the fit's."""
    if entry.learn_bases:
        bases, factors = kronecker_svd(weight, entry.n, entry.num_bases)
    else:
        bases = fixed_bases(entry.n, entry.num_bases)
        factors = project_fixed(weight, bases)
    frobenius = kron_weight(bases, factors)
    record["weight_error_frobenius"] = relative_weight_error(weight, frobenius)
    if stats is not None:
        record["output_error_frobenius"] = relative_output_error(weight, frobenius, stats.input_cov)
    if entry.init == "activation":
        if stats is None:
            raise ConfigError("the activation-aware PHM fit needs calibration data; pass calibration inputs, "
                              "or use init='frobenius'")
        cross = stats.cross_cov if entry.fit_target == "original" else None
        factors = project_activation_aware(weight, bases, stats.input_cov, entry.ridge, cross)
        fitted = kron_weight(bases, factors)
        record["weight_error_activation"] = relative_weight_error(weight, fitted)
        record["output_error_activation"] = relative_output_error(weight, fitted, stats.input_cov)
    return bases, factors


class _PHMKind(LayerKind):
    def needs_calibration(self, entry: PHMFields) -> bool:
        # the activation-aware fit, or GPTQ on the factors (phm-quant)
        return entry.init == "activation" or getattr(entry, "method", None) == "gptq"

    def check(self, entry: PHMFields, out_features, in_features) -> None:
        check_phm_shape(in_features, out_features, entry.n, entry.num_bases)

    def build(self, entry, weight, bias, stats, record) -> nn.Module:
        bases, factors = fit_phm(entry, weight, stats, record)
        return self.from_fit(entry, bases, factors, weight.shape, bias, stats, record)

    def from_fit(self, entry, bases, factors, shape, bias, stats, record) -> nn.Module:
        """The module of fitted bases (B, n, n) and factors (B, out/n, in/n) of a dense (out, in) weight."""
        raise NotImplementedError

    def macs_per_token(self, module) -> int:
        return phm_macs(module.in_features, module.out_features, module.n, module.num_bases)["total"]


class PHMFloatKind(_PHMKind):
    name = "phm-float"
    entry_type = PHMFloatPlan
    module_types = (PHMLinear,)

    def from_fit(self, entry, bases, factors, shape, bias, stats, record) -> nn.Module:
        out_f, in_f = shape
        return phm_float_module(bases, factors, in_f, out_f, bias, entry.learn_bases)

    def describe(self, entry: PHMFloatPlan) -> Names:
        return Names(f"{entry.shape_label()} float", "PHM float", f"phm-n{entry.n}b{entry.num_bases}-float")

    def spec(self, module: PHMLinear) -> dict:
        return {"n": module.n, "num_bases": module.num_bases, "bits": None, "learn_bases": module.learn_bases}

    def empty(self, in_features, out_features, bias, spec) -> nn.Module:
        return PHMLinear(in_features, out_features, spec["n"], spec["num_bases"], bias=bias,
                         learn_bases=spec.get("learn_bases", False))

    def export_module(self, module: PHMLinear, name: str, dtype: torch.dtype) -> nn.Module:
        from hyperquant.exporters.ops import ExportPHMLinear

        return ExportPHMLinear(module, dtype)


def phm_float_module(bases, factors, in_features, out_features, bias, learn_bases=False) -> PHMLinear:
    num_bases, n, _ = bases.shape
    new = PHMLinear(in_features, out_features, n, num_bases, bias=bias is not None, learn_bases=learn_bases)
    with torch.no_grad():
        new.bases.copy_(bases)
        new.factors.copy_(factors)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def quantize_phm(entry: QuantFields, bases: torch.Tensor, a_cat: torch.Tensor, in_features: int,
                 bias: torch.Tensor | None, input_cov: torch.Tensor | None, record: dict) -> QuantPHMLinear:
    """Quantize A_cat (out/n, B*in/n). Its Hessian is the second moment of the mixed inputs z it multiplies,
    so GPTQ on it minimizes the PHM layer's true output error."""
    hz = mixed_hessian(bases, input_cov) if input_cov is not None else None
    return QuantPHMLinear.from_quantized(quantize_matrix(a_cat, hz, entry, record), bases, in_features, bias)


class PHMQuantKind(_PHMKind):
    name = "phm-quant"
    entry_type = PHMQuantPlan
    module_types = (QuantPHMLinear,)

    def from_fit(self, entry, bases, factors, shape, bias, stats, record) -> nn.Module:
        a_cat = factors_to_cat(factors).contiguous()
        return quantize_phm(entry, bases, a_cat, shape[1], bias, stats.input_cov if stats is not None else None,
                            record)

    def describe(self, entry: PHMQuantPlan) -> Names:
        return Names(f"{entry.shape_label()} {entry.quant_label()}", f"PHM {entry.method.upper()}",
                     f"phm-n{entry.n}b{entry.num_bases}-{entry.method}{entry.bits}")

    def spec(self, module: QuantPHMLinear) -> dict:
        return {"n": module.n, "num_bases": module.num_bases, "bits": module.bits, "group_size": module.group_size,
                "symmetric": module.symmetric}

    def empty(self, in_features, out_features, bias, spec) -> nn.Module:
        return QuantPHMLinear(in_features, out_features, spec["n"], spec["num_bases"], spec["bits"],
                              spec["group_size"], spec["symmetric"], bias)

    def parameters(self, module: QuantPHMLinear) -> int:
        bias = module.bias.numel() if module.bias is not None else 0
        return module.q_rows * module.q_cols + module.bases.numel() + bias

    def no_export_reason(self, entry_or_module) -> str | None:
        return matmul_nbits_reason(entry_or_module.bits)

    def export_module(self, module: QuantPHMLinear, name: str, dtype: torch.dtype) -> nn.Module:
        from hyperquant.exporters.ops import ExportQuantPHMLinear, check_bits

        check_bits(module.bits, name)
        return ExportQuantPHMLinear(module, dtype)

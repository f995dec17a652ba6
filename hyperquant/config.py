"""Typed, validated configuration of a compression run."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import asdict, dataclass, field

from hyperquant.errors import HyperquantError
from hyperquant.quant.packing import SUPPORTED_BITS

METHODS = ("gptq", "rtn", "fourier")
INITS = ("activation", "frobenius")
FIT_TARGETS = ("original", "current")
REST_DTYPES = ("float32", "float16", "bfloat16")


class ConfigError(HyperquantError, ValueError):
    pass


def from_known_fields(cls, data: dict, what: str):
    """``cls(**data)`` for a config dataclass, with a clear error for keys it does not have."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown {what}(s) {unknown}; known: {sorted(known)}")
    return cls(**data)


@dataclass
class CompressConfig:
    """What `hyperquant.compress` does to each FFN linear.

    n = 1 keeps the layer dense (quantization only, the baseline); n >= 2 reparameterizes it as PHM with
    ``num_bases`` n x n bases and quantizes the factors A_cat. ``bits=None`` keeps weights in float.
    ``method="fourier"`` (with n = 1) instead replaces the weight by a rank-r factorization of its 2-D
    FFT whose complex factors are PolarQuant-ized (docs/fourier.md), a comparator to PHM.
    """

    bits: int | None = 4
    method: str = "gptq"
    n: int = 2
    num_bases: int = 2
    # Per-layer B by regular expression on the module name (first match wins), e.g. {r"layers\.0\.": 3}.
    layer_bases: dict[str, int] = field(default_factory=dict)
    learn_bases: bool = False
    init: str = "activation"  # activation-aware least squares (needs calibration) or Frobenius projection
    ridge: float = 1e-4  # relative ridge of the activation-aware fit
    # Activation-aware target: "current" = W applied to the layer's own (compressed-upstream) inputs;
    # "original" = the uncompressed model's layer output at the same token. Fitting through upstream
    # errors shrinks the outputs (regression dilution) and measured worse on the default model
    # (perplexity 3148 vs 1495 for PHM n2 B2 + GPTQ-4, scripts/bench_compress.py).
    fit_target: str = "current"
    group_size: int = 128
    symmetric: bool = False
    act_order: bool = True
    damp: float = 0.01
    calib_samples: int = 32
    calib_seq_len: int = 512
    true_sequential: bool = True  # re-collect inputs after each group of layers that share an input
    target_patterns: list[str] | None = None  # regexes on module names; None = the architecture's FFN
    min_features: int = 0  # skip linears whose smaller side is below this
    rest_dtype: str = "float16"  # storage dtype of the weights hyperquant does not compress
    # method="fourier": fraction of the dense layer's real parameter count the factors keep (sets the rank),
    # bits of the factors' phases (None = bits), and a per-output-channel scale fitted on calibration data.
    fourier_fraction: float = 0.25
    phase_bits: int | None = None
    diag_calibration: bool = True

    def __post_init__(self) -> None:
        if self.bits is not None and self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"bits={self.bits} is not supported; use one of {list(SUPPORTED_BITS)}")
        if self.method not in METHODS:
            raise ConfigError(f"method={self.method!r} is not supported; use one of {list(METHODS)}")
        if self.init not in INITS:
            raise ConfigError(f"init={self.init!r} is not supported; use one of {list(INITS)}")
        if self.fit_target not in FIT_TARGETS:
            raise ConfigError(f"fit_target={self.fit_target!r} is not supported; use one of {list(FIT_TARGETS)}")
        if self.rest_dtype not in REST_DTYPES:
            raise ConfigError(f"rest_dtype={self.rest_dtype!r} is not supported; use one of {list(REST_DTYPES)}")
        if self.n < 1:
            raise ConfigError(f"n={self.n} must be >= 1 (1 = keep the layer dense)")
        if self.method == "fourier":
            if self.bits is None:
                raise ConfigError(f"method='fourier' quantizes its factors; set bits to one of {list(SUPPORTED_BITS)}")
            if self.n != 1:
                raise ConfigError("method='fourier' replaces the weight by a Fourier low-rank factorization; use n=1")
        if not 0 < self.fourier_fraction <= 1:
            raise ConfigError(f"fourier_fraction={self.fourier_fraction} must be in (0, 1], e.g. 0.25")
        if self.phase_bits is not None and self.phase_bits not in SUPPORTED_BITS:
            raise ConfigError(f"phase_bits={self.phase_bits} is not supported; use one of {list(SUPPORTED_BITS)} "
                              f"or None (= bits)")
        if self.n == 1 and self.bits is None:
            raise ConfigError("n=1 with bits=None would leave every layer as it is; set bits or n >= 2")
        for b in [self.num_bases, *self.layer_bases.values()]:
            if self.n > 1 and not 1 <= b <= self.n * self.n:
                raise ConfigError(f"number of bases {b} must be in [1, n^2 = {self.n * self.n}] for n={self.n}")
        for pattern in [*self.layer_bases, *(self.target_patterns or [])]:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"invalid module-name pattern {pattern!r}: {e}") from None
        gs = self.group_size
        if gs < 16 or gs & (gs - 1):
            raise ConfigError(
                f"group_size={gs} must be a power of two >= 16 (onnxruntime's MatMulNBits block size), e.g. 128"
            )
        if self.calib_samples < 1 or self.calib_seq_len < 8:
            raise ConfigError("calib_samples must be >= 1 and calib_seq_len >= 8")
        if not 0 < self.damp < 1:
            raise ConfigError(f"damp={self.damp} must be in (0, 1), e.g. 0.01")
        if self.ridge < 0:
            raise ConfigError(f"ridge={self.ridge} must be >= 0")

    @property
    def needs_calibration(self) -> bool:
        quantizes_with_gptq = self.bits is not None and self.method == "gptq"
        calibrates_fourier = self.method == "fourier" and self.diag_calibration
        return quantizes_with_gptq or calibrates_fourier or (self.n > 1 and self.init == "activation")

    @property
    def fits_original_outputs(self) -> bool:
        return self.n > 1 and self.init == "activation" and self.fit_target == "original"

    def bases_for(self, module_name: str) -> int:
        for pattern, b in self.layer_bases.items():
            if re.search(pattern, module_name):
                return b
        return self.num_bases

    def to_dict(self) -> dict:
        return asdict(self)

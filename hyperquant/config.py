"""CompressConfig: what `hyperquant.compress` does, as a user states it. `plan.resolve_plan` turns it into
the per-layer plan ({module name: plan entry}) that everything downstream reads."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields

from hyperquant.errors import ConfigError, from_known_fields
from hyperquant.kinds import (
    DenseQuantPlan,
    EmbedQuantPlan,
    KeepPlan,
    PHMFloatPlan,
    PHMQuantPlan,
    PlanEntry,
    entry_from_dict,
)

REST_DTYPES = ("float32", "float16", "bfloat16")
# "model": the FFN as the flat fields say, plus the attention projections and the LM head with the dense
# quantizer of the same bits, and the embedding table with RTN; "ffn": the FFN linears only.
SCOPES = ("model", "ffn")
ALL_LAYERS = ".*"  # the ``layers`` pattern that matches every target
# The fields that describe the built-in dense/PHM entry every target gets unless ``layers`` says otherwise.
_QUANT_FIELDS = ("bits", "method", "group_size", "symmetric", "act_order", "damp")
_PHM_FIELDS = ("n", "num_bases", "init", "ridge", "learn_bases", "fit_target")


@dataclass
class CompressConfig:
    """What `hyperquant.compress` does to each selected linear.

    The flat fields describe the default entry: n = 1 quantizes the layer's own weight (dense-quant);
    n >= 2 reparameterizes it as PHM with ``num_bases`` n x n bases, its factors A_cat quantized
    (phm-quant) or, with ``bits=None``, kept in float (phm-float). ``layer_bases`` sets B per layer and
    ``layers`` gives any registered kind to the layers its patterns match (first match wins), e.g.
    ``{r"down_proj$": {"kind": "keep"}}`` or ``{".*": {"kind": "fourier", "fraction": 0.25}}``.
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
    # "current" = W applied to the layer's own (compressed-upstream) inputs; "original" = the uncompressed
    # model's layer output at the same token. Fitting through upstream errors shrinks the outputs
    # (regression dilution) and measured worse on the default model (scripts/bench_compress.py).
    fit_target: str = "current"
    group_size: int = 128
    symmetric: bool = False
    act_order: bool = True
    damp: float = 0.01
    # Per-layer plan entries of any registered kind by regular expression (first match wins).
    layers: dict[str, PlanEntry | dict] = field(default_factory=dict)
    calib_samples: int = 32
    calib_seq_len: int = 512
    # Sequences of calib_seq_len after the fit ones, never fitted on: every layer's output error is also
    # measured on them (``output_error_heldout``), since the in-sample error flatters the fit.
    heldout_samples: int = 4
    true_sequential: bool = True  # re-collect inputs after each group of layers that share an input
    target_patterns: list[str] | None = None  # regexes on module names; None = as ``scope`` says
    # A vision-language model: the towers whose FFN / MLP linears are selected (language, vision,
    # projector). Attention, the LM head and the embeddings (scope "model") are the language tower's.
    towers: list[str] = field(default_factory=lambda: ["language"])
    scope: str = "model"
    # Bits of the embedding table in scope "model" (RTN, group_size; None keeps it in rest_dtype). Unused
    # when bits is None (a float setting keeps every weight but the FFN in float).
    embed_bits: int | None = 4
    # A tied model (embedding = LM head) whose head is quantized with embed_bits: the table is the head's
    # codes, stored once (as onnxruntime-genai's builder does), instead of its own RTN codes.
    share_tied_embedding: bool = True
    min_features: int = 0  # skip linears whose smaller side is below this
    rest_dtype: str = "float16"  # storage dtype of the weights hyperquant does not compress

    def __post_init__(self) -> None:
        if self.rest_dtype not in REST_DTYPES:
            raise ConfigError(f"rest_dtype={self.rest_dtype!r} is not supported; use one of {list(REST_DTYPES)}")
        if self.scope not in SCOPES:
            raise ConfigError(f"scope={self.scope!r} is not supported; use one of {list(SCOPES)} "
                              f"(model: every linear and the embeddings; ffn: the FFN only)")
        from hyperquant.multimodal.towers import TOWERS

        if not isinstance(self.towers, (list, tuple)) or not self.towers or any(t not in TOWERS for t in self.towers):
            raise ConfigError(f"towers={self.towers!r}: give a list of {', '.join(TOWERS)} (e.g. [language, vision])")
        self.towers = [t for t in TOWERS if t in self.towers]
        if self.embed_bits is not None:
            EmbedQuantPlan(bits=self.embed_bits, group_size=self.group_size, symmetric=self.symmetric)
        if not isinstance(self.n, int) or self.n < 1:
            raise ConfigError(f"n={self.n} must be an integer >= 1 (1 = keep the layer dense)")
        if self.n == 1 and self.bits is None and not self.layers:
            raise ConfigError("n=1 with bits=None would leave every layer as it is; set bits or n >= 2")
        if not isinstance(self.calib_samples, int) or not isinstance(self.calib_seq_len, int) \
                or self.calib_samples < 1 or self.calib_seq_len < 8:
            raise ConfigError("calib_samples must be an integer >= 1 and calib_seq_len >= 8")
        if not isinstance(self.heldout_samples, int) or self.heldout_samples < 0:
            raise ConfigError(f"heldout_samples={self.heldout_samples!r} must be an integer >= 0 (0: no held-out errors)")
        for pattern in [*self.layer_bases, *self.layers, *(self.target_patterns or [])]:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as e:
                raise ConfigError(f"invalid module-name pattern {pattern!r}: {e}") from None
        self.layers = {pattern: entry_from_dict(entry) for pattern, entry in self.layers.items()}
        for b in self.layer_bases.values():
            self.default_entry(num_bases=b)  # validates B against n
        self.default_entry()

    def default_entry(self, num_bases: int | None = None) -> PlanEntry:
        """The entry a target gets from the flat fields (dense-quant, phm-float or phm-quant)."""
        quant = {k: getattr(self, k) for k in _QUANT_FIELDS}
        if self.n == 1:
            return DenseQuantPlan(**quant) if self.bits is not None else KeepPlan()
        phm = {k: getattr(self, k) for k in _PHM_FIELDS}
        if num_bases is not None:
            phm["num_bases"] = num_bases
        return PHMFloatPlan(**phm) if self.bits is None else PHMQuantPlan(**phm, **quant)

    def rest_entries(self) -> dict[str, PlanEntry | None]:
        """What scope "model" gives the layers outside the FFN: {"attention": entry, "head": entry,
        "embedding": entry}, None where the layer stays as it is (scope "ffn", or a float setting)."""
        if self.scope == "ffn" or self.bits is None:
            return {"attention": None, "head": None, "embedding": None}
        dense = DenseQuantPlan(**{k: getattr(self, k) for k in _QUANT_FIELDS})
        embedding = None if self.embed_bits is None else EmbedQuantPlan(
            bits=self.embed_bits, group_size=self.group_size, symmetric=self.symmetric)
        return {"attention": dense, "head": dense, "embedding": embedding}

    def bases_for(self, module_name: str) -> int:
        for pattern, b in self.layer_bases.items():
            if re.search(pattern, module_name):
                return b
        return self.num_bases

    def entry_for(self, module_name: str, part: str = "ffn") -> PlanEntry | None:
        """The plan entry of one target: the first matching ``layers`` pattern, else the flat fields (an
        FFN layer) or ``rest_entries()[part]`` (attention, head, embedding: None leaves it alone). A
        pattern that matches every name (``".*"``) covers the FFN only."""
        for pattern, entry in self.layers.items():
            if part != "ffn" and pattern in (ALL_LAYERS, ""):
                continue
            if re.search(pattern, module_name):
                return entry
        if part != "ffn":
            return self.rest_entries()[part]
        return self.default_entry(self.bases_for(module_name) if self.n > 1 else None)

    @classmethod
    def every_layer(cls, entry: PlanEntry | dict, **options) -> CompressConfig:
        """Every target layer compressed by one plan entry of any registered kind, e.g.
        ``CompressConfig.every_layer(FourierPlan(fraction=0.25), rest_dtype="float32")``."""
        return cls(**{"n": 1, "bits": None, **options, "layers": {ALL_LAYERS: entry}})

    def _covering_entry(self) -> PlanEntry | None:
        """The first ``layers`` entry whose pattern matches every name, if any: the flat fields then
        reach no layer that an earlier pattern does not already take."""
        return next((e for p, e in self.layers.items() if p in (ALL_LAYERS, "")), None)

    def main_entry(self) -> PlanEntry:
        """The entry most targets get, known without a model: a covering ``layers`` entry, else the
        flat fields' default (what labels, folder names and report families are made from)."""
        return self._covering_entry() or self.default_entry()

    @property
    def varies_by_layer(self) -> bool:
        return bool(self.layer_bases) or any(p not in (ALL_LAYERS, "") for p in self.layers)

    @property
    def needs_calibration(self) -> bool:
        """Whether the entries this config can give need calibration data (without a model at hand)."""
        from hyperquant.kinds import kind_of_entry

        entries: list[PlanEntry] = []
        for pattern, entry in self.layers.items():  # first match wins: nothing after a covering pattern applies
            entries.append(entry)
            if pattern in (ALL_LAYERS, ""):
                break
        else:
            entries += [self.default_entry(), *(self.default_entry(b) for b in self.layer_bases.values())]
        if self.target_patterns is None:
            entries += [e for e in self.rest_entries().values() if e is not None]
        return any(kind_of_entry(e).needs_calibration(e) for e in entries)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["layers"] = {pattern: entry.to_dict() for pattern, entry in self.layers.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> CompressConfig:
        return from_known_fields(cls, data, "compress option")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


__all__ = ["REST_DTYPES", "CompressConfig", "ConfigError", "from_known_fields"]

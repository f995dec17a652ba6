"""What a tradeoff sweep measures: typed, validated point and sweep configurations (YAML or flags).

A point is one compression setting (or a baseline, or an existing checkpoint); its id is a hash of
everything that determines its measurements, so a re-run finds it in the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hyperquant.config import CompressConfig, ConfigError, from_known_fields
from hyperquant.kinds import kind_of_entry
from hyperquant.plan import config_label
from hyperquant.quant.packing import SUPPORTED_BITS
from hyperquant.textsets import default_test_tokens

BASELINE_METHODS = ("bnb-nf4", "gptqmodel")
QUANTIZERS = ("rtn", "gptq")
# bump when the measurement itself changes (3: whole-model points, fused-graph latency; 4: held-out
# per-layer errors)
SWEEP_VERSION = 5  # 5: every point also measures the second domain's perplexity
# The calibration fields a sweep sets for every point (SweepConfig.calib_samples / calib_seq_len).
_SWEEP_CALIB = ("calib_samples", "calib_seq_len")
_FAMILY_OF_KIND = {"dense-quant": "dense", "phm-float": "phm", "phm-quant": "phm"}


@dataclass
class PointSpec:
    """One point of a sweep: a label and what is measured, exactly one of

    - ``compress``: a CompressConfig (a mapping of its fields in YAML) run by `hyperquant.compress`, e.g.
      ``{n: 1, bits: 4, method: gptq}`` or ``{layers: {".*": {kind: fourier, fraction: 0.5}}}``;
    - ``baseline``: bnb-nf4 or gptqmodel, the libraries' own quantization of the same FFN linears
      (``[baselines]`` extra), at ``bits`` / ``group_size``;
    - ``checkpoint``: an existing hyperquant checkpoint folder (e.g. a trained one), measured as is;
    - ``original: true``: the uncompressed model (fp32).
    """

    label: str | None = None
    compress: CompressConfig | dict | None = None
    baseline: str | None = None
    bits: int = 4  # baseline only
    group_size: int = 128  # baseline only
    checkpoint: str | None = None
    original: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.compress, dict):
            self.compress = CompressConfig.from_dict(self.compress)
        given = [name for name, on in (("compress", self.compress is not None), ("baseline", self.baseline),
                                       ("checkpoint", self.checkpoint), ("original", self.original)) if on]
        if len(given) != 1:
            raise ConfigError(f"a point needs exactly one of compress, baseline, checkpoint or original: true; "
                              f"got {given or 'none'}")
        if self.baseline is not None and self.baseline not in BASELINE_METHODS:
            raise ConfigError(f"baseline={self.baseline!r} is not a baseline; use one of {list(BASELINE_METHODS)}")
        if self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"bits={self.bits} is not supported; use one of {list(SUPPORTED_BITS)}")

    @property
    def method(self) -> str:
        """original | checkpoint | a baseline's name | the family of a compress point (dense, phm, or the
        kind's name, e.g. fourier)."""
        if self.original:
            return "original"
        if self.checkpoint:
            return "checkpoint"
        if self.baseline:
            return self.baseline
        entry = self.main_entry()
        return _FAMILY_OF_KIND.get(entry.kind, entry.kind)

    def main_entry(self):
        return self.compress.main_entry()

    def compress_config(self, calib_samples: int = 32, calib_seq_len: int = 512) -> CompressConfig:
        """The `hyperquant.compress` configuration of a compress point, calibrated as the sweep says."""
        if self.compress is None:
            raise ConfigError(f"point {self.default_label()!r} is not run by hyperquant.compress")
        return dataclasses.replace(self.compress, calib_samples=calib_samples, calib_seq_len=calib_seq_len)

    def key(self) -> dict:
        """The fields that determine what is measured (the label does not), plus ``bits`` for display."""
        keep: dict = {"method": self.method}
        if self.compress is not None:
            entry = self.main_entry()
            keep["bits"] = getattr(entry, "bits", None)
            keep["compress"] = {k: v for k, v in self.compress.to_dict().items() if k not in _SWEEP_CALIB}
        if self.baseline:
            keep.update(bits=self.bits, group_size=self.group_size)
        if self.checkpoint:
            keep["path"] = str(Path(self.checkpoint).resolve())
        return keep

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["compress"] = self.compress.to_dict() if self.compress is not None else None
        return data

    def default_label(self) -> str:
        if self.original:
            return "dense fp32 (original)"
        if self.checkpoint:
            return Path(self.checkpoint).name
        if self.baseline == "bnb-nf4":
            return "bitsandbytes NF4"
        if self.baseline == "gptqmodel":
            return f"GPTQModel GPTQ-{self.bits} g{self.group_size}"
        return config_label(self.compress)

    def family(self) -> str:
        """The legend group of the plots."""
        if self.compress is not None:
            entry = self.main_entry()
            return kind_of_entry(entry).describe(entry).family
        return {"original": "dense fp32", "bnb-nf4": "bitsandbytes NF4", "gptqmodel": "GPTQModel",
                "checkpoint": "checkpoint (trained)"}[self.method]


@dataclass
class SweepConfig:
    """A sweep: the points (explicit and/or a grid), and how every point is measured."""

    model: str | None = None  # local HF folder or .gguf; None = the embedded default model
    points: list[PointSpec] = field(default_factory=list)
    grid: dict[str, list] = field(default_factory=dict)  # compress points: cartesian product of CompressConfig fields
    eval_tokens: int = 4096
    eval_context: int = 512
    test_tokens: int | None = None  # per test domain (textsets), with standard errors; None: 4 x eval_tokens
    calib_samples: int = 32
    calib_seq_len: int = 512
    latency: bool = True  # export to ONNX and time onnxruntime (methods that export)
    latency_threads: int = 2
    prompt_tokens: int = 128
    decode_tokens: int = 32
    latency_rounds: int = 5
    accuracy_level: int = 4  # MatMulNBits accuracy level of the timed exports (4 = int8 activations, fastest)
    keep_checkpoints: bool = False  # keep each point's checkpoint folder in the cache
    notes: str | None = None  # a Markdown file with a written reading, included in the report

    def __post_init__(self) -> None:
        self.points = [p if isinstance(p, PointSpec) else _point(p) for p in self.points]
        if self.test_tokens is None and isinstance(self.eval_tokens, int):
            self.test_tokens = default_test_tokens(self.eval_tokens)
        for name in ("eval_tokens", "eval_context", "test_tokens", "calib_samples", "calib_seq_len", "latency_threads",
                     "prompt_tokens", "decode_tokens", "latency_rounds"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be an integer >= 1")
        if self.eval_context < 2 or self.eval_tokens < 2:
            raise ConfigError("eval_tokens and eval_context must be >= 2")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ConfigError(f"accuracy_level={self.accuracy_level} must be 0-4")
        known = set(CompressConfig.field_names())
        for key, values in self.grid.items():
            if key not in known:
                raise ConfigError(f"grid key {key!r} is not a compress option; known: {sorted(known)}")
            if not isinstance(values, list) or not values:
                raise ConfigError(f"grid.{key} must be a non-empty list")
        if self.notes is not None and not Path(self.notes).is_file():
            raise ConfigError(f"notes file {self.notes} does not exist")
        if not self.expanded():
            raise ConfigError("the sweep has no points: give points: [...] or a grid")
        labels = [self.label_of(p) for p in self.expanded()]
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        if dupes:
            raise ConfigError(f"two points share the label(s) {dupes}; set label: on one of them")

    def expanded(self) -> list[PointSpec]:
        """Explicit points, then the grid's, without repeats (same key)."""
        out = list(self.points)
        if self.grid:
            keys = list(self.grid)
            for values in itertools.product(*(self.grid[k] for k in keys)):
                out.append(_point({"compress": dict(zip(keys, values))}))
        seen, unique = set(), []
        for p in out:
            k = json.dumps(p.key(), sort_keys=True)
            if k not in seen:
                seen.add(k)
                unique.append(p)
        return unique

    @staticmethod
    def label_of(p: PointSpec) -> str:
        return p.label or p.default_label()

    def measurement(self) -> dict:
        """The settings every point's measurements depend on."""
        return {"eval_tokens": self.eval_tokens, "eval_context": self.eval_context, "test_tokens": self.test_tokens,
                "calib_samples": self.calib_samples, "calib_seq_len": self.calib_seq_len,
                "version": SWEEP_VERSION}

    def point_id(self, p: PointSpec, model_id: str) -> str:
        blob = json.dumps({"point": p.key(), "model": model_id, **self.measurement()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def to_dict(self) -> dict:
        return {**asdict(self), "points": [p.to_dict() for p in self.points]}

    @classmethod
    def from_dict(cls, data: dict) -> SweepConfig:
        return from_known_fields(cls, data, "sweep option")

    @classmethod
    def from_yaml(cls, path: str | Path) -> SweepConfig:
        from hyperquant.train.config import read_yaml_options

        data = read_yaml_options(path)
        here = Path(path).parent
        # Files named in the YAML (notes, checkpoint points) are relative to the YAML file.
        if isinstance(data.get("notes"), str) and not Path(data["notes"]).is_absolute():
            data["notes"] = str(here / data["notes"])
        for point in data.get("points") or []:
            if isinstance(point, dict) and isinstance(point.get("checkpoint"), str) \
                    and not Path(point["checkpoint"]).is_absolute():
                point["checkpoint"] = str(here / point["checkpoint"])
        return cls.from_dict(data)


def _point(data) -> PointSpec:
    if isinstance(data, PointSpec):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"a point must be a mapping of field: value, got {data!r}")
    return from_known_fields(PointSpec, data, "point field")


def default_sweep(bits: list[int], ns: list[int], bases: list[int], group_size: int = 128, fourier: bool = True,
                  baselines: bool = True, **options) -> SweepConfig:
    """The sweep `hyperquant report` runs without --config: the original model; dense RTN and GPTQ at each
    bit width; PHM for each (n, B) with float, RTN and GPTQ factors; the Fourier comparator at the
    parameter fraction of each PHM shape (B/n^2, so bytes match); and the library baselines at 4 bits."""
    points: list[dict] = [{"original": True}]
    for b in bits:
        points += [{"compress": {"n": 1, "method": q, "bits": b, "group_size": group_size}} for q in QUANTIZERS]
    for n in ns:
        for nb in bases:
            if not 1 <= nb <= n * n:
                continue
            points.append({"compress": {"n": n, "num_bases": nb, "bits": None}})
            for b in bits:
                points += [{"compress": {"n": n, "num_bases": nb, "method": q, "bits": b, "group_size": group_size}}
                           for q in QUANTIZERS]
                if fourier:
                    fourier_entry = {"kind": "fourier", "fraction": nb / (n * n), "bits": b, "group_size": group_size}
                    points.append({"compress": {"n": 1, "bits": None, "layers": {".*": fourier_entry}}})
    if baselines:
        points += [{"baseline": "bnb-nf4"}, {"baseline": "gptqmodel", "bits": 4, "group_size": group_size}]
    return SweepConfig(points=points, **options)

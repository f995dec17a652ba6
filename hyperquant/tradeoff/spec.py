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
from hyperquant.quant.packing import SUPPORTED_BITS

POINT_METHODS = ("original", "dense", "phm", "fourier", "bnb-nf4", "gptqmodel", "checkpoint")
QUANTIZERS = ("rtn", "gptq")
SWEEP_VERSION = 1  # bump when the measurement itself changes, to invalidate cached points


@dataclass
class PointSpec:
    """One setting. ``method``:

    - original: the uncompressed model (fp32);
    - dense: FFN weights quantized as they are (``quantizer`` rtn|gptq, ``bits``, ``group_size``);
    - phm: FFN linears as PHM with ``n``, ``bases`` (or ``layer_bases``), factors float (no quantizer) or
      quantized (``quantizer``, ``bits``);
    - fourier: LLaVA-FA-style low-rank factorization in the 2-D Fourier domain keeping ``fraction`` of
      the layer's parameters, PolarQuant-ized at ``bits`` (docs/fourier.md);
    - bnb-nf4, gptqmodel: the libraries' own quantization of the same FFN linears (``[baselines]`` extra);
    - checkpoint: an existing hyperquant checkpoint folder ``path`` (e.g. a trained one), measured as is.
    """

    method: str
    quantizer: str | None = None
    bits: int | None = None
    group_size: int = 128
    n: int = 2
    bases: int = 2
    layer_bases: dict[str, int] = field(default_factory=dict)
    fraction: float = 0.25
    path: str | None = None
    label: str | None = None

    def __post_init__(self) -> None:
        m = self.method
        if m not in POINT_METHODS:
            raise ConfigError(f"method={m!r} is not a sweep method; use one of {list(POINT_METHODS)}")
        if self.quantizer is not None and self.quantizer not in QUANTIZERS:
            raise ConfigError(f"quantizer={self.quantizer!r} must be one of {list(QUANTIZERS)} (or omitted)")
        if self.bits is not None and self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"bits={self.bits} is not supported; use one of {list(SUPPORTED_BITS)}")
        if m == "dense" and (self.quantizer is None or self.bits is None):
            raise ConfigError("a dense point needs quantizer (rtn or gptq) and bits; the float model is method: original")
        if m == "phm" and (self.quantizer is None) != (self.bits is None):
            raise ConfigError("a phm point quantizes its factors with both quantizer and bits, or keeps them float "
                              "with neither")
        if m == "gptqmodel" and self.bits is None:
            raise ConfigError("a gptqmodel point needs bits")
        if m == "checkpoint" and not self.path:
            raise ConfigError("a checkpoint point needs path: the folder written by `hyperquant compress`")
        if m in ("dense", "phm", "fourier"):
            self.compress_config()  # validates n, bases, bits, group size, fraction

    def compress_config(self, calib_samples: int = 32, calib_seq_len: int = 512) -> CompressConfig:
        """The `hyperquant.compress` configuration of a dense, phm or fourier point."""
        common = {"group_size": self.group_size, "calib_samples": calib_samples, "calib_seq_len": calib_seq_len}
        if self.method == "dense":
            return CompressConfig(bits=self.bits, method=self.quantizer, n=1, **common)
        if self.method == "phm":
            return CompressConfig(bits=self.bits, method=self.quantizer or "gptq", n=self.n, num_bases=self.bases,
                                  layer_bases=dict(self.layer_bases), **common)
        if self.method == "fourier":
            return CompressConfig(bits=self.bits or 4, method="fourier", n=1, fourier_fraction=self.fraction,
                                  **common)
        raise ConfigError(f"method {self.method!r} is not run by hyperquant.compress")

    def key(self) -> dict:
        """The fields that determine what is measured (the label does not)."""
        keep = {"method": self.method}
        if self.method in ("dense", "phm"):
            keep.update(quantizer=self.quantizer, bits=self.bits, group_size=self.group_size)
        if self.method == "phm":
            keep.update(n=self.n, bases=self.bases, layer_bases=self.layer_bases)
        if self.method == "fourier":
            keep.update(bits=self.bits or 4, group_size=self.group_size, fraction=self.fraction)
        if self.method == "gptqmodel":
            keep.update(bits=self.bits, group_size=self.group_size)
        if self.method == "checkpoint":
            keep.update(path=str(Path(self.path).resolve()))
        return keep

    def default_label(self) -> str:
        q = f"{(self.quantizer or '').upper()}-{self.bits} g{self.group_size}"
        if self.method == "original":
            return "dense fp32 (original)"
        if self.method == "dense":
            return f"dense {q}"
        if self.method == "phm":
            shape = f"n={self.n} B={self.bases}" + (" (per-layer B)" if self.layer_bases else "")
            return f"PHM {shape} " + (q if self.bits else "float")
        if self.method == "fourier":
            return f"Fourier low-rank {self.fraction:g} + PolarQuant-{self.bits or 4}"
        if self.method == "bnb-nf4":
            return "bitsandbytes NF4"
        if self.method == "gptqmodel":
            return f"GPTQModel GPTQ-{self.bits} g{self.group_size}"
        return Path(self.path).name

    def family(self) -> str:
        """The legend group of the plots."""
        return {
            "original": "dense fp32",
            "dense": f"dense {(self.quantizer or '').upper()}",
            "phm": "PHM " + (self.quantizer.upper() if self.quantizer else "float"),
            "fourier": "Fourier + PolarQuant",
            "bnb-nf4": "bitsandbytes NF4",
            "gptqmodel": "GPTQModel",
            "checkpoint": "checkpoint (trained)",
        }[self.method]


@dataclass
class SweepConfig:
    """A sweep: the points (explicit and/or a grid), and how every point is measured."""

    model: str | None = None  # local HF folder or .gguf; None = the embedded default model
    points: list[PointSpec] = field(default_factory=list)
    grid: dict[str, list] = field(default_factory=dict)  # cartesian product of PointSpec fields
    eval_tokens: int = 4096
    eval_context: int = 512
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
        for name in ("eval_tokens", "eval_context", "calib_samples", "calib_seq_len", "latency_threads",
                     "prompt_tokens", "decode_tokens", "latency_rounds"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be an integer >= 1")
        if self.eval_context < 2 or self.eval_tokens < 2:
            raise ConfigError("eval_tokens and eval_context must be >= 2")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ConfigError(f"accuracy_level={self.accuracy_level} must be 0-4")
        known = {f.name for f in dataclasses.fields(PointSpec)}
        for key, values in self.grid.items():
            if key not in known:
                raise ConfigError(f"grid key {key!r} is not a point field; known: {sorted(known)}")
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
                out.append(_point(dict(zip(keys, values))))
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
        return {"eval_tokens": self.eval_tokens, "eval_context": self.eval_context,
                "calib_samples": self.calib_samples, "calib_seq_len": self.calib_seq_len,
                "version": SWEEP_VERSION}

    def point_id(self, p: PointSpec, model_id: str) -> str:
        blob = json.dumps({"point": p.key(), "model": model_id, **self.measurement()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def to_dict(self) -> dict:
        return asdict(self)

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
            if isinstance(point, dict) and isinstance(point.get("path"), str) and not Path(point["path"]).is_absolute():
                point["path"] = str(here / point["path"])
        return cls.from_dict(data)


def _point(data) -> PointSpec:
    if not isinstance(data, dict):
        raise ConfigError(f"a point must be a mapping of field: value, got {data!r}")
    if "method" not in data:
        raise ConfigError(f"point {data} has no method; use one of {list(POINT_METHODS)}")
    return from_known_fields(PointSpec, data, "point field")


def default_sweep(bits: list[int], ns: list[int], bases: list[int], group_size: int = 128, fourier: bool = True,
                  baselines: bool = True, **options) -> SweepConfig:
    """The sweep `hyperquant report` runs without --config: the original model; dense RTN and GPTQ at each
    bit width; PHM for each (n, B) with float, RTN and GPTQ factors; the Fourier comparator at the
    parameter fraction of each PHM shape (B/n^2, so bytes match); and the library baselines at 4 bits."""
    points: list[dict] = [{"method": "original"}]
    for b in bits:
        points += [{"method": "dense", "quantizer": q, "bits": b, "group_size": group_size} for q in QUANTIZERS]
    for n in ns:
        for nb in bases:
            if not 1 <= nb <= n * n:
                continue
            points.append({"method": "phm", "n": n, "bases": nb})
            for b in bits:
                points += [{"method": "phm", "n": n, "bases": nb, "quantizer": q, "bits": b,
                            "group_size": group_size} for q in QUANTIZERS]
                if fourier:
                    points.append({"method": "fourier", "fraction": nb / (n * n), "bits": b,
                                   "group_size": group_size})
    if baselines:
        points += [{"method": "bnb-nf4"}, {"method": "gptqmodel", "bits": 4, "group_size": group_size}]
    return SweepConfig(points=points, **options)

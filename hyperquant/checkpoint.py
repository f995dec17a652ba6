"""The compressed checkpoint: a folder written atomically, and `load` that rebuilds the model.

Layout: config.json (the model's config plus a `hyperquant` section: format version, compress config
and one entry per compressed layer), model.safetensors (packed integer weights in MatMulNBits layout,
fp16 scales, packed zero points, bases, and the other weights in `rest_dtype`), tokenizer files,
quant_log.json and report.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from hyperquant.convert import set_module
from hyperquant.errors import HyperquantError
from hyperquant.fourier.module import FourierLinear
from hyperquant.phm.layer import PHMLinear
from hyperquant.pipeline import FORMAT_VERSION
from hyperquant.quant.modules import QuantLinear, QuantPHMLinear

WEIGHTS_NAME = "model.safetensors"


def layer_specs(model: nn.Module) -> dict[str, dict]:
    """One entry per compressed layer: everything needed to rebuild its empty module."""
    specs = {}
    for name, m in model.named_modules():
        common = {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None} \
            if isinstance(m, (QuantLinear, QuantPHMLinear, PHMLinear, FourierLinear)) else None
        if isinstance(m, FourierLinear):
            specs[name] = {"kind": "fourier", "rank": m.rank, "bits": m.bits, "phase_bits": m.phase_bits,
                           "group_size": m.group_size, **common}
        elif isinstance(m, QuantLinear):
            specs[name] = {"kind": "dense", "bits": m.bits, "group_size": m.group_size, "symmetric": m.symmetric,
                           **common}
        elif isinstance(m, QuantPHMLinear):
            specs[name] = {"kind": "phm", "n": m.n, "num_bases": m.num_bases, "bits": m.bits,
                           "group_size": m.group_size, "symmetric": m.symmetric, **common}
        elif isinstance(m, PHMLinear):
            specs[name] = {"kind": "phm", "n": m.n, "num_bases": m.num_bases, "bits": None,
                           "learn_bases": m.learn_bases, **common}
    return specs


def _module_from_spec(spec: dict) -> nn.Module:
    io_kw = {"in_features": spec["in_features"], "out_features": spec["out_features"], "bias": spec["bias"]}
    if spec["kind"] == "fourier":
        return FourierLinear(rank=spec["rank"], bits=spec["bits"], phase_bits=spec["phase_bits"],
                             group_size=spec["group_size"], **io_kw)
    if spec["kind"] == "dense":
        return QuantLinear(bits=spec["bits"], group_size=spec["group_size"], symmetric=spec["symmetric"], **io_kw)
    if spec["bits"] is None:
        return PHMLinear(n=spec["n"], num_bases=spec["num_bases"], learn_bases=spec.get("learn_bases", False),
                         **io_kw)
    return QuantPHMLinear(n=spec["n"], num_bases=spec["num_bases"], bits=spec["bits"],
                          group_size=spec["group_size"], symmetric=spec["symmetric"], **io_kw)


def _state_to_save(model: nn.Module, rest_dtype: torch.dtype, compressed: set[str]) -> dict[str, torch.Tensor]:
    """The persistent state, each tied tensor once, uncompressed float weights cast to ``rest_dtype``."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:  # tied (e.g. lm_head = embed_tokens): rebuilt by tie_weights()
            continue
        seen.add(tensor.data_ptr())
        owner = name.rpartition(".")[0]
        if owner not in compressed and tensor.is_floating_point():
            tensor = tensor.to(rest_dtype)
        out[name] = tensor.contiguous()
    return out


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder beside ``out_dir``; on success it replaces ``out_dir``, on any error
    (or Ctrl-C) it is removed, so no half-written output is ever left."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise HyperquantError(f"output {out_dir} already exists; pass --overwrite or choose another --out")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private (0700); the output is an ordinary folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out_dir)


def save_compressed(
    model: nn.Module,
    out_dir: str | os.PathLike,
    tokenizer=None,
    overwrite: bool = False,
    extra_files: Callable[[Path], None] | None = None,
) -> Path:
    """Write the checkpoint of a model returned by `hyperquant.compress`.

    ``extra_files(folder)`` may add files (report.md) to the temporary folder before it is published.
    """
    section = getattr(model.config, "hyperquant", None)
    if not section:
        raise HyperquantError("this model was not compressed by hyperquant.compress; nothing to save")
    specs = layer_specs(model)
    rest_dtype = getattr(torch, section["compress_config"]["rest_dtype"])
    with atomic_output_dir(out_dir, overwrite) as tmp:
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["architectures"] = [type(model).__name__]  # the class `load` rebuilds
        config["hyperquant"] = {**section, "layers": specs}
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        save_file(_state_to_save(model, rest_dtype, set(specs)), str(tmp / WEIGHTS_NAME),
                  metadata={"format": "pt", "hyperquant_format_version": str(FORMAT_VERSION)})
        (tmp / "quant_log.json").write_text(json.dumps(getattr(model, "hyperquant_log", []), indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extra_files is not None:
            extra_files(tmp)
    return Path(out_dir)


def read_hyperquant_config(folder: str | os.PathLike) -> dict:
    folder = Path(folder)
    config_path = folder / "config.json"
    if not folder.is_dir() or not config_path.is_file():
        raise HyperquantError(f"{folder} is not a hyperquant checkpoint folder (no config.json); "
                              f"make one with `hyperquant compress --out {folder}`")
    config = json.loads(config_path.read_text())
    section = config.get("hyperquant")
    if not isinstance(section, dict) or "layers" not in section:
        raise HyperquantError(f"{folder} has no hyperquant section in config.json; it is not a hyperquant "
                              f"checkpoint (compress it with `hyperquant compress`)")
    version = section.get("format_version")
    if version != FORMAT_VERSION:
        raise HyperquantError(f"{folder} was written in checkpoint format {version}; this hyperquant reads "
                              f"format {FORMAT_VERSION}: re-run `hyperquant compress` with this version")
    return config


def load(folder: str | os.PathLike) -> nn.Module:
    """Rebuild the compressed model of a checkpoint folder, in float32, ready for inference (eval mode).

    Packed codes, fp16 scales and zero points stay as stored (a blanket `.to(dtype)` would widen the
    scales); float weights stored in `rest_dtype` are widened to float32."""
    import transformers
    from transformers import AutoConfig

    folder = Path(folder)
    config_dict = read_hyperquant_config(folder)
    section = config_dict["hyperquant"]
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise HyperquantError(f"{folder} has no {WEIGHTS_NAME}; the checkpoint is incomplete, re-run compress")
    config = AutoConfig.from_pretrained(folder)
    arch = (config.architectures or [None])[0]
    model_cls = getattr(transformers, arch, None) if arch else None
    if model_cls is None:
        raise HyperquantError(f"{folder}: unknown architecture {arch!r} in config.json")
    model = model_cls(config)
    for name, spec in section["layers"].items():
        set_module(model, name, _module_from_spec(spec))
    state = load_file(str(weights))
    expected = model.state_dict()
    for key, value in state.items():
        if key in expected and expected[key].is_floating_point():
            state[key] = value.to(expected[key].dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not any(k.startswith(t) for t in tied)]
    if missing or unexpected:
        raise HyperquantError(f"{folder}: the weights do not match the config (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}); the checkpoint is from another version or damaged")
    model.tie_weights()
    model.config.hyperquant = {k: v for k, v in section.items() if k != "layers"}
    return model.eval()

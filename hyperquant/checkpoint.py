"""The compressed checkpoint: a folder written atomically, and `load` that rebuilds the model.

Layout: config.json (the model's config plus a `hyperquant` section: format version, compress config,
the per-layer plan and one module spec per compressed layer), model.safetensors (each compressed
module's state as its kind stores it, e.g. packed codes in MatMulNBits layout with fp16 scales; the
other weights in `rest_dtype`), tokenizer files, quant_log.json and report.md. Format 1 checkpoints
(before the plan existed) still load: their specs are upgraded on read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from hyperquant.atomic import atomic_output_dir
from hyperquant.convert import set_module
from hyperquant.errors import HyperquantError, first_line
from hyperquant.kinds import kind_named, kind_of
from hyperquant.pipeline import FORMAT_VERSION

WEIGHTS_NAME = "model.safetensors"
READABLE_VERSIONS = (1, FORMAT_VERSION)


def layer_specs(model: nn.Module) -> dict[str, dict]:
    """One entry per compressed layer: its kind and what that kind needs to rebuild the empty module."""
    specs = {}
    for name, module in model.named_modules():
        kind = kind_of(module)
        if kind is not None:
            specs[name] = {"kind": kind.name, "in_features": module.in_features,
                           "out_features": module.out_features, "bias": module.bias is not None,
                           **kind.spec(module)}
    return specs


def _module_from_spec(spec: dict) -> nn.Module:
    kind = kind_named(spec["kind"])
    return kind.empty(spec["in_features"], spec["out_features"], spec["bias"], spec)


# Format 1 named the kinds by family; format 2 names each registered kind.
_V1_KINDS = {"dense": "dense-quant", "fourier": "fourier"}


def _upgrade_v1(section: dict) -> dict:
    layers = {}
    for name, spec in section["layers"].items():
        kind = _V1_KINDS.get(spec["kind"]) or ("phm-float" if spec.get("bits") is None else "phm-quant")
        layers[name] = {**spec, "kind": kind}
    return {**section, "layers": layers, "format_version": FORMAT_VERSION, "upgraded_from": 1}


def _sharing_modules(model: nn.Module) -> dict[str, str]:
    """{module name: name of the module whose tensors it shares} (a tied table that is the LM head's codes)."""
    return {name: m.shares for name, m in model.named_modules() if getattr(m, "shares", None)}


def _state_to_save(model: nn.Module, rest_dtype: torch.dtype, compressed: set[str]) -> dict[str, torch.Tensor]:
    """The persistent state, each tied tensor once, uncompressed float weights cast to ``rest_dtype``."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    sharing = _sharing_modules(model)
    for name, tensor in model.state_dict().items():
        if name.rpartition(".")[0] in sharing:  # stored under the module it shares with
            continue
        if tensor.data_ptr() in seen:  # tied (e.g. lm_head = embed_tokens): rebuilt by tie_weights()
            continue
        seen.add(tensor.data_ptr())
        owner = name.rpartition(".")[0]
        if owner not in compressed and tensor.is_floating_point():
            tensor = tensor.to(rest_dtype)
        out[name] = tensor.contiguous()
    return out


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
                  # one key only: safetensors writes metadata in hash order, and two keys would make the
                  # same model's file differ from run to run (the format version is in config.json)
                  metadata={"format": "pt"})
        (tmp / "quant_log.json").write_text(json.dumps(getattr(model, "hyperquant_log", []), indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extra_files is not None:
            extra_files(tmp)
    return Path(out_dir)


def _read_config(folder: Path) -> dict:
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise HyperquantError(f"{config_path} is not valid JSON ({e}); the checkpoint is damaged, re-create it "
                              f"with `hyperquant compress`") from None
    if not isinstance(config, dict):
        raise HyperquantError(f"{config_path} is not a JSON object; the checkpoint is damaged")
    return config


def is_hyperquant_checkpoint(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` claims to be a hyperquant checkpoint (config.json with a hyperquant section).
    A folder that is no checkpoint but was one (its section deleted) loads as a plain model, which
    `models.load_model` refuses for its missing weights."""
    folder = Path(folder)
    return folder.is_dir() and (folder / "config.json").is_file() and "hyperquant" in _read_config(folder)


def read_hyperquant_config(folder: str | os.PathLike) -> dict:
    folder = Path(folder)
    config_path = folder / "config.json"
    if not folder.is_dir() or not config_path.is_file():
        raise HyperquantError(f"{folder} is not a hyperquant checkpoint folder (no config.json); "
                              f"make one with `hyperquant compress --out {folder}`")
    config = _read_config(folder)
    section = config.get("hyperquant")
    if isinstance(section, dict) and not isinstance(section.get("layers"), dict):
        raise HyperquantError(f"{folder}: the hyperquant section of config.json has no layers mapping; the "
                              f"checkpoint is damaged, re-create it with `hyperquant compress`")
    if not isinstance(section, dict) or "layers" not in section:
        raise HyperquantError(f"{folder} has no hyperquant section in config.json; it is not a hyperquant "
                              f"checkpoint (compress it with `hyperquant compress`)")
    version = section.get("format_version")
    if version not in READABLE_VERSIONS:
        raise HyperquantError(f"{folder} was written in checkpoint format {version}; this hyperquant reads "
                              f"formats {list(READABLE_VERSIONS)}: re-run `hyperquant compress` with this version")
    if version == 1:
        config["hyperquant"] = _upgrade_v1(section)
    for spec in config["hyperquant"]["layers"].values():
        kind_named(spec.get("kind", "?"))  # an unknown kind fails here, with the registered ones listed
    return config


def load(folder: str | os.PathLike) -> nn.Module:
    """Rebuild the compressed model of a checkpoint folder, in float32, ready for inference (eval mode).

    Packed codes, fp16 scales and zero points stay as stored (a blanket `.to(dtype)` would widen the
    scales); float weights stored in `rest_dtype` are widened to float32. Every problem with the folder
    (missing, damaged or tampered files) raises HyperquantError."""
    folder = Path(folder)
    try:
        return _load(folder)
    except HyperquantError:
        raise
    except Exception as e:  # noqa: BLE001 - a tampered spec or torn file fails anywhere in torch or transformers
        raise HyperquantError(f"{folder}: the checkpoint is damaged or does not match its config.json "
                              f"({type(e).__name__}: {first_line(e)}); re-create it with `hyperquant compress`") from None


def _load(folder: Path) -> nn.Module:
    import transformers
    from transformers import AutoConfig

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
    try:
        state = load_file(str(weights))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for torn files
        raise HyperquantError(f"{weights} is damaged ({first_line(e, 200)}); re-create the checkpoint with "
                              f"`hyperquant compress`") from None
    expected = model.state_dict()
    for key, value in state.items():
        if key in expected and expected[key].is_floating_point():
            state[key] = value.to(expected[key].dtype)
    bad = [key for key, value in state.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        raise HyperquantError(f"{folder}: tensor {bad[0]} holds NaN or Inf ({len(bad)} tensor(s) in all); the "
                              f"checkpoint is damaged, re-create it with `hyperquant compress`")
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    sharing = _sharing_modules(model)
    missing = [k for k in missing if k not in tied and not any(k.startswith(t) for t in tied)
               and k.rpartition(".")[0] not in sharing]
    for name, shares in sharing.items():
        if shares not in section["layers"]:
            raise HyperquantError(f"{folder}: layer {name} shares the codes of {shares}, which the checkpoint does "
                                  f"not hold; the checkpoint is damaged, re-create it with `hyperquant compress`")
        model.get_submodule(name).share_codes(model.get_submodule(shares), shares)
    if missing or unexpected:
        raise HyperquantError(f"{folder}: the weights do not match the config (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}); the checkpoint is from another version or damaged")
    model.tie_weights()
    model.config.hyperquant = {k: v for k, v in section.items() if k != "layers"}
    return model.eval()

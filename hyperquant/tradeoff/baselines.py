"""Comparison baselines for the tradeoff sweep: the quantizers users would pick instead of hyperquant.

Each baseline quantizes exactly the FFN linears hyperquant compresses (every other linear, the LM head
included, stays in float) so that the comparison is at the same footprint, runs on CPU, and saves the
result with the library's own save method. The model handed back is loaded again from that folder, so
what is evaluated is what is measured on disk.

- ``bnb-nf4``: bitsandbytes NF4 through transformers' ``BitsAndBytesConfig`` (format-fixed: 4-bit NF4
  codes, one absmax per block of 64 weights, no double quantization, fp32 compute). The other linears are
  kept out with ``llm_int8_skip_modules``.
- ``gptqmodel``: GPTQ through GPTQModel with the given bits and group size, calibrated on the given token
  ids. The other linears are kept out with negative ``dynamic`` rules (``"-:^name$"``). Defaults kept from
  GPTQModel: ``sym=True``, ``desc_act=False`` (its group-aware reordering ``act_group_aware=True``),
  ``damp_percent=0.05``.

Both libraries are optional: ``pip install 'hyperquant[baselines]'``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import io
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from hyperquant.errors import HyperquantError

BASELINES = ("bnb-nf4", "gptqmodel")
INSTALL_HINT = "pip install 'hyperquant[baselines]'"


@dataclass
class BaselineResult:
    model: nn.Module  # on CPU; forward(input_ids=...) returns an object with .logits
    folder: Path  # what the library saved
    weight_files: list[Path]  # the files in ``folder`` that hold weights (*.safetensors, *.bin)
    seconds: float  # quantization time: loading the float model and quantizing it (not saving, not reloading)
    label: str
    details: dict = field(default_factory=dict)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _check_name(name: str) -> None:
    if name not in BASELINES:
        raise HyperquantError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")


@functools.cache
def _bnb_reason() -> str | None:
    if importlib.util.find_spec("bitsandbytes") is None:
        return f"bitsandbytes is not installed; install it with: {INSTALL_HINT}"
    try:
        with _quiet():
            import bitsandbytes  # noqa: F401
            from transformers.utils import is_bitsandbytes_available
    except Exception as e:  # noqa: BLE001 - a broken install is reported, not raised
        return f"bitsandbytes does not import ({_first_line(e)}); reinstall it with: {INSTALL_HINT}"
    if not is_bitsandbytes_available():
        return (f"transformers {_version('transformers')} cannot use bitsandbytes "
                f"{_version('bitsandbytes')}; upgrade it with: pip install -U bitsandbytes")
    return None


def _unmet_requirement(dist: str, names: tuple[str, ...]) -> str | None:
    """The first requirement of ``dist`` on one of ``names`` that the installed versions do not meet."""
    from packaging.requirements import Requirement

    for text in importlib.metadata.requires(dist) or []:
        req = Requirement(text)
        if req.name.lower() not in names:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        have = _version(req.name)
        if have is None or not req.specifier.contains(have.split("+")[0], prereleases=True):
            return f"{dist} needs {req.name}{req.specifier} but {req.name} {have or 'is not installed'}"
    return None


@functools.cache
def _gptqmodel_reason() -> str | None:
    # Checked from package metadata: importing gptqmodel takes seconds and sets process-wide state.
    if importlib.util.find_spec("gptqmodel") is None:
        return f"gptqmodel is not installed; install it with: {INSTALL_HINT}"
    # numpy is left out on purpose: gptqmodel pins numpy exactly but works with newer numpy 2.x.
    unmet = _unmet_requirement("gptqmodel", ("torch", "transformers", "accelerate", "safetensors"))
    if unmet:
        return (f"{unmet}; gptqmodel {_version('gptqmodel')} cannot run here "
                "(hyperquant keeps its torch and transformers)")
    return None


def unavailable_reason(name: str) -> str | None:
    """None if the baseline can run here, else one line saying why not and how to fix it."""
    _check_name(name)
    return _bnb_reason() if name == "bnb-nf4" else _gptqmodel_reason()


class _quiet(contextlib.AbstractContextManager):
    """Capture what the libraries print (banners, progress bars) so the sweep's own output stays readable."""

    def __enter__(self):
        self.buffer = io.StringIO()
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(contextlib.redirect_stdout(self.buffer))
        self._stack.enter_context(contextlib.redirect_stderr(self.buffer))
        return self

    def __exit__(self, *exc):
        self._stack.close()
        return False

    def tail(self, lines: int = 8) -> str:
        return "\n".join(self.buffer.getvalue().strip().splitlines()[-lines:])


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


def _linear_names(model_dir: Path) -> list[str]:
    """Names of every linear of the model in ``model_dir``, from its config alone (no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return [n for n, m in skeleton.named_modules() if _is_linear(m)]


def _split_linears(model_dir: Path, ffn_names: list[str]) -> list[str]:
    """The linears to keep in float: all but ``ffn_names``, after checking those are linears of the model."""
    linears = _linear_names(model_dir)
    missing = sorted(set(ffn_names) - set(linears))
    if missing:
        raise HyperquantError(
            f"{len(missing)} of the FFN names are not linears of the model in {model_dir} "
            f"(first: {missing[0]}); pass names from find_ffn_linears on the same model"
        )
    if not ffn_names:
        raise HyperquantError("no FFN names given; pass the linears to quantize (find_ffn_linears)")
    keep = set(ffn_names)
    return [n for n in linears if n not in keep]


def _prepare_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and any(out_dir.iterdir()):
        raise HyperquantError(f"baseline output folder {out_dir} is not empty; give a new or empty folder")
    out_dir.mkdir(parents=True, exist_ok=True)


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(p for pattern in ("*.safetensors", "*.bin") for p in folder.glob(pattern) if p.is_file())
    if not files:
        raise HyperquantError(f"the baseline saved no weight files (*.safetensors, *.bin) in {folder}")
    return files


def _check_quantized(quantized: set[str], ffn_names: list[str], what: str) -> None:
    """Exactly the FFN linears are quantized; raise naming the difference otherwise."""
    extra, missing = sorted(quantized - set(ffn_names)), sorted(set(ffn_names) - quantized)
    if extra or missing:
        parts = [f"{len(missing)} FFN linears were left unquantized (first: {missing[0]})"] if missing else []
        parts += [f"{len(extra)} other modules were quantized (first: {extra[0]})"] if extra else []
        raise HyperquantError(f"{what} did not quantize exactly the FFN linears: {'; '.join(parts)}")


def run_baseline(
    name: str,
    model_dir: Path,
    ffn_names: list[str],
    calib_ids: torch.Tensor | None,
    bits: int,
    group_size: int | None,
    out_dir: Path,
    *,
    quiet: bool = True,
    rest_dtype: torch.dtype | None = torch.float16,
) -> BaselineResult:
    """Quantize the FFN linears of the float HF causal LM in ``model_dir`` with baseline ``name``.

    ``model_dir`` must hold the model (float weights) and its tokenizer (GPTQModel loads it).
    ``calib_ids``: (samples, seq_len) token ids, required by ``gptqmodel``, unused by ``bnb-nf4``.
    ``bits``/``group_size`` are used by ``gptqmodel`` (group_size None: 128); NF4's are fixed by the
    format (4 bits, blocks of 64), which ``details`` records. ``out_dir`` must be new or empty.
    ``quiet``: capture the libraries' console output (its tail is put in the error if they fail).
    ``rest_dtype``: the float tensors outside the FFN linears are stored in this dtype (float16, as
    hyperquant's checkpoints store them by default), so sizes compare the FFN formats alone; None keeps
    what the library writes (float32). The model returned is reloaded from those files.
    """
    _check_name(name)
    reason = unavailable_reason(name)
    if reason:
        raise HyperquantError(f"baseline {name} is not available: {reason}")
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not (model_dir / "config.json").is_file():
        raise HyperquantError(f"{model_dir} is not a Hugging Face model folder (no config.json)")
    if name == "gptqmodel" and (calib_ids is None or calib_ids.ndim != 2 or calib_ids.shape[0] == 0):
        raise HyperquantError("gptqmodel needs calibration token ids, a (samples, seq_len) tensor; "
                              "pass calibration_ids(tokenizer, samples, seq_len)")
    out = _quiet() if quiet else contextlib.nullcontext()
    try:
        with out:
            keep_float = _split_linears(model_dir, list(ffn_names))
            _prepare_out_dir(out_dir)
            if name == "bnb-nf4":
                return _run_bnb_nf4(model_dir, list(ffn_names), keep_float, out_dir, rest_dtype)
            return _run_gptqmodel(model_dir, list(ffn_names), keep_float, calib_ids, bits, group_size,
                                  out_dir, rest_dtype)
    except HyperquantError:
        raise
    except Exception as e:
        tail = out.tail() if quiet else ""
        raise HyperquantError(
            f"baseline {name} failed: {type(e).__name__}: {_first_line(e)}" + (f"\n{tail}" if tail else "")
        ) from e


def cast_rest(folder: Path, ffn_names: list[str], dtype: torch.dtype | None) -> int:
    """Rewrite the safetensors files in ``folder`` with every float32 tensor that does not belong to an FFN
    linear cast to ``dtype``; returns how many were cast. The files are replaced atomically."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if dtype is None:
        return 0
    starts = tuple(n + "." for n in ffn_names)
    cast = 0
    for file in _weight_files(folder):
        if file.suffix != ".safetensors":
            continue
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata()
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - not iterable
        for key, tensor in tensors.items():
            if tensor.dtype == torch.float32 and not key.startswith(starts):
                tensors[key] = tensor.to(dtype)
                cast += 1
        tmp = file.with_name(file.name + ".tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.replace(file)
    return cast


def _run_bnb_nf4(model_dir: Path, ffn_names: list[str], keep_float: list[str],
                 out_dir: Path, rest_dtype: torch.dtype | None) -> BaselineResult:
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    compute_dtype = torch.float32
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=False,
        # Patterns are regexes matched from the start of a module name up to a module boundary.
        llm_int8_skip_modules=[re.escape(n) for n in keep_float],
    )
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, quantization_config=config,
                                                 device_map="cpu")
    seconds = time.perf_counter() - start
    # Save before any forward: on CPUs with AVX512-BF16, bitsandbytes 0.50 repacks the weights at the first
    # forward and its save path does not restore the absmax layout, so a later save writes wrong scales.
    start = time.perf_counter()
    model.save_pretrained(out_dir)
    cast = cast_rest(out_dir, ffn_names, rest_dtype)
    save_seconds = time.perf_counter() - start
    del model
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, device_map="cpu").eval()
    load_seconds = time.perf_counter() - start
    quantized = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    _check_quantized(quantized, ffn_names, "bitsandbytes")
    with torch.no_grad():  # float16-stored float layers computed in float32, like hyperquant's checkpoints
        for name, param in model.named_parameters():
            if param.is_floating_point() and name.rpartition(".")[0] not in quantized:
                param.data = param.data.float()
    blocksizes = sorted({m.weight.quant_state.blocksize for n, m in model.named_modules() if n in quantized})
    details = {
        "library": "bitsandbytes", "bitsandbytes": _version("bitsandbytes"),
        "transformers": _version("transformers"), "torch": torch.__version__, "quant_type": "nf4", "bits": 4,
        "blocksize": blocksizes[0] if len(blocksizes) == 1 else blocksizes, "double_quant": False,
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
        # On CPUs with AVX512-BF16 the first forward repacks the weights for a kernel with bf16 absmax.
        "cpu_bf16_kernel": any(getattr(m, "support_avx512bf16_for_cpu", False)
                               for n, m in model.named_modules() if n in quantized),
        "quantized_modules": len(quantized), "float_linears": len(keep_float),
        "save_seconds": save_seconds, "load_seconds": load_seconds,
        "rest_dtype": str(rest_dtype).removeprefix("torch.") if cast else "float32",
    }
    return BaselineResult(model, out_dir, _weight_files(out_dir), seconds, "bitsandbytes NF4 (FFN)", details)


def _run_gptqmodel(model_dir: Path, ffn_names: list[str], keep_float: list[str], calib_ids: torch.Tensor,
                   bits: int, group_size: int | None, out_dir: Path,
                   rest_dtype: torch.dtype | None) -> BaselineResult:
    if group_size is None:
        group_size = 128  # GPTQModel's default
    # GPTQModel sizes its CPU worker pool as half the cores, but its model loader asks for 2 workers: on a
    # machine with 2 cores or fewer quantize() fails ("requests 2 workers but parent 'cpu' only has 1")
    # unless GPTQMODEL_CPU_WORKERS is at least 2. Read when the pool is first built, not at import.
    if "GPTQMODEL_CPU_WORKERS" not in os.environ and (os.cpu_count() or 1) <= 2:
        os.environ["GPTQMODEL_CPU_WORKERS"] = "2"
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    try:  # GPTQModel writes per-run logs to ./logs of the current directory; keep them with the model
        from gptqmodel.looper import loop_processor

        if hasattr(loop_processor, "_PROJECT_LOG_DIR"):
            loop_processor._PROJECT_LOG_DIR = out_dir / "gptqmodel-logs"
    except ImportError:
        pass

    config = QuantizeConfig(
        bits=bits,
        group_size=group_size,
        sym=True,
        desc_act=False,
        # Negative rules: "-:" + an anchored literal name skips that module.
        dynamic={f"-:^{re.escape(n)}$": {} for n in keep_float},
        device="cpu",
        offload_to_disk=False,
        # "original" packs in plain torch; the default ("cpu") first JIT-compiles a C++ extension (~1 min).
        pack_impl="original",
    )
    calibration = [{"input_ids": row.long().cpu(), "attention_mask": torch.ones_like(row, dtype=torch.long)}
                   for row in calib_ids]
    start = time.perf_counter()
    try:
        wrapped = GPTQModel.load(str(model_dir), config, dtype=torch.float32)
    except ValueError as e:
        if "tokenizer" in str(e).lower():
            raise HyperquantError(f"gptqmodel could not load the tokenizer from {model_dir}; save the "
                                  f"tokenizer there too (tokenizer.save_pretrained)") from e
        raise
    wrapped.quantize(calibration, batch_size=1)
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    wrapped.save(str(out_dir))
    cast = cast_rest(out_dir, ffn_names, rest_dtype)
    save_seconds = time.perf_counter() - start
    # The in-memory model after quantize() still carries GPTQModel's capture hooks; evaluate the saved one.
    del wrapped
    start = time.perf_counter()
    # The portable torch kernel (dequantize, then matmul in the input's dtype) accepts only fp16/bf16 at
    # load time, and GPTQModel's CPU kernel (torch_fused) computes in bf16. Load in bf16, then put every
    # float tensor back in fp32 from the saved files (they hold the float layers in fp32) and run the
    # dequantized FFN weights in fp32, so only the GPTQ codes differ from the original model.
    loaded = GPTQModel.load(str(out_dir), device="cpu", backend=BACKEND.TORCH, dtype=torch.bfloat16)
    model = loaded.model.eval()
    quantized = {n for n, m in model.named_modules() if isinstance(m, BaseQuantLinear)}
    _check_quantized(quantized, ffn_names, "gptqmodel")
    _restore_fp32(model, _weight_files(out_dir), quantized)
    load_seconds = time.perf_counter() - start
    details = {
        "library": "gptqmodel", "gptqmodel": _version("gptqmodel"), "transformers": _version("transformers"),
        "torch": torch.__version__, "method": "gptq", "bits": bits, "group_size": group_size,
        "sym": config.sym,
        "desc_act": config.desc_act, "act_group_aware": getattr(config, "act_group_aware", None),
        "damp_percent": getattr(config, "damp_percent", None), "calibration_samples": int(calib_ids.shape[0]),
        "calibration_seq_len": int(calib_ids.shape[1]), "backend": "torch", "compute_dtype": "float32",
        "cpu_workers": os.environ.get("GPTQMODEL_CPU_WORKERS"),
        "kernel": sorted({type(m).__name__ for n, m in model.named_modules() if n in quantized}),
        "quantized_modules": len(quantized), "float_linears": len(keep_float),
        "save_seconds": save_seconds, "load_seconds": load_seconds,
        "rest_dtype": str(rest_dtype).removeprefix("torch.") if cast else "float32",
    }
    label = f"GPTQModel GPTQ-{bits} g{group_size} (FFN)"
    return BaselineResult(model, out_dir, _weight_files(out_dir), seconds, label, details)


def _restore_fp32(model: nn.Module, files: list[Path], quantized: set[str]) -> None:
    """Cast ``model`` to fp32 and copy the exact fp32 float tensors saved in ``files`` back into it."""
    from safetensors import safe_open

    model.float()  # the quantized modules' fp16 scales become fp32 exactly; their int codes are untouched
    params = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    restored = 0
    for file in files:
        if file.suffix != ".safetensors":
            raise HyperquantError(f"expected safetensors from gptqmodel, got {file.name}")
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - a safetensors handle is not iterable
                if key.rpartition(".")[0] in quantized:
                    continue
                tensor = f.get_tensor(key)
                if not tensor.is_floating_point() or key not in params:
                    continue
                target = params[key]
                if target.shape != tensor.shape:
                    raise HyperquantError(f"gptqmodel reloaded {key} with shape {tuple(target.shape)}, "
                                          f"saved {tuple(tensor.shape)}")
                with torch.no_grad():
                    target.copy_(tensor.to(torch.float32))
                restored += 1
    if not restored:
        raise HyperquantError("gptqmodel saved no float tensors to restore in fp32")

"""Where the work runs: ``--device auto|cpu|cuda[:i]``, resolved and checked before anything is loaded."""

from __future__ import annotations

import re

import torch

from hyperquant.errors import HyperquantError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:<index>"


def resolve_device(spec: str | None, option: str = "--device") -> torch.device:
    """``auto`` (or None): the first CUDA device when one is visible, else the CPU."""
    text = "auto" if spec is None else str(spec).strip().lower()
    if text == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise HyperquantError(f"{option} {spec!r}: choose {DEVICE_CHOICES}")
    device = torch.device(text)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise HyperquantError(f"{option} {spec}: no CUDA device is visible to torch here "
                                  f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); "
                                  f"use {option} cpu, or install a CUDA build of torch")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise HyperquantError(f"{option} {spec}: only {torch.cuda.device_count()} CUDA device(s) are visible "
                                  f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return device


def fast_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices natively: a CUDA device that supports bf16, or a CPU with
    AMX-BF16 or AVX512-BF16 (oneDNN's bf16 kernels: with AMX, bf16 matrix products run several times faster
    than fp32). Elsewhere bf16 is emulated and slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    capabilities = getattr(torch.cpu, "get_capabilities", None)  # torch >= 2.7
    if capabilities is None:
        return False
    found = capabilities()
    return bool(found.get("amx_bf16") or found.get("avx512_bf16"))


def resolve_mixed_precision(setting: str, device: torch.device) -> str:
    """A training's ``mixed_precision`` as it runs: ``auto`` is bf16 where `fast_bf16`, else no."""
    if setting != "auto":
        return setting
    return "bf16" if fast_bf16(device) else "no"


def peak_memory(device: torch.device | None = None) -> dict[str, int]:
    """Peak resident host memory of this process so far and, on CUDA, peak allocated device memory (bytes)."""
    import resource
    import sys

    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    out = {"peak_host_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale}
    if device is not None and device.type == "cuda":
        out["peak_device_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def memory_now() -> dict[str, int]:
    """Resident host memory now and at its peak so far (bytes), and on CUDA the peak allocated device memory."""
    out = peak_memory(torch.device("cuda") if torch.cuda.is_available() and torch.cuda.is_initialized() else None)
    try:
        import os

        with open("/proc/self/statm") as f:  # Linux: pages
            out["host_rss_bytes"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    return out

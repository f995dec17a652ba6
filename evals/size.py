"""Bytes, parameters and multiply-adds per token, counted from the modules' shapes and storage."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from hyperquant.convert import find_ffn_linears, is_conv1d, linear_weight
from hyperquant.kinds import kind_of


def folder_bytes(folder: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def _compressed_types() -> tuple[type, ...]:
    from hyperquant.kinds import registered_kinds

    return tuple(t for kind in registered_kinds().values() for t in kind.module_types)


def _linear_macs(module: nn.Module) -> int:
    kind = kind_of(module)
    if kind is not None:
        return kind.macs_per_token(module)
    out_f, in_f = linear_weight(module).shape
    return out_f * in_f


def _weights_of(module: nn.Module, float_bytes: int | None) -> tuple[int, int, float]:
    """(parameters it represents, bytes it stores, weights of the dense layer it stands for). A compressed
    module is counted by its kind (its tensors as stored); a plain linear at ``float_bytes`` per weight
    (None: its dtype's size)."""
    kind = kind_of(module)
    if kind is not None:
        return kind.parameters(module), kind.stored_bytes(module), module.in_features * module.out_features
    params = sum(p.numel() for p in module.parameters())
    stored = sum(p.numel() * (float_bytes or p.element_size()) for p in module.parameters())
    return params, stored, linear_weight(module).numel()


def model_size(model: nn.Module, rest_bytes_per_param: int | None = None, ffn_names: list[str] | None = None) -> dict:
    """Parameter counts, storage bytes (total and FFN), bits per FFN weight and multiply-adds per token.

    Storage bytes count packed codes, scales and zero points as stored; float weights at
    ``rest_bytes_per_param`` (default: their dtype's size). Tied weights count once.
    Multiply-adds per token count every linear layer (FFN, attention projections, LM head);
    attention's score/value products depend on the context and are left out.
    """
    compressed_types = _compressed_types()
    if ffn_names is None:
        ffn_names = list(find_ffn_linears(model, _compressed_or_default_patterns(model), extra_types=compressed_types))
    ffn = {name: model.get_submodule(name) for name in ffn_names}
    seen: set[int] = set()
    total_params = total_bytes = 0
    covered: set[str] = set()
    for name, module in model.named_modules():
        if kind_of(module) is not None:
            p, b, _ = _weights_of(module, rest_bytes_per_param)
            total_params += p
            total_bytes += b
            covered.add(name)
    for name, param in model.named_parameters():
        if name.rpartition(".")[0] in covered or param.data_ptr() in seen:
            continue
        seen.add(param.data_ptr())
        total_params += param.numel()
        total_bytes += param.numel() * (rest_bytes_per_param or param.element_size())
    ffn_params = ffn_bytes = 0
    ffn_dense_weights = 0.0
    for module in ffn.values():
        p, b, dense = _weights_of(module, rest_bytes_per_param)
        ffn_params, ffn_bytes, ffn_dense_weights = ffn_params + p, ffn_bytes + b, ffn_dense_weights + dense
    macs = sum(_linear_macs(m) for m in model.modules()
               if isinstance(m, (nn.Linear, *compressed_types)) or is_conv1d(m))
    return {
        "params": total_params,
        "bytes": total_bytes,
        "ffn_params": ffn_params,
        "ffn_bytes": ffn_bytes,
        "ffn_bits_per_weight": 8 * ffn_bytes / max(ffn_dense_weights, 1),
        "macs_per_token": macs,
        "ffn_macs_per_token": sum(_linear_macs(m) for m in ffn.values()),
    }


def _compressed_or_default_patterns(model: nn.Module) -> list[str] | None:
    config = getattr(model, "config", None)
    section = getattr(config, "hyperquant", None) or {}
    return (section.get("compress_config") or {}).get("target_patterns")


def dtype_bytes(dtype_name: str) -> int:
    return torch.empty(0, dtype=getattr(torch, dtype_name)).element_size()

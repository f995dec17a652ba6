"""Bytes, parameters and multiply-adds per token, counted from the modules' shapes and storage."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from hyperquant.convert import find_ffn_linears, is_conv1d, linear_weight
from hyperquant.fourier.module import FourierLinear
from hyperquant.phm.layer import PHMLinear
from hyperquant.quant.modules import QuantLinear, QuantPHMLinear

_COMPRESSED = (QuantLinear, QuantPHMLinear, PHMLinear, FourierLinear)


def folder_bytes(folder: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def _linear_macs(module: nn.Module) -> int:
    if isinstance(module, _COMPRESSED):
        return module.macs_per_token()["total"]
    out_f, in_f = linear_weight(module).shape
    return out_f * in_f


def _weights_of(module: nn.Module, float_bytes: int) -> tuple[int, int, float]:
    """(parameters it represents, bytes it stores, weights of the dense layer it stands for)."""
    if isinstance(module, QuantLinear | QuantPHMLinear):
        stored = module.packed_bytes() + (module.bias.numel() * float_bytes if module.bias is not None else 0)
        params = module.q_rows * module.q_cols + (module.bias.numel() if module.bias is not None else 0)
        if isinstance(module, QuantPHMLinear):
            params += module.bases.numel()
            stored += module.bases.numel() * 4
        return params, stored, module.in_features * module.out_features
    if isinstance(module, FourierLinear):
        # Packed magnitude/phase codes, fp16 magnitude scales and channel scale; the factors represent
        # 2 r (out + in) real values (magnitude and phase of every complex entry of P and Q).
        bias = module.bias.numel() if module.bias is not None else 0
        params = 2 * module.rank * (module.in_features + module.out_features) + bias
        return params, module.packed_bytes() + bias * float_bytes, module.in_features * module.out_features
    if isinstance(module, PHMLinear):
        # Float PHM layers are stored in their own dtype (the checkpoint leaves them as they are).
        tensors = [module.factors, module.bases] + ([module.bias] if module.bias is not None else [])
        params = sum(t.numel() for t in tensors)
        return params, sum(t.numel() * t.element_size() for t in tensors), module.in_features * module.out_features
    params = sum(p.numel() for p in module.parameters())
    return params, params * float_bytes, linear_weight(module).numel()


def model_size(model: nn.Module, rest_bytes_per_param: int | None = None, ffn_names: list[str] | None = None) -> dict:
    """Parameter counts, storage bytes (total and FFN), bits per FFN weight and multiply-adds per token.

    Storage bytes count packed codes, scales and zero points as stored; float weights at
    ``rest_bytes_per_param`` (default: their dtype's size). Tied weights count once.
    Multiply-adds per token count every linear layer (FFN, attention projections, LM head);
    attention's score/value products depend on the context and are left out.
    """
    if ffn_names is None:
        ffn_names = list(find_ffn_linears(model, _compressed_or_default_patterns(model), extra_types=_COMPRESSED))
    ffn = {name: model.get_submodule(name) for name in ffn_names}
    seen: set[int] = set()
    total_params = total_bytes = 0
    covered: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, _COMPRESSED):
            p, b, _ = _weights_of(module, rest_bytes_per_param or 4)
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
        p, b, dense = _weights_of(module, rest_bytes_per_param or 4)
        ffn_params, ffn_bytes, ffn_dense_weights = ffn_params + p, ffn_bytes + b, ffn_dense_weights + dense
    macs = sum(_linear_macs(m) for m in model.modules()
               if isinstance(m, (nn.Linear, *_COMPRESSED)) or is_conv1d(m))
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

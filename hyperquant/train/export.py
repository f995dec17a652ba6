"""Turning a trained model into a hyperquant checkpoint: merge LoRA, quantize A_cat, save like `compress`."""

from __future__ import annotations

import time

import torch
from torch import nn

from hyperquant.config import CompressConfig
from hyperquant.convert import set_module
from hyperquant.errors import HyperquantError
from hyperquant.linalg import quadratic_form
from hyperquant.phm.layer import PHMLinear
from hyperquant.phm.projection import mixed_hessian
from hyperquant.pipeline import FORMAT_VERSION, input_covariances
from hyperquant.quant.gptq import gptq_quantize
from hyperquant.quant.modules import QuantPHMLinear
from hyperquant.quant.rtn import rtn_quantize
from hyperquant.train.config import TrainConfig
from hyperquant.train.interp import InterpolatedLinear, drop_dense, interpolated_layers
from hyperquant.train.lora import merge_lora


def _final_module(name: str, m: InterpolatedLinear, cfg: TrainConfig, cov: torch.Tensor | None,
                  record: dict) -> nn.Module:
    phm = m.phm
    bias = None if phm.bias is None else phm.bias.detach().float().cpu()
    bases = phm.bases.detach().float().cpu()
    a_cat = phm.a_cat.detach().float().cpu().contiguous()
    if cfg.bits is None:
        new = PHMLinear(phm.in_features, phm.out_features, phm.n, phm.num_bases, bias=bias is not None)
        new.factors.data.copy_(phm.factors.detach().float().cpu())
        if bias is not None:
            new.bias.data.copy_(bias)
        return new
    hz = mixed_hessian(bases, cov) if cov is not None else None
    if cfg.export_method == "gptq":
        if hz is None:
            raise HyperquantError("GPTQ export needs calibration inputs")
        res = gptq_quantize(a_cat, hz, cfg.bits, cfg.group_size, cfg.symmetric, True, 0.01)
        ref = quadratic_form(a_cat, hz)
        record.update(quant_error=res.error / ref, quant_error_rtn=res.rtn_error / ref)
        qw = res.weight
    else:
        quantizer = m.quantizer
        if quantizer is not None and (quantizer.bits, quantizer.group_size, quantizer.symmetric) == \
                (cfg.bits, cfg.group_size, cfg.symmetric):
            qw = quantizer.quantized(a_cat)
        else:
            qw = rtn_quantize(a_cat, cfg.bits, cfg.group_size, cfg.symmetric)
        if hz is not None:
            record["quant_error"] = quadratic_form(a_cat - qw.dequantize(), hz) / quadratic_form(a_cat, hz)
    return QuantPHMLinear.from_quantized(qw, bases, phm.in_features, bias)


def compress_config_for(cfg: TrainConfig, model: nn.Module) -> CompressConfig:
    """The CompressConfig that describes the exported layers (its layer_bases pins each layer's B)."""
    import re

    layer_bases = {re.escape(name) + "$": m.phm.num_bases for name, m in interpolated_layers(model).items()}
    return CompressConfig(bits=cfg.bits, method=cfg.export_method, n=cfg.n, num_bases=cfg.num_bases,
                          layer_bases=layer_bases, init=cfg.init, ridge=cfg.ridge, group_size=cfg.group_size,
                          symmetric=cfg.symmetric, calib_samples=cfg.init_samples, calib_seq_len=cfg.seq_len,
                          target_patterns=cfg.target_patterns, rest_dtype=cfg.rest_dtype)


def _round_rest(model: nn.Module, compressed: set[str], dtype_name: str) -> None:
    """Round the uncompressed float weights to their storage dtype, so the in-memory model equals the
    one `hyperquant.load` rebuilds from the checkpoint."""
    if dtype_name == "float32":
        return
    dtype = getattr(torch, dtype_name)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.rpartition(".")[0] in compressed or not param.is_floating_point():
                continue
            param.copy_(param.to(dtype).to(param.dtype))


def finalize(model: nn.Module, cfg: TrainConfig, calib_ids: torch.Tensor | None = None,
             train_summary: dict | None = None) -> nn.Module:
    """In place: merge LoRA, drop dense branches, replace every interpolated layer by its quantized PHM
    layer (or float PHMLinear when bits is None), and set ``model.config.hyperquant`` like `compress`."""
    start = time.perf_counter()
    model.eval()
    merge_lora(model)
    drop_dense(model)
    layers = interpolated_layers(model)
    if not layers:
        raise HyperquantError("the model holds no PHM training layers to export")
    ccfg = compress_config_for(cfg, model)
    covs: dict[str, torch.Tensor] = {}
    if cfg.bits is not None and calib_ids is not None:
        covs = input_covariances(model, interpolated_layers(model), calib_ids)
    log = []
    for name, m in layers.items():
        record = {"name": name, "n": m.phm.n, "num_bases": m.phm.num_bases, "bits": cfg.bits,
                  "method": cfg.export_method if cfg.bits else None, "trained": True}
        set_module(model, name, _final_module(name, m, cfg, covs.get(name), record))
        log.append(record)
    _round_rest(model, set(layers), cfg.rest_dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    model.config.hyperquant = {
        "format_version": FORMAT_VERSION,
        "compress_config": ccfg.to_dict(),
        "compress_time_s": time.perf_counter() - start,
        "train_config": cfg.to_dict(),
        **({"train_summary": train_summary} if train_summary else {}),
    }
    model.hyperquant_log = log
    return model

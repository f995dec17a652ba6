"""Turning a trained model into a hyperquant checkpoint: merge LoRA, quantize A_cat as the phm-quant kind
does, and record the plan like `compress`."""

from __future__ import annotations

import dataclasses
import re
import time

from torch import nn

from hyperquant.config import CompressConfig
from hyperquant.convert import set_module
from hyperquant.errors import HyperquantError
from hyperquant.kinds import PlanEntry, kind_of_entry
from hyperquant.kinds.dense import DenseQuantPlan
from hyperquant.kinds.phm import PHMFields, PHMQuantPlan, phm_float_module, quantize_phm
from hyperquant.kinds.quantize import QuantFields, quantize_matrix
from hyperquant.linalg import quadratic_form
from hyperquant.phm.projection import relative_output_error
from hyperquant.pipeline import FORMAT_VERSION, input_covariances, round_rest
from hyperquant.plan import plan_to_dict
from hyperquant.quant.modules import QuantLinear, QuantPHMLinear
from hyperquant.train.config import TrainConfig
from hyperquant.train.interp import InterpolatedLinear, drop_dense, interpolated_layers
from hyperquant.train.lora import merge_lora


def dense_entry_of(entry: PHMQuantPlan) -> DenseQuantPlan:
    """The dense-quant entry with ``entry``'s quantizer settings."""
    return DenseQuantPlan(**{f.name: getattr(entry, f.name) for f in dataclasses.fields(QuantFields)})


def _final_module(m: InterpolatedLinear, entry, cov, record: dict) -> tuple[nn.Module, PlanEntry]:
    """The exported module of one trained layer and its plan entry."""
    phm = m.phm
    bias = None if phm.bias is None else phm.bias.detach().float().cpu()
    bases = phm.bases.detach().float().cpu()
    if entry.kind == "phm-float":
        return phm_float_module(bases, phm.factors.detach().float().cpu(), phm.in_features, phm.out_features,
                                bias), entry
    a_cat = phm.a_cat.detach().float().cpu().contiguous()
    quantizer = m.quantizer
    qat_grid = entry.method == "rtn" and quantizer is not None and \
        (quantizer.bits, quantizer.group_size, quantizer.symmetric) == (entry.bits, entry.group_size, entry.symmetric)
    if phm.num_bases == phm.n * phm.n and not qat_grid:
        # n^2 bases span every matrix, so the layer is just W = sum_b H_b kron A_b: stored and run as a dense
        # quantized layer, the same parameters at half the multiply-adds of its PHM form (B*in*out/n).
        # (QAT trained A_cat's own grid: that layer stays PHM so the checkpoint computes what was trained.)
        dense = dense_entry_of(entry)
        weight = phm.effective_weight().detach().float().cpu()
        for phm_field in dataclasses.fields(PHMFields):
            record.pop(phm_field.name, None)
        record.update(dense.to_dict(), trained_as=f"PHM n={phm.n} B={phm.num_bases}")
        return QuantLinear.from_quantized(quantize_matrix(weight, cov, dense, record), bias), dense
    if qat_grid:
        # QAT's own grid (its learned scales, if any): the checkpoint computes what was trained
        qw = quantizer.quantized(a_cat)
        if cov is not None:
            from hyperquant.phm.projection import mixed_hessian

            hz = mixed_hessian(bases, cov)
            record["quant_error"] = quadratic_form(a_cat - qw.dequantize(), hz) / quadratic_form(a_cat, hz)
        return QuantPHMLinear.from_quantized(qw, bases, phm.in_features, bias), entry
    if entry.method == "gptq" and cov is None:
        raise HyperquantError("GPTQ export needs calibration inputs")
    return quantize_phm(entry, bases, a_cat, phm.in_features, bias, cov, record), entry


def compress_config_for(cfg: TrainConfig, model: nn.Module) -> CompressConfig:
    """The CompressConfig that describes the exported layers (its layer_bases pins each layer's B)."""
    layer_bases = {re.escape(name) + "$": m.phm.num_bases for name, m in interpolated_layers(model).items()}
    return dataclasses.replace(cfg.compress, layer_bases=layer_bases, calib_samples=cfg.init_samples,
                               calib_seq_len=cfg.seq_len)


def _compress_rest(model: nn.Module, ccfg, calib_ids, heldout_ids=None) -> dict:
    """What the compress config gives the layers training does not touch (attention, the LM head, the
    embedding table), compressed by the same pipeline as `hyperquant compress`, on the trained model."""
    from hyperquant.pipeline import compress
    from hyperquant.plan import resolve_plan

    rest = resolve_plan(model, ccfg, parts=("attention", "head", "embedding"))
    if not rest:
        return {}
    if calib_ids is None and any(kind_of_entry(e).needs_calibration(e) for e in rest.values()):
        raise HyperquantError("compressing attention and the LM head with GPTQ needs calibration tokens; pass "
                              "calib_ids to finalize (or set compress.scope: ffn)")
    compress(model, ccfg, calib_ids, progress=False, plan=rest, heldout_inputs=heldout_ids)
    return {"plan": rest, "log": model.hyperquant_log}


def finalize(model: nn.Module, cfg: TrainConfig, calib_ids=None, train_summary: dict | None = None,
             heldout_ids=None) -> nn.Module:
    """In place: merge LoRA, drop dense branches, replace every interpolated layer by its quantized PHM
    layer (or float PHMLinear when bits is None), and set ``model.config.hyperquant`` like `compress`.
    ``heldout_ids``: calibration-text rows training and the export never saw; each quantized layer's
    error against its trained float weights is also measured on them (``quant_error_heldout``)."""
    start = time.perf_counter()
    model.eval()
    merge_lora(model)
    drop_dense(model)
    layers = interpolated_layers(model)
    if not layers:
        raise HyperquantError("the model holds no PHM training layers to export")
    ccfg = compress_config_for(cfg, model)
    plan = {name: ccfg.entry_for(name) for name in layers}
    covs, heldout = {}, {}
    if ccfg.bits is not None and calib_ids is not None:
        covs = input_covariances(model, layers, calib_ids)
    if ccfg.bits is not None and heldout_ids is not None:
        heldout = input_covariances(model, layers, heldout_ids)
    log = []
    for name, m in layers.items():
        record = {"name": name, "in_features": m.phm.in_features, "out_features": m.phm.out_features,
                  **plan[name].to_dict(), "trained": True}
        new, plan[name] = _final_module(m, plan[name], covs.get(name), record)
        if name in heldout:
            record["quant_error_heldout"] = relative_output_error(
                m.phm.effective_weight().detach().float().cpu(), new.effective_weight(), heldout[name])
        set_module(model, name, new)
        log.append(record)
    round_rest(model, set(layers), cfg.compress.rest_dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    rest = _compress_rest(model, ccfg, calib_ids, heldout_ids)  # attention, LM head, embeddings (scope "model")
    plan.update(rest.get("plan", {}))
    log += rest.get("log", [])
    model.config.hyperquant = {
        "format_version": FORMAT_VERSION,
        "compress_config": ccfg.to_dict(),
        "plan": plan_to_dict(plan),
        "train_config": cfg.to_dict(),
        **({"train_summary": train_summary} if train_summary else {}),
    }
    model.hyperquant_log = log
    model.hyperquant_seconds = time.perf_counter() - start  # not in config.json: the checkpoint stays reproducible
    return model

"""Compressing one linear: PHM projection and/or factor quantization (or the Fourier low-rank comparator),
with its error accounting."""

from __future__ import annotations

import time

import torch
from torch import nn

from hyperquant.config import CompressConfig
from hyperquant.convert import linear_bias, linear_weight
from hyperquant.fourier.calibration import diag_scale
from hyperquant.fourier.module import FourierLinear
from hyperquant.fourier.transform import fourier_lowrank, rank_for_fraction, reconstruct
from hyperquant.linalg import quadratic_form
from hyperquant.phm.bases import fixed_bases
from hyperquant.phm.functional import factors_to_cat, kron_weight
from hyperquant.phm.layer import PHMLinear
from hyperquant.phm.projection import (
    kronecker_svd,
    mixed_hessian,
    project_activation_aware,
    project_fixed,
    relative_error_to_original,
    relative_output_error,
    relative_weight_error,
)
from hyperquant.quant.gptq import gptq_quantize
from hyperquant.quant.modules import QuantLinear, QuantPHMLinear
from hyperquant.quant.qtensor import QuantizedWeight
from hyperquant.quant.rtn import rtn_quantize


def _quantize(matrix: torch.Tensor, hessian: torch.Tensor | None, cfg: CompressConfig, record: dict) -> QuantizedWeight:
    """Quantize ``matrix`` (rows, cols) with RTN or GPTQ; log errors relative to the float matrix."""
    if cfg.method == "gptq":
        res = gptq_quantize(matrix, hessian, cfg.bits, cfg.group_size, cfg.symmetric, cfg.act_order, cfg.damp)
        ref = quadratic_form(matrix, hessian)
        record.update(quant_error=res.error / ref, quant_error_rtn=res.rtn_error / ref, damp=res.damp)
        return res.weight
    qw = rtn_quantize(matrix, cfg.bits, cfg.group_size, cfg.symmetric)
    if hessian is not None:
        record["quant_error"] = quadratic_form(matrix - qw.dequantize(), hessian) / quadratic_form(matrix, hessian)
    record["quant_weight_error"] = relative_weight_error(matrix, qw.dequantize())
    return qw


def _fourier(weight: torch.Tensor, bias: torch.Tensor | None, cfg: CompressConfig,
             input_cov: torch.Tensor | None, record: dict) -> FourierLinear:
    """Rank-r factors of FFT2(W), PolarQuant-ized, then (with calibration) a per-channel output scale."""
    out_f, in_f = weight.shape
    rank = rank_for_fraction(out_f, in_f, cfg.fourier_fraction)
    p, q = fourier_lowrank(weight.double(), rank)
    lowrank = reconstruct(p, q, out_f, in_f)
    new = FourierLinear.from_factors(p, q, cfg.bits, cfg.phase_bits, cfg.group_size, bias)
    record.update(rank=rank, fourier_fraction=cfg.fourier_fraction, phase_bits=new.phase_bits,
                  weight_error_lowrank_float=relative_weight_error(weight, lowrank))
    if input_cov is not None:
        record["output_error_lowrank_float"] = relative_output_error(weight, lowrank, input_cov)
        record["output_error_uncalibrated"] = relative_output_error(weight, new.effective_weight(), input_cov)
        if cfg.diag_calibration:
            new.set_channel_scale(diag_scale(weight, new.effective_weight(), input_cov))
            scale = new.channel_scale.float()
            record.update(channel_scale_min=float(scale.min()), channel_scale_max=float(scale.max()))
    record["weight_error"] = relative_weight_error(weight, new.effective_weight())
    return new


def compress_linear(
    name: str, module: nn.Module, cfg: CompressConfig, input_cov: torch.Tensor | None,
    cross_cov: torch.Tensor | None = None, original_cov: torch.Tensor | None = None,
) -> tuple[nn.Module, dict]:
    """Return the replacement of ``module`` and a log record.

    ``input_cov`` is sum_t x_t x_t^T over the calibration tokens this layer sees (None without
    calibration); ``cross_cov`` = sum_t x_t xo_t^T and ``original_cov`` = sum_t xo_t xo_t^T pair them with
    the inputs xo_t of the uncompressed model, when the fit targets its outputs. Errors are relative:
    output errors are sum_t ||W x_t - W' x_t||^2 / sum_t ||W x_t||^2; "..._to_original" ones compare
    with W xo_t instead.
    """
    start = time.perf_counter()
    weight = linear_weight(module).float()
    bias = linear_bias(module)
    out_f, in_f = weight.shape
    n, num_bases = cfg.n, cfg.bases_for(name)
    record: dict = {"name": name, "in_features": in_f, "out_features": out_f, "n": n, "num_bases": num_bases,
                    "bits": cfg.bits, "method": cfg.method if cfg.bits else None}

    if cfg.method == "fourier":
        new = _fourier(weight, bias, cfg, input_cov, record)
    elif n == 1:
        new = QuantLinear.from_quantized(_quantize(weight, input_cov, cfg, record), bias)
    else:
        if cfg.learn_bases:
            bases, factors = kronecker_svd(weight, n, num_bases)
        else:
            bases = fixed_bases(n, num_bases)
            factors = project_fixed(weight, bases)
        frobenius = kron_weight(bases, factors)
        record["weight_error_frobenius"] = relative_weight_error(weight, frobenius)
        if input_cov is not None:
            record["output_error_frobenius"] = relative_output_error(weight, frobenius, input_cov)
        if cfg.init == "activation":
            factors = project_activation_aware(weight, bases, input_cov, cfg.ridge, cross_cov)
            fitted = kron_weight(bases, factors)
            record["weight_error_activation"] = relative_weight_error(weight, fitted)
            record["output_error_activation"] = relative_output_error(weight, fitted, input_cov)
        if cfg.bits is None:
            new = PHMLinear(in_f, out_f, n, num_bases, bias=bias is not None, learn_bases=cfg.learn_bases)
            with torch.no_grad():
                new.bases.copy_(bases)
                new.factors.copy_(factors)
                if bias is not None:
                    new.bias.copy_(bias)
        else:
            a_cat = factors_to_cat(factors).contiguous()
            # The Hessian of A_cat is the second moment of the mixed inputs z that it multiplies.
            hz = mixed_hessian(bases, input_cov) if input_cov is not None else None
            new = QuantPHMLinear.from_quantized(_quantize(a_cat, hz, cfg, record), bases, in_f, bias)
    if input_cov is not None:
        record["output_error"] = relative_output_error(weight, new.effective_weight(), input_cov)
    if cross_cov is not None:
        record["output_error_to_original"] = relative_error_to_original(
            weight, new.effective_weight(), input_cov, cross_cov, original_cov)
    record["time_s"] = time.perf_counter() - start
    return new.to(module.weight.device), record

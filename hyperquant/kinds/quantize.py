"""Quantizing one matrix with RTN or GPTQ as a plan entry says, with its error accounting (shared by the
dense and PHM kinds and by the training export)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hyperquant.errors import ConfigError
from hyperquant.linalg import quadratic_form
from hyperquant.phm.projection import relative_weight_error
from hyperquant.quant.gptq import gptq_quantize
from hyperquant.quant.packing import SUPPORTED_BITS
from hyperquant.quant.qtensor import QuantizedWeight
from hyperquant.quant.rtn import rtn_quantize

QUANT_METHODS = ("gptq", "rtn")


@dataclass(frozen=True)
class QuantFields:
    """Group-wise quantization of a matrix: asymmetric codes with fp16 scales by default."""

    bits: int = 4
    method: str = "gptq"  # gptq (needs calibration) or rtn
    group_size: int = 128
    symmetric: bool = False
    act_order: bool = True  # GPTQ: quantize columns by decreasing Hessian diagonal
    damp: float = 0.01  # GPTQ: relative damping of the Hessian (escalated when Cholesky fails)

    def check_quant_fields(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"bits={self.bits} is not supported; use one of {list(SUPPORTED_BITS)}")
        if self.method not in QUANT_METHODS:
            raise ConfigError(f"method={self.method!r} is not supported; use one of {list(QUANT_METHODS)}")
        gs = self.group_size
        if not isinstance(gs, int) or gs < 16 or gs & (gs - 1):
            raise ConfigError(
                f"group_size={gs} must be a power of two >= 16 (onnxruntime's MatMulNBits block size), e.g. 128")
        if not 0 < self.damp < 1:
            raise ConfigError(f"damp={self.damp} must be in (0, 1), e.g. 0.01")

    def quant_label(self) -> str:
        return f"{self.method.upper()}-{self.bits} g{self.group_size}"


def quantize_matrix(matrix: torch.Tensor, hessian: torch.Tensor | None, q: QuantFields, record: dict) -> QuantizedWeight:
    """Quantize ``matrix`` (rows, cols) with RTN or GPTQ; log errors relative to the float matrix
    (``quant_error``: tr(dW H dW^T) / tr(W H W^T); GPTQ also logs RTN's on the same weights and Hessian)."""
    if q.method == "gptq":
        if hessian is None:
            raise ConfigError("GPTQ needs calibration data (the Hessian of the layer's inputs); pass calibration "
                              "inputs, or use method='rtn'")
        res = gptq_quantize(matrix, hessian, q.bits, q.group_size, q.symmetric, q.act_order, q.damp)
        ref = max(quadratic_form(matrix, hessian), 1e-30)  # an all-zero matrix (or input) has error 0 too
        record.update(quant_error=res.error / ref, quant_error_rtn=res.rtn_error / ref, damp=res.damp)
        return res.weight
    qw = rtn_quantize(matrix, q.bits, q.group_size, q.symmetric)
    if hessian is not None:
        record["quant_error"] = quadratic_form(matrix, hessian, minus=qw.dequantize()) / \
            max(quadratic_form(matrix, hessian), 1e-30)
    record["quant_weight_error"] = relative_weight_error(matrix, qw.dequantize())
    return qw

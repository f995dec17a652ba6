"""dense-quant: the layer's own weight, group-wise quantized (RTN or GPTQ); the dense baselines."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hyperquant.kinds.base import LayerKind, LayerStats, Names, PlanEntry
from hyperquant.kinds.quantize import QuantFields, quantize_matrix
from hyperquant.quant.modules import QuantLinear

# Bit widths com.microsoft.MatMulNBits runs on onnxruntime's CPU kernel (1.32 refuses 3 bits at load).
ORT_SUPPORTED_BITS = (2, 4, 8)


def matmul_nbits_reason(bits: int | None) -> str | None:
    if bits is None or bits in ORT_SUPPORTED_BITS:
        return None
    return (f"bits={bits} cannot be exported: onnxruntime's MatMulNBits runs {list(ORT_SUPPORTED_BITS)} bits "
            f"only, so compress with --bits 4 (or 2, 8)")


@dataclass(frozen=True)
class DenseQuantPlan(QuantFields, PlanEntry):
    kind = "dense-quant"

    def __post_init__(self) -> None:
        self.check_quant_fields()


class DenseQuantKind(LayerKind):
    name = "dense-quant"
    entry_type = DenseQuantPlan
    module_types = (QuantLinear,)

    def needs_calibration(self, entry: DenseQuantPlan) -> bool:
        return entry.method == "gptq"

    def build(self, entry, weight, bias, stats: LayerStats | None, record) -> nn.Module:
        hessian = stats.input_cov if stats is not None else None
        return QuantLinear.from_quantized(quantize_matrix(weight, hessian, entry, record), bias)

    def describe(self, entry: DenseQuantPlan) -> Names:
        return Names(f"dense {entry.quant_label()}", f"dense {entry.method.upper()}", f"dense-{entry.method}{entry.bits}")

    def spec(self, module: QuantLinear) -> dict:
        return {"bits": module.bits, "group_size": module.group_size, "symmetric": module.symmetric}

    def empty(self, in_features, out_features, bias, spec) -> nn.Module:
        return QuantLinear(in_features, out_features, spec["bits"], spec["group_size"], spec["symmetric"], bias)

    def parameters(self, module: QuantLinear) -> int:
        return module.q_rows * module.q_cols + (module.bias.numel() if module.bias is not None else 0)

    def no_export_reason(self, entry_or_module) -> str | None:
        return matmul_nbits_reason(entry_or_module.bits)

    def export_module(self, module: QuantLinear, name: str, dtype: torch.dtype) -> nn.Module:
        from hyperquant.exporters.ops import ExportQuantLinear, check_bits

        check_bits(module.bits, name)
        return ExportQuantLinear(module, dtype)

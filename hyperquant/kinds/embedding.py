"""embed-quant: the token embedding table, group-wise RTN-quantized along the embedding (rows are tokens).

GPTQ does not apply (a table is gathered from, not multiplied), so the method is RTN. onnxruntime reads
the codes with GatherBlockQuantized (exporters/fused.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hyperquant.errors import ConfigError
from hyperquant.kinds.base import LayerKind, LayerStats, Names, PlanEntry
from hyperquant.kinds.quantize import QuantFields, quantize_matrix
from hyperquant.quant.modules import QuantEmbedding


@dataclass(frozen=True)
class EmbedQuantPlan(QuantFields, PlanEntry):
    kind = "embed-quant"
    method: str = "rtn"
    # A tied model whose LM head is quantized alike: the table is the head's codes (resolve_plan decides)
    share_head: bool = False

    def __post_init__(self) -> None:
        self.check_quant_fields()
        if self.method != "rtn":
            raise ConfigError(f"embed-quant method={self.method!r}: an embedding table is quantized with rtn "
                              f"(GPTQ needs a layer that multiplies its input)")


class EmbedQuantKind(LayerKind):
    name = "embed-quant"
    entry_type = EmbedQuantPlan
    module_types = (QuantEmbedding,)

    def check(self, entry: EmbedQuantPlan, out_features: int, in_features: int) -> None:
        """out_features = vocabulary, in_features = embedding width."""

    def build(self, entry, weight, bias, stats: LayerStats | None, record) -> nn.Module:
        if entry.share_head:
            raise ValueError("a table that shares the LM head's codes is built from the head (build_shared)")
        return QuantEmbedding.from_quantized(quantize_matrix(weight, None, entry, record))

    def build_shared(self, weight: torch.Tensor, head: nn.Module, head_name: str, record: dict) -> QuantEmbedding:
        """The table of a tied model as the quantized head's codes; logs its error against the float table."""
        from hyperquant.phm.projection import relative_weight_error

        table = QuantEmbedding.sharing(head, head_name)
        record.update(shares=head_name, quant_weight_error=relative_weight_error(weight, table.dequantized(torch.float32)))
        return table

    def describe(self, entry: EmbedQuantPlan) -> Names:
        if entry.share_head:
            return Names("embedding = LM head codes", "embedding tied", "embed-tied")
        return Names(f"embedding {entry.quant_label()}", "embedding RTN", f"embed-rtn{entry.bits}")

    def spec(self, module: QuantEmbedding) -> dict:
        return {"bits": module.bits, "group_size": module.group_size, "symmetric": module.symmetric,
                **({"shares": module.shares} if module.shares else {})}

    def empty(self, in_features, out_features, bias, spec) -> nn.Module:
        table = QuantEmbedding(out_features, in_features, spec["bits"], spec["group_size"], spec["symmetric"])
        table.shares = spec.get("shares")  # the codes are the head's: `load` points them there
        return table

    def stored_bytes(self, module: QuantEmbedding) -> int:
        return 0 if module.shares else super().stored_bytes(module)

    def parameters(self, module: QuantEmbedding) -> int:
        return 0 if module.shares else module.q_rows * module.q_cols  # tied weights count once

    def macs_per_token(self, module: QuantEmbedding) -> int:
        return 0

    def export_module(self, module: QuantEmbedding, name: str, dtype: torch.dtype) -> nn.Module:
        """The traced export gathers from the dequantized table (the fused graph reads the codes)."""
        return nn.Embedding.from_pretrained(module.dequantized(dtype), freeze=True)

"""Inference modules whose state is the packed checkpoint: quantized dense and quantized PHM linears.

The packed tensors (MatMulNBits layout) are the registered buffers, so ``state_dict()`` is exactly what
the checkpoint stores. The float weight is dequantized once, on first use, and cached (not persistent).
"""

from __future__ import annotations

import torch
from torch import nn

from hyperquant.phm.bases import fixed_bases
from hyperquant.phm.functional import cat_to_factors, kron_weight, phm_forward, phm_macs
from hyperquant.quant.qtensor import QuantizedWeight


class _PackedWeightMixin(nn.Module):
    """Holds one group-quantized (rows, cols) matrix as packed buffers."""

    def _init_packed(self, rows: int, cols: int, bits: int, group_size: int, symmetric: bool) -> None:
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.q_rows, self.q_cols = rows, cols
        groups = -(-cols // group_size)
        self.register_buffer("qweight", torch.zeros(rows, groups, group_size * bits // 8, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(rows, groups, dtype=torch.float16))
        if not symmetric:
            self.register_buffer("qzeros", torch.zeros(rows, -(-groups * bits // 8), dtype=torch.uint8))
        self._dequantized: torch.Tensor | None = None
        self.compute_dtype = torch.float32  # the dtype the model was cast to (what an embedding returns)
        self._register_load_state_dict_pre_hook(self._drop_cache)

    def _apply(self, fn, recurse=True):
        """``.to(device)`` moves the packed weight; a dtype cast (``model.to(torch.bfloat16)``) sets the compute
        dtype but keeps the fp16 scales as stored (bf16 would change the quantized weight), and the
        cached dequantization is dropped (it is on the old device or in the old dtype)."""
        scales = self.scales
        super()._apply(fn, recurse)
        if self._buffers["scales"] is not scales and self._buffers["scales"].dtype != scales.dtype:
            self._buffers["scales"] = scales.to(self._buffers["scales"].device)
        probe = fn(torch.zeros((), dtype=self.compute_dtype))  # a device move keeps it, a cast changes it
        if probe.is_floating_point():
            self.compute_dtype = probe.dtype
        self._dequantized = None
        return self

    def _drop_cache(self, *args, **kwargs) -> None:
        self._dequantized = None

    def _set_packed(self, qw: QuantizedWeight) -> None:
        for key, value in qw.to_packed().items():
            getattr(self, key).copy_(value)
        self._dequantized = None

    def quantized_weight(self) -> QuantizedWeight:
        tensors = {"qweight": self.qweight, "scales": self.scales}
        if not self.symmetric:
            tensors["qzeros"] = self.qzeros
        return QuantizedWeight.from_packed(tensors, self.bits, self.group_size, self.q_cols, self.symmetric)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        if self._dequantized is None or self._dequantized.dtype != dtype:
            self._dequantized = self.quantized_weight().dequantize(dtype).to(self.scales.device)
        return self._dequantized

    def packed_bytes(self) -> int:
        names = ["qweight", "scales"] + ([] if self.symmetric else ["qzeros"])
        return sum(getattr(self, k).numel() * getattr(self, k).element_size() for k in names)


class QuantLinear(_PackedWeightMixin):
    """nn.Linear with a group-wise quantized weight (out, in)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 symmetric: bool = False, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_packed(out_features, in_features, bits, group_size, symmetric)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> QuantLinear:
        rows, cols = qw.shape
        layer = cls(cols, rows, qw.bits, qw.group_size, qw.symmetric, bias=bias is not None)
        layer._set_packed(qw)
        if bias is not None:
            layer.bias.data.copy_(bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.dequantized(x.dtype), self.bias)

    def effective_weight(self) -> torch.Tensor:
        return self.dequantized(torch.float32)

    def macs_per_token(self) -> dict[str, int]:
        macs = self.in_features * self.out_features
        return {"matmul": macs, "mixing": 0, "total": macs}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}")


class QuantPHMLinear(_PackedWeightMixin):
    """PHMLinear whose A_cat (out/n, B*in/n) is group-wise quantized; bases stay float."""

    def __init__(self, in_features: int, out_features: int, n: int, num_bases: int, bits: int,
                 group_size: int, symmetric: bool = False, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features, self.n, self.num_bases = in_features, out_features, n, num_bases
        self.register_buffer("bases", fixed_bases(n, num_bases))
        self._init_packed(out_features // n, num_bases * in_features // n, bits, group_size, symmetric)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bases: torch.Tensor, in_features: int,
                       bias: torch.Tensor | None = None) -> QuantPHMLinear:
        num_bases, n, _ = bases.shape
        rows, _ = qw.shape
        layer = cls(in_features, rows * n, n, num_bases, qw.bits, qw.group_size, qw.symmetric,
                    bias=bias is not None)
        layer.bases.copy_(bases)
        layer._set_packed(qw)
        if bias is not None:
            layer.bias.data.copy_(bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return phm_forward(x, self.bases, self.dequantized(x.dtype), self.bias)

    def effective_weight(self) -> torch.Tensor:
        return kron_weight(self.bases.float(), cat_to_factors(self.dequantized(torch.float32), self.num_bases))

    def macs_per_token(self) -> dict[str, int]:
        return phm_macs(self.in_features, self.out_features, self.n, self.num_bases)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, n={self.n}, "
                f"num_bases={self.num_bases}, bits={self.bits}, group_size={self.group_size}")


class QuantEmbedding(_PackedWeightMixin):
    """nn.Embedding with a group-wise quantized table (num_embeddings, embedding_dim): rows are tokens,
    groups run along the embedding, the layout onnxruntime's GatherBlockQuantized reads (quantize_axis 1)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, group_size: int,
                 symmetric: bool = False, padding_idx: int | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        # what every compressed module carries (the checkpoint's spec): in = width, out = vocabulary
        self.in_features, self.out_features, self.bias = embedding_dim, num_embeddings, None
        self.shares: str | None = None  # the LM head whose codes this table is (a tied model), if any
        self._init_packed(num_embeddings, embedding_dim, bits, group_size, symmetric)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, padding_idx: int | None = None) -> QuantEmbedding:
        rows, cols = qw.shape
        layer = cls(rows, cols, qw.bits, qw.group_size, qw.symmetric, padding_idx)
        layer._set_packed(qw)
        return layer

    @classmethod
    def sharing(cls, head: QuantLinear, head_name: str) -> QuantEmbedding:
        """The table of a tied model whose LM head is ``head``: the same codes, scales and zero points (one
        copy in the checkpoint and the ONNX graph, as onnxruntime-genai's builder shares them)."""
        layer = cls(head.out_features, head.in_features, head.bits, head.group_size, head.symmetric)
        layer.share_codes(head, head_name)
        return layer

    def share_codes(self, head: QuantLinear, head_name: str) -> None:
        if (head.out_features, head.in_features, head.bits, head.group_size, head.symmetric) != \
                (self.num_embeddings, self.embedding_dim, self.bits, self.group_size, self.symmetric):
            raise ValueError(f"{head_name} ({head.extra_repr()}) cannot share its codes with this table ({self.extra_repr()})")
        self.qweight, self.scales = head.qweight, head.scales  # registered buffers: same tensors as the head's
        if not self.symmetric:
            self.qzeros = head.qzeros
        self.shares = head_name
        self._dequantized = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.dequantized(self.compute_dtype))

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized table (what transformers' code reads as ``embed_tokens.weight``)."""
        return self.dequantized(self.compute_dtype)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group_size={self.group_size}, "
                f"symmetric={self.symmetric}" + (f", shares={self.shares}" if self.shares else ""))

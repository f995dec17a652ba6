"""The fused decoder graph: what onnxruntime-genai's model builder emits, built from hyperquant's weights.

For Llama-family models (RMSNorm, rotary attention with grouped KV heads, gated SiLU FFN) the graph is
written node by node rather than traced, so that it uses onnxruntime's fused contrib ops:

* ``GroupQueryAttention`` with the rotary embedding inside (cos/sin caches from the model's own rotary
  module, so rope scaling is whatever transformers computes) and the KV cache in (batch, kv_heads, seq,
  head_dim) layout, q/k/v packed into one input where the three projections allow it;
* ``SimplifiedLayerNormalization`` / ``SkipSimplifiedLayerNormalization`` (the residual add inside);
* ``MatMulNBits`` for every quantized dense linear, q/k/v and gate/up packed into one node each when
  their codes share bits, group size and symmetry; the LM head too;
* ``GatherBlockQuantized`` for a quantized embedding table, else a gather from an fp16 table;
* PHM layers as single nodes of the ``hyperquant`` domain (model-local functions, exporters/ops.py).

Inputs and outputs are named as the builder names them (``input_ids``, ``attention_mask``,
``past_key_values.{i}.key/value`` -> ``logits``, ``present.{i}.key/value``), so the folder that
``exporters.genai`` writes around this graph runs in onnxruntime-genai, and ``OnnxCausalLM`` runs it in
plain onnxruntime.

Hand-written because no tool does it for hyperquant's layers: the builder reads float or GPTQ/AWQ
checkpoints and has no PHM layer, and the traced export (exporters/export.py) keeps transformers'
unfused attention (~2,100 nodes on the default model).
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from hyperquant.exporters.ops import DOMAIN, MS_DOMAIN, attach_functions
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from hyperquant.phm.layer import PHMLinear
from hyperquant.quant.modules import QuantLinear, QuantPHMLinear

FUSED_MODEL_TYPES = ("llama", "mistral", "qwen2")
FUSED_OPSET = 21
GATHER_BITS = (4, 8)  # GatherBlockQuantized's uint8 codes (MatMulNBits' layout)


def fused_reason(model: nn.Module) -> str | None:
    """Why ``model`` cannot be written as the fused graph, or None when it can."""
    config = model.config
    model_type = getattr(config, "model_type", "?")
    if model_type not in FUSED_MODEL_TYPES:
        return (f"the fused graph covers {', '.join(FUSED_MODEL_TYPES)} models, not {model_type}; "
                f"export it as one traced file with --out model.onnx")
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act={config.hidden_act} (the fused graph has SiLU); export with --out model.onnx"
    if _head_dim(config) % 16:
        return (f"head_dim={_head_dim(config)}: onnxruntime's GroupQueryAttention needs a multiple of 16; "
                f"export with --out model.onnx")
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) \
            and window < config.max_position_embeddings:
        return f"sliding_window={window} is not in the fused graph; export with --out model.onnx"
    from hyperquant.quant.modules import QuantEmbedding

    embed = model.get_input_embeddings()
    if isinstance(embed, QuantEmbedding) and embed.bits not in GATHER_BITS:
        return (f"the embedding table has {embed.bits}-bit codes; onnxruntime's GatherBlockQuantized reads "
                f"{' or '.join(map(str, GATHER_BITS))} bits (compress with --embed-bits 4), or export with --out model.onnx")
    for name, module in model.named_modules():
        if name.endswith(("_proj", "lm_head")) and not isinstance(module, _LINEAR_TYPES):
            return (f"layer {name} is a {type(module).__name__}, which the fused graph has no node for; "
                    f"export with --out model.onnx")
    return None


_LINEAR_TYPES = (nn.Linear, QuantLinear, QuantPHMLinear, PHMLinear)


class _Graph:
    """Nodes and initializers of one graph, with unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}

    def tensor(self, name: str, array: np.ndarray, shared: bool = False) -> str:
        """An initializer; with ``shared`` one that several nodes read (defined once, same name)."""
        if name in self.initializers:
            if shared:
                return name
            raise ValueError(f"initializer {name} defined twice")
        self.initializers[name] = numpy_helper.from_array(np.ascontiguousarray(array), name)
        return name

    def ints(self, name: str, values: list[int]) -> str:
        if name not in self.initializers:
            self.tensor(name, np.array(values, np.int64))
        return name

    def node(self, op: str, inputs: list[str], name: str, outputs: int | list[str] = 1, domain: str = "",
             **attrs) -> list[str]:
        outs = outputs if isinstance(outputs, list) else [f"{name}/output_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain or None, **attrs))
        return outs


def _np(t: torch.Tensor) -> np.ndarray:
    """A float tensor as fp32 (fp16 scales widen exactly: MatMulNBits wants scales in the input's type)."""
    return t.detach().cpu().float().numpy()


def _stacked_bias(modules: list[nn.Module]) -> np.ndarray | None:
    if all(m.bias is None for m in modules):
        return None
    return np.concatenate([_np(m.bias) if m.bias is not None else np.zeros(m.out_features, np.float32)
                           for m in modules])


def _packable(modules: list[nn.Module]) -> bool:
    """Whether several quantized linears reading the same input can be one MatMulNBits (rows stacked)."""
    if not all(type(m) is QuantLinear for m in modules):
        return False
    first = modules[0]
    return all((m.bits, m.group_size, m.symmetric, m.q_cols) == (first.bits, first.group_size, first.symmetric,
                                                               first.q_cols) for m in modules)


class _Emitter:
    def __init__(self, graph: _Graph, accuracy_level: int) -> None:
        self.g, self.accuracy_level = graph, accuracy_level

    def _nbits(self, name: str, x: str, modules: list[QuantLinear]) -> str:
        """One MatMulNBits over the stacked rows of ``modules`` (all quantized alike)."""
        g, first = self.g, modules[0]
        inputs = [x, *_codes(g, name, modules)]
        bias = _stacked_bias(modules)
        if bias is not None:
            inputs += ["", g.tensor(f"{name}.bias", bias)]  # after the absent g_idx
        rows = sum(m.q_rows for m in modules)
        return g.node("MatMulNBits", inputs, f"{name}/MatMulNBits", domain=MS_DOMAIN, K=first.q_cols, N=rows,
                      bits=first.bits, block_size=first.group_size, accuracy_level=self.accuracy_level)[0]

    def _float(self, name: str, x: str, modules: list[nn.Linear]) -> str:
        g = self.g
        weight = np.concatenate([_np(m.weight) for m in modules]).T
        out = g.node("MatMul", [x, g.tensor(f"{name}.weight_t", weight)], f"{name}/MatMul")[0]
        bias = _stacked_bias(modules)
        if bias is not None:
            out = g.node("Add", [out, g.tensor(f"{name}.bias", bias)], f"{name}/Add")[0]
        return out

    def _phm(self, name: str, x: str, module: nn.Module) -> str:
        g = self.g
        # Equal bases are one initializer: after onnxruntime inlines the functions, the mixing of layers
        # that read the same input (gate, up) has identical inputs and its CSE pass computes it once.
        bases_values = _np(module.bases)
        bases = g.tensor(f"phm.bases.{_digest(bases_values)}", bases_values, shared=True)
        bias = [] if module.bias is None else [g.tensor(f"{name}.bias", _np(module.bias))]
        if isinstance(module, PHMLinear):
            a_cat = g.tensor(f"{name}.a_cat", _np(module.a_cat))
            return g.node("PHMLinear", [x, bases, a_cat, *bias], f"{name}/PHMLinear", domain=DOMAIN)[0]
        inputs = [x, bases, g.tensor(f"{name}.qweight", module.qweight.cpu().numpy()),
                  g.tensor(f"{name}.scales", _np(module.scales)),
                  "" if module.symmetric else g.tensor(f"{name}.qzeros", module.qzeros.cpu().numpy())]
        if bias:
            inputs += bias
        return g.node("PHMMatMulNBits", inputs, f"{name}/PHMMatMulNBits", domain=DOMAIN, K=module.q_cols,
                      N=module.q_rows, bits=module.bits, block_size=module.group_size,
                      accuracy_level=self.accuracy_level)[0]

    def linears(self, name: str, x: str, named: dict[str, nn.Module], packed_name: str,
                split: bool = True) -> list[str]:
        """Outputs of the ``named`` linears applied to ``x``: one packed node where they allow it (split
        into its parts, or with ``split=False`` the one packed output), else one node each."""
        modules = list(named.values())
        if len(modules) > 1 and (_packable(modules) or all(type(m) is nn.Linear for m in modules)):
            emit = self._nbits if _packable(modules) else self._float
            out = emit(f"{name}.{packed_name}", x, modules)
            if not split:
                return [out]
            sizes = self.g.ints(f"{name}.{packed_name}.split", [m.out_features for m in modules])
            return self.g.node("Split", [out, sizes], f"{name}.{packed_name}/Split", outputs=len(modules), axis=-1)
        return [self.one(f"{name}.{suffix}", x, m) for suffix, m in named.items()]

    def one(self, name: str, x: str, module: nn.Module) -> str:
        if type(module) is QuantLinear:
            return self._nbits(name, x, [module])
        if isinstance(module, (QuantPHMLinear, PHMLinear)):
            return self._phm(name, x, module)
        if isinstance(module, nn.Linear):
            return self._float(name, x, [module])
        raise TypeError(f"{name}: no fused node for {type(module).__name__}")


def _digest(array: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(array.tobytes() + str(array.shape).encode()).hexdigest()[:12]


def _codes(g: _Graph, name: str, modules: list[QuantLinear]) -> list[str]:
    """MatMulNBits' B, scales and zero points ("" when symmetric) of the stacked rows of ``modules``; shared
    by name, so a tied embedding table reads the LM head's."""
    inputs = [g.tensor(f"{name}.qweight", np.concatenate([m.qweight.cpu().numpy() for m in modules]), shared=True),
              g.tensor(f"{name}.scales", np.concatenate([_np(m.scales) for m in modules]), shared=True)]
    inputs.append("" if modules[0].symmetric else
                  g.tensor(f"{name}.qzeros", np.concatenate([m.qzeros.cpu().numpy() for m in modules]), shared=True))
    return inputs


def _rotary_caches(model: nn.Module, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin (max_positions, head_dim/2) from the model's own rotary module (rope scaling included)."""
    rotary = model.model.rotary_emb
    head_dim = _head_dim(model.config)
    positions = torch.arange(max_positions).unsqueeze(0)
    probe = torch.zeros(1, 1, head_dim, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = rotary(probe, positions)
    half = head_dim // 2
    return _np(cos[0, :, :half]), _np(sin[0, :, :half])


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _embedding(g: _Graph, embed: nn.Module, model: nn.Module) -> str:
    """Token embeddings: GatherBlockQuantized for a quantized table (reading the LM head's codes when the
    table shares them), else a gather from the table in fp16 when that is exact (a checkpoint's rest
    weights are fp16) or fp32."""
    from hyperquant.quant.modules import QuantEmbedding

    if isinstance(embed, QuantEmbedding) and embed.shares:
        head = model.get_submodule(embed.shares)
        codes, scales, zeros = _codes(g, embed.shares, [head])
        groups, blob = head.qweight.shape[1:]
        rows = g.node("Reshape", [codes, g.ints("embed_tokens.rows", [head.q_rows, groups * blob])],
                      "embed_tokens/Reshape")[0]
        inputs = [rows, "input_ids", scales] + ([zeros] if zeros else [])
        out = g.node("GatherBlockQuantized", inputs, "embed_tokens/GatherBlockQuantized", domain=MS_DOMAIN,
                     bits=head.bits, block_size=head.group_size, gather_axis=0, quantize_axis=1)[0]
        if groups * head.group_size == head.q_cols:
            return out
        # the last block is padded: drop its padding columns from the gathered rows
        return g.node("Slice", [out, g.ints("const.zero", [0]), g.ints("embed_tokens.width", [head.q_cols]),
                                g.ints("const.minus1", [-1])], "embed_tokens/Slice")[0]
    if isinstance(embed, QuantEmbedding):
        # MatMulNBits rows without the padding of the last block: GatherBlockQuantized takes the row width
        # from the data, (vocab, dim*bits/8)
        data = embed.qweight.cpu().numpy().reshape(embed.q_rows, -1)[:, : embed.q_cols * embed.bits // 8]
        inputs = [g.tensor("embed_tokens.qweight", data), "input_ids",
                  g.tensor("embed_tokens.scales", _np(embed.scales))]
        if not embed.symmetric:
            inputs.append(g.tensor("embed_tokens.qzeros", embed.qzeros.cpu().numpy()))
        return g.node("GatherBlockQuantized", inputs, "embed_tokens/GatherBlockQuantized", domain=MS_DOMAIN,
                      bits=embed.bits, block_size=embed.group_size, gather_axis=0, quantize_axis=1)[0]
    weight = embed.weight.detach().cpu().float()
    if torch.equal(weight.half().float(), weight):
        table = g.tensor("embed_tokens.weight", weight.half().numpy())
        gathered = g.node("Gather", [table, "input_ids"], "embed_tokens/Gather")[0]
        return g.node("Cast", [gathered], "embed_tokens/Cast", to=TensorProto.FLOAT)[0]
    return g.node("Gather", [g.tensor("embed_tokens.weight", weight.numpy()), "input_ids"], "embed_tokens/Gather")[0]


def _norm_weight(g: _Graph, name: str, norm: nn.Module) -> tuple[str, float]:
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)
    return g.tensor(f"{name}.weight", _np(norm.weight)), float(eps)


def build_fused_graph(model: nn.Module, accuracy_level: int = 4, max_positions: int | None = None,
                      pack_gate_up: bool = False) -> onnx.ModelProto:
    """The fused decoder graph of a (hyperquant-compressed or plain) Llama-family causal LM.

    ``pack_gate_up``: gate and up as one MatMulNBits (then Split) where their codes allow it; off by
    default, as in the builder: the Split made prefill slower on the default model (one interleaved run,
    2 threads: 210 vs 172 ms for 128 tokens, decode equal)."""
    reason = fused_reason(model)
    if reason is not None:
        raise ValueError(reason)
    config = model.config
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, _head_dim(config)
    layers = model.model.layers
    max_positions = max_positions or config.max_position_embeddings
    g = _Graph()
    emit = _Emitter(g, accuracy_level)

    # seqlens_k (batch,) int32 = attended tokens - 1; total_sequence_length () int32, as GQA wants them
    axis1 = g.ints("const.axis1", [1])
    total = g.node("ReduceSum", ["attention_mask", axis1], "mask/ReduceSum", keepdims=0)[0]
    seqlens = g.node("Sub", [total, g.ints("const.one", [1])], "mask/Sub")[0]
    seqlens = g.node("Cast", [seqlens], "mask/Cast", to=TensorProto.INT32)[0]
    shape = g.node("Shape", ["attention_mask"], "mask/Shape", start=1, end=2)[0]
    total_len = g.node("Cast", [g.node("Squeeze", [shape], "mask/Squeeze")[0]], "mask/Cast_total",
                       to=TensorProto.INT32)[0]
    cos, sin = _rotary_caches(model, max_positions)
    g.tensor("cos_cache", cos)
    g.tensor("sin_cache", sin)

    hidden = _embedding(g, model.model.embed_tokens, model)
    weight, eps = _norm_weight(g, "layers.0.input_layernorm", layers[0].input_layernorm)
    normed = g.node("SimplifiedLayerNormalization", [hidden, weight], "layers.0/input_layernorm",
                    axis=-1, epsilon=eps, stash_type=1)[0]
    residual = hidden
    for i, layer in enumerate(layers):
        prefix = f"layers.{i}"
        attn, mlp = layer.self_attn, layer.mlp
        qkv = emit.linears(f"{prefix}.attn", normed, {"q_proj": attn.q_proj, "k_proj": attn.k_proj,
                                                      "v_proj": attn.v_proj}, "qkv_proj", split=False)
        q, k, v = qkv if len(qkv) == 3 else (qkv[0], "", "")  # packed: GQA splits it itself
        scale = float(getattr(attn, "scaling", head_dim ** -0.5))
        attn_out, _, _ = g.node(
            "GroupQueryAttention",
            [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens, total_len,
             "cos_cache", "sin_cache"],
            f"{prefix}/attn/GroupQueryAttention",
            outputs=[f"{prefix}/attn/output", f"present.{i}.key", f"present.{i}.value"], domain=MS_DOMAIN,
            num_heads=heads, kv_num_heads=kv_heads, scale=scale, do_rotary=1, rotary_interleaved=0,
            local_window_size=-1)
        o = emit.one(f"{prefix}.attn.o_proj", attn_out, attn.o_proj)
        weight, eps = _norm_weight(g, f"{prefix}.post_attention_layernorm", layer.post_attention_layernorm)
        normed, _, _, residual = g.node("SkipSimplifiedLayerNormalization", [residual, o, weight],
                                        f"{prefix}/post_attention_layernorm", outputs=4, domain=MS_DOMAIN, epsilon=eps)
        ffn_in = {"gate_proj": mlp.gate_proj, "up_proj": mlp.up_proj}
        gate, up = emit.linears(f"{prefix}.mlp", normed, ffn_in, "gate_up_proj") if pack_gate_up else \
            [emit.one(f"{prefix}.mlp.{k}", normed, m) for k, m in ffn_in.items()]
        sig = g.node("Sigmoid", [gate], f"{prefix}/mlp/Sigmoid")[0]
        act = g.node("Mul", [gate, sig], f"{prefix}/mlp/SiLU")[0]
        prod = g.node("Mul", [act, up], f"{prefix}/mlp/Mul")[0]
        down = emit.one(f"{prefix}.mlp.down_proj", prod, mlp.down_proj)
        last = i == len(layers) - 1
        norm = model.model.norm if last else layers[i + 1].input_layernorm
        norm_name = "final_norm" if last else f"layers.{i + 1}.input_layernorm"
        weight, eps = _norm_weight(g, norm_name, norm)
        normed, _, _, residual = g.node("SkipSimplifiedLayerNormalization", [residual, down, weight],
                                        f"{norm_name}/SkipSimplifiedLayerNormalization", outputs=4,
                                        domain=MS_DOMAIN, epsilon=eps)
    emit.one("lm_head", normed, model.lm_head)
    g.nodes[-1].output[0] = "logits"
    return _model_proto(g, config, len(layers), kv_heads, head_dim)


def _model_proto(g: _Graph, config, num_layers: int, kv_heads: int, head_dim: int) -> onnx.ModelProto:
    batch, seq, past, total = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [batch, seq]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [batch, total])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, seq, config.vocab_size])]
    for i in range(num_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT,
                                                        [batch, kv_heads, past, head_dim]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT,
                                                         [batch, kv_heads, total, head_dim]))
    graph = helper.make_graph(g.nodes, "hyperquant-fused", inputs, outputs, list(g.initializers.values()))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", FUSED_OPSET),
                                                    helper.make_opsetid(MS_DOMAIN, 1)],
                              producer_name="hyperquant")
    model.ir_version = 10
    attach_functions(model)
    return model


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


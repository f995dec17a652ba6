"""The hyperquant ONNX op domain: torch custom ops, their ONNX translations and function bodies.

Each hyperquant layer becomes ONE node in domain ``hyperquant`` (version 1):

* ``PHMLinear(X, bases, A_cat[, bias])``: float PHM factors, A_cat (out/n, B*in/n).
* ``PHMMatMulNBits(X, bases, B, scales[, zero_points][, bias])``: A_cat packed for com.microsoft.MatMulNBits
  (B uint8 (N, k_blocks, block_size*bits/8), scales (N, k_blocks), zero points packed), with attributes
  K = B*in/n, N = out/n, bits, block_size, accuracy_level.

Both are model-local ONNX functions (stored in ``ModelProto.functions``), so onnxruntime inlines them
with no registration step. The body mixes the n input chunks with the bases (one MatMul of the
(n*B, n) mixing matrix with the (..., n, in/n) chunks), multiplies by A_cat (MatMul or MatMulNBits),
reshapes (..., n, out/n) -> (..., out) and adds the bias. The variant with a bias is the function
overload ``"bias"`` (ONNX IR 10), because an ONNX function cannot skip a node when an input is absent.

Dense layers quantized by hyperquant (QuantLinear) export as a plain com.microsoft.MatMulNBits node.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import onnx
import torch
from onnx import helper
from torch import nn

from hyperquant.convert import set_module
from hyperquant.errors import HyperquantError
from hyperquant.kinds import kind_of
from hyperquant.kinds.dense import matmul_nbits_reason
from hyperquant.phm.functional import phm_forward
from hyperquant.phm.layer import PHMLinear
from hyperquant.quant.modules import QuantLinear, QuantPHMLinear
from hyperquant.quant.qtensor import QuantizedWeight

DOMAIN = "hyperquant"
DOMAIN_VERSION = 1
MS_DOMAIN = "com.microsoft"
BIAS_OVERLOAD = "bias"
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
NBITS_ATTRS = ("K", "N", "bits", "block_size", "accuracy_level")


# ---------------------------------------------------------------------------------------------------
# torch custom ops: what torch.export keeps as single nodes. The eager kernels are the reference math.


def _dequantize(qweight, scales, qzeros, bits: int, group_size: int, k: int, dtype) -> torch.Tensor:
    tensors = {"qweight": qweight.cpu(), "scales": scales.cpu()}
    if qzeros is not None:
        tensors["qzeros"] = qzeros.cpu()
    qw = QuantizedWeight.from_packed(tensors, bits, group_size, k, symmetric=qzeros is None)
    return qw.dequantize(dtype).to(qweight.device)


@torch.library.custom_op("hyperquant::phm_linear", mutates_args=())
def phm_linear(x: torch.Tensor, bases: torch.Tensor, a_cat: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return phm_forward(x, bases, a_cat, bias)


@phm_linear.register_fake
def _phm_linear_fake(x, bases, a_cat, bias):
    return x.new_empty(*x.shape[:-1], a_cat.shape[0] * bases.shape[1])


@torch.library.custom_op("hyperquant::phm_matmul_nbits", mutates_args=())
def phm_matmul_nbits(x: torch.Tensor, bases: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                     qzeros: torch.Tensor | None, bias: torch.Tensor | None, bits: int, group_size: int,
                     k: int) -> torch.Tensor:
    a_cat = _dequantize(qweight, scales, qzeros, bits, group_size, k, x.dtype)
    return phm_forward(x, bases, a_cat, bias)


@phm_matmul_nbits.register_fake
def _phm_matmul_nbits_fake(x, bases, qweight, scales, qzeros, bias, bits, group_size, k):
    return x.new_empty(*x.shape[:-1], qweight.shape[0] * bases.shape[1])


@torch.library.custom_op("hyperquant::matmul_nbits", mutates_args=())
def matmul_nbits(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None,
                 bias: torch.Tensor | None, bits: int, group_size: int, k: int) -> torch.Tensor:
    w = _dequantize(qweight, scales, qzeros, bits, group_size, k, x.dtype)
    return nn.functional.linear(x, w, bias)


@matmul_nbits.register_fake
def _matmul_nbits_fake(x, qweight, scales, qzeros, bias, bits, group_size, k):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


# ---------------------------------------------------------------------------------------------------
# Export-time stand-ins for the hyperquant modules: same buffers (scales upcast to the model dtype,
# as MatMulNBits wants scales in A's type), forward = one custom op.


def check_bits(bits: int, where: str) -> None:
    reason = matmul_nbits_reason(bits)
    if reason is not None:
        raise HyperquantError(f"{where}: {reason}")


def _register_packed(module: nn.Module, src: nn.Module, dtype: torch.dtype) -> None:
    module.bits, module.group_size, module.k = src.bits, src.group_size, src.q_cols
    module.register_buffer("qweight", src.qweight.detach().clone())
    module.register_buffer("scales", src.scales.detach().to(dtype).clone())
    module.register_buffer("qzeros", None if src.symmetric else src.qzeros.detach().clone())
    module.register_buffer("bias", None if src.bias is None else src.bias.detach().to(dtype).clone())


class ExportQuantLinear(nn.Module):
    def __init__(self, src: QuantLinear, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        _register_packed(self, src, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return matmul_nbits(x, self.qweight, self.scales, self.qzeros, self.bias, self.bits, self.group_size,
                            self.k)


class ExportQuantPHMLinear(nn.Module):
    def __init__(self, src: QuantPHMLinear, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        _register_packed(self, src, dtype)
        self.register_buffer("bases", src.bases.detach().to(dtype).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return phm_matmul_nbits(x, self.bases, self.qweight, self.scales, self.qzeros, self.bias, self.bits,
                                self.group_size, self.k)


class ExportPHMLinear(nn.Module):
    def __init__(self, src: PHMLinear, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.register_buffer("bases", src.bases.detach().to(dtype).clone())
        self.register_buffer("a_cat", src.a_cat.detach().to(dtype).contiguous().clone())
        self.register_buffer("bias", None if src.bias is None else src.bias.detach().to(dtype).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return phm_linear(x, self.bases, self.a_cat, self.bias)


def export_module_for(module: nn.Module, name: str, dtype: torch.dtype = torch.float32) -> nn.Module | None:
    """The export stand-in of a hyperquant module (its kind's), or None for any other module. A kind
    without an export raises NoExport with its reason."""
    kind = kind_of(module)
    return None if kind is None else kind.export_module(module, name, dtype)


@contextlib.contextmanager
def export_modules(model: nn.Module, dtype: torch.dtype = torch.float32) -> Iterator[dict[str, str]]:
    """Swap every hyperquant layer for its export stand-in; restore the originals on exit.

    Yields {module name: module type} of the swapped layers. A layer that cannot be exported raises
    before any swap.
    """
    swaps = {}
    for name, module in model.named_modules():
        stand_in = export_module_for(module, name, dtype)
        if stand_in is not None:
            swaps[name] = (module, stand_in)
    for name, (_, stand_in) in swaps.items():
        set_module(model, name, stand_in)
    try:
        yield {name: type(orig).__name__ for name, (orig, _) in swaps.items()}
    finally:
        for name, (orig, _) in swaps.items():
            set_module(model, name, orig)


# ---------------------------------------------------------------------------------------------------
# ONNX translations (onnxscript, used by torch.onnx.export's custom_translation_table).


def _schema(name: str, domain: str, inputs: list[tuple[str, str, bool]], attributes: tuple[str, ...]):
    """An onnx OpSchema for onnxscript to build a node with (not registered globally)."""
    from onnx.defs import OpSchema

    optional, single = OpSchema.FormalParameterOption.Optional, OpSchema.FormalParameterOption.Single
    return OpSchema(
        name, domain, 1,
        inputs=[OpSchema.FormalParameter(n, t, param_option=optional if opt else single) for n, t, opt in inputs],
        outputs=[OpSchema.FormalParameter("Y", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "float type"),
                          ("T2", ["tensor(uint8)"], "packed codes"),
                          ("T4", ["tensor(int32)"], "group index")],
        attributes=[OpSchema.Attribute(a, OpSchema.AttrType.INT) for a in attributes],
    )


_NBITS_INPUTS = [("B", "T2", False), ("scales", "T", False), ("zero_points", "T2", True)]


def translation_table(accuracy_level: int = 0) -> dict:
    """{torch op: onnxscript translation} emitting one hyperquant (or com.microsoft) node per layer."""
    from onnxscript.values import Op, Opset

    hq = Opset(DOMAIN, DOMAIN_VERSION)
    ms = Opset(MS_DOMAIN, 1)
    phm_op = Op(hq, "PHMLinear", _schema("PHMLinear", DOMAIN, [
        ("X", "T", False), ("bases", "T", False), ("A_cat", "T", False), ("bias", "T", True)], ()))
    phm_nbits_op = Op(hq, "PHMMatMulNBits", _schema("PHMMatMulNBits", DOMAIN, [
        ("X", "T", False), ("bases", "T", False), *_NBITS_INPUTS, ("bias", "T", True)], NBITS_ATTRS))
    nbits_op = Op(ms, "MatMulNBits", _schema("MatMulNBits", MS_DOMAIN, [
        ("A", "T", False), *_NBITS_INPUTS, ("g_idx", "T4", True), ("bias", "T", True)], NBITS_ATTRS))

    def _phm_linear(x, bases, a_cat, bias=None):
        return phm_op(x, bases, a_cat, bias)

    def _phm_matmul_nbits(x, bases, qweight, scales, qzeros=None, bias=None, bits=4, group_size=128, k=0):
        return phm_nbits_op(x, bases, qweight, scales, qzeros, bias, K=k, N=qweight.shape[0], bits=bits,
                            block_size=group_size, accuracy_level=accuracy_level)

    def _matmul_nbits(x, qweight, scales, qzeros=None, bias=None, bits=4, group_size=128, k=0):
        return nbits_op(x, qweight, scales, qzeros, None, bias, K=k, N=qweight.shape[0], bits=bits,
                        block_size=group_size, accuracy_level=accuracy_level)

    return {
        torch.ops.hyperquant.phm_linear.default: _phm_linear,
        torch.ops.hyperquant.phm_matmul_nbits.default: _phm_matmul_nbits,
        torch.ops.hyperquant.matmul_nbits.default: _matmul_nbits,
    }


# ---------------------------------------------------------------------------------------------------
# ONNX function bodies.


def _mixing_nodes(nodes: list) -> None:
    """X (..., in), bases (B, n, n) -> z (..., n, B*in/n); also defines 'lead' (X's shape but the last
    axis) and 'minus1' used by the caller."""
    nodes += [
        helper.make_node("Shape", ["X"], ["lead"], end=-1),
        helper.make_node("Shape", ["bases"], ["n"], start=1, end=2),
        helper.make_node("Constant", [], ["minus1"], value_ints=[-1]),
        helper.make_node("Concat", ["lead", "n", "minus1"], ["chunk_shape"], axis=0),
        helper.make_node("Reshape", ["X", "chunk_shape"], ["chunks"]),  # (..., n, in/n)
        # mix[i*B + b, j] = H_b[i, j]: one (n*B, n) matrix applied to the n chunks of every token
        helper.make_node("Transpose", ["bases"], ["bases_ibj"], perm=[1, 0, 2]),
        helper.make_node("Concat", ["minus1", "n"], ["mix_shape"], axis=0),
        helper.make_node("Reshape", ["bases_ibj", "mix_shape"], ["mix"]),
        helper.make_node("MatMul", ["mix", "chunks"], ["mixed"]),  # (..., n*B, in/n), rows (i, b)
        helper.make_node("Reshape", ["mixed", "chunk_shape"], ["z"]),  # (..., n, B*in/n)
    ]


def _output_nodes(nodes: list, product: str, with_bias: bool) -> None:
    nodes += [
        helper.make_node("Concat", ["lead", "minus1"], ["out_shape"], axis=0),
        helper.make_node("Reshape", [product, "out_shape"], ["Y" if not with_bias else "Y_nobias"]),
    ]
    if with_bias:
        nodes.append(helper.make_node("Add", ["Y_nobias", "bias"], ["Y"]))


def _function(name: str, inputs: list[str], nodes: list, opset: int, with_bias: bool,
              attributes: list[str] = ()) -> onnx.FunctionProto:
    fn = helper.make_function(
        DOMAIN, name, inputs + (["bias"] if with_bias else []), ["Y"], nodes,
        [helper.make_opsetid("", opset), helper.make_opsetid(MS_DOMAIN, 1)],
        attributes=list(attributes),
    )
    fn.doc_string = f"hyperquant {name}{' with bias' if with_bias else ''}: mix the n input chunks with the bases, " \
        "multiply by A_cat, reshape (..., n, out/n) -> (..., out)"
    if with_bias:
        fn.overload = BIAS_OVERLOAD
    return fn


def phm_linear_function(opset: int, with_bias: bool) -> onnx.FunctionProto:
    nodes: list = []
    _mixing_nodes(nodes)
    nodes += [
        helper.make_node("Transpose", ["A_cat"], ["A_cat_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["z", "A_cat_t"], ["product"]),  # (..., n, out/n)
    ]
    _output_nodes(nodes, "product", with_bias)
    return _function("PHMLinear", ["X", "bases", "A_cat"], nodes, opset, with_bias)


def phm_matmul_nbits_function(opset: int, with_bias: bool) -> onnx.FunctionProto:
    nodes: list = []
    _mixing_nodes(nodes)
    matmul = helper.make_node("MatMulNBits", ["z", "B", "scales", "zero_points"], ["product"], domain=MS_DOMAIN)
    matmul.attribute.extend(helper.make_attribute_ref(a, onnx.AttributeProto.INT) for a in NBITS_ATTRS)
    nodes.append(matmul)
    _output_nodes(nodes, "product", with_bias)
    return _function("PHMMatMulNBits", ["X", "bases", "B", "scales", "zero_points"], nodes, opset, with_bias,
                     attributes=list(NBITS_ATTRS))


_FUNCTIONS = {"PHMLinear": phm_linear_function, "PHMMatMulNBits": phm_matmul_nbits_function}
_ARITY_WITHOUT_BIAS = {"PHMLinear": 3, "PHMMatMulNBits": 5}


def attach_functions(model: onnx.ModelProto) -> dict[str, int]:
    """Make a model with hyperquant nodes self-contained: bias nodes get the "bias" overload, the used
    function definitions are added at the model's opset, and the domains are imported.

    Returns {op type: node count} of the hyperquant and MatMulNBits nodes.
    """
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    counts: dict[str, int] = {}
    needed: set[tuple[str, bool]] = set()
    for node in model.graph.node:
        if node.domain == MS_DOMAIN and node.op_type == "MatMulNBits":
            counts["MatMulNBits"] = counts.get("MatMulNBits", 0) + 1
        if node.domain != DOMAIN:
            continue
        if node.op_type not in _FUNCTIONS:
            raise HyperquantError(f"unknown hyperquant op {node.op_type} in the exported graph")
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
        arity = _ARITY_WITHOUT_BIAS[node.op_type]
        while len(node.input) > arity and not node.input[-1]:
            del node.input[-1]
        with_bias = len(node.input) > arity and bool(node.input[arity])
        node.overload = BIAS_OVERLOAD if with_bias else ""
        needed.add((node.op_type, with_bias))
    kept = [f for f in model.functions if f.domain != DOMAIN]
    del model.functions[:]
    model.functions.extend(kept)
    model.functions.extend(_FUNCTIONS[op](opset, bias) for op, bias in sorted(needed))
    imports = {o.domain: o for o in model.opset_import}
    for domain, version in ((DOMAIN, DOMAIN_VERSION), (MS_DOMAIN, 1)):
        if domain not in imports and counts:
            model.opset_import.append(helper.make_opsetid(domain, version))
    model.ir_version = max(model.ir_version, 10)  # function overloads
    return counts

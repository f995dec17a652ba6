"""The hyperquant ONNX ops (model-local functions) against the torch layers they export."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hyperquant.exporters.ops import (
    DOMAIN,
    MS_DOMAIN,
    attach_functions,
    export_modules,
    phm_matmul_nbits,
    translation_table,
)
from onnx import TensorProto, helper, numpy_helper

from hyperquant.phm.bases import fixed_bases
from hyperquant.phm.layer import PHMLinear
from hyperquant.quant.modules import QuantLinear, QuantPHMLinear
from hyperquant.quant.qtensor import QuantizedWeight

OPSET = 21


def random_qweight(rows, cols, bits, group_size, symmetric, gen):
    groups = -(-cols // group_size)
    codes = torch.randint(0, 2**bits, (rows, cols), dtype=torch.uint8, generator=gen)
    scales = (torch.rand(rows, groups, generator=gen) * 0.05 + 0.005).half().float()
    zeros = (torch.full((rows, groups), 2 ** (bits - 1), dtype=torch.uint8) if symmetric
             else torch.randint(0, 2**bits, (rows, groups), dtype=torch.uint8, generator=gen))
    return QuantizedWeight(codes, scales, zeros, bits, group_size, symmetric)


def quant_phm(in_f, out_f, n, num_bases, bits, group_size, symmetric, bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    qw = random_qweight(out_f // n, num_bases * in_f // n, bits, group_size, symmetric, gen)
    b = torch.randn(out_f, generator=gen) if bias else None
    return QuantPHMLinear.from_quantized(qw, fixed_bases(n, num_bases).float(), in_f, bias=b).eval()


def single_node_model(node_inputs, op_type, domain, module, attrs, in_f, out_f):
    """A one-node graph feeding X through ``op_type`` with ``module``'s tensors as initializers."""
    inits = [numpy_helper.from_array(np.ascontiguousarray(t), name) for name, t in module.items() if t is not None]
    node = helper.make_node(op_type, node_inputs, ["Y"], domain=domain, **attrs)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, None, in_f])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, None, out_f])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    attach_functions(model)
    onnx.checker.check_model(model, full_check=True)
    return model


def run(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"X": x.numpy()})[0]


def nbits_inputs(layer):
    return {"B": layer.qweight.numpy(), "scales": layer.scales.float().numpy(),
            "zp": None if layer.symmetric else layer.qzeros.numpy(),
            "bias": None if layer.bias is None else layer.bias.detach().numpy()}


@pytest.mark.parametrize(
    ("in_f", "out_f", "n", "num_bases", "bits", "symmetric", "bias"),
    [
        (80, 48, 2, 2, 4, False, False),  # K = 80: 5 blocks of 16 (odd)
        (72, 40, 2, 1, 4, True, True),  # K = 36: 3 blocks, the last one padded
        (80, 48, 4, 3, 8, False, True),  # n = 4, B = 3, K = 60
        (64, 32, 4, 2, 2, False, False),  # 2 bits, small factors (N = 8)
        (96, 64, 2, 4, 8, True, False),  # B = n^2: every dense matrix
    ],
)
def test_phm_matmul_nbits_function_matches_torch(in_f, out_f, n, num_bases, bits, symmetric, bias):
    layer = quant_phm(in_f, out_f, n, num_bases, bits, 16, symmetric, bias)
    t = nbits_inputs(layer)
    tensors = {"bases": layer.bases.numpy(), "B": t["B"], "scales": t["scales"], "zp": t["zp"], "bias": t["bias"]}
    inputs = ["X", "bases", "B", "scales", "zp" if not symmetric else "", *(["bias"] if bias else [])]
    attrs = {"K": layer.q_cols, "N": layer.q_rows, "bits": bits, "block_size": 16, "accuracy_level": 0}
    model = single_node_model(inputs, "PHMMatMulNBits", DOMAIN, tensors, attrs, in_f, out_f)
    assert [n.op_type for n in model.graph.node] == ["PHMMatMulNBits"]
    x = torch.randn(3, 5, in_f)
    with torch.no_grad():
        ref = layer(x).numpy()
    np.testing.assert_allclose(run(model, x), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize(("n", "num_bases", "bias"), [(2, 2, True), (4, 3, False), (3, 9, True)])
def test_phm_linear_function_matches_torch(n, num_bases, bias):
    torch.manual_seed(0)
    layer = PHMLinear(48, 36, n=n, num_bases=num_bases, bias=bias).eval()
    tensors = {"bases": layer.bases.numpy(), "A_cat": layer.a_cat.detach().numpy(),
               "bias": None if layer.bias is None else layer.bias.detach().numpy()}
    inputs = ["X", "bases", "A_cat", *(["bias"] if bias else [])]
    model = single_node_model(inputs, "PHMLinear", DOMAIN, tensors, {}, 48, 36)
    x = torch.randn(2, 7, 48)
    with torch.no_grad():
        ref = layer(x).numpy()
    np.testing.assert_allclose(run(model, x), ref, rtol=1e-5, atol=1e-5)


def test_torch_custom_op_equals_module():
    layer = quant_phm(80, 48, 2, 2, 4, 16, False, True)
    x = torch.randn(2, 3, 80)
    got = phm_matmul_nbits(x, layer.bases, layer.qweight, layer.scales.float(), layer.qzeros, layer.bias.detach(),
                           4, 16, layer.q_cols)
    torch.testing.assert_close(got, layer(x))


class _Stack(torch.nn.Module):
    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.a = quant_phm(80, 48, 2, 2, 4, 16, False, True)
        self.b = QuantLinear.from_quantized(random_qweight(40, 48, 8, 16, True, gen))
        self.c = PHMLinear(40, 32, n=4, num_bases=3, bias=False)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


def exported_stack():
    torch.manual_seed(0)
    net = _Stack().eval()
    x = torch.randn(2, 3, 80)
    dims = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")},)
    with export_modules(net), torch.no_grad():
        program = torch.onnx.export(net, (x,), dynamic_shapes=dims, dynamo=True, opset_version=OPSET,
                                    custom_translation_table=translation_table(0), verbose=False)
    model = program.model_proto
    counts = attach_functions(model)
    return net, model, counts


def test_torch_export_keeps_one_node_per_layer():
    net, model, counts = exported_stack()
    assert counts == {"PHMMatMulNBits": 1, "MatMulNBits": 1, "PHMLinear": 1}
    ops = [(n.domain, n.op_type) for n in model.graph.node]
    assert ops == [(DOMAIN, "PHMMatMulNBits"), (MS_DOMAIN, "MatMulNBits"), (DOMAIN, "PHMLinear")]
    assert isinstance(net.a, QuantPHMLinear)  # the stand-ins were swapped back
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for shape in [(2, 3, 80), (1, 1, 80), (4, 9, 80)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            ref = net(x).numpy()
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_corrupted_zero_point_changes_output():
    """Negative control: the zero points really reach the kernel through the function."""
    _, model, _ = exported_stack()
    x = torch.randn(2, 3, 80).numpy()

    def output(m):
        session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: x})[0]

    clean = output(model)
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    zp = next(t for t in bad.graph.initializer if t.name.endswith("qzeros"))
    arr = numpy_helper.to_array(zp).copy()
    arr[0, 0] ^= 0x0F  # the first block's zero point of row 0
    zp.CopyFrom(numpy_helper.from_array(arr, zp.name))
    assert np.abs(output(bad) - clean).max() > 1e-3 * np.abs(clean).max()

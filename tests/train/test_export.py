"""The training export: each trained layer quantized as its plan entry says; a layer with n^2 bases is a
plain matrix and leaves as a dense quantized layer."""

import torch

from hyperquant.kinds.dense import DenseQuantPlan
from hyperquant.kinds.phm import PHMQuantPlan
from hyperquant.kinds.quantize import quantize_matrix
from hyperquant.phm.layer import PHMLinear
from hyperquant.quant.modules import QuantLinear, QuantPHMLinear
from hyperquant.train.export import _final_module
from hyperquant.train.interp import InterpolatedLinear


def _trained(num_bases: int, seed: int = 0) -> tuple[InterpolatedLinear, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dense = torch.nn.Linear(32, 48)
    phm = PHMLinear(32, 48, n=2, num_bases=num_bases)
    with torch.no_grad():
        phm.factors.copy_(torch.randn(phm.factors.shape, generator=g) * 0.1)
        phm.bias.copy_(torch.randn(48, generator=g))
    x = torch.randn(256, 32, generator=g, dtype=torch.float64)
    return InterpolatedLinear(dense, phm), x.T @ x


def test_n_squared_bases_export_as_the_dense_gptq_of_the_trained_matrix():
    """The exported codes are exactly dense GPTQ of sum_b H_b kron A_b with the layer's input Hessian,
    computed here from the plain materialized matrix; the entry says dense-quant with the same quantizer."""
    layer, cov = _trained(4)
    entry = PHMQuantPlan(bits=4, group_size=16, n=2, num_bases=4)
    record = {"name": "x", **entry.to_dict()}
    module, new_entry = _final_module(layer, entry, cov, record)
    assert isinstance(module, QuantLinear) and new_entry == DenseQuantPlan(bits=4, group_size=16)
    assert record["kind"] == "dense-quant" and record["trained_as"] == "PHM n=2 B=4" and "num_bases" not in record
    weight = torch.einsum("bij,bpq->ipjq", layer.phm.bases, layer.phm.factors.detach()).reshape(48, 32)
    expected = quantize_matrix(weight, cov, DenseQuantPlan(bits=4, group_size=16), {})
    torch.testing.assert_close(module.effective_weight(), expected.dequantize(), rtol=0, atol=0)
    torch.testing.assert_close(module.bias, layer.phm.bias.detach())
    x = torch.randn(5, 32)
    err = (module(x) - layer.phm(x)).norm() / layer.phm(x).norm()
    assert 0 < float(err) < 0.05  # 4-bit codes of the trained layer


def test_fewer_bases_stay_phm():
    layer, cov = _trained(2)
    entry = PHMQuantPlan(bits=4, group_size=16, n=2, num_bases=2)
    module, new_entry = _final_module(layer, entry, cov, {})
    assert isinstance(module, QuantPHMLinear) and new_entry is entry

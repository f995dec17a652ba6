import pytest
import torch

from hyperquant.phm.layer import PHMLinear
from hyperquant.quant.modules import QuantPHMLinear
from hyperquant.quant.rtn import rtn_quantize
from hyperquant.train import FakeQuantizer, InterpolatedLinear, fake_quantize


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_fake_quant_forward_is_rtn_dequantized_and_gradient_is_straight_through(bits, symmetric):
    w = torch.randn(12, 40, requires_grad=True)  # 40 = 2 groups of 16 and a partial one
    out = fake_quantize(w, bits, 16, symmetric)
    assert torch.equal(out.detach(), rtn_quantize(w.detach(), bits, 16, symmetric).dequantize())
    upstream = torch.randn_like(w)
    out.backward(upstream)
    assert torch.equal(w.grad, upstream)
    fq = FakeQuantizer(12, 40, bits, 16, symmetric)
    assert torch.equal(fq(w), w)  # off until enabled
    fq.enable(w.detach())
    assert torch.equal(fq(w).detach(), out.detach())


@pytest.mark.parametrize("bits", [2, 4])
def test_learned_scales_start_on_the_rtn_grid_and_get_gradients(bits):
    w = torch.randn(6, 48, requires_grad=True)
    fq = FakeQuantizer(6, 48, bits, 16, learn_scales=True)
    fq.enable(w.detach())
    out = fq(w)
    torch.testing.assert_close(out.detach(), rtn_quantize(w.detach(), bits, 16).dequantize(), atol=1e-6, rtol=0)
    (out * torch.randn_like(out)).sum().backward()
    assert fq.scales.grad is not None and fq.scales.grad.abs().sum() > 0
    assert w.grad.abs().sum() > 0
    qw = fq.quantized(w.detach())
    torch.testing.assert_close(qw.dequantize(), out.detach(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("learn", [False, True])
def test_qat_layer_equals_the_exported_quantized_layer(learn):
    dense = torch.nn.Linear(64, 32)
    phm = PHMLinear.from_dense(dense, n=2, num_bases=2)
    a = phm.a_cat
    layer = InterpolatedLinear(dense, phm, FakeQuantizer(a.shape[0], a.shape[1], 4, 16, learn_scales=learn))
    layer.quantizer.enable(a.detach())
    layer.drop_dense()
    x = torch.randn(5, 64)
    qw = layer.quantizer.quantized(a.detach())
    exported = QuantPHMLinear.from_quantized(qw, phm.bases, 64, phm.bias.detach())
    torch.testing.assert_close(layer(x), exported(x), atol=1e-5, rtol=1e-5)


def test_learned_scales_train_on_the_exported_fp16_grid():
    """After an optimizer step the learned scales are no longer fp16 values; the forward must still use
    the fp16 scales the export stores, so that no code flips between training and the checkpoint."""
    torch.manual_seed(3)
    w = torch.randn(64, 256, requires_grad=True)
    fq = FakeQuantizer(64, 256, 4, 32, learn_scales=True)
    fq.enable(w.detach())
    with torch.no_grad():
        fq.scales.mul_(1 + 1e-4 * torch.randn_like(fq.scales))  # an update off the fp16 grid
    assert not torch.equal(fq.scales.half().float(), fq.scales)
    trained = fq(w).detach()
    exported = fq.quantized(w.detach()).dequantize()
    assert torch.equal(trained, exported)  # bit for bit, every code and scale
    (fq(w) * torch.randn(64, 256)).sum().backward()
    assert fq.scales.grad.abs().sum() > 0  # the rounding passes the gradient straight through

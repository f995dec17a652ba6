"""Quantizers against plain references, and GPTQ against RTN on the same weights and Hessian."""

import pytest
import torch

from hyperquant import PHMLinear
from hyperquant.linalg import quadratic_form
from hyperquant.phm import mixed_hessian
from hyperquant.quant import HessianNotPositiveDefinite, gptq_quantize, rtn_quantize
from hyperquant.quant.modules import QuantLinear, QuantPHMLinear


def correlated_inputs(tokens, features, strength=1.0):
    mix = torch.eye(features) + strength * torch.randn(features, features) / features**0.5
    return torch.randn(tokens, features) @ mix


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_is_round_to_nearest_on_its_grid(bits, symmetric):
    w = torch.randn(8, 72)  # 72 = 4 groups of 16 + a partial group of 8
    qw = rtn_quantize(w, bits, 16, symmetric)
    assert qw.codes.max() <= 2**bits - 1
    deq = qw.dequantize()
    step = qw.scales.repeat_interleave(16, dim=1)[:, :72]
    if not symmetric:  # every value within half a step (the symmetric grid's short side may clip)
        assert ((w - deq).abs() <= step * 0.5 + 1e-6).all()
    # Reference: nearest grid point, brute force over all codes.
    grid = (torch.arange(2**bits).float()[None, None, :] - qw.zeros.float().repeat_interleave(16, 1)[:, :72, None]) \
        * step[..., None]
    nearest = grid.gather(2, (w[..., None] - grid).abs().argmin(-1, keepdim=True))[..., 0]
    assert torch.allclose((w - deq).abs(), (w - nearest).abs(), atol=1e-5)


@pytest.mark.parametrize("bits", [2, 4])
def test_symmetric_grid_is_sign_aware(bits):
    """The long side of the symmetric grid (2^(b-1) steps) points at each group's largest-magnitude
    weight, which lands on the grid (GPTQ's 2 max|w| / (2^b - 1) clipped a positive one to 7/7.5 of its
    value at 4 bits); float64 reference, and a lower error than the old grid."""
    torch.manual_seed(1)
    w = torch.randn(64, 128)
    qw = rtn_quantize(w, bits, 128, symmetric=True)
    deq = qw.dequantize().double()
    wd = w.double()
    at = wd.abs().argmax(dim=1, keepdim=True)
    extreme, got = wd.gather(1, at), deq.gather(1, at)
    assert ((got - extreme).abs() <= 1e-3 * extreme.abs()).all()  # on the grid, up to fp16 scale rounding
    assert (torch.sign(qw.scales.double()) == -torch.sign(extreme)).all()
    half = 2 ** (bits - 1)
    old_scale = 2 * wd.abs().amax(dim=1, keepdim=True) / (2**bits - 1)
    old = (torch.clamp(torch.round(wd / old_scale) + half, 0, 2**bits - 1) - half) * old_scale
    new_err = ((wd - deq) ** 2).sum() / (wd**2).sum()
    old_err = ((wd - old) ** 2).sum() / (wd**2).sum()
    assert new_err < old_err, (float(new_err), float(old_err))


def test_scales_are_exact_in_float16():
    qw = rtn_quantize(torch.randn(4, 64), 4, 32)
    assert torch.equal(qw.scales.half().float(), qw.scales)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_objective_is_the_measured_output_error(act_order):
    x = correlated_inputs(512, 64)
    w = torch.randn(24, 64)
    res = gptq_quantize(w, x.T @ x, bits=3, group_size=16, act_order=act_order)
    dense = QuantLinear.from_quantized(res.weight)
    measured = ((x.double() @ (w.double() - dense.effective_weight().double()).T) ** 2).sum().item()
    assert res.error == pytest.approx(measured, rel=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_rtn_on_correlated_inputs(bits):
    x = correlated_inputs(2048, 128, strength=2.0)
    w = torch.randn(64, 128)
    h = x.T @ x
    res = gptq_quantize(w, h, bits=bits, group_size=32)
    rtn_err = quadratic_form(w - rtn_quantize(w, bits, 32).dequantize(), h)
    assert res.rtn_error == pytest.approx(rtn_err, rel=1e-9)
    assert res.error < 0.8 * rtn_err


def test_gptq_on_a_cat_minimizes_the_true_phm_output_error():
    x = correlated_inputs(600, 48)
    w = torch.randn(32, 48)
    phm = PHMLinear.from_dense(w, n=2, num_bases=2, bias=None)
    h = mixed_hessian(phm.bases, x.T @ x)
    res = gptq_quantize(phm.a_cat.detach(), h, bits=4, group_size=16)
    q = QuantPHMLinear.from_quantized(res.weight, phm.bases, 48)
    with torch.no_grad():
        measured = ((phm(x).double() - q(x).double()) ** 2).sum().item()
    assert res.error == pytest.approx(measured, rel=1e-4)
    assert res.error < 0.9 * res.rtn_error


def test_damping_escalates_on_a_singular_hessian():
    x = torch.randn(8, 64)  # 8 tokens for 64 features: rank 8
    w = torch.randn(16, 64)
    res = gptq_quantize(w, x.T @ x, bits=4, group_size=16, damp=1e-9)
    assert res.damp > 1e-9 and torch.isfinite(res.weight.dequantize()).all()


def test_indefinite_hessian_is_a_clear_error():
    h = -torch.eye(32)
    h[0, 0] = 1.0
    with pytest.raises(HessianNotPositiveDefinite, match="calibration"):
        gptq_quantize(torch.randn(4, 32), h, bits=4, group_size=16, max_damp_tries=3)
    from hyperquant import HyperquantError

    assert issubclass(HessianNotPositiveDefinite, HyperquantError)  # the CLI reports it on one line, exit 2


def test_dead_inputs_are_zeroed():
    x = correlated_inputs(256, 32)
    x[:, 5] = 0
    res = gptq_quantize(torch.randn(8, 32), x.T @ x, bits=4, group_size=16)
    assert torch.isfinite(torch.tensor(res.error))


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_in_row_slices_is_the_whole_matrix_result(act_order):
    """Rows are independent given H: slicing them (what bounds the LM head's memory) changes no code."""
    x = torch.randn(400, 48) @ torch.randn(48, 48)
    h = x.T @ x
    h[:, 5] = h[5, :] = 0  # a dead input too
    w = torch.randn(70, 48)
    whole = gptq_quantize(w, h, bits=4, group_size=16, act_order=act_order, row_chunk=10_000)
    sliced = gptq_quantize(w, h, bits=4, group_size=16, act_order=act_order, row_chunk=16)
    assert torch.equal(sliced.weight.codes, whole.weight.codes)
    assert torch.equal(sliced.weight.scales, whole.weight.scales)
    assert torch.equal(sliced.weight.zeros, whole.weight.zeros)
    assert sliced.error == pytest.approx(whole.error, rel=1e-9)
    assert sliced.rtn_error == pytest.approx(whole.rtn_error, rel=1e-9)
    assert sliced.error == pytest.approx(quadratic_form(w.double() - whole.weight.dequantize(torch.float64), h), rel=1e-9)

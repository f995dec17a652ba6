import itertools
import math

import pytest
import torch
from hyperquant.evals import model_size
from hyperquant.evals.size import dtype_bytes
from safetensors import safe_open

from hyperquant import CompressConfig, FourierLinear, compress, save_compressed
from hyperquant.config import ConfigError
from hyperquant.fourier import (
    FourierPlan,
    diag_scale,
    fourier_lowrank,
    polar_quantize,
    rank_for_fraction,
    reconstruct,
)
from hyperquant.fourier.polar import PolarQuantized
from hyperquant.kinds import DenseQuantPlan, LayerStats
from hyperquant.layer_compress import compress_layer
from hyperquant.phm.projection import relative_output_error, relative_weight_error
from hyperquant.quant.rtn import rtn_quantize
from tests.conftest import tiny_llama

OUT, IN = 48, 80
RANKS = [1, 2, 4, 8, 16, 32, 48]


def _random(out_f=OUT, in_f=IN):
    return torch.randn(out_f, in_f, dtype=torch.float64)


def _structured(out_f=OUT, in_f=IN):
    """Power-law spectrum plus a smooth (few-frequency) component: the kind of matrix low rank suits."""
    u, _, vh = torch.linalg.svd(torch.randn(out_f, in_f, dtype=torch.float64), full_matrices=False)
    k = min(out_f, in_f)
    decay = u @ torch.diag(torch.arange(1, k + 1, dtype=torch.float64) ** -1.5) @ vh
    i = torch.arange(out_f, dtype=torch.float64)[:, None]
    j = torch.arange(in_f, dtype=torch.float64)[None, :]
    smooth = torch.cos(2 * math.pi * 3 * i / out_f) * torch.sin(2 * math.pi * 5 * j / in_f) / math.sqrt(out_f * in_f)
    return decay + smooth


def _quantized_error(weight, rank, bits, group_size=16):
    p, q = fourier_lowrank(weight, rank)
    layer = FourierLinear.from_factors(p, q, bits, group_size=group_size)
    return relative_weight_error(weight, layer.effective_weight())


def test_full_rank_recovers_the_weight():
    w = _random()
    p, q = fourier_lowrank(w, min(OUT, IN))
    assert p.dtype == torch.complex128 and p.shape == (OUT, min(OUT, IN))
    assert torch.allclose(reconstruct(p, q, OUT, IN), w, rtol=0, atol=1e-12)


def test_float_truncation_equals_plain_svd():
    """FFT2 with norm='ortho' is unitary: truncating F is truncating W."""
    w = _structured()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    for r in (1, 5, 20):
        p, q = fourier_lowrank(w, r)
        assert torch.allclose(reconstruct(p, q, OUT, IN), (u[:, :r] * s[:r]) @ vh[:r], atol=1e-12)


@pytest.mark.parametrize("make", [_random, _structured])
def test_error_falls_with_rank(make):
    w = make()
    floats = []
    for r in RANKS:
        p, q = fourier_lowrank(w, r)
        floats.append(relative_weight_error(w, reconstruct(p, q, OUT, IN)))
    assert all(a > b for a, b in itertools.pairwise(floats))
    for bits in (4, 8):
        errors = [_quantized_error(w, r, bits) for r in RANKS]
        assert all(a > b for a, b in itertools.pairwise(errors)), (bits, errors)


@pytest.mark.parametrize("make", [_random, _structured])
@pytest.mark.parametrize("rank", [4, 16])
def test_error_falls_with_bits(make, rank):
    w = make()
    errors = [_quantized_error(w, rank, bits) for bits in (2, 3, 4, 8)]
    assert all(a > b for a, b in itertools.pairwise(errors)), errors
    p, q = fourier_lowrank(w, rank)
    assert errors[-1] >= relative_weight_error(w, reconstruct(p, q, OUT, IN)) * (1 - 1e-9)


def test_rank_for_fraction():
    assert rank_for_fraction(576, 1536, 0.25) == round(0.25 * 576 * 1536 / (2 * 2112))
    assert rank_for_fraction(8, 8, 1e-6) == 1
    assert rank_for_fraction(4, 1000, 1.0) == 2  # out*in / (2 (out+in)) <= min/2: never full rank
    assert rank_for_fraction(64, 64, 1.0) == 16
    with pytest.raises(ValueError):
        rank_for_fraction(8, 8, 0)


@pytest.mark.parametrize(("mag_bits", "phase_bits"), [(2, 2), (3, 4), (4, 4), (8, 3), (4, 8)])
def test_polar_codes_pack_round_trip(mag_bits, phase_bits):
    z = torch.randn(5, 70, dtype=torch.complex128)  # 70 columns: a partial last group of 16
    pq = polar_quantize(z, mag_bits, phase_bits, 16)
    assert int(pq.mag_codes.max()) <= 2**mag_bits - 1 and int(pq.phase_codes.max()) <= 2**phase_bits - 1
    packed = pq.to_packed()
    assert packed["mag"].shape == (5, 5, 16 * mag_bits // 8) and packed["scales"].dtype == torch.float16
    back = PolarQuantized.from_packed(packed, mag_bits, phase_bits, 16, 70)
    assert torch.equal(back.mag_codes, pq.mag_codes) and torch.equal(back.phase_codes, pq.phase_codes)
    assert torch.equal(back.mag_scales, pq.mag_scales)
    assert torch.equal(back.dequantize(torch.complex128), pq.dequantize(torch.complex128))


@pytest.mark.parametrize("phase_bits", [2, 3, 4, 8])
def test_phase_error_is_at_most_half_a_step(phase_bits):
    z = torch.randn(16, 256, dtype=torch.complex128)
    z[0, :4] = torch.tensor([-1 + 0j, -1 - 1e-12j, 1j, -1j])  # the wrap-around at +-pi
    pq = polar_quantize(z, 4, phase_bits, 16)
    diff = torch.remainder(pq.phase() - z.angle() + math.pi, 2 * math.pi) - math.pi
    assert diff.abs().max() <= math.pi / 2**phase_bits + 1e-12
    assert pq.phase().min() >= -math.pi and pq.phase().max() < math.pi


def test_magnitude_grid_is_unsigned_with_zero():
    z = torch.randn(3, 32, dtype=torch.complex128)
    z[1, :16] = 0
    pq = polar_quantize(z, 4, 4, 16)
    mag = pq.magnitude()
    assert torch.all(mag >= 0) and torch.all(mag[1, :16] == 0)
    step = pq.mag_scales.double().repeat_interleave(16, dim=1)
    assert torch.all((mag - z.abs()).abs() <= step / 2 + 1e-6 * z.abs().amax())


def _calibration(in_f=IN, tokens=400):
    x = torch.randn(tokens, in_f, dtype=torch.float64) @ torch.randn(in_f, in_f, dtype=torch.float64) * 0.3
    return x, x.T @ x


def test_diag_scale_is_the_per_row_least_squares_and_never_hurts():
    w = _structured()
    approx = w + 0.3 * torch.randn_like(w) * w.abs().mean()
    approx = approx * (1 + 0.2 * torch.randn(OUT, 1, dtype=torch.float64))
    x, cov = _calibration()
    s = diag_scale(w, approx, cov)
    assert s.dtype == torch.float16
    y, a = x @ w.T, x @ approx.T  # (tokens, out)
    ref = torch.stack([torch.linalg.lstsq(a[:, i : i + 1], y[:, i : i + 1]).solution[0, 0] for i in range(OUT)])
    assert torch.allclose(s.double(), ref, rtol=1e-3, atol=1e-3)  # fp16 storage
    def per_row(scale):
        return ((y - a * scale) ** 2).sum(0)

    assert torch.all(per_row(s.double()) <= per_row(torch.ones(OUT, dtype=torch.float64)) * (1 + 1e-12))
    calibrated = relative_output_error(w, s.double()[:, None] * approx, cov)
    assert calibrated < relative_output_error(w, approx, cov)


def test_diag_scale_of_a_zero_row_is_one():
    w, approx = _random(), _random()
    approx[3] = 0
    assert diag_scale(w, approx, _calibration()[1])[3] == 1


def test_forward_is_linear_with_the_effective_weight():
    w = _random().float()
    p, q = fourier_lowrank(w, 9)
    assert p.dtype == torch.complex64
    layer = FourierLinear.from_factors(p, q, 4, phase_bits=3, group_size=16, bias=torch.randn(OUT),
                                       channel_scale=1 + 0.1 * torch.randn(OUT))
    x = torch.randn(3, 5, IN)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.effective_weight(), layer.bias))
    assert layer.macs_per_token()["total"] == IN * OUT and "rank=9" in repr(layer)
    state = layer.state_dict()
    assert set(state) == {"p_mag", "p_phase", "p_scales", "q_mag", "q_phase", "q_scales", "channel_scale", "bias"}
    fresh = FourierLinear(IN, OUT, 9, 4, 3, 16, bias=True)
    fresh(x)  # caches the weight of the empty layer
    fresh.load_state_dict(state)
    assert torch.equal(fresh(x), layer(x))


def test_config_validation():
    cfg = CompressConfig.every_layer(FourierPlan(bits=4))
    assert cfg.needs_calibration and cfg.entry_for("model.layers.0.mlp.up_proj") == FourierPlan(bits=4)
    assert not CompressConfig.every_layer(FourierPlan(bits=4, diag_calibration=False)).needs_calibration
    assert not CompressConfig(method="rtn", n=1, bits=4).needs_calibration  # unchanged
    with pytest.raises(ConfigError, match="method='fourier' is not supported"):
        CompressConfig(method="fourier", n=1, bits=4)  # no longer a core-config method: a registered kind
    with pytest.raises(ConfigError, match="bits=None"):
        FourierPlan(bits=None)
    for fraction in (0, 1.5):
        with pytest.raises(ConfigError, match="fraction"):
            FourierPlan(fraction=fraction)
    with pytest.raises(ConfigError, match="phase_bits"):
        FourierPlan(phase_bits=5)
    with pytest.raises(ConfigError, match="unknown fourier option"):
        CompressConfig.every_layer({"kind": "fourier", "fourier_fraction": 0.5})


@pytest.mark.parametrize("cfg", [
    CompressConfig.every_layer(FourierPlan(bits=4)),
    CompressConfig.every_layer(FourierPlan(bits=3, phase_bits=4, group_size=16, fraction=0.5), rest_dtype="bfloat16"),
], ids=["default-4", "3-4-bf16-rest"])
def test_compress_calibrates_logs_and_counts_bytes(cfg, tmp_path):
    ids = torch.randint(0, 128, (4, 24))
    model = compress(tiny_llama(), cfg, ids, progress=False)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, FourierLinear)}
    assert len(layers) == 6
    assert all(m.channel_scale.float().ne(1).any() for m in layers.values())  # calibrated
    save_compressed(model, tmp_path / "ckpt")  # the load round trip: tests/test_checkpoint.py
    size = model_size(model, rest_bytes_per_param=dtype_bytes(cfg.rest_dtype))
    buffers = sum(b.numel() * b.element_size() for m in layers.values() for b in m.buffers())
    assert size["ffn_bytes"] == buffers
    assert size["ffn_params"] == sum(2 * m.rank * (m.in_features + m.out_features) for m in layers.values())
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as f:
        stored = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())  # noqa: SIM118
    assert stored == size["bytes"]

    for record in model.hyperquant_log:
        assert record["kind"] == "fourier" and record["rank"] == rank_for_fraction(
            record["out_features"], record["in_features"], cfg.layers[".*"].fraction)
        assert record["output_error"] <= record["output_error_uncalibrated"] * (1 + 1e-6)
        assert record["output_error_lowrank_float"] <= record["output_error_uncalibrated"]
        assert 0 < record["weight_error"] and record["time_s"] >= 0


def test_without_calibration_the_channel_scale_is_one():
    model = compress(tiny_llama(), CompressConfig.every_layer(FourierPlan(bits=4, diag_calibration=False)),
                     progress=False)
    for record in model.hyperquant_log:
        assert "output_error" not in record and record["weight_error"] > 0
    assert all(torch.all(m.channel_scale == 1) for m in model.modules() if isinstance(m, FourierLinear))


def _bytes_per_weight(layer, out_f, in_f):
    return 8 * layer.packed_bytes() / (out_f * in_f)


def test_matched_bytes_against_rtn():
    """At ~4 bits per weight: on a full-rank random weight, dense RTN-4 wins by far (low rank has nothing
    to keep); on an exactly low-rank weight, Fourier factors at 8 bits win. Both measured on outputs."""
    out_f, in_f = 64, 128
    _, cov = _calibration(in_f, 600)
    lin = torch.nn.Linear(in_f, out_f, bias=False)
    rtn_entry = DenseQuantPlan(method="rtn", bits=4, group_size=16)
    fourier_entry = FourierPlan(bits=8, fraction=0.5, group_size=16)
    results = {}
    for name, w in {"random": torch.randn(out_f, in_f),
                    "rank8": torch.randn(out_f, 8) @ torch.randn(8, in_f) / 8}.items():
        lin.weight.data.copy_(w)
        rtn, rtn_rec = compress_layer("l", lin, rtn_entry, LayerStats(cov.float()))
        four, four_rec = compress_layer("l", lin, fourier_entry, LayerStats(cov.float()))
        assert four_rec["rank"] == rank_for_fraction(out_f, in_f, 0.5) >= 8
        rtn_bpw = _bytes_per_weight(rtn, out_f, in_f)
        four_bpw = _bytes_per_weight(four, out_f, in_f)
        assert abs(four_bpw - rtn_bpw) / rtn_bpw < 0.25, (four_bpw, rtn_bpw)  # matched storage
        results[name] = (rtn_rec["output_error"], four_rec["output_error"])
        assert all(math.isfinite(v) for v in results[name])
        ref = relative_output_error(w, rtn_quantize(w, 4, 16).dequantize(), cov)
        assert math.isclose(rtn_rec["output_error"], ref, rel_tol=1e-6)
    assert results["random"][0] < results["random"][1] / 10
    assert results["rank8"][1] < results["rank8"][0] / 10

import copy

import pytest
import torch

from hyperquant.convert import find_ffn_linears, set_module
from hyperquant.phm.layer import PHMLinear
from hyperquant.train import InterpolatedLinear, TrainConfig, drop_dense, fixed_alpha, layer_alpha, set_alphas
from hyperquant.train.interp import has_dense, interpolated_layers, reconstruction_loss
from hyperquant.train.runner import prepare_model
from tests.conftest import tiny_llama


def _ids(vocab=128, rows=2, cols=16, seed=1):
    return torch.randint(0, vocab, (rows, cols), generator=torch.Generator().manual_seed(seed))


def _prepared(cfg=None, layers=2):
    dense = tiny_llama(layers=layers)
    model = copy.deepcopy(dense)
    cfg = cfg or TrainConfig(compress={"init": "frobenius"})
    prepare_model(model, cfg, {}, None)
    return dense, model


def test_alpha_zero_reproduces_dense_logits_exactly():
    dense, model = _prepared(TrainConfig(compress={"init": "activation"}, recon_weight=1.0))
    ids = _ids()
    set_alphas(model, 0, fade_steps=10, schedule="linear", stagger=0.0)
    for train_mode in (False, True):  # in training mode the PHM branch also runs (for the recon loss)
        model.train(train_mode)
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, dense(input_ids=ids).logits)


def test_alpha_one_with_stage_b_equals_the_phm_model():
    _, model = _prepared()
    with torch.no_grad():  # move the PHM layers away from their init so the check is not trivial
        for m in interpolated_layers(model).values():
            m.phm.factors.add_(0.01 * torch.randn_like(m.phm.factors))
    phm_model = copy.deepcopy(model)
    for name, m in interpolated_layers(phm_model).items():
        set_module(phm_model, name, m.phm)
    assert all(isinstance(m, PHMLinear) for m in find_ffn_linears(phm_model, extra_types=(PHMLinear,)).values())
    ids = _ids()
    with torch.no_grad():
        with fixed_alpha(model, 1.0):
            at_one = model(input_ids=ids).logits
        freed = drop_dense(model)
        assert freed == 2 * 3 * 64 * 128 and not has_dense(model)
        assert all(m.dense is None for m in interpolated_layers(model).values())
        stage_b = model(input_ids=ids).logits
        reference = phm_model(input_ids=ids).logits
    assert torch.equal(stage_b, reference)
    assert torch.equal(at_one, reference)


def test_interpolation_is_the_convex_combination():
    dense = torch.nn.Linear(8, 6)
    phm = PHMLinear(8, 6, n=2, num_bases=2)
    layer = InterpolatedLinear(dense, phm)
    x = torch.randn(3, 8)
    layer.alpha = 0.3
    expected = 0.7 * dense(x) + 0.3 * phm(x)
    torch.testing.assert_close(layer(x), expected)
    assert not any(p.requires_grad for p in layer.dense.parameters())
    layer(x).sum().backward()
    assert phm.factors.grad is not None and phm.factors.grad.abs().sum() > 0


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_alpha_schedules(schedule):
    assert layer_alpha(0, 0, 4, 10, schedule) == 0.0
    assert layer_alpha(10, 3, 4, 10, schedule) == 1.0
    assert layer_alpha(5, 0, 4, 10, schedule) == pytest.approx(0.5)
    values = [layer_alpha(s, 0, 1, 10, schedule) for s in range(11)]
    assert values == sorted(values)
    if schedule == "cosine":
        assert layer_alpha(2, 0, 1, 10, "cosine") < layer_alpha(2, 0, 1, 10, "linear")
    # staggered bottom-up: lower layers are ahead, all reach 1 at fade_steps
    stag = [layer_alpha(5, layer, 4, 10, schedule, stagger=0.6) for layer in range(4)]
    assert stag == sorted(stag, reverse=True) and stag[0] > stag[-1]
    assert layer_alpha(6, 3, 4, 10, schedule, stagger=0.6) == 0.0
    assert all(layer_alpha(10, layer, 4, 10, schedule, stagger=0.6) == 1.0 for layer in range(4))
    assert layer_alpha(0, 0, 1, 0, schedule) == 1.0


def test_set_alphas_uses_block_order():
    _, model = _prepared(layers=2)
    mean = set_alphas(model, 5, fade_steps=10, schedule="linear", stagger=0.5)
    by_block = {m.layer_index: m.alpha for m in interpolated_layers(model).values()}
    assert by_block[0] > by_block[1]
    assert mean == pytest.approx(sum(m.alpha for m in interpolated_layers(model).values()) / 6)


def test_reconstruction_loss_from_the_same_forward():
    torch.manual_seed(0)
    dense = torch.nn.Linear(8, 6, bias=False)
    exact = InterpolatedLinear(dense, PHMLinear.from_dense(dense.weight, n=2, num_bases=4, bias=None))
    rough = InterpolatedLinear(copy.deepcopy(dense), PHMLinear.from_dense(dense.weight, n=2, num_bases=1, bias=None))
    x = torch.randn(5, 8)
    model = torch.nn.ModuleDict({"a": exact, "b": rough}).train()
    for m in (exact, rough):
        m.track_recon, m.alpha = True, 0.5
        m(x)
    assert float(exact.last_recon.detach()) < 1e-10  # B = n^2 spans every matrix: PHM = dense
    w = dense.weight.detach()
    approx = rough.phm.effective_weight().detach()
    expected = ((x @ (approx - w).T) ** 2).mean() / ((x @ w.T) ** 2).mean()
    torch.testing.assert_close(rough.last_recon.detach(), expected)
    torch.testing.assert_close(reconstruction_loss(model).detach(), (exact.last_recon + rough.last_recon).detach() / 2)
    rough.recon_relative = False
    rough(x)
    torch.testing.assert_close(rough.last_recon.detach(), ((x @ (approx - w).T) ** 2).mean())


@pytest.mark.parametrize("sequential", [True, False])
def test_activation_init_matches_compress_or_the_dense_inputs(sequential):
    import hyperquant

    dense, model = tiny_llama(), None
    model = copy.deepcopy(dense)
    ids = _ids(rows=4, cols=24)
    prepare_model(model, TrainConfig(init_sequential=sequential), {r"layers\.1\.mlp\.up": 3}, ids)
    layers = interpolated_layers(model)
    assert layers["model.layers.1.mlp.up_proj"].phm.num_bases == 3
    ref = hyperquant.compress(copy.deepcopy(dense), hyperquant.CompressConfig(
        bits=None, n=2, num_bases=2, layer_bases={r"layers\.1\.mlp\.up": 3}, rest_dtype="float32"), ids, progress=False)
    same = [torch.allclose(m.phm.factors, ref.get_submodule(name).factors, atol=1e-6) for name, m in layers.items()]
    if sequential:
        assert all(same)
    else:  # block 0's first group sees the same inputs either way; later layers differ
        assert same[0] and not all(same)

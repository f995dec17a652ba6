import pytest
import torch

from hyperquant import PHMLinear
from hyperquant.phm import fixed_bases, mix_inputs, phm_macs


def kron_reference(bases, factors):
    return sum(torch.kron(h, a) for h, a in zip(bases, factors))


@pytest.mark.parametrize("n,num_bases", [(1, 1), (2, 1), (2, 2), (2, 4), (3, 5), (4, 2), (4, 16)])
def test_forward_matches_materialized_kronecker(n, num_bases):
    layer = PHMLinear(4 * n, 6 * n, n=n, num_bases=num_bases, bias=True, dtype=torch.float64)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(3, 5, 4 * n, dtype=torch.float64)
    weight = kron_reference(layer.bases, layer.factors)
    assert torch.allclose(layer.effective_weight(), weight, atol=1e-12)
    assert torch.allclose(layer(x), x @ weight.T + layer.bias, atol=1e-10)
    assert layer.factors.shape == (num_bases, 6, 4) and layer.bases.shape == (num_bases, n, n)


def test_mixed_inputs_are_the_documented_z():
    bases = torch.randn(3, 2, 2, dtype=torch.float64)
    x = torch.randn(7, 10, dtype=torch.float64)
    z = mix_inputs(x, bases)
    x0, x1 = x[:, :5], x[:, 5:]
    for i in range(2):
        expected = torch.cat([bases[b, i, 0] * x0 + bases[b, i, 1] * x1 for b in range(3)], dim=1)
        assert torch.allclose(z[:, i], expected)


def test_fixed_bases_are_orthogonal_and_start_with_identity():
    for n in (2, 3, 4, 6):
        h = fixed_bases(n, n * n, torch.float64)
        gram = h.reshape(n * n, -1) @ h.reshape(n * n, -1).T
        assert torch.allclose(gram, n * torch.eye(n * n, dtype=torch.float64), atol=1e-10)
        assert torch.equal(h[0], torch.eye(n, dtype=torch.float64))
    i, j, k, l = fixed_bases(2, 4)
    assert torch.equal(j @ j, -i) and torch.equal(k @ k, i) and torch.equal(l @ l, i)


def test_parameter_and_mac_counts_from_shapes():
    layer = PHMLinear(576, 1536, n=2, num_bases=2, bias=False)
    assert layer.num_parameters() == 2 * 768 * 288  # B * out/n * in/n = dense / 2
    assert layer.macs_per_token()["matmul"] == 2 * 576 * 1536 // 2  # B * in * out / n
    assert phm_macs(576, 1536, 4, 2)["matmul"] == 576 * 1536 // 2  # n=4, B=2 halves the compute
    assert phm_macs(576, 1536, 2, 2)["mixing"] == 2 * 2 * 576


def test_learned_bases_get_gradients_and_fixed_do_not():
    learned = PHMLinear(8, 8, n=2, num_bases=2, learn_bases=True)
    fixed = PHMLinear(8, 8, n=2, num_bases=2)
    for layer in (learned, fixed):
        layer(torch.randn(4, 8)).sum().backward()
    assert learned.bases.grad is not None and learned.bases.grad.abs().sum() > 0
    assert "bases" not in dict(fixed.named_parameters())


@pytest.mark.parametrize("bad", [{"n": 3}, {"n": 2, "num_bases": 5}, {"n": 0}])
def test_bad_shapes_are_rejected(bad):
    with pytest.raises(ValueError, match="n"):
        PHMLinear(8, 8, **bad)


def test_from_dense_reads_gpt2_conv1d_as_out_by_in():
    """GPT-2's Conv1D stores its weight (in, out); the PHM layer must represent the same map as nn.Linear."""
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(12, 8)  # nf=12 outputs, nx=8 inputs: weight (8, 12)
    torch.nn.init.normal_(conv.weight)
    torch.nn.init.normal_(conv.bias)
    layer = PHMLinear.from_dense(conv, n=2, num_bases=4)  # B = n^2: the projection is exact
    assert (layer.in_features, layer.out_features) == (8, 12)
    x = torch.randn(5, 8)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-5)

"""Projections against brute-force references (float64)."""

import torch

from hyperquant import PHMLinear
from hyperquant.phm import (
    fixed_bases,
    kron_weight,
    kronecker_svd,
    mix_inputs,
    mixed_hessian,
    project_activation_aware,
    project_fixed,
)
from hyperquant.phm.functional import factors_to_cat
from hyperquant.phm.projection import relative_output_error


def brute_force_fixed(weight, bases):
    """Least squares over vec(A) with the Kronecker map materialized column by column."""
    num_bases, n, _ = bases.shape
    rows, cols = weight.shape[0] // n, weight.shape[1] // n
    columns = []
    for b in range(num_bases):
        for p in range(rows):
            for q in range(cols):
                unit = torch.zeros(rows, cols, dtype=torch.float64)
                unit[p, q] = 1
                columns.append(torch.kron(bases[b], unit).reshape(-1))
    design = torch.stack(columns, 1)
    sol = torch.linalg.lstsq(design, weight.reshape(-1, 1)).solution
    return sol.reshape(num_bases, rows, cols)


def test_fixed_projection_equals_brute_force_least_squares():
    weight = torch.randn(6, 8, dtype=torch.float64)
    for n, num_bases in [(2, 1), (2, 2), (2, 3)]:
        bases = fixed_bases(n, num_bases, torch.float64)
        assert torch.allclose(project_fixed(weight, bases), brute_force_fixed(weight, bases), atol=1e-10)
    # Non-orthogonal random bases too: the normal equations are not diagonal there.
    bases = torch.randn(3, 2, 2, dtype=torch.float64)
    assert torch.allclose(project_fixed(weight, bases), brute_force_fixed(weight, bases), atol=1e-9)


def test_exact_structure_is_recovered_on_a_non_symmetric_weight():
    # A row/column-shuffled rearrangement would still "work" on symmetric blocks; these are not.
    bases = fixed_bases(2, 2, torch.float64)
    factors = torch.randn(2, 3, 5, dtype=torch.float64)
    weight = kron_weight(bases, factors)
    assert not torch.allclose(weight[:3, :5], weight[:3, :5].flip(0))
    assert torch.allclose(project_fixed(weight, bases), factors, atol=1e-12)
    layer = PHMLinear.from_dense(weight, n=2, num_bases=2)
    x = torch.randn(4, 10, dtype=torch.float64)
    assert torch.allclose(layer(x), x @ weight.T, atol=1e-10)


def test_kronecker_svd_recovers_a_random_rank_two_kronecker_sum():
    h = torch.randn(2, 3, 3, dtype=torch.float64)
    a = torch.randn(2, 4, 2, dtype=torch.float64)
    weight = kron_weight(h, a)
    layer = PHMLinear.from_dense(weight, n=3, num_bases=2, learn_bases=True)
    assert torch.allclose(layer.effective_weight(), weight, atol=1e-10)
    assert torch.allclose(layer.bases.flatten(1).norm(dim=1), torch.full((2,), 3**0.5, dtype=torch.float64))


def test_kronecker_svd_beats_a_gradient_optimizer():
    weight = torch.randn(8, 6, dtype=torch.float64)
    bases, factors = kronecker_svd(weight, 2, 2)
    svd_err = (weight - kron_weight(bases, factors)).norm() ** 2
    h = torch.randn(2, 2, 2, dtype=torch.float64, requires_grad=True)
    a = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([h, a], lr=0.05)
    for _ in range(1500):
        opt.zero_grad()
        loss = (weight - kron_weight(h, a)).norm() ** 2
        loss.backward()
        opt.step()
    assert svd_err <= loss.item() + 1e-6
    assert svd_err < weight.norm() ** 2  # and it is not trivial


def _correlated_inputs(tokens, features):
    mix = torch.randn(features, features, dtype=torch.float64)
    return torch.randn(tokens, features, dtype=torch.float64) @ mix + torch.randn(features, dtype=torch.float64)


def test_mixed_hessian_is_z_transpose_z():
    bases = fixed_bases(2, 3, torch.float64)
    x = _correlated_inputs(50, 12)
    z = mix_inputs(x, bases).reshape(-1, 18)
    assert torch.allclose(mixed_hessian(bases, x.T @ x), z.T @ z, atol=1e-9)


def test_activation_aware_projection_equals_token_level_least_squares():
    bases = fixed_bases(2, 2, torch.float64)
    weight = torch.randn(6, 10, dtype=torch.float64)
    x = _correlated_inputs(200, 10)
    factors = project_activation_aware(weight, bases, x.T @ x, ridge=0.0)
    # Reference: solve min ||Z A_cat^T - Y||^2 on the stacked (token, i) rows directly.
    z = mix_inputs(x, bases).reshape(-1, 10)
    y = (x @ weight.T).reshape(200, 2, 3).reshape(-1, 3)
    a_cat_t = torch.linalg.lstsq(z, y).solution
    assert torch.allclose(factors_to_cat(factors), a_cat_t.T, atol=1e-8)
    # It beats the Frobenius projection on the error it targets, and loses on weight error.
    frob = project_fixed(weight, bases)
    cov = x.T @ x
    act_err = relative_output_error(weight, kron_weight(bases, factors), cov)
    frob_err = relative_output_error(weight, kron_weight(bases, frob), cov)
    assert act_err < 0.9 * frob_err
    assert (weight - kron_weight(bases, factors)).norm() >= (weight - kron_weight(bases, frob)).norm()


def test_activation_aware_from_dense_matches_measured_outputs():
    weight = torch.randn(8, 12, dtype=torch.float64)
    x = _correlated_inputs(300, 12)
    layer = PHMLinear.from_dense(weight, n=2, num_bases=2, input_cov=x.T @ x, ridge=0.0)
    measured = ((x @ weight.T - layer(x)) ** 2).sum() / ((x @ weight.T) ** 2).sum()
    predicted = relative_output_error(weight, layer.effective_weight(), x.T @ x)
    assert abs(measured.item() - predicted) < 1e-9


def test_fit_to_original_outputs_equals_token_level_least_squares():
    from hyperquant.phm.projection import relative_error_to_original

    bases = fixed_bases(2, 2, torch.float64)
    weight = torch.randn(6, 10, dtype=torch.float64)
    original = _correlated_inputs(200, 10)
    current = original + 0.3 * torch.randn(200, 10, dtype=torch.float64)  # upstream errors
    factors = project_activation_aware(weight, bases, current.T @ current, ridge=0.0,
                                       cross_cov=current.T @ original)
    z = mix_inputs(current, bases).reshape(-1, 10)
    y = (original @ weight.T).reshape(-1, 3)
    assert torch.allclose(factors_to_cat(factors), torch.linalg.lstsq(z, y).solution.T, atol=1e-8)
    approx = kron_weight(bases, factors)
    measured = ((original @ weight.T - current @ approx.T) ** 2).sum() / ((original @ weight.T) ** 2).sum()
    predicted = relative_error_to_original(weight, approx, current.T @ current, current.T @ original,
                                           original.T @ original)
    assert abs(measured.item() - predicted) < 1e-9

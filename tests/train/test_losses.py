import copy

import pytest
import torch
from torch.nn import functional as F

from hyperquant.train import TrainConfig, causal_lm_loss, fixed_alpha, kd_loss
from hyperquant.train.lora import adapters_disabled, merge_lora
from hyperquant.train.runner import prepare_model
from tests.conftest import tiny_llama


def test_kd_is_zero_when_student_equals_teacher():
    logits = torch.randn(2, 7, 50) * 3
    assert float(kd_loss(logits, logits.clone(), 4.0)) == 0.0
    assert float(kd_loss(logits, logits + 5.0, 2.0)) < 1e-6  # a constant shift is the same distribution
    assert float(kd_loss(logits, torch.randn(2, 7, 50), 4.0)) > 0


def test_kd_matches_temperature_scaled_kl():
    s, t, temp = torch.randn(3, 4, 11), torch.randn(3, 4, 11), 4.0
    p_t = F.softmax(t / temp, -1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / temp, -1))).sum(-1).mean()
    torch.testing.assert_close(kd_loss(s, t, temp), kl * temp**2)


def _kd_reference(s, t, temp, mask=None):
    """The loss as plain float64 autograd code."""
    log_ps = F.log_softmax(s.double() / temp, -1)
    log_pt = F.log_softmax(t.double() / temp, -1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    keep = torch.ones_like(kl) if mask is None else (mask != 0).double()
    return (kl * keep).sum() / keep.sum() * temp**2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 5, 64])
@pytest.mark.parametrize("temp", [1.0, 4.0])
@pytest.mark.parametrize("masked", [False, True])
def test_chunked_kd_value_and_gradient_match_float64(dtype, chunk, temp, masked):
    """The chunked loss and the gradient it keeps from its forward against float64 autograd, for chunks
    that do not divide the 3 x 7 rows, bf16 logits (the gradient comes back in bf16, as autograd's would)
    and padding."""
    s = (torch.randn(3, 7, 300) * 4).to(dtype).requires_grad_(True)
    t = (torch.randn(3, 7, 300) * 4).to(dtype)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [0] + [1] * 6]) if masked else None
    loss = kd_loss(s, t, temp, mask, chunk=chunk)
    (2.5 * loss).backward()
    ref_s = s.detach().double().requires_grad_(True)
    ref = _kd_reference(ref_s, t, temp, mask)
    (2.5 * ref).backward()
    assert loss.dtype == torch.float32 and s.grad.dtype == dtype  # fp32 arithmetic for bf16 logits too
    assert float(loss) == pytest.approx(float(ref), rel=1e-5, abs=1e-6)
    tol = 1e-6 if dtype == torch.float32 else 1e-2 * float(ref_s.grad.abs().max())  # bf16 holds 8 bits
    torch.testing.assert_close(s.grad.double(), ref_s.grad, rtol=1e-3 if dtype == torch.float32 else 2e-2, atol=tol)
    if masked:  # padded positions get no gradient at all
        assert torch.all(s.grad[1, 4:] == 0) and torch.all(s.grad[2, 0] == 0)


def test_chunked_kd_is_a_differentiable_function_of_its_input():
    """Against torch's own numerical gradient (float64), through a function of the logits."""
    t = torch.randn(2, 3, 13, dtype=torch.float64)
    x = torch.randn(2, 3, 13, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: kd_loss(v.tanh() * 3, t, 2.0, chunk=4), (x,))


def test_label_smoothed_cross_entropy():
    logits, ids = torch.randn(2, 5, 9), torch.randint(0, 9, (2, 5))
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 9), ids[:, 1:].reshape(-1), label_smoothing=0.1)
    torch.testing.assert_close(causal_lm_loss(logits, ids, 0.1), expected)
    assert causal_lm_loss(logits, ids, 0.1) != causal_lm_loss(logits, ids, 0.0)


def test_self_teacher_is_the_dense_model_without_lora_and_lora_merges():
    dense = tiny_llama()
    model = copy.deepcopy(dense)
    prepare_model(model, TrainConfig(compress={"init": "frobenius"}, lora_r=4, lora_include_o=True), {}, None)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("q_proj.lora_A" in n for n in names) and any("o_proj.lora_B" in n for n in names)
    assert any(n.endswith("phm.factors") for n in names)
    assert not any(".dense." in n or "embed" in n or "base_layer" in n for n in names)
    with torch.no_grad():  # a non-zero LoRA update (B starts at zero) and a moved PHM
        for n, p in model.named_parameters():
            if "lora_B" in n or n.endswith("phm.factors"):
                p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(0, 128, (2, 12))
    model.eval()
    with torch.no_grad():
        with fixed_alpha(model, 0.0), adapters_disabled(model):
            teacher = model(input_ids=ids).logits
        with fixed_alpha(model, 0.0):
            with_lora = model(input_ids=ids).logits
        with fixed_alpha(model, 1.0):
            before_merge = model(input_ids=ids).logits
        assert torch.equal(teacher, dense(input_ids=ids).logits)
        assert not torch.allclose(with_lora, teacher)
        assert merge_lora(model) == 8
        assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
        with fixed_alpha(model, 1.0):
            after_merge = model(input_ids=ids).logits
    torch.testing.assert_close(after_merge, before_merge, atol=1e-5, rtol=1e-5)


def test_masked_losses_score_only_the_kept_positions():
    """Padding (attention mask 0) is not distilled and label -100 is not scored: each equals the loss
    of the kept positions alone."""
    from hyperquant.train.losses import causal_lm_loss, kd_loss

    student, teacher = torch.randn(2, 6, 11), torch.randn(2, 6, 11)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    per_row = kd_loss(student[0:1], teacher[0:1], 2.0) * 6 + kd_loss(student[1:2, :3], teacher[1:2, :3], 2.0) * 3
    assert float(kd_loss(student, teacher, 2.0, mask)) == pytest.approx(float(per_row) / 9, rel=1e-5)
    ids = torch.randint(0, 11, (2, 6))
    labels = ids.masked_fill(mask == 0, -100)
    alone = torch.nn.functional.cross_entropy(torch.cat([student[0, :5], student[1, :2]]),
                                              torch.cat([ids[0, 1:], ids[1, 1:3]]))
    assert float(causal_lm_loss(student, labels)) == pytest.approx(float(alone), rel=1e-5)

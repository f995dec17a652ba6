"""Training losses: label-smoothed next-token cross-entropy and temperature-scaled distillation.

The distillation loss works on (tokens x vocabulary) logits, 50 M numbers per 1,024-token batch of the
default model: as plain tensor code its forward and backward make about a dozen passes over such arrays
(casts, two log-softmaxes, exp, difference, product, their gradients), which on a CPU take as long as
the model's own matrix products in bf16. `kd_loss` instead walks the rows in chunks that stay in cache,
once, and keeps the gradient it already knows in closed form,
d(T^2 KL(p_t || p_s)) / d s = T (p_s - p_t) per scored row.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

KD_CHUNK_ROWS = 64  # 64 rows x 49,152 logits in fp32: 12.6 MB per temporary


def causal_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 from logits at t, with label smoothing; labels of -100
    (padding, image tokens, a caption's prompt) are not scored."""
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    targets = input_ids[:, 1:].reshape(-1)
    return F.cross_entropy(shifted, targets, label_smoothing=label_smoothing)


class _ChunkedKD(torch.autograd.Function):
    """sum_r w_r T^2 KL(softmax(t_r / T) || softmax(s_r / T)) over rows r, in fp32 (float64 for float64
    logits) chunks of rows; the
    gradient with respect to s is saved in the forward (in s's dtype, as autograd would return it)."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor, temperature: float,
                chunk: int) -> torch.Tensor:
        vocab = student.shape[-1]
        s2, t2 = student.detach().reshape(-1, vocab), teacher.detach().reshape(-1, vocab)
        need_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(s2) if need_grad else None
        work = torch.promote_types(student.dtype, torch.float32)  # fp32, or float64 for float64 logits
        total = torch.zeros((), dtype=work, device=student.device)
        for start in range(0, s2.shape[0], chunk):
            rows = slice(start, start + chunk)
            log_ps = F.log_softmax(s2[rows].to(work) / temperature, dim=-1)
            log_pt = F.log_softmax(t2[rows].to(work) / temperature, dim=-1)
            p_t = log_pt.exp()
            w = weights[rows].to(work)
            total = total + ((p_t * (log_pt - log_ps)).sum(-1) * w).sum()
            if need_grad:
                grad[rows] = (log_ps.exp_() - p_t).mul_((w * temperature)[:, None])
        if need_grad:
            ctx.save_for_backward(grad)
        ctx.shape = student.shape
        return total * temperature**2

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * grad_output.to(grad.dtype)).reshape(ctx.shape), None, None, None, None


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0,
            mask: torch.Tensor | None = None, chunk: int = KD_CHUNK_ROWS) -> torch.Tensor:
    """KL(teacher/T || student/T) * T^2, averaged over tokens (exactly 0 when the logits agree); ``mask``
    (batch, seq), e.g. the attention mask, keeps only the positions where it is nonzero. The teacher's
    logits get no gradient (they come from a frozen model)."""
    vocab = student_logits.shape[-1]
    rows = student_logits.numel() // vocab
    if mask is None:
        weights = torch.full((rows,), 1.0 / rows, dtype=torch.float32, device=student_logits.device)
    else:  # a weighted mean: no data-dependent shape
        keep = (mask.reshape(-1).to(student_logits.device) != 0).to(torch.float32)
        weights = keep / keep.sum()
    return _ChunkedKD.apply(student_logits, teacher_logits.detach(), weights, float(temperature), chunk)

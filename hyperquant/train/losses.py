"""Training losses: label-smoothed next-token cross-entropy and temperature-scaled distillation."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def causal_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 from logits at t, with label smoothing; labels of -100
    (padding, image tokens, a caption's prompt) are not scored."""
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    targets = input_ids[:, 1:].reshape(-1)
    return F.cross_entropy(shifted, targets, label_smoothing=label_smoothing)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher/T || student/T) * T^2, averaged over tokens (exactly 0 when the logits agree); ``mask``
    (batch, seq), e.g. the attention mask, keeps only the positions where it is nonzero."""
    vocab = student_logits.shape[-1]
    s = F.log_softmax(student_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(dim=-1)
    if mask is not None:
        keep = (mask.reshape(-1).to(kl.device) != 0).to(kl.dtype)  # a weighted mean: no data-dependent shape
        return (kl * keep).sum() / keep.sum() * temperature**2
    return kl.mean() * temperature**2

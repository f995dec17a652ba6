"""Perplexity of a causal LM on a token stream.

Protocol: the stream is cut into windows of ``context`` tokens starting every ``stride`` tokens. Each
window scores the tokens that no earlier window scored; a window's first token has no context and is
never scored, so with stride == context (non-overlapping windows) each window scores context - 1
tokens. Perplexity = exp(mean negative log-likelihood over the scored tokens).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from hyperquant.errors import HyperquantError


@dataclass(frozen=True)
class PerplexityProtocol:
    context: int = 512
    stride: int = 512
    num_tokens: int = 4096

    def __post_init__(self) -> None:
        if not 0 < self.stride <= self.context:
            raise ValueError(f"stride={self.stride} must be in (0, context={self.context}]")
        if self.num_tokens < 2:
            raise ValueError("num_tokens must be >= 2")

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def perplexity(model: nn.Module, token_ids: torch.Tensor, protocol: PerplexityProtocol = PerplexityProtocol(),
               progress=None) -> dict:
    """{'perplexity', 'nll', 'predicted_tokens', **protocol} for a 1-D tensor of token ids."""
    # the ids go where the model's weights are (eval --device, a model trained on a GPU)
    device = next((p.device for p in model.parameters()), token_ids.device)
    ids = token_ids[: protocol.num_tokens].reshape(1, -1).to(device)
    total = ids.shape[1]
    nll_sum, count, scored_until = 0.0, 0, 1  # token 0 is never predicted
    begin = 0
    while scored_until < total:
        end = min(begin + protocol.context, total)
        window = ids[:, begin:end]
        logits = model(input_ids=window, use_cache=False).logits[0, :-1].float()
        targets = window[0, 1:]
        first = max(scored_until - begin - 1, 0)  # position in `targets` of the first unscored token
        losses = nn.functional.cross_entropy(logits[first:], targets[first:], reduction="sum")
        nll_sum += float(losses)
        count += targets.numel() - first
        scored_until = end
        if progress is not None:
            progress(end / total)
        begin += protocol.stride
        if end == total:
            break
    nll = nll_sum / count
    if math.isnan(nll):
        raise HyperquantError("the model gives NaN log-likelihoods on the evaluation text (NaN or Inf in its "
                              "weights or activations); its perplexity is undefined, check the model or checkpoint")
    return {"perplexity": math.exp(nll), "nll": nll, "predicted_tokens": count, **protocol.to_dict()}

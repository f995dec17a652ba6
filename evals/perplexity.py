"""Perplexity of a causal LM on a token stream.

Protocol: the stream is cut into windows of ``context`` tokens starting every ``stride`` tokens. Each
window scores the tokens that no earlier window scored; a window's first token has no context and is
never scored, so with stride == context (non-overlapping windows) each window scores context - 1
tokens. Perplexity = exp(mean negative log-likelihood over the scored tokens). Its standard error is taken over
windows (`window_stderr`), as lm-evaluation-harness reports one beside every figure.
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


IGNORE = -100  # a label that is not scored


def model_device(model: nn.Module, fallback: torch.device | str = "cpu") -> torch.device:
    """Where the model takes its inputs: its input embedding's tensors (a quantized table has buffers only,
    and a block-offloaded model keeps its blocks, whose parameters may come first, on the host), else its
    first parameter."""
    try:
        embedding = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):  # not a transformers model, or one without a table
        embedding = None
    if embedding is not None:
        for tensor in [*embedding.parameters(), *embedding.buffers()]:
            return tensor.device
    return next((p.device for p in model.parameters()), torch.device(fallback))


def scored_nll(model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> tuple[float, int]:
    """(sum of -log p(labels[t+1] | inputs up to t), number of scored positions) for one sequence:
    position t+1 is scored unless its label is IGNORE. The one scoring rule of text and caption
    perplexity."""
    logits = model(**inputs, use_cache=False).logits[0, :-1].float()
    targets = labels[0, 1:].to(logits.device)
    keep = targets != IGNORE
    return float(nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum")), int(keep.sum())


def window_stderr(window_nll: list[float], window_count: list[int]) -> float:
    """The standard error of the mean token NLL, with the windows as the independent units (tokens inside a
    window share their context, so they are not): the ratio estimator's variance over windows, as a
    clustered standard error. 0 for a single window, where nothing estimates it."""
    k, total = len(window_nll), sum(window_count)
    if k < 2:
        return 0.0
    mean = sum(window_nll) / total
    spread = sum((s - c * mean) ** 2 for s, c in zip(window_nll, window_count))
    return math.sqrt(spread * k / (k - 1)) / total


def perplexity_from_nll(nll_sum: float, count: int, what: str = "the evaluation text") -> dict:
    """{'perplexity', 'nll', 'predicted_tokens'} from summed negative log-likelihoods; NaN fails."""
    nll = nll_sum / count
    if math.isnan(nll):
        raise HyperquantError(f"the model gives NaN log-likelihoods on {what} (NaN or Inf in its weights or "
                              f"activations); its perplexity is undefined, check the model or checkpoint")
    return {"perplexity": math.exp(nll), "nll": nll, "predicted_tokens": count}


@torch.no_grad()
def perplexity(model: nn.Module, token_ids: torch.Tensor, protocol: PerplexityProtocol = PerplexityProtocol(),
               progress=None) -> dict:
    """{'perplexity', 'nll', 'predicted_tokens', **protocol} for a 1-D tensor of token ids."""
    # the ids go where the model's weights are (eval --device, a model trained on a GPU)
    ids = token_ids[: protocol.num_tokens].reshape(1, -1).to(model_device(model, token_ids.device))
    total = ids.shape[1]
    sums, counts, scored_until = [], [], 1  # token 0 is never predicted
    begin = 0
    while scored_until < total:
        end = min(begin + protocol.context, total)
        window = ids[:, begin:end]
        labels = window.clone()
        labels[0, : max(scored_until - begin, 1)] = IGNORE  # tokens an earlier window scored
        window_nll, window_count = scored_nll(model, {"input_ids": window}, labels)
        if window_count:
            sums.append(window_nll)
            counts.append(window_count)
        scored_until = end
        if progress is not None:
            progress(end / total)
        begin += protocol.stride
        if end == total:
            break
    result = perplexity_from_nll(sum(sums), sum(counts))
    stderr = window_stderr(sums, counts)
    # the delta method: d exp(nll) = exp(nll) d nll
    return {**result, "nll_stderr": stderr, "perplexity_stderr": result["perplexity"] * stderr,
            "windows": len(sums), **protocol.to_dict()}


def reported(result: dict) -> dict:
    """What a table or summary keeps of a `perplexity` result: the figure, its standard error, the windows."""
    return {"perplexity": result["perplexity"], "stderr": result["perplexity_stderr"], "windows": result["windows"]}

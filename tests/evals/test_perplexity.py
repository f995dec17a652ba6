import math

import pytest
import torch
from hyperquant.evals import PerplexityProtocol, perplexity

from tests.conftest import tiny_llama


def reference_nll(model, ids, context, stride):
    """Brute force: for every token, the loss of the window that scores it under the documented rule."""
    losses = {}
    begin = 0
    while True:
        end = min(begin + context, len(ids))
        logp = torch.log_softmax(model(input_ids=ids[None, begin:end]).logits[0].double(), -1)
        for pos in range(begin + 1, end):
            losses.setdefault(pos, -logp[pos - begin - 1, ids[pos]].item())
        if end == len(ids):
            break
        begin += stride
    return sum(losses.values()) / len(losses), len(losses)


@pytest.mark.parametrize("context,stride", [(64, 64), (64, 16), (200, 200)])
def test_perplexity_matches_brute_force(context, stride):
    model = tiny_llama()
    ids = torch.randint(0, 128, (150,))
    with torch.no_grad():
        nll, count = reference_nll(model, ids, context, stride)
        result = perplexity(model, ids, PerplexityProtocol(context=context, stride=stride, num_tokens=150))
    assert result["predicted_tokens"] == count
    assert result["nll"] == pytest.approx(nll, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)


def test_random_model_is_near_uniform_and_protocol_is_validated():
    model = tiny_llama()
    with torch.no_grad():
        result = perplexity(model, torch.randint(0, 128, (100,)), PerplexityProtocol(64, 64, 100))
    assert 64 < result["perplexity"] < 256  # an untrained model is close to uniform over 128 tokens
    with pytest.raises(ValueError):
        PerplexityProtocol(context=64, stride=128)


def test_the_standard_error_is_the_spread_of_the_window_means():
    """Equal windows: the clustered standard error is the plain standard error of the per-window mean NLL
    (float64 reference from the brute-force losses); the perplexity's is perplexity x that (delta method)."""
    model = tiny_llama()
    ids = torch.randint(0, 128, (4 * 33,))
    with torch.no_grad():
        result = perplexity(model, ids, PerplexityProtocol(context=33, stride=33, num_tokens=len(ids)))
        means = []
        for w in range(4):
            window = ids[w * 33 : (w + 1) * 33]
            logp = torch.log_softmax(model(input_ids=window[None]).logits[0].double(), -1)
            means.append(float(-logp[torch.arange(32), window[1:]].mean()))
    reference = torch.tensor(means, dtype=torch.float64).std(unbiased=True).item() / math.sqrt(4)
    assert result["windows"] == 4
    assert result["nll_stderr"] == pytest.approx(reference, rel=1e-4)
    assert result["perplexity_stderr"] == pytest.approx(result["perplexity"] * reference, rel=1e-4)
    one = perplexity(model, ids[:33], PerplexityProtocol(context=33, stride=33, num_tokens=33))
    assert one["windows"] == 1 and one["nll_stderr"] == 0.0

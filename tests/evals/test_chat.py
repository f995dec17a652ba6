"""The instruction-model check: KL to the original and greedy agreement along the original's replies."""

import copy

import pytest
import torch
from hyperquant.evals.chat import PLAIN_TEMPLATE, ChatReference

from hyperquant.textsets import SelectionReadTestSet, choosing
from tests.conftest import tiny_llama


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from tests.conftest import minilm_dir

    return AutoTokenizer.from_pretrained(minilm_dir())


PROMPTS = ("What is the capital of France?", "Tell me a short joke about computers.")


def test_the_original_agrees_with_itself_and_a_changed_model_is_scored_against_a_float64_reference(tokenizer):
    torch.manual_seed(0)
    model = tiny_llama(vocab_size=len(tokenizer), hidden=32, intermediate=64)
    reference = ChatReference.from_model(model, tokenizer, PROMPTS, max_new_tokens=6)
    assert reference.describe() == {"prompts": 2, "reply_tokens": 12, "max_new_tokens": 6, "template": PLAIN_TEMPLATE}
    same = reference.score(model)
    assert same["tokens"] == 12 and same["agreement"] == 1.0 and abs(same["kl"]) < 1e-6

    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.model.layers[0].mlp.parameters():
            p.add_(0.5 * torch.randn_like(p))
    got = other_score = reference.score(other)
    kl, agree = 0.0, 0
    with torch.no_grad():
        for seq, start in zip(reference.sequences, reference.reply_starts):
            p = torch.log_softmax(model(input_ids=seq[None]).logits[0].double(), -1)[start - 1 : -1]
            q = torch.log_softmax(other(input_ids=seq[None]).logits[0].double(), -1)[start - 1 : -1]
            kl += float((p.exp() * (p - q)).sum())
            agree += int((q.argmax(-1) == seq[start:]).sum())
    assert got["kl"] == pytest.approx(kl / 12, rel=1e-4) and got["kl"] > 1e-4
    assert other_score["agreement"] == agree / 12


def test_the_chat_prompts_are_test_side(tokenizer):
    model = tiny_llama(vocab_size=len(tokenizer), hidden=32, intermediate=64)
    with choosing("a recipe choice"), pytest.raises(SelectionReadTestSet):
        ChatReference.from_model(model, tokenizer, PROMPTS, max_new_tokens=2)

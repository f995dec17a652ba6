"""The three roles of text: calibration/training, validation, test. The test set is read by reports only."""

import pytest
import torch

from hyperquant.textsets import (
    CHUNK_TOKENS,
    TEST_DOMAINS,
    TEST_TOKENS,
    SelectionReadTestSet,
    chooses,
    choosing,
    domain_documents,
    domain_tokens,
    other_roles_ngrams,
    word_ngrams,
)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from tests.conftest import minilm_dir

    return AutoTokenizer.from_pretrained(minilm_dir())


def test_three_domains_unlike_wikipedia_each_large_enough_and_spread_over_documents(tokenizer):
    assert set(TEST_DOMAINS) == {"dialogue", "drama", "code"}
    for name in TEST_DOMAINS:
        ids = domain_tokens(tokenizer, name, TEST_TOKENS)
        assert ids.shape == (TEST_TOKENS,) and ids.dtype == torch.long
        assert torch.equal(ids, domain_tokens(tokenizer, name, TEST_TOKENS))  # fixed, no seed to vary
        # 16,384 tokens from at least 4 documents (CHUNK_TOKENS each at most), not one play or one module
        assert len(domain_documents(name)) >= 4 and TEST_TOKENS // CHUNK_TOKENS >= 4
    text = {name: tokenizer.decode(domain_tokens(tokenizer, name, TEST_TOKENS).tolist()) for name in TEST_DOMAINS}
    assert "def " in text["code"] and "self" in text["code"]
    assert any(word in text["drama"].lower() for word in ("thou", "thee", "thy"))
    assert "?" in text["dialogue"]


def test_no_test_text_shares_a_13_word_sequence_with_calibration_training_or_validation(tokenizer):
    """Wikipedia (every article: calibration, training and validation draw from it) and the Python docs
    (validation); teacher samples start from BOS alone. chatterbot's trivia quotes Wikipedia, and that
    paragraph is dropped."""
    other = other_roles_ngrams()
    for name in TEST_DOMAINS:
        used = tokenizer.decode(domain_tokens(tokenizer, name, TEST_TOKENS).tolist())
        raw = "\n\n".join(text for _, text in TEST_DOMAINS[name].documents())
        assert not word_ngrams(used) & other, name
        assert not any(word_ngrams(text) & other for _, text in domain_documents(name)), name
        if name == "dialogue":  # the check is not vacuous: the raw corpus does overlap
            assert word_ngrams(raw) & other


def test_selection_code_cannot_read_the_test_set(tokenizer):
    with choosing("a recipe choice"), pytest.raises(SelectionReadTestSet, match="a recipe choice read"):
        domain_tokens(tokenizer, "drama", 64)
    domain_tokens(tokenizer, "drama", 64)  # outside, reports read it

    @chooses("the capacity assignment")
    def sneaky():
        return domain_tokens(tokenizer, "code", 64)

    with pytest.raises(SelectionReadTestSet, match="capacity assignment"):
        sneaky()


@pytest.mark.parametrize("path", ["hyperquant.train.runner:train", "hyperquant.pipeline:compress",
                                  "hyperquant.train.capacity:assign_capacity",
                                  "hyperquant.train.blockwise:blockwise_stage"])
def test_every_selection_path_runs_under_the_guard(path):
    """Each path that fits or chooses is wrapped by `chooses`, so a test-set read anywhere inside it raises
    (and the tests that run those paths fail)."""
    import importlib

    module_name, name = path.split(":")
    function = getattr(importlib.import_module(module_name), name)
    assert getattr(function, "chooses", None), path

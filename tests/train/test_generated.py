"""Teacher-generated distillation data: reproducible from its seed, cached, and invalidated when the
teacher or the settings change."""

import pytest
import torch

from hyperquant.errors import ConfigError
from hyperquant.train.generated import GenerationSettings, generate_sequences, mix_rows, teacher_sequences
from tests.conftest import tiny_llama

SETTINGS = GenerationSettings(sequences=5, seq_len=12, seed=3, batch_size=2)


def test_generation_is_reproducible_from_its_seed_and_follows_the_model():
    model = tiny_llama()
    first = generate_sequences(model, SETTINGS, bos_id=1, vocab_size=128)
    assert first.shape == (5, 12) and (first[:, 0] == 1).all() and first.dtype == torch.long
    assert torch.equal(first, generate_sequences(model, SETTINGS, bos_id=1, vocab_size=128))
    other_seed = GenerationSettings(sequences=5, seq_len=12, seed=4, batch_size=2)
    assert not torch.equal(first, generate_sequences(model, other_seed, bos_id=1, vocab_size=128))
    # the samples follow the model's own next-token distribution: with top_k=1 they are its greedy tokens
    greedy = generate_sequences(model, GenerationSettings(sequences=2, seq_len=8, top_k=1), bos_id=1, vocab_size=128)
    reference = model.generate(torch.ones(2, 1, dtype=torch.long), max_new_tokens=7, do_sample=False,
                               min_new_tokens=7, pad_token_id=0)
    assert torch.equal(greedy, reference)
    no_bos = generate_sequences(model, SETTINGS, bos_id=None, vocab_size=128)
    assert len(set(no_bos[:, 0].tolist())) > 1  # the first token drawn from the vocabulary


def test_the_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    from hyperquant.train import generated

    model = tiny_llama()
    ids, info = teacher_sequences(model, SETTINGS, "model-a", tmp_path, 1, 128)
    assert not info["reused"]
    calls = []
    real = generated.generate_sequences

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(generated, "generate_sequences", counted)
    again, info = teacher_sequences(model, SETTINGS, "model-a", tmp_path, 1, 128)
    assert info["reused"] and not calls and torch.equal(ids, again)
    # another teacher (its files changed) or other settings: generated anew, in another file
    _, info_b = teacher_sequences(model, SETTINGS, "model-b", tmp_path, 1, 128)
    hotter = GenerationSettings(sequences=5, seq_len=12, seed=3, batch_size=2, temperature=2.0)
    _, info_t = teacher_sequences(model, hotter, "model-a", tmp_path, 1, 128)
    assert not info_b["reused"] and not info_t["reused"] and len(calls) == 2
    assert len({info["cache"], info_b["cache"], info_t["cache"]}) == 3
    # a damaged cache file is generated again, not trusted
    with open(info["cache"], "r+b") as f:
        f.write(b"garbage!")
    repaired, info = teacher_sequences(model, SETTINGS, "model-a", tmp_path, 1, 128)
    assert not info["reused"] and torch.equal(repaired, ids) and len(calls) == 3


def test_mixture_keeps_the_row_count_and_the_share():
    text = torch.zeros(10, 6, dtype=torch.long)
    generated = torch.ones(8, 9, dtype=torch.long)
    rows = mix_rows(text, generated, 0.3, seed=0)
    assert rows.shape == (10, 6) and int(rows[:, 0].sum()) == 3
    assert torch.equal(rows, mix_rows(text, generated, 0.3, seed=0))
    with pytest.raises(ConfigError):
        GenerationSettings(temperature=0)


def test_training_on_a_mixture(tiny_model_dir, tmp_path):
    from hyperquant.train.config import TrainConfig
    from hyperquant.train.runner import train

    def run(folder, fraction):
        cfg = TrainConfig.from_dict({
            "output_dir": str(folder), "max_steps": 2, "seq_len": 16, "train_samples": 8, "per_device_batch_size": 2,
            "init_samples": 2, "fade_steps": 1, "eval_tokens": 64, "eval_context": 32, "progress": False,
            "save_every": 0, "generated_fraction": fraction, "generation_cache": str(tmp_path / "cache"),
            "compress": {"bits": 4, "n": 2, "num_bases": 2, "group_size": 16, "heldout_samples": 0}})
        return train(tiny_model_dir, cfg)

    mixed = run(tmp_path / "mixed", 0.5)
    import json

    info = json.loads((tmp_path / "mixed" / "generation.json").read_text())
    # the 2 steps read 4 rows: half of them are the teacher's
    assert info["rows"] == 2 and not info["reused"] and info["settings"]["seq_len"] == 16
    again = run(tmp_path / "again", 0.5)
    assert json.loads((tmp_path / "again" / "generation.json").read_text())["reused"]
    assert again["exported_ppl"] == pytest.approx(mixed["exported_ppl"], rel=1e-9)
    text_only = run(tmp_path / "text", 0.0)
    assert not (tmp_path / "text" / "generation.json").exists()
    assert text_only["exported_ppl"] != pytest.approx(mixed["exported_ppl"], rel=1e-9)


def test_sampling_follows_the_temperature():
    """At a temperature near 0 the samples are the model's greedy tokens; at a high one they are not (the
    logits are divided by the temperature before sampling)."""
    model = tiny_llama()
    cold = generate_sequences(model, GenerationSettings(sequences=3, seq_len=10, temperature=1e-4), bos_id=1,
                              vocab_size=128)
    greedy = generate_sequences(model, GenerationSettings(sequences=3, seq_len=10, top_k=1), bos_id=1, vocab_size=128)
    assert torch.equal(cold, greedy)
    hot = generate_sequences(model, GenerationSettings(sequences=3, seq_len=10, temperature=1.0), bos_id=1,
                             vocab_size=128)
    assert not torch.equal(hot, greedy)


def test_the_mixture_interleaves_the_generated_rows():
    """Generated rows are spread through the training order, not put in one block at either end."""
    text = torch.zeros(100, 4, dtype=torch.long)
    generated = torch.ones(50, 4, dtype=torch.long)
    marks = mix_rows(text, generated, 0.5, seed=0)[:, 0]
    assert int(marks.sum()) == 50
    for quarter in marks.reshape(4, 25):
        assert 6 <= int(quarter.sum()) <= 19, marks.tolist()

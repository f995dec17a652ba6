"""The block-wise first stage lowers every block's held-out error (or keeps a block as it was when training
does not help), and hands a model whose alphas the end-to-end schedule sets."""

import json

import torch

from hyperquant.train.blockwise import blockwise_stage
from hyperquant.train.config import TrainConfig
from hyperquant.train.interp import interpolated_layers
from hyperquant.train.runner import prepare_model
from tests.conftest import tiny_llama


def _prepared():
    model = tiny_llama(vocab_size=128, hidden=64, intermediate=128, layers=3)
    cfg = TrainConfig(compress={"bits": 4, "n": 2, "num_bases": 1, "group_size": 16}, init_sequential=False)
    prepare_model(model, cfg, {}, torch.randint(0, 128, (4, 32)))
    return model


def test_blockwise_stage_lowers_each_blocks_heldout_error():
    model = _prepared()
    fit, held = torch.randint(0, 128, (64, 32)), torch.randint(0, 128, (8, 32))
    records = blockwise_stage(model, fit, held, steps=40, lr=1e-3, batch_size=8)
    assert [r["block"] for r in records] == [0, 1, 2] and all(r["layers"] == 3 for r in records)
    for r in records:
        assert 0 < r["heldout_error_trained"] < r["heldout_error_before"], r
        assert r["kept"] == "trained" and r["heldout_error_after"] == r["heldout_error_trained"], r
    assert all(layer.alpha == 0.0 for layer in interpolated_layers(model).values())
    # the record is the true error: block 0 at alpha = 1 against the dense block, recomputed by hand
    from hyperquant.pipeline import _capture_block_inputs
    from hyperquant.train.blockwise import _hidden

    block = model.model.layers[0]
    with torch.no_grad():
        (args, kwargs), = _capture_block_inputs(model, block, [{"input_ids": held}])
        dense = _hidden(block(*args, **kwargs))
        for layer in interpolated_layers(model).values():
            layer.alpha = 1.0
        phm = _hidden(block(*args, **kwargs))
    error = float(((phm - dense).pow(2).sum(-1) / dense.pow(2).sum(-1)).mean())  # per token, then the mean
    assert abs(error - records[0]["heldout_error_after"]) < 1e-4 * max(error, 1e-6)


def test_token_error_weighs_every_token_alike():
    """'token' is the mean of per-token relative errors, 'whole' the ratio of totals (a massive-activation
    token dominates it), each checked against a float64 loop; a shared scale per token leaves 'token' alone."""
    from hyperquant.train.blockwise import error_terms

    g = torch.Generator().manual_seed(0)
    target = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    target[:, 0] *= 1000.0  # the attention sink
    out = target + 0.1 * torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    per_token = [float((out[b, t] - target[b, t]).pow(2).sum() / target[b, t].pow(2).sum())
                 for b in range(2) for t in range(5)]
    num, den = error_terms(out, target, "token")
    assert abs(float(num / den) - sum(per_token) / 10) < 1e-12
    num, den = error_terms(out, target, "whole")
    assert abs(float(num / den) - float((out - target).pow(2).sum() / target.pow(2).sum())) < 1e-12
    # the sink's error is 1e-6 of its norm, the others' about 1e-2: only "token" sees the others
    assert float(num / den) < 1e-4 < sum(per_token) / 10
    scale = torch.rand(2, 5, 1, generator=g, dtype=torch.float64) + 0.5
    num_s, den_s = error_terms(out * scale, target * scale, "token")
    assert abs(float(num_s / den_s) - sum(per_token) / 10) < 1e-12


def test_blockwise_stage_on_the_whole_error_lowers_it():
    model = _prepared()
    fit, held = torch.randint(0, 128, (64, 32)), torch.randint(0, 128, (8, 32))
    records = blockwise_stage(model, fit, held, steps=40, lr=1e-3, batch_size=8, error="whole")
    for r in records:
        assert 0 < r["heldout_error_trained"] < r["heldout_error_before"], r


def test_a_block_fitted_almost_exactly_keeps_its_initial_factors():
    """With n^2 bases the initial fit nearly reproduces the dense block (error ~2e-4, the ridge's); Adam's
    lr-sized steps at lr 1e-2 move it away (~4e-2), so the stage hands on the initial factors bit for bit
    (and says so), while a block with 1 basis, far from exact, keeps what it trained."""
    model = tiny_llama(vocab_size=128, hidden=64, intermediate=128, layers=2)
    cfg = TrainConfig(compress={"bits": 4, "n": 2, "num_bases": 1, "group_size": 16}, init_sequential=False)
    prepare_model(model, cfg, {r"layers\.0\.": 4}, torch.randint(0, 128, (4, 32)))
    layers = interpolated_layers(model)
    initial = {name: [p.detach().clone() for p in layer.phm.parameters()] for name, layer in layers.items()}
    fit, held = torch.randint(0, 128, (64, 32)), torch.randint(0, 128, (8, 32))
    records = blockwise_stage(model, fit, held, steps=20, lr=1e-2, batch_size=8)
    exact, rough = records
    assert exact["heldout_error_before"] < 1e-3 < exact["heldout_error_trained"], exact
    assert exact["kept"] == "initial" and exact["heldout_error_after"] == exact["heldout_error_before"]
    assert rough["kept"] == "trained" and rough["heldout_error_after"] < rough["heldout_error_before"], rough
    for name, layer in layers.items():
        same = all(torch.equal(p, p0) for p, p0 in zip(layer.phm.parameters(), initial[name]))
        assert same == (".0." in name), name


def test_training_with_a_blockwise_first_stage(tiny_model_dir, tmp_path):
    from hyperquant.train.runner import train

    cfg = TrainConfig.from_dict({
        "output_dir": str(tmp_path / "run"), "max_steps": 2, "seq_len": 16, "train_samples": 8,
        "per_device_batch_size": 2, "init_samples": 2, "fade_steps": 1, "eval_tokens": 64, "eval_context": 32,
        "progress": False, "save_every": 0, "blockwise_steps": 5, "blockwise_samples": 4,
        "compress": {"bits": 4, "n": 2, "num_bases": 2, "group_size": 16, "heldout_samples": 2}})
    summary = train(tiny_model_dir, cfg)
    log = json.loads((tmp_path / "run" / "blockwise.json").read_text())
    assert len(log["blocks"]) == 2 and log["heldout_rows"] == 2 and log["block_tokens"] == 5 * 2 * 2 * 16
    assert log["error"] == "token"
    assert all(r["heldout_error_trained"] < r["heldout_error_before"] for r in log["blocks"])
    assert all(r["heldout_error_after"] <= r["heldout_error_before"] for r in log["blocks"])
    assert summary["steps"] == 2


def test_blockwise_stage_runs_in_the_training_precision():
    """Under the training's autocast the blocks' matrix products run in bf16 (what the FFN linears return),
    the loss and errors stay fp32, and the stage still lowers every block's held-out error."""
    model = _prepared()
    seen = set()
    for layer in interpolated_layers(model).values():
        layer.register_forward_hook(lambda _m, _a, out: seen.add(out.dtype))
    fit, held = torch.randint(0, 128, (64, 32)), torch.randint(0, 128, (8, 32))
    records = blockwise_stage(model, fit, held, steps=40, lr=1e-3, batch_size=8,
                              autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert seen == {torch.bfloat16}
    for r in records:
        assert 0 < r["heldout_error_trained"] < r["heldout_error_before"], r
        assert isinstance(r["heldout_error_trained"], float)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights


def _mixture_run(tiny_model_dir, folder, blockwise_samples, caplog):
    from hyperquant.train.runner import train

    cfg = TrainConfig.from_dict({
        "output_dir": str(folder / "run"), "max_steps": 2, "seq_len": 16, "train_samples": 12,
        "per_device_batch_size": 2, "init_samples": 2, "fade_steps": 1, "eval_tokens": 64, "eval_context": 32,
        "progress": False, "save_every": 0, "blockwise_steps": 2, "blockwise_samples": blockwise_samples,
        "generated_fraction": 0.5, "generation_cache": str(folder / "cache"),
        "compress": {"bits": 4, "n": 2, "num_bases": 2, "group_size": 16, "heldout_samples": 2}})
    with caplog.at_level("WARNING", logger="hyperquant.train.runner"):
        train(tiny_model_dir, cfg)
    return json.loads((folder / "run" / "blockwise.json").read_text())


def test_the_blockwise_stage_fits_on_the_rows_it_states(tiny_model_dir, tmp_path, caplog):
    """With teacher samples a run keeps only the 4 rows its 2 steps read; the stage asked for 6 tops up
    from the 6 text rows the steps do not read, and asked for 32 (more than the 10 rows there are) it fits
    on all of them and says so."""
    log = _mixture_run(tiny_model_dir, tmp_path / "six", 6, caplog)
    assert log["fit_rows"] == 6 and log["asked_rows"] == 6
    assert "blockwise_samples" not in caplog.text
    log = _mixture_run(tiny_model_dir, tmp_path / "many", 32, caplog)
    assert log["fit_rows"] == 10 and log["asked_rows"] == 32
    assert "blockwise_samples=32 asked" in caplog.text


def test_the_keep_decision_never_reads_the_held_out_rows(monkeypatch):
    """The held-out errors a block reports are made to say "training hurt" (every second held-out error,
    the trained one, inflated 1000x); the decision reads the fit rows only, so every block still keeps what
    it trained, and the records carry the inflated figure they were given."""
    from hyperquant.train import blockwise

    real, held_calls = blockwise._relative_error, []

    def inflated(block, inputs, targets, error):
        value = real(block, inputs, targets, error)
        if len(inputs) == 1:  # the single held-out batch (8 rows, batch 8); the fit rows are 8 batches
            held_calls.append(value)
            return value * 1000 if len(held_calls) % 2 == 0 else value
        return value

    monkeypatch.setattr(blockwise, "_relative_error", inflated)
    model = _prepared()
    fit, held = torch.randint(0, 128, (64, 32)), torch.randint(0, 128, (8, 32))
    records = blockwise_stage(model, fit, held, steps=40, lr=1e-3, batch_size=8)
    assert len(held_calls) == 2 * len(records)
    for r in records:
        assert r["heldout_error_trained"] > r["heldout_error_before"], r
        assert r["kept"] == "trained", r

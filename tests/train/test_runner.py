import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

import hyperquant
from hyperquant.config import ConfigError
from hyperquant.errors import HyperquantError
from hyperquant.train import TrainConfig, train, train_command
from hyperquant.train.runner import global_batch_rows, load_checkpoint

BASE = {"seq_len": 32, "train_samples": 16, "per_device_batch_size": 2, "max_steps": 6, "fade_steps": 2,
        "stage_b_step": 4, "warmup_steps": 1, "init_samples": 4, "compress": {"group_size": 16}, "eval_every": 0,
        "eval_tokens": 128, "eval_context": 64, "progress": False, "export": False, "save_every": 3, "num_threads": 1}


def _state(folder, step):
    return load_checkpoint(folder / "checkpoints" / f"step-{step:07d}")["model"]


def _losses(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_config_is_validated(tmp_path):
    with pytest.raises(ConfigError):
        TrainConfig(stagger=1.5)
    with pytest.raises(ConfigError):
        TrainConfig(fade_steps=10, stage_b_step=5)
    with pytest.raises(ConfigError):
        TrainConfig(compress={"bits": 5})
    with pytest.raises(ConfigError):
        TrainConfig.from_dict({"learning_rate": 1.0})
    with pytest.raises(ConfigError, match="unknown compress option"):
        TrainConfig.from_dict({"compress": {"bases": 3}})
    for teacher in ("self", "none"):  # KD-only needs a teacher that outlives Stage B
        with pytest.raises(ConfigError, match="leaves no loss after Stage B"):
            TrainConfig(ce_weight=0.0, teacher=teacher)
    assert TrainConfig(ce_weight=0.0, teacher="separate").ce_weight == 0.0
    with pytest.raises(ConfigError, match="capacity_cost='hessian' must be one of"):
        TrainConfig(capacity_cost="hessian")
    with pytest.raises(ConfigError, match=r"capacity_min_bases=4 must be in \[1, capacity_max_bases=3\]"):
        TrainConfig(capacity="knapsack", capacity_min_bases=4)
    with pytest.raises(ConfigError, match="mixed_precision='fp8' must be one of"):
        TrainConfig(mixed_precision="fp8")
    assert TrainConfig(mixed_precision="auto", capacity_cost="kl", capacity_min_bases=2).capacity_bounds == (2, 3)
    named = {"capacity_min_bases": "num_bases", "capacity_max_bases": "n^2"}  # the compress recipe's bounds
    assert TrainConfig(**named).capacity_bounds == (2, 4)
    assert TrainConfig(**named, compress={"n": 4, "num_bases": 3}).capacity_bounds == (3, 16)
    assert TrainConfig(**named, compress={"num_bases": 1}).capacity_bounds == (1, 4)
    with pytest.raises(ConfigError, match="capacity_max_bases='n2' must be a number of bases, 'num_bases' or 'n"):
        TrainConfig(capacity_max_bases="n2")
    with pytest.raises(ConfigError, match=r"capacity_max_bases=5 must be in \[1, n\^2=4\]"):
        TrainConfig(capacity_max_bases=5)
    # capacity_budget: a mean number of bases, or relative to num_bases (the compress recipe's num_bases+1)
    assert TrainConfig().capacity_mean_bases == 2 + 1 / 3
    assert TrainConfig(capacity_budget=2.5).capacity_mean_bases == 2.5
    assert TrainConfig(capacity_budget="num_bases+1").capacity_mean_bases == 3.0
    assert TrainConfig(capacity_budget="num_bases + 0.5", compress={"n": 4, "num_bases": 3}).capacity_mean_bases == 3.5
    with pytest.raises(ConfigError, match="capacity_budget='num_bases\\+3' is 5 bases per layer; it must be in"):
        TrainConfig(capacity_budget="num_bases+3")
    for bad in ("num_bases*2", "3", True):
        with pytest.raises(ConfigError, match="must be a mean number of bases per layer or 'num_bases\\+K'"):
            TrainConfig(capacity_budget=bad)
    (tmp_path / "t.yaml").write_text("max_steps: 7\ncompress: {layer_bases: {'layers\\.0\\.': 3}}\n")
    cfg = TrainConfig.from_yaml(tmp_path / "t.yaml")
    assert cfg.max_steps == 7 and cfg.compress.layer_bases == {r"layers\.0\.": 3}
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # the YAML/JSON round trip


def test_resume_refuses_another_run_and_never_unpickles(tiny_model_dir, tmp_path):
    """A checkpoint of another model, configuration or text is not resumed; a pickle is never loaded."""
    from hyperquant.errors import HyperquantError

    cfg = TrainConfig(**BASE, output_dir=str(tmp_path / "run"))
    train(str(tiny_model_dir), cfg, stop_after=3)
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "step-0000003")
    assert saved["step"] == 3 and saved["fingerprint"]["data"] and saved["optimizer"]["state"]
    with pytest.raises(HyperquantError, match=r"started with another lr \(0.0005 -> 0.001\)"):
        train(str(tiny_model_dir), cfg.replace(lr=1e-3))
    other_text = torch.randint(0, 100, (16, 32))
    with pytest.raises(HyperquantError, match="started with another data"):
        train(str(tiny_model_dir), cfg, train_ids=other_text)
    assert len(_losses(tmp_path / "run")) == 3  # nothing was trained or logged by the refused runs
    # a state.pt that would run code when unpickled: refused by name, never opened
    marker = tmp_path / "ran"
    evil = tmp_path / "run" / "checkpoints" / "step-0000004"
    evil.mkdir()
    import pickle

    class Payload:
        def __reduce__(self):
            return (marker.write_text, ("pwned",))

    (evil / "state.pt").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(HyperquantError, match="never loaded"):
        train(str(tiny_model_dir), cfg)
    assert not marker.exists()


def test_global_batches_do_not_depend_on_the_process_split():
    rows = [global_batch_rows(s, 4, 10, 0) for s in range(5)]
    flat = [r for batch in rows for r in batch]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))


def test_resume_continues_like_an_uninterrupted_run(tiny_model_dir, tmp_path):
    cfg = TrainConfig(**BASE, qat_start_step=2, qat_learn_scales=True, recon_weight=0.5, lora_r=2,
                      output_dir=str(tmp_path / "full"))
    train(str(tiny_model_dir), cfg)
    part = cfg.replace(output_dir=str(tmp_path / "part"))
    stopped = train(str(tiny_model_dir), part, stop_after=3)
    assert stopped["stopped"] and stopped["steps"] == 3
    assert len(_losses(tmp_path / "part")) == 3
    train(str(tiny_model_dir), part)  # resumes from step 3: QAT on, Stage B at 4
    full, resumed = _losses(tmp_path / "full"), _losses(tmp_path / "part")
    assert [r["step"] for r in resumed] == list(range(1, 7))
    assert [r["stage"] for r in resumed] == ["A", "A", "A", "A", "B", "B"]
    for a, b in zip(full, resumed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-7)
        assert b["kd"] == pytest.approx(a["kd"], rel=1e-5, abs=1e-7)
    sa, sb = _state(tmp_path / "full", 6), _state(tmp_path / "part", 6)
    assert sa.keys() == sb.keys() and any("quantizer.scales" in k for k in sa) and any("lora_A" in k for k in sa)
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("method", "scope"), [("rtn", "ffn"), ("gptq", "model")])
def test_export_is_a_hyperquant_checkpoint(tiny_model_dir, tmp_path, method, scope):
    cfg = TrainConfig(**{**BASE, "export": True, "save_every": 0,
                         "compress": {"group_size": 16, "method": method, "rest_dtype": "float32", "scope": scope}},
                      qat_start_step=3, output_dir=str(tmp_path / "run"), lora_r=2)
    summary = train(str(tiny_model_dir), cfg)
    loaded = hyperquant.load(summary["final_dir"])
    section = loaded.config.hyperquant
    assert section["compress_config"]["bits"] == 4 and section["train_config"]["max_steps"] == 6
    mlp = loaded.model.layers[0].mlp
    assert isinstance(mlp.up_proj, hyperquant.QuantPHMLinear) and mlp.up_proj.bits == 4
    if scope == "model":  # LoRA merged into q/k/v, then the rest quantized like `hyperquant compress`
        assert type(loaded.model.layers[0].self_attn.q_proj) is hyperquant.QuantLinear
        assert loaded.model.embed_tokens.shares == "lm_head" and section["plan"]["lm_head"]["method"] == method
    else:
        assert type(loaded.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # LoRA merged
    from hyperquant.evals import PerplexityProtocol, perplexity
    from transformers import AutoTokenizer

    from hyperquant.data import eval_tokens

    ev = eval_tokens(AutoTokenizer.from_pretrained(tiny_model_dir), 128)
    ppl = perplexity(loaded, ev, PerplexityProtocol(context=64, stride=64, num_tokens=128))["perplexity"]
    assert ppl == pytest.approx(summary["exported_ppl"], rel=1e-5)
    if scope == "ffn":  # the QAT forward is exactly the exported quantized model
        assert summary["eval"][-1]["ppl"]["1"] == pytest.approx(summary["exported_ppl"], rel=1e-4)
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,stage,mean_alpha") and len(rows) == 7


def test_train_command_with_yaml_and_capacity(tiny_model_dir, tmp_path):
    (tmp_path / "train.yaml").write_text(
        "\n".join(f"{k}: {json.dumps(v)}" for k, v in {**BASE, "max_steps": 2, "stage_b_step": 2,
                                                       "capacity": "topk", "capacity_topk": 2,
                                                       "capacity_cost": "fisher",  # the paper's ranking
                                                       "capacity_samples": 2, "eval_every": 1}.items()))
    summary = train_command(str(tiny_model_dir), tmp_path / "train.yaml", output_dir=str(tmp_path / "o"),
                            print_summary=True)
    plan = json.loads((tmp_path / "o" / "capacity.json").read_text())
    assert sum(r["bases"] == 3 for r in plan["layers"]) == 2
    assert sorted(summary["layer_bases"].values()).count(3) == 2
    evals = [json.loads(line) for line in (tmp_path / "o" / "eval.jsonl").read_text().splitlines()]
    assert set(evals[0]["ppl"]) == {"0", "0.25", "0.5", "0.75", "1"}  # step 0: all alphas
    assert set(evals[-1]["ppl"]) == {"1"}  # after Stage B only the PHM model remains


def test_training_with_measured_capacity_exports_the_assigned_bases(tiny_model_dir, tmp_path, monkeypatch):
    """capacity_cost: kl measures on the rows after the initial fit's (none of them fitted on), and the
    exported checkpoint holds the B each layer was assigned (the layer with n^2 bases too)."""
    from hyperquant.train import runner

    seen, real = {}, runner.assign_capacity

    def spy(model, ids, *args, **kwargs):
        seen.update(measured=ids.clone(), fit=kwargs["fit_ids"].clone())
        return real(model, ids, *args, **kwargs)

    monkeypatch.setattr(runner, "assign_capacity", spy)
    cfg = TrainConfig(**{**BASE, "max_steps": 2, "stage_b_step": 2, "export": True, "capacity": "knapsack",
                         "capacity_cost": "kl", "capacity_budget": "num_bases+0.3334", "capacity_max_bases": 4,
                         "capacity_min_bases": 2, "capacity_samples": 2,
                         "compress": {"bits": 4, "group_size": 16, "heldout_samples": 2}},
                      output_dir=str(tmp_path / "run"))
    summary = train(str(tiny_model_dir), cfg)
    plan = json.loads((tmp_path / "run" / "capacity.json").read_text())
    assert plan["cost"] == "kl" and summary["capacity"]["cost"] == "kl"
    assert len(seen["fit"]) == 4 and len(seen["measured"]) == 2
    assert not any(torch.equal(m, f) for m in seen["measured"] for f in seen["fit"])
    bases = {r["name"]: r["bases"] for r in plan["layers"]}
    assert sorted(bases.values()) == [2, 2, 2, 2, 2, 4]
    assert all(set(r["costs"]) == {"2", "3", "4"} for r in plan["layers"])  # from min_bases (JSON keys)
    model = hyperquant.load(tmp_path / "run" / "final")
    kinds = model.config.hyperquant["plan"]
    for name, b in bases.items():  # n^2 bases: a dense quantized layer
        if b == 4:
            assert kinds[name]["kind"] == "dense-quant" and model.get_submodule(name).bits == 4
        else:
            assert kinds[name]["kind"] == "phm-quant" and model.get_submodule(name).num_bases == b
    with pytest.raises(HyperquantError, match="lower init_samples or raise the budget"):
        train(str(tiny_model_dir), cfg.replace(init_samples=16, output_dir=str(tmp_path / "other")))
    assert not (tmp_path / "other").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two(model_dir, config_path, options: dict) -> None:
    """`accelerate launch --multi_gpu --num_processes 2 -m hyperquant.train` on the CPU (gloo)."""
    config_path.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in options.items()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "hyperquant.train", str(model_dir),
           "--config", str(config_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _library_defaults() -> dict:
    """The options the CLI's recipe (COMPRESS_RECIPE: teacher samples, a block-wise stage, KD alone) sets
    and BASE does not (BASE's schedule, e.g. its fade_steps, stays), at TrainConfig's own values: a launched
    run then trains as `train(TrainConfig(...))` does."""
    from hyperquant.train.recipe import COMPRESS_RECIPE

    fields = TrainConfig.__dataclass_fields__
    return {k: fields[k].default for k in COMPRESS_RECIPE if k not in BASE}


def test_two_processes_match_one_process_with_the_doubled_batch(tiny_model_dir, tmp_path):
    # recon_relative divides by a per-batch norm, which does not split over processes: use the plain MSE
    common = {**BASE, "max_steps": 3, "save_every": 0, "recon_weight": 0.5, "recon_relative": False, "lora_r": 2,
              **_library_defaults()}
    one = TrainConfig(**{**common, "per_device_batch_size": 4}, output_dir=str(tmp_path / "one"))
    train(str(tiny_model_dir), one)
    _launch_two(tiny_model_dir, tmp_path / "two.yaml", {**common, "output_dir": str(tmp_path / "two")})
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["processes"] == 2 and not summary["sharded"]
    a, b = _state(tmp_path / "one", 3), _state(tmp_path / "two", 3)
    assert a.keys() == b.keys()
    # The per-process batches sum in another order, so gradients agree to round-off only; Adam's first
    # steps are nearly sign(g) * lr, so a coordinate whose gradient is at round-off level may move up to
    # 2 lr per step differently. Every other coordinate must agree closely.
    diff = torch.cat([(b[k].float() - a[k].float()).abs().flatten() for k in a])
    assert float(diff.max()) <= 2 * one.lr * one.max_steps
    assert float((diff > 1e-5).float().mean()) < 0.005
    assert float(diff.mean()) < 1e-6
    la, lb = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    for x, y in zip(la, lb):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)


def test_gradient_accumulation_matches_the_larger_batch_and_bf16_runs(tiny_model_dir, tmp_path):
    common = {**BASE, "max_steps": 2, "save_every": 0, "recon_weight": 0.5, "recon_relative": False}
    train(str(tiny_model_dir), TrainConfig(**common, output_dir=str(tmp_path / "big")))
    train(str(tiny_model_dir), TrainConfig(**{**common, "per_device_batch_size": 1, "grad_accum_steps": 2},
                                           output_dir=str(tmp_path / "acc")))
    for x, y in zip(_losses(tmp_path / "big"), _losses(tmp_path / "acc")):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
    a, b = _state(tmp_path / "big", 2), _state(tmp_path / "acc", 2)
    diff = torch.cat([(b[k] - a[k]).abs().flatten() for k in a])
    assert float(diff.mean()) < 1e-6
    train(str(tiny_model_dir), TrainConfig(**common, mixed_precision="bf16", output_dir=str(tmp_path / "bf16")))
    bf16 = _losses(tmp_path / "bf16")
    assert len(bf16) == 2 and all(abs(r["loss"] - x["loss"]) < 0.1 for r, x in zip(bf16, _losses(tmp_path / "big")))


def test_gradient_checkpointing_and_the_teachers_give_the_same_training(tiny_model_dir, tmp_path, monkeypatch):
    """Recomputing activations in the backward changes no gradient; the teacher from the student's frozen
    dense weights (the default) computes what a separate copy of the model does, through Stage B."""
    common = {**BASE, "max_steps": 5, "save_every": 0, "lora_r": 2, "kd_weight": 1.0}
    train(str(tiny_model_dir), TrainConfig(**common, output_dir=str(tmp_path / "plain")))
    import transformers.modeling_utils as checkpointing  # it binds torch's checkpoint when enabling it

    recomputed = []
    real = checkpointing.checkpoint
    monkeypatch.setattr(checkpointing, "checkpoint", lambda *a, **k: recomputed.append(1) or real(*a, **k))
    train(str(tiny_model_dir), TrainConfig(**common, gradient_checkpointing=True, output_dir=str(tmp_path / "ckpt")))
    assert len(recomputed) >= 2 * 5  # both blocks in every step went through torch's checkpoint
    monkeypatch.setattr(checkpointing, "checkpoint", real)
    train(str(tiny_model_dir), TrainConfig(**common, teacher="separate", output_dir=str(tmp_path / "separate")))
    plain = _losses(tmp_path / "plain")
    assert [r["stage"] for r in plain] == ["A"] * 4 + ["B"]
    assert all(r["kd"] > 0 for r in plain[1:])  # KD stays on in Stage B
    for other in ("ckpt", "separate"):
        for x, y in zip(plain, _losses(tmp_path / other)):
            assert y["loss"] == pytest.approx(x["loss"], rel=1e-5), other
            assert y["kd"] == pytest.approx(x["kd"], rel=1e-4, abs=1e-8), other
        a, b = _state(tmp_path / "plain", 5), _state(tmp_path / other, 5)
        assert a.keys() == b.keys()
        diff = torch.cat([(b[k] - a[k]).abs().flatten() for k in a])
        assert float(diff.max()) < 1e-5, other


def test_fsdp_matches_one_process_and_resumes_exactly(tiny_model_dir, tmp_path):
    """fsdp: true on two gloo processes: every parameter sharded, and the same training as one process with
    the whole batch through QAT's learned scales (written into shards), Stage B, LoRA, gradient
    accumulation (unsynchronized micro-batches) and the export (rebuilt unsharded); a resume loads the
    gathered checkpoint back into shards, moments included, and continues bit for bit."""
    common = {**BASE, "max_steps": 4, "save_every": 2, "fade_steps": 2, "stage_b_step": 3, "recon_weight": 0.5,
              "recon_relative": False, "lora_r": 2, **_library_defaults(),
              "qat_start_step": 2, "qat_learn_scales": True, "export": True,
              "compress": {"group_size": 16, "heldout_samples": 0}}
    one = TrainConfig(**{**common, "per_device_batch_size": 4}, output_dir=str(tmp_path / "one"))
    train(str(tiny_model_dir), one)
    two = {**common, "fsdp": True, "per_device_batch_size": 1, "grad_accum_steps": 2,
           "output_dir": str(tmp_path / "two")}
    _launch_two(tiny_model_dir, tmp_path / "two.yaml", two)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["sharded"]
    assert summary["parameters_per_process"] < 0.6 * summary["parameters"]  # half, plus the odd rows
    la, lb = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert [r["qat"] for r in lb] == [False, False, True, True] and lb[-1]["stage"] == "B"
    for x, y in zip(la, lb, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
    a, b = _state(tmp_path / "one", 4), _state(tmp_path / "two", 4)
    assert a.keys() == b.keys() and any(k.endswith("quantizer.scales") for k in a)
    diff = torch.cat([(b[k].float() - a[k].float()).abs().flatten() for k in a])
    assert float(diff.max()) <= 2 * one.lr * one.max_steps and float(diff.mean()) < 1e-6
    exported = json.loads((tmp_path / "one" / "summary.json").read_text())["exported_ppl"]
    assert summary["exported_ppl"] == pytest.approx(exported, rel=1e-4)
    assert hyperquant.load(tmp_path / "two" / "final") is not None

    # resume from step 2: the step-4 state and moments come out the same
    ckpt = tmp_path / "two" / "checkpoints"
    full_run = load_checkpoint(ckpt / "step-0000004")
    for path in (ckpt / "step-0000004", tmp_path / "two" / "final"):
        shutil.rmtree(path)
    (tmp_path / "two" / "summary.json").unlink()
    _launch_two(tiny_model_dir, tmp_path / "two.yaml", two)
    resumed = load_checkpoint(ckpt / "step-0000004")
    for k, v in full_run["model"].items():
        assert torch.equal(resumed["model"][k], v), k
    for index, values in full_run["optimizer"]["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                assert torch.equal(resumed["optimizer"]["state"][index][key], value), (index, key)


def test_fsdp_is_refused_where_it_cannot_run(tiny_model_dir, tmp_path, monkeypatch):
    """One process has nothing to shard over; accelerate's own --use_fsdp (on the CPU it quietly runs as
    DDP) is pointed to fsdp: true. Both in one line, before anything is written."""
    with pytest.raises(HyperquantError, match="fsdp: true shards.*--num_processes N"):
        train(str(tiny_model_dir), TrainConfig(**BASE, fsdp=True, output_dir=str(tmp_path / "o")))
    with pytest.raises(ConfigError, match="fsdp with mixed_precision: fp16"):
        TrainConfig(**BASE, fsdp=True, mixed_precision="fp16")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(HyperquantError, match="--use_fsdp.*set fsdp: true.*--multi_gpu"):
        train(str(tiny_model_dir), TrainConfig(**BASE, output_dir=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()

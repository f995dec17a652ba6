"""Training inside `hyperquant compress`: the time budget, the recipe, and the CLI shortcut."""

import json

import pytest
import torch
from typer.testing import CliRunner

import hyperquant
from hyperquant.cli import app
from hyperquant.config import CompressConfig, ConfigError
from hyperquant.train import TrainConfig, train
from hyperquant.train.recipe import DEFAULT_STEPS, compress_train_config

TINY = {"seq_len": 32, "train_samples": 16, "per_device_batch_size": 2, "init_samples": 4, "eval_tokens": 128,
        "eval_context": 64, "progress": False, "num_threads": 1, "compress": {"group_size": 16}}


def test_scaled_to_keeps_the_schedule_shape():
    cfg = TrainConfig(max_steps=100, warmup_steps=5, fade_steps=30, stage_b_step=40, qat_start_step=60,
                      save_every=10, eval_every=0, compress={"bits": 4})
    big = cfg.scaled_to(300)
    assert (big.max_steps, big.warmup_steps, big.fade_steps, big.stage_b, big.qat_start_step, big.save_every,
            big.eval_every) == (300, 15, 90, 120, 180, 30, 0)
    small = cfg.scaled_to(3)
    assert small.max_steps == 3 and small.save_every == 1 and small.stage_b >= small.fade_steps
    assert small.qat_start_step <= 3


def test_recipe_follows_the_compress_config(tmp_path):
    ccfg = CompressConfig(bits=3, method="rtn", n=4, num_bases=3, group_size=64, symmetric=True)
    tcfg = compress_train_config(ccfg, str(tmp_path), minutes=5, qat=True)
    c = tcfg.compress
    assert (c.n, c.num_bases, c.bits, c.group_size, c.symmetric) == (4, 3, 3, 64, True)
    assert tcfg.max_minutes == 5 and tcfg.max_steps == DEFAULT_STEPS
    assert c.method == "rtn" and 0 < tcfg.qat_start_step < tcfg.max_steps
    assert compress_train_config(CompressConfig(), str(tmp_path), qat=False).qat_start_step is None
    assert compress_train_config(CompressConfig(), str(tmp_path), overrides={"lr": 1e-3}).lr == 1e-3
    with pytest.raises(ConfigError, match="n >= 2"):
        compress_train_config(CompressConfig(n=1), str(tmp_path))
    with pytest.raises(ConfigError, match="unknown training option"):
        compress_train_config(CompressConfig(), str(tmp_path), overrides={"learning_rate": 1})
    with pytest.raises(ConfigError, match="must be > 0"):
        compress_train_config(CompressConfig(), str(tmp_path), minutes=0)


def _plans(folder):
    return [json.loads(line) for line in (folder / "plan.jsonl").read_text().splitlines()]


def test_budgeted_run_plans_its_steps_from_the_second_step(tiny_model_dir, tmp_path):
    # A budget far below two steps: the run is re-planned to the two steps it has already made.
    cfg = TrainConfig(**TINY, max_steps=50, fade_steps=20, warmup_steps=2, save_every=10, eval_every=0,
                      max_minutes=1e-5, export=False, output_dir=str(tmp_path / "short"))
    summary = train(str(tiny_model_dir), cfg)
    plans = _plans(tmp_path / "short")
    assert len(plans) == 1 and plans[0]["after_step"] == 2
    assert summary["steps"] == plans[0]["max_steps"] == 2
    # A generous budget: more steps than the template, schedule stretched by the same factor.
    cfg = cfg.replace(max_steps=10, fade_steps=5, warmup_steps=0, save_every=1, max_minutes=0.05,
                      output_dir=str(tmp_path / "long"))
    summary = train(str(tiny_model_dir), cfg)
    plans = _plans(tmp_path / "long")
    assert plans[0]["after_step"] == 2 and 1 <= len(plans) <= 4
    assert summary["steps"] == plans[-1]["max_steps"] > 10
    assert plans[0]["fade_steps"] == round(5 * plans[0]["max_steps"] / 10)
    rows = [json.loads(line) for line in (tmp_path / "long" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, summary["steps"] + 1))


def test_replanning_never_moves_a_milestone_already_passed():
    template = TrainConfig(max_steps=100, warmup_steps=10, fade_steps=30, stage_b_step=40, qat_start_step=60,
                           compress={"bits": 4}, save_every=10, eval_every=0)
    current = template.scaled_to(200)  # fade 60, Stage B 80, QAT 120
    shorter = current.replanned(template, done=90, max_steps=150)
    assert (shorter.warmup_steps, shorter.fade_steps, shorter.stage_b) == (20, 60, 80)  # passed: kept
    assert shorter.qat_start_step == 90 and shorter.max_steps == 150  # not reached yet: rescaled
    early = current.replanned(template, done=5, max_steps=50)
    assert early.schedule() == template.scaled_to(50).schedule()


def test_budgeted_run_resumes_with_its_schedule(tiny_model_dir, tmp_path):
    cfg = TrainConfig(**TINY, max_steps=2, fade_steps=1, warmup_steps=0, save_every=1, eval_every=0,
                      max_minutes=0.1, export=False, output_dir=str(tmp_path / "run"))
    stopped = train(str(tiny_model_dir), cfg, stop_after=3)
    plans = _plans(tmp_path / "run")  # one plan, or two on a machine slow enough to reach 25 % by step 3
    planned = plans[-1]["max_steps"]
    assert stopped["steps"] == 3 < planned
    done = train(str(tiny_model_dir), cfg)  # resumes; must not re-plan from a new timing
    assert done["steps"] == planned and _plans(tmp_path / "run") == plans


def test_compress_trains_by_default_and_publishes_one_folder(tiny_model_dir, tmp_path):
    yaml_file = tmp_path / "small.yaml"
    yaml_file.write_text("seq_len: 32\ntrain_samples: 16\nper_device_batch_size: 2\ninit_samples: 4\n"
                         "max_steps: 4\nsave_every: 2\nnum_threads: 1\nprogress: false\neval_tokens: 128\n"
                         "eval_context: 64\n")
    out = tmp_path / "ckpt"
    result = CliRunner().invoke(app, ["compress", str(tiny_model_dir), "--out", str(out), "--group-size", "16",
                                      "--eval-tokens", "256", "--train-minutes", "0.02",
                                      "--train-config", str(yaml_file)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "small.yaml"]  # work folder removed
    for name in ("config.json", "model.safetensors", "report.md", "summary.json", "quant_log.json",
                 "train/metrics.csv", "train/plan.jsonl"):
        assert (out / name).is_file(), name
    section = json.loads((out / "config.json").read_text())["hyperquant"]
    assert section["train_config"]["max_minutes"] == 0.02 and section["compress_config"]["bits"] == 4
    summary = json.loads((out / "summary.json").read_text())
    steps = summary["train_summary"]["steps"]
    assert "## Training" in (out / "report.md").read_text() and f"trained {steps} steps" in summary["rows"][1]["label"]
    # The published checkpoint is the one that was evaluated.
    model = hyperquant.load(out)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    from hyperquant.evals import PerplexityProtocol, perplexity
    from transformers import AutoTokenizer

    from hyperquant.data import eval_tokens

    ids = eval_tokens(AutoTokenizer.from_pretrained(out), 256)
    ppl = perplexity(model, ids, PerplexityProtocol(num_tokens=256))["perplexity"]
    assert ppl == pytest.approx(summary["rows"][1]["perplexity"], rel=1e-6)


def test_token_budget_gives_byte_identical_checkpoints(tiny_model_dir, tmp_path):
    """The default budget is tokens: the same command twice gives the same checkpoint, byte for byte
    (timings live in quant_log.json and summary.json, not in the weights or config.json)."""
    yaml_file = tmp_path / "small.yaml"
    yaml_file.write_text("seq_len: 32\ntrain_samples: 24\nper_device_batch_size: 2\ninit_samples: 4\n"
                         "save_every: 2\nnum_threads: 1\nprogress: false\neval_tokens: 128\neval_context: 64\n")
    out, runs = tmp_path / "ckpt", []
    for again in (False, True):
        result = CliRunner().invoke(app, ["compress", str(tiny_model_dir), "--out", str(out), "--group-size", "16",
                                          "--eval-tokens", "128", "--train-tokens", "320",
                                          "--train-config", str(yaml_file), *(["--overwrite"] if again else [])])
        assert result.exit_code == 0, result.output
        runs.append({name: (out / name).read_bytes() for name in ("model.safetensors", "config.json")})
    section = json.loads(runs[0]["config.json"])["hyperquant"]
    assert section["train_config"]["max_steps"] == 5 and section["train_config"]["max_minutes"] is None
    for name in runs[0]:
        assert runs[0][name] == runs[1][name], name
    log = json.loads((out / "quant_log.json").read_text())
    trained = [r for r in log if r.get("trained")]
    assert trained and all(0 <= r["quant_error_heldout"] < 1 for r in trained)
    rest = [r for r in log if r["kind"] == "dense-quant" and not r.get("trained")]  # attention, head
    assert rest and all(r["output_error_heldout"] >= 0 and r["output_error"] >= 0 for r in rest)


def test_compress_training_errors(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 1\n")
    cases = [(["--train-config", str(bad)], "unknown training option"),
             (["--train-minutes", "-1"], "must be > 0"),
             (["--train-tokens", "0"], "must be > 0"),
             (["--train-tokens", "100", "--train-minutes", "3"], "two budgets"),
             (["--no-train", "--qat"], "--qat trains"),
             (["--learn-bases"], "--no-train")]
    for args, message in cases:
        result = CliRunner().invoke(app, ["compress", str(tiny_model_dir), "--out", str(tmp_path / "o"), *args])
        assert result.exit_code == 2 and message in result.output.strip().splitlines()[-1], result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_one_recipe_whichever_command_starts_it(tmp_path):
    """`hyperquant compress` and `hyperquant train` without a YAML file train with the same settings."""
    from hyperquant.train.cli import load_train_config

    via_compress = compress_train_config(CompressConfig(), str(tmp_path), minutes=None)
    via_train = load_train_config(None, {"output_dir": str(tmp_path)})
    assert via_compress == via_train
    assert via_train.compress == CompressConfig()  # the layers: compress's own defaults

"""The CLI end to end on a tiny local model folder, and its error paths."""

import json

import pytest
from typer.testing import CliRunner

from hyperquant.cli import app

runner = CliRunner()
FAST = ["--calib-samples", "4", "--calib-seq-len", "64", "--eval-tokens", "256", "--group-size", "16", "--no-train"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, message):
    """Exit code 2, the error is the last line and a single line, and no traceback."""
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert lines[-1].startswith("error: ") and message in lines[-1], result.output
    assert "Traceback" not in result.output and sum(line.startswith("error") for line in lines) == 1


def test_compress_eval_info(tiny_model_dir, tmp_path):
    out = tmp_path / "ckpt"
    result = run("compress", tiny_model_dir, "--bits", "4", "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    for name in ("config.json", "model.safetensors", "quant_log.json", "report.md", "summary.json",
                 "tokenizer.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"][1]["size"]["bytes"] < summary["rows"][0]["size"]["bytes"]
    assert "perplexity" in (out / "report.md").read_text()
    # the second domain (Python language reference) beside the Wikipedia split, same protocol
    from hyperquant.evals import PerplexityProtocol, perplexity
    from transformers import AutoTokenizer

    from hyperquant.checkpoint import load
    from hyperquant.data import second_domain_tokens

    row = summary["rows"][1]
    ids = second_domain_tokens(AutoTokenizer.from_pretrained(out), summary["protocol"]["num_tokens"])
    protocol = PerplexityProtocol(**{k: summary["protocol"][k] for k in ("context", "stride", "num_tokens")})
    assert row["perplexity_second_domain"] == pytest.approx(perplexity(load(out), ids, protocol)["perplexity"],
                                                           rel=1e-6)
    assert row["perplexity_second_domain"] != pytest.approx(row["perplexity"])
    assert "Python language reference" in (out / "report.md").read_text()
    result = run("eval", out, "--eval-tokens", summary["protocol"]["num_tokens"], "--no-latency")
    assert result.exit_code == 0 and "Python language reference" in result.output
    # the test set, reported with standard errors and labelled as what it is, in the summary and in eval
    from hyperquant.textsets import TEST_DOMAINS, load_test_set

    tests = load_test_set(AutoTokenizer.from_pretrained(out), summary["protocol"]["num_tokens"] * 4)
    assert set(row["test"]) == set(TEST_DOMAINS) == set(summary["protocol"]["test_domains"])
    drama = perplexity(load(out), tests["drama"], PerplexityProtocol(protocol.context, protocol.stride,
                                                                     len(tests["drama"])))
    assert row["test"]["drama"]["perplexity"] == pytest.approx(drama["perplexity"], rel=1e-6)
    assert row["test"]["drama"]["stderr"] == pytest.approx(drama["perplexity_stderr"], rel=1e-6) and drama["windows"] > 1
    assert 0 <= row["chat"]["kl"] and 0 <= row["chat"]["agreement"] <= 1 and summary["rows"][0]["chat"]["agreement"] == 1
    report = (out / "report.md").read_text()
    assert "test: drama" in report and "val: Wikipedia" in report and " ± " in report
    for domain in TEST_DOMAINS.values():
        assert f"test: {domain.title}" in result.output
    assert "validation: held-out Wikipedia" in result.output and " ± " in result.output
    result = run("eval", out, "--eval-tokens", 64, "--no-latency", "--original", tiny_model_dir)
    assert result.exit_code == 0, result.output
    assert "chat KL to the original" in result.output and "chat greedy agreement" in result.output
    assert_one_line_error(run("eval", out, "--original", tmp_path / "no-such-model"), "no-such-model")

    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    result = run("eval", out, "--text", text, "--context", "64", "--stride", "32", "--no-latency")
    assert result.exit_code == 0, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("perplexity: ") and float(last.split()[1]) > 1

    result = run("info", out)
    assert result.exit_code == 0 and "phm" in result.output

    # An existing output needs --overwrite; with it, the folder is replaced.
    assert_one_line_error(run("compress", tiny_model_dir, "--out", out, *FAST), "--overwrite")
    result = run("compress", tiny_model_dir, "--out", out, "--method", "rtn", "--n", "1", "--overwrite", *FAST)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["hyperquant"]["compress_config"]["n"] == 1


def test_overwrite_never_touches_the_input_or_a_users_folder(tiny_model_dir, tmp_path):
    """--overwrite replaces only hyperquant's own outputs; these are refused before the model is loaded."""
    def listing(folder):
        return sorted((p.relative_to(folder), p.stat().st_size) for p in folder.rglob("*"))

    before = listing(tiny_model_dir)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    a_file = tmp_path / "file.txt"
    a_file.write_text("keep me too")
    cases = [(["compress", tiny_model_dir, "--out", tiny_model_dir, "--overwrite"], "is (or holds) the input"),
             (["compress", tiny_model_dir, "--out", tiny_model_dir.parent, "--overwrite"], "is (or holds) the input"),
             (["compress", tiny_model_dir, "--out", mine, "--overwrite"], "not written by hyperquant"),
             (["compress", tiny_model_dir, "--out", a_file, "--overwrite"], "is not a folder"),
             (["report", tiny_model_dir, "--out", mine, "--overwrite", "--no-latency"], "not written by hyperquant")]
    for args, message in cases:
        assert_one_line_error(run(*args, *FAST) if args[0] == "compress" else run(*args), message)
    assert listing(tiny_model_dir) == before
    assert (mine / "notes.txt").read_text() == "keep me" and a_file.read_text() == "keep me too"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--bits", "5"], "bits=5 is not supported"),
        (["--group-size", "100"], "power of two"),
        (["--n", "3"], "n=3 must divide"),
        (["--method", "awq"], "method='awq'"),
        (["--bases", "9"], "number of bases 9"),
    ],
)
def test_bad_settings_are_one_line_errors_and_write_nothing(tiny_model_dir, tmp_path, args, message):
    out = tmp_path / "never"
    result = run("compress", tiny_model_dir, "--out", out, *FAST, *args)
    assert_one_line_error(result, message)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bad_paths_and_text(tiny_model_dir, tmp_path):
    cases = [
        (["compress", tmp_path / "nope", "--out", tmp_path / "o"], "does not exist"),
        (["compress", tmp_path, "--out", tmp_path / "o"], "no config.json"),
        (["eval", tmp_path / "nope"], "does not exist"),
        (["info", tmp_path], "not a hyperquant checkpoint"),
    ]
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    cases.append((["compress", tiny_model_dir, "--calib-text", empty, "--out", tmp_path / "o", *FAST], "is empty"))
    cases.append((["eval", tiny_model_dir, "--text", empty, "--no-latency"], "is empty"))
    for args, message in cases:
        assert_one_line_error(run(*args), message)
    assert not (tmp_path / "o").exists()


def test_interrupted_compress_leaves_no_output(tiny_model_dir, tmp_path, monkeypatch):
    import hyperquant.pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hyperquant.pipeline, "compress", interrupted)
    result = run("compress", tiny_model_dir, "--out", tmp_path / "o", *FAST)
    assert result.exit_code != 0
    assert list(tmp_path.iterdir()) == []


def test_export_command(tiny_model_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    assert run("compress", tiny_model_dir, "--out", ckpt, "--eval-tokens", "0", *FAST[:4], "--group-size", "16", "--no-train").exit_code == 0
    result = run("export", ckpt, "--out", tmp_path / "m.onnx", "--no-cache")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "m.export_report.json").read_text())
    assert report["max_rel_error"] <= report["tolerance"]
    assert_one_line_error(run("export", ckpt, "--out", tmp_path / "m.onnx", "--no-cache"), "exists")


def test_compress_scope_keep_and_embedding_flags(tiny_model_dir, tmp_path):
    out = tmp_path / "whole"
    result = run("compress", tiny_model_dir, "--n", "1", "--method", "rtn", "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    plan = json.loads((out / "config.json").read_text())["hyperquant"]["plan"]
    kinds = {name: entry["kind"] for name, entry in plan.items()}
    assert kinds["lm_head"] == "dense-quant" and kinds["model.layers.0.self_attn.q_proj"] == "dense-quant"
    assert plan["model.embed_tokens"] == {**plan["model.embed_tokens"], "kind": "embed-quant", "share_head": True}

    kept = tmp_path / "kept"
    result = run("compress", tiny_model_dir, "--n", "1", "--method", "rtn", "--out", kept, "--keep", "attention,head",
                 "--embed-bits", "8", *FAST)
    assert result.exit_code == 0, result.output
    plan = json.loads((kept / "config.json").read_text())["hyperquant"]["plan"]
    assert plan["lm_head"]["kind"] == "keep"
    assert all(entry["kind"] == "keep" for name, entry in plan.items() if "self_attn" in name)
    assert plan["model.embed_tokens"]["bits"] == 8 and not plan["model.embed_tokens"]["share_head"]

    ffn = tmp_path / "ffn"
    result = run("compress", tiny_model_dir, "--n", "1", "--method", "rtn", "--out", ffn, "--scope", "ffn", *FAST)
    assert result.exit_code == 0, result.output
    assert all(".mlp." in name for name in json.loads((ffn / "config.json").read_text())["hyperquant"]["plan"])

    assert_one_line_error(run("compress", tiny_model_dir, "--keep", "mlp", "--out", tmp_path / "x", *FAST),
                          "--keep mlp: choose from attention, head, embedding")
    assert_one_line_error(run("compress", tiny_model_dir, "--embed-bits", "four", "--out", tmp_path / "x", *FAST),
                          "--embed-bits")
    assert_one_line_error(run("compress", tiny_model_dir, "--scope", "all", "--out", tmp_path / "x", *FAST),
                          "scope='all'")
    assert not (tmp_path / "x").exists()

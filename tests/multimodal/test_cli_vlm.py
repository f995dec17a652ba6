"""The command line on a vision-language model folder (tiny random LLaVA / Idefics3 with its processor):
compress with image calibration, eval with caption figures, info with towers, training with images, and
the refusals."""

import json
import re

import pytest
from typer.testing import CliRunner

from hyperquant.cli import app

SMALL = ["--group-size", "16", "--calib-samples", "2", "--calib-seq-len", "64", "--eval-tokens", "256"]


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("family", ["llava", "idefics3"])
def test_compress_eval_info_of_a_vision_language_folder(family, vlm_dirs, tmp_path):
    out = tmp_path / "ckpt"
    result = _run("compress", vlm_dirs[family], "--no-train", "--towers", "language,vision", "--out", out, *SMALL)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    original, compressed = summary["rows"]
    assert original["caption_agreement"] == 1.0  # the reference itself
    for row in summary["rows"]:
        assert 1 < row["caption_perplexity"] < float("inf") and 1 < row["perplexity"] < float("inf")
    assert 0 <= compressed["caption_agreement"] <= 1
    assert summary["protocol"]["caption_pairs"] == 8 and summary["reference_captions"]["tokens"]
    assert "caption perplexity" in (out / "report.md").read_text()
    assert (out / "processor_config.json").is_file()
    log = json.loads((out / "quant_log.json").read_text())
    assert sum("vision" in r["name"] for r in log) == 4

    result = _run("eval", out, "--eval-tokens", "256", "--no-latency")
    assert result.exit_code == 0, result.output
    shown = float(re.search(r"caption perplexity\s*│\s*([\d.,e+]+)", result.output).group(1).replace(",", ""))
    assert shown == pytest.approx(compressed["caption_perplexity"], rel=1e-3)  # one protocol, two commands
    assert f"{compressed['caption_agreement']:.1%} tokens" in result.output

    result = _run("info", out)
    assert result.exit_code == 0 and "tower" in result.output and "vision" in result.output
    result = _run("export", out, "--out", tmp_path / "m.onnx")
    assert result.exit_code == 2 and "vision-language model" in result.output and not (tmp_path / "m.onnx").exists()


def test_compress_trains_a_vision_language_model_on_images(vlm_dirs, tmp_path):
    yaml_file = tmp_path / "small.yaml"
    yaml_file.write_text("seq_len: 32\ntrain_samples: 8\nper_device_batch_size: 4\ninit_samples: 2\nsave_every: 0\n"
                         "progress: false\neval_tokens: 128\neval_context: 64\nlora_r: 2\n")
    out = tmp_path / "trained"
    result = _run("compress", vlm_dirs["llava"], "--out", out, "--train-tokens", "384", "--train-config", yaml_file,
                  *SMALL)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_summary"]["steps"] == 3
    assert all(1 < row["caption_perplexity"] < float("inf") for row in summary["rows"])
    assert (out / "processor_config.json").is_file()


def test_vision_language_refusals(vlm_dirs, tiny_model_dir, tmp_path):
    import shutil

    no_processor = tmp_path / "no-processor"
    shutil.copytree(vlm_dirs["llava"], no_processor)
    (no_processor / "processor_config.json").unlink()
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(pairs / "x.png")
    cases = [
        (["compress", vlm_dirs["llava"], "--towers", "language,audio"], "towers 'audio'"),
        (["compress", tiny_model_dir, "--no-train", "--towers", "vision", *SMALL], "is a text model"),
        (["compress", tiny_model_dir, "--no-train", "--images", pairs, *SMALL], "is a text model"),
        (["compress", vlm_dirs["llava"], "--no-train", "--images", tmp_path / "none", *SMALL], "does not exist"),
        (["compress", no_processor, "--no-train", *SMALL], "save the model's processor beside it"),
        (["compress", vlm_dirs["llava"], "--no-train", "--images", pairs, *SMALL], "caption file x.txt"),
        (["eval", tiny_model_dir, "--images", pairs], "not a vision-language model folder"),
        (["eval", vlm_dirs["llava"], "--images", pairs], "caption file x.txt"),
        (["report", vlm_dirs["llava"], "--out", tmp_path / "r"], "sweeps text models only"),
    ]
    for args, message in cases:
        out = tmp_path / "o"
        result = _run(*args, *(["--out", out] if args[0] == "compress" else []))
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Traceback" not in result.output, (args, result.output)
        assert not out.exists()
    (pairs / "x.txt").write_text("A black square.\n")
    out = tmp_path / "own-pairs"
    result = _run("compress", vlm_dirs["llava"], "--no-train", "--images", pairs, "--out", out, *SMALL)
    assert result.exit_code == 0, result.output
    assert (out / "summary.json").is_file()

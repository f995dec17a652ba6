"""NaN and Inf are refused wherever they can enter: the model to compress, a checkpoint, the evaluation and
the ONNX parity check (where a NaN error used to pass every tolerance)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import hyperquant
from hyperquant import CompressConfig, HyperquantError
from tests.conftest import tiny_llama

RTN = CompressConfig(bits=4, n=1, method="rtn", group_size=16)


def test_compress_refuses_a_non_finite_weight():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    with pytest.raises(HyperquantError, match=r"layer model.layers.1.mlp.up_proj: its weight holds NaN or Inf"):
        hyperquant.compress(model, RTN, progress=False)


def _damaged_checkpoint(tmp_path):
    model = hyperquant.compress(tiny_llama(), RTN, progress=False)
    folder = hyperquant.save_compressed(model, tmp_path / "ckpt")
    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    key = "model.layers.0.mlp.down_proj.scales"
    state[key][0, 0] = float("nan")
    save_file(state, str(weights), metadata={"format": "pt"})
    return folder, key


def test_load_refuses_a_nan_scale(tmp_path):
    folder, key = _damaged_checkpoint(tmp_path)
    with pytest.raises(HyperquantError, match=f"tensor {key} holds NaN or Inf"):
        hyperquant.load(folder)


def test_perplexity_of_nan_logits_is_an_error():
    from hyperquant.evals import PerplexityProtocol, perplexity

    model = tiny_llama()
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    with pytest.raises(HyperquantError, match="NaN log-likelihoods"):
        perplexity(model, torch.randint(0, 128, (80,)), PerplexityProtocol(context=32, stride=32, num_tokens=80))


def test_export_parity_with_nan_logits_fails_and_writes_nothing(tmp_path):
    from hyperquant.exporters import export_model

    model = hyperquant.compress(tiny_llama(), RTN, progress=False)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.scales[0, 0] = float("nan")
    model.model.layers[0].mlp.down_proj._dequantized = None
    with pytest.raises(HyperquantError, match="NaN or Inf in the logits"):
        export_model(model, tmp_path / "model.onnx", tolerance=1e9)  # no tolerance lets NaN pass
    assert list(tmp_path.iterdir()) == []


def test_eval_cli_reports_a_damaged_checkpoint_on_one_line(tmp_path):
    from typer.testing import CliRunner

    from hyperquant.cli import app

    folder, _ = _damaged_checkpoint(tmp_path)
    result = CliRunner().invoke(app, ["eval", str(folder), "--no-latency"])
    assert result.exit_code == 2 and "NaN or Inf" in result.output.strip().splitlines()[-1], result.output
    assert "Traceback" not in result.output
    assert json.loads((folder / "config.json").read_text())["hyperquant"]  # the folder is left as it was

"""One end-to-end check on the embedded default model (SmolLM2-135M-Instruct): compress, export with
the KV cache, and generate greedily in onnxruntime exactly as torch does."""

from __future__ import annotations

import copy

import pytest
import torch
from hyperquant.exporters import export_checkpoint, generate

import hyperquant
from hyperquant import CompressConfig
from hyperquant.data import eval_tokens


@pytest.mark.slow
def test_default_model_phm4_export_generates_like_torch(tmp_path):
    from hyperquant.models import default_model_source, load_model

    model, tokenizer = load_model(default_model_source())
    # PHM + 4-bit on the FFNs of the first 4 blocks keeps compression quick; the export covers all 30.
    cfg = CompressConfig(bits=4, n=2, num_bases=2, method="rtn", init="frobenius",
                         target_patterns=[r"layers\.[0-3]\.mlp\.(gate|up|down)_proj$"])
    hyperquant.compress(model, cfg, progress=False)
    folder = hyperquant.save_compressed(model, tmp_path / "ckpt", tokenizer)
    report = export_checkpoint(folder, tmp_path / "onnx" / "model.onnx")
    assert report["nodes"] == {"PHMMatMulNBits": 12}
    assert {"real_prefill", "real_decode"} <= set(report["parity"])
    # At accuracy level 0 both runtimes compute the same dequantized weights in fp32, so they may differ
    # only by summation order. The scale of that noise is measured, not guessed: torch fp32 against the
    # same model in float64, on the parity check's real prompt (63 tokens). Any real defect (a wrong
    # zero point, scale or mixing sign) is orders of magnitude above it.
    prompt = eval_tokens(tokenizer, 64).reshape(1, -1)[:, :63]
    with torch.no_grad():
        fp32 = model(prompt).logits.double()
        fp64 = copy.deepcopy(model).double()(prompt).logits
    torch_noise = float((fp32 - fp64).abs().max() / fp64.abs().max())
    assert 0 < torch_noise < 1e-3  # measured 1.0e-4; ORT was 0.6x that on this prompt, 1.1x on random ids
    assert report["parity"]["real_prefill"]["rel"] <= 4 * torch_noise, (report["parity"], torch_noise)
    assert report["max_rel_error"] <= 8 * torch_noise, (report["parity"], torch_noise)

    prompt = "The capital of France is"
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():  # the in-memory compressed model is the one `load` rebuilds
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    expected = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert generate(tmp_path / "onnx" / "model.onnx", tokenizer, prompt, max_new_tokens=12) == expected


@pytest.mark.slow
def test_default_model_genai_folder_generates_like_torch(tmp_path):
    """The whole default model (every linear RTN-4, the tied table the head's codes) as an
    onnxruntime-genai folder: its Generator gives torch's greedy tokens at accuracy level 0."""
    pytest.importorskip("onnxruntime_genai")
    from hyperquant.exporters import export_checkpoint_folder, genai_generate_ids

    from hyperquant.models import default_model_source, load_model

    model, tokenizer = load_model(default_model_source())
    hyperquant.compress(model, CompressConfig(bits=4, n=1, method="rtn"), progress=False)
    folder = hyperquant.save_compressed(model, tmp_path / "ckpt", tokenizer)
    report = export_checkpoint_folder(folder, tmp_path / "deploy", accuracy_level=0)
    ops = report["op_counts"]
    assert ops["GroupQueryAttention"] == 30 and ops["MatMulNBits"] == 30 * 5 + 1 and report["nodes"] < 400
    assert report["max_rel_error"] < 1e-4 and report["judged_on"] == ["real_decode", "real_prefill"]

    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    expected = out[0, ids.shape[1]:].tolist()
    produced = genai_generate_ids(tmp_path / "deploy", ids[0], 16)
    assert produced[: len(expected)] == expected  # torch stops at EOS; genai may too

"""The fused graph and the onnxruntime-genai folder: parity with torch per layer mix, op counts, the
folder's files, generation through onnxruntime-genai, refusals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hyperquant.exporters import (
    build_fused_graph,
    export_checkpoint_folder,
    export_genai_folder,
    fused_reason,
    genai_generate_ids,
)
from hyperquant.exporters.export import check_parity
from hyperquant.exporters.genai import FOLDER_REPORT, GENAI_CONFIG, save_fused
from typer.testing import CliRunner

import hyperquant
from hyperquant import CompressConfig, HyperquantError
from hyperquant.atomic import OUTPUT_MARKER
from hyperquant.cli import app
from tests.conftest import minilm_dir


def _llama(hidden=64, heads=4, kv=2, vocab=128, tie=True, layers=2, model_type="llama", seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    kw = {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
          "num_attention_heads": heads, "num_key_value_heads": kv, "tie_word_embeddings": tie,
          "max_position_embeddings": 64}
    model = (Qwen2ForCausalLM(Qwen2Config(**kw)) if model_type == "qwen2" else LlamaForCausalLM(LlamaConfig(**kw))).eval()
    with torch.no_grad():  # well separated greedy choices (random init gives near-uniform logits)
        model.lm_head.weight.mul_(20.0)
    return model


CASES = {
    # name: (model options, compress config or None for the plain model)
    "fp32-untied": ({"tie": False}, None),
    "dense-gptq4-tied-shared": ({}, CompressConfig(bits=4, n=1, group_size=16, calib_seq_len=16)),
    "phm4-n2": ({}, CompressConfig(bits=4, n=2, group_size=16, calib_seq_len=16)),
    "phm-float-n4-ffn": ({}, CompressConfig(bits=None, n=4, init="frobenius", rest_dtype="float32")),
    # K=96 with groups of 64: the last block is padded, the shared table is sliced
    "padded-shared-table": ({"hidden": 96, "heads": 2, "kv": 1}, CompressConfig(bits=4, n=2, group_size=64,
                                                                               calib_seq_len=16)),
    # what a training with measured capacity exports: FFN layers given n^2 bases are dense quantized
    "phm4-n2-some-ffn-dense": ({}, CompressConfig(bits=4, n=2, group_size=16, calib_seq_len=16, layers={
        r"layers\.0\.mlp\.(up|down)_proj$": {"kind": "dense-quant", "bits": 4, "group_size": 16}})),
    "own-table-8bit-attn": ({}, CompressConfig(bits=8, n=2, group_size=16, embed_bits=4, calib_seq_len=16)),
    "table-8bit": ({}, CompressConfig(bits=4, n=1, method="rtn", group_size=16, embed_bits=8)),
    "qwen2-qkv-bias-sym": ({"model_type": "qwen2"}, CompressConfig(bits=4, n=1, group_size=16, symmetric=True,
                                                                     calib_seq_len=16)),
}


def _compressed(name):
    options, cfg = CASES[name]
    model = _llama(**options)
    if cfg is not None:
        calib = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
        hyperquant.compress(model, cfg, calib, progress=False)
    return model


@pytest.mark.parametrize("name", CASES)
def test_fused_graph_matches_torch(name, tmp_path):
    model = _compressed(name)
    layers = model.config.num_hidden_layers
    proto = build_fused_graph(model, accuracy_level=0)
    ops = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    assert ops["GroupQueryAttention"] == layers and ops["SkipSimplifiedLayerNormalization"] == 2 * layers
    assert ops["SimplifiedLayerNormalization"] == 1 and "Softmax" not in ops  # attention is fused
    assert sum(ops.values()) < 15 * layers + 20
    save_fused(proto, tmp_path)
    parity = check_parity(tmp_path / "model.onnx", model, None)
    assert all(r["finite"] and r["rel"] < 1e-5 and r["top1_agree"] == 1.0 for r in parity.values()), parity
    section = getattr(model.config, "hyperquant", {}).get("plan", {})
    quantized_linears = sum(e["kind"] == "dense-quant" for e in section.values())
    if name == "dense-gptq4-tied-shared":  # q/k/v packed into one node per block; the table reads the head's codes
        assert ops["MatMulNBits"] == quantized_linears - 2 * layers and ops["GatherBlockQuantized"] == 1
        gather = next(n for n in proto.graph.node if n.op_type == "GatherBlockQuantized")
        reshape = next(n for n in proto.graph.node if n.output[0] == gather.input[0])
        assert reshape.input[0] == "lm_head.qweight"  # one copy of the codes
    if name == "padded-shared-table":
        assert ops["Slice"] == 1
    if name == "phm4-n2":
        assert ops["PHMMatMulNBits"] == 3 * layers
    if name == "phm4-n2-some-ffn-dense":
        assert ops["PHMMatMulNBits"] == 3 * layers - 2
    if name == "own-table-8bit-attn":
        assert ops["GatherBlockQuantized"] == 1 and "Reshape" not in ops


def test_tied_table_is_stored_once(tmp_path):
    model = _compressed("dense-gptq4-tied-shared")
    assert model.model.embed_tokens.shares == "lm_head"
    hyperquant.save_compressed(model, tmp_path / "ck")
    loaded = hyperquant.load(tmp_path / "ck")
    assert loaded.model.embed_tokens.qweight is loaded.lm_head.qweight
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ck" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.qweight" in keys and not any(k.startswith("model.embed_tokens") for k in keys)
    ids = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
        table = loaded.model.embed_tokens(ids)
        rows = loaded.lm_head.effective_weight()[ids]
    assert torch.equal(table, rows)  # the embedding is the dequantized head


def test_accuracy_level_4_error_is_bounded_and_finite(tmp_path):
    model = _compressed("phm4-n2")
    save_fused(build_fused_graph(model, accuracy_level=4), tmp_path)
    parity = check_parity(tmp_path / "model.onnx", model, None)
    worst = max(r["rel"] for r in parity.values())
    assert math.isfinite(worst) and 0 < worst < 0.1  # int8 activations: not exact, but close


def test_unsupported_models_are_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    assert "--out model.onnx" in fused_reason(gpt2)
    assert "multiple of 16" in fused_reason(_llama(hidden=96, heads=4, kv=2))  # head_dim 24
    two_bit_table = _llama()
    hyperquant.compress(two_bit_table, CompressConfig(bits=4, n=1, method="rtn", group_size=16, embed_bits=2),
                        progress=False)
    assert "GatherBlockQuantized reads 4 or 8 bits" in fused_reason(two_bit_table)
    with pytest.raises(ValueError, match="gpt2"):
        build_fused_graph(gpt2)


# ---------------------------------------------------------------------------------------------------
# The onnxruntime-genai folder (needs the tokenizer files: a tiny model over MiniLM's vocabulary).


@pytest.fixture(scope="module")
def genai_checkpoint(tmp_path_factory):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    model = _llama(vocab=len(tokenizer), hidden=64, tie=False)  # tied, greedy echoes the last token
    calib = torch.randint(0, len(tokenizer), (4, 32), generator=torch.Generator().manual_seed(2))
    hyperquant.compress(model, CompressConfig(bits=4, n=2, group_size=16, calib_seq_len=32), calib, progress=False)
    folder = tmp_path_factory.mktemp("genai") / "ck"
    hyperquant.save_compressed(model, folder, tokenizer)
    return folder


def _torch_greedy(model, prompt, steps):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _genai_greedy(folder, prompt, steps):
    pytest.importorskip("onnxruntime_genai")
    return genai_generate_ids(folder, prompt, steps)


def test_genai_folder_generates_like_torch(genai_checkpoint, tmp_path):
    pytest.importorskip("onnxruntime_genai")
    out = tmp_path / "folder"
    report = export_checkpoint_folder(genai_checkpoint, out, accuracy_level=0)
    files = {p.name for p in out.iterdir()}
    assert {"model.onnx", "model.onnx.data", GENAI_CONFIG, FOLDER_REPORT, "tokenizer.json", OUTPUT_MARKER} <= files
    saved = json.loads((out / FOLDER_REPORT).read_text())
    assert saved["passed"] and saved["genai_config"] and saved["max_rel_error"] < 1e-5
    assert saved["op_counts"]["GroupQueryAttention"] == 2 and saved["op_counts"]["PHMMatMulNBits"] == 6
    config = json.loads((out / GENAI_CONFIG).read_text())
    assert config["model"]["decoder"]["filename"] == "model.onnx" and config["search"]["past_present_share_buffer"]
    prompt = [101, 2023, 2003, 1037, 3231, 1997]
    expected = _torch_greedy(hyperquant.load(genai_checkpoint), prompt, 12)
    assert len(set(expected)) > 2  # a test that could fail: the tokens vary
    assert _genai_greedy(out, prompt, 12) == expected
    assert report["model_bytes"] == (out / "model.onnx").stat().st_size + (out / "model.onnx.data").stat().st_size


def test_cli_export_folder_and_refusals(genai_checkpoint, tmp_path):
    pytest.importorskip("onnxruntime_genai")
    runner = CliRunner()
    out = tmp_path / "deploy"
    result = runner.invoke(app, ["export", str(genai_checkpoint), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "GroupQueryAttention" in result.output and "onnxruntime-genai" in result.output
    assert json.loads((out / FOLDER_REPORT).read_text())["accuracy_level"] == 4  # the CPU default
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir())
    again = runner.invoke(app, ["export", str(genai_checkpoint), "--out", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.output and "Traceback" not in again.output
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir()) == before  # untouched
    into_input = runner.invoke(app, ["export", str(genai_checkpoint), "--out", str(genai_checkpoint), "--overwrite"])
    assert into_input.exit_code == 2 and (genai_checkpoint / "model.safetensors").is_file()


def test_nan_scale_fails_the_folder_export_and_writes_nothing(genai_checkpoint, tmp_path):
    model = hyperquant.load(genai_checkpoint)
    model.model.layers[1].mlp.down_proj.scales[0, 0] = float("nan")
    model.model.layers[1].mlp.down_proj._dequantized = None
    with pytest.raises(HyperquantError, match="NaN or Inf"):
        export_genai_folder(model, tmp_path / "out", None, genai_checkpoint, accuracy_level=0, tolerance=1e9)
    assert not list(tmp_path.iterdir())


def test_folder_export_needs_a_tokenizer(tmp_path):
    pytest.importorskip("onnxruntime_genai")
    model = _compressed("phm4-n2")
    with pytest.raises(HyperquantError, match="tokenizer"):
        export_genai_folder(model, tmp_path / "out", None, None)
    assert not (tmp_path / "out").exists()


def test_onnx_causal_lm_reads_cache_sizes_from_genai_config(genai_checkpoint, tmp_path):
    """The builder leaves head_dim symbolic; OnnxCausalLM then reads genai_config.json."""
    import onnx
    from hyperquant.exporters import OnnxCausalLM

    out = tmp_path / "folder"
    export_checkpoint_folder(genai_checkpoint, out, accuracy_level=0)
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    for value in [*proto.graph.input, *proto.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if value.name.startswith(("past", "present")):
            dims[3].dim_param = "kv_cache_dim"
    onnx.save(proto, str(out / "model.onnx"))
    lm = OnnxCausalLM(out / "model.onnx")
    assert (lm.kv_heads, lm.head_dim) == (2, 16)
    logits, past = lm.step(np.array([[101, 2023]]), np.ones((1, 2), np.int64))
    assert logits.shape[:2] == (1, 2) and past["past_key_values.0.key"].shape == (1, 2, 2, 16)


def test_gate_and_up_share_one_mixing_after_onnxruntime_optimizes(tmp_path):
    """Equal bases are one initializer, so onnxruntime's common-subexpression pass computes the mixing of
    gate and up (same input) once: 2 mixing MatMuls per block (gate+up, down), not 3."""
    import onnx
    import onnxruntime as ort

    model = _compressed("phm4-n2")
    save_fused(build_fused_graph(model, accuracy_level=4), tmp_path)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(str(tmp_path / "model.onnx"), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False)
    mixing = sum(n.op_type == "MatMul" for n in optimized.graph.node)
    assert mixing == 2 * model.config.num_hidden_layers


def test_the_sweep_times_the_fused_folder(tmp_path):
    """Report points of a Llama with a GQA-sized head are exported as the deployment folder, so their
    latency column is the fused graph's."""
    from transformers import AutoTokenizer

    from hyperquant.tradeoff.spec import SweepConfig
    from hyperquant.tradeoff.sweep import run_sweep

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    model_dir = tmp_path / "model"
    _llama(vocab=len(tokenizer), hidden=64, tie=False).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    cfg = SweepConfig(model=str(model_dir), eval_tokens=128, eval_context=64, calib_samples=2, calib_seq_len=16,
                      prompt_tokens=4, decode_tokens=2, latency_rounds=1, latency_threads=1, accuracy_level=0,
                      points=[{"original": True}, {"compress": {"n": 2, "bits": 4, "method": "rtn",
                                                                 "init": "frobenius", "group_size": 16}}])
    points = run_sweep(cfg, tmp_path / "report", tmp_path / "cache", progress=False)["points"]
    for point in points:
        assert point["status"] == "ok", point.get("error")
        assert point["onnx"]["graph"] == "fused" and point["metrics"]["decode_ms"] > 0
        folder = tmp_path / "cache" / "points" / point["id"] / "onnx"
        assert (folder / "model.onnx.data").is_file() and point["onnx"]["file_bytes"] == sum(
            (folder / f).stat().st_size for f in ("model.onnx", "model.onnx.data"))

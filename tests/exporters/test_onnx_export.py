"""Whole-LM export: parity report, generation, loading without registration, errors, atomic output."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from hyperquant.exporters import (
    OnnxCausalLM,
    export_checkpoint,
    export_command,
    export_dense,
    export_ort_rtn,
    generate_ids,
    report_path,
)

import hyperquant
from hyperquant.errors import HyperquantError


def torch_greedy(model, prompt, max_new_tokens):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def exported_phm4(phm4_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    report = export_checkpoint(phm4_checkpoint, out)
    return out, report


def test_export_writes_model_and_report(exported_phm4):
    out, report = exported_phm4
    saved = json.loads(report_path(out).read_text())
    assert saved["passed"] and saved == json.loads(json.dumps(report))
    assert set(saved["parity"]) == {"random_prefill", "random_decode"}
    assert saved["max_rel_error"] < 1e-4
    # gate, up, down in 2 blocks; q, k, v, o and the LM head (the whole model is compressed)
    assert saved["nodes"] == {"PHMMatMulNBits": 6, "MatMulNBits": 9}
    model = onnx.load(str(out))
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"] + [
        f"past_key_values.{i}.{k}" for i in range(2) for k in ("key", "value")]
    assert [o.name for o in model.graph.output] == ["logits"] + [
        f"present.{i}.{k}" for i in range(2) for k in ("key", "value")]
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch_size", "sequence_length"]
    assert [f.name for f in model.functions] == ["PHMMatMulNBits"]
    assert not list(out.parent.glob(".model.onnx.tmp-*"))  # the staging folder is gone


def test_loads_in_fresh_process_without_registration(exported_phm4):
    """A plain onnxruntime (no hyperquant import, no custom-op library) runs the exported model."""
    out, _ = exported_phm4
    code = (
        "import numpy as np, onnxruntime as ort, sys\n"
        f"s = ort.InferenceSession({str(out)!r}, providers=['CPUExecutionProvider'])\n"
        "feeds = {'input_ids': np.array([[1, 2, 3]]), 'attention_mask': np.ones((1, 3), np.int64)}\n"
        "feeds.update({i.name: np.zeros((1, 2, 0, 16), np.float32) for i in s.get_inputs()[2:]})\n"
        "print(s.run(['logits'], feeds)[0].shape, 'hyperquant' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(1, 3, 128) False"


def test_greedy_generation_matches_torch(exported_phm4, phm4_checkpoint, tmp_path):
    out, _ = exported_phm4
    model = hyperquant.load(phm4_checkpoint)
    prompt = [5, 17, 99, 3, 42, 7]
    expected = torch_greedy(model, prompt, 12)
    assert generate_ids(OnnxCausalLM(out), prompt, 12) == expected
    no_cache = tmp_path / "nocache.onnx"
    report = export_checkpoint(phm4_checkpoint, no_cache, with_cache=False)
    assert set(report["parity"]) == {"random_prefill"}
    lm = OnnxCausalLM(no_cache)
    assert not lm.with_cache and generate_ids(lm, prompt, 12) == expected


def test_batched_left_padding_matches_torch(exported_phm4, phm4_checkpoint):
    """Position ids come from the attention mask, so a left-padded row equals the unpadded one."""
    out, _ = exported_phm4
    lm = OnnxCausalLM(out)
    ids = np.array([[0, 0, 11, 12, 13], [21, 22, 23, 24, 25]])
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    padded, _ = lm.step(ids, mask)
    alone, _ = lm.step(ids[:1, 2:], mask[:1, 2:])
    np.testing.assert_allclose(padded[0, -1], alone[0, -1], rtol=1e-4, atol=1e-5)


def test_dense_gptq_exports_as_matmul_nbits(tmp_path, make_checkpoint):
    dense = make_checkpoint(tmp_path / "dense8", bits=8, n=1, method="gptq")
    report = export_checkpoint(dense, tmp_path / "d" / "model.onnx", with_cache=False)
    assert report["nodes"] == {"MatMulNBits": 6 + 8 + 1} and report["passed"]


def test_float_phm_exports_as_phm_linear(tmp_path, make_checkpoint):
    float_phm = make_checkpoint(tmp_path / "phmf", bits=None, n=4, num_bases=2)
    report = export_checkpoint(float_phm, tmp_path / "f" / "model.onnx", with_cache=False)
    assert report["nodes"] == {"PHMLinear": 6} and report["max_rel_error"] < 1e-4


def test_dense_fp32_and_ort_rtn_baseline(tmp_path, make_tiny_llama):
    model = make_tiny_llama()
    report = export_dense(model, tmp_path / "fp32" / "model.onnx", with_cache=False)
    assert report["nodes"] == {} and report["max_rel_error"] < 1e-4
    report = export_ort_rtn(model, tmp_path / "rtn" / "model.onnx", with_cache=False, block_size=32)
    assert report["ort_rtn_nodes"] == 2 * 7 + 1  # q, k, v, o, gate, up, down per block and the head
    assert report["passed"] and 0 < report["max_rel_error"] < report["tolerance"]
    # the export itself was checked strictly before onnxruntime's RTN changed the weights
    assert max(r["rel"] for r in report["parity_before_ort_rtn"].values()) < 1e-4


def test_accuracy_level_and_tolerance_refusal(phm4_checkpoint, tmp_path):
    out = tmp_path / "model.onnx"
    report = export_checkpoint(phm4_checkpoint, out, accuracy_level=4, with_cache=False)
    assert report["accuracy_level"] == 4 and report["passed"]
    node = next(n for n in onnx.load(str(out)).graph.node if n.op_type == "PHMMatMulNBits")
    assert {a.name: a.i for a in node.attribute}["accuracy_level"] == 4
    from hyperquant.exporters import export_model

    with pytest.raises(HyperquantError, match="does not match torch") as err:
        export_model(hyperquant.load(phm4_checkpoint), tmp_path / "strict" / "model.onnx", accuracy_level=4,
                     with_cache=False, tolerance=1e-9)
    assert "\n" not in str(err.value)
    assert list((tmp_path / "strict").iterdir()) == []  # nothing written, no staging folder left


def one_line_error(fn, *args, match, **kwargs):
    with pytest.raises(HyperquantError, match=match) as err:
        fn(*args, **kwargs)
    assert "\n" not in str(err.value)


def test_bad_inputs_give_one_line_errors(phm4_checkpoint, tmp_path, make_checkpoint):
    one_line_error(export_checkpoint, tmp_path / "missing", tmp_path / "m.onnx", match="not a hyperquant checkpoint")
    old = tmp_path / "old"
    old.mkdir()
    config = json.loads((phm4_checkpoint / "config.json").read_text())
    config["hyperquant"]["format_version"] = 0
    (old / "config.json").write_text(json.dumps(config))
    one_line_error(export_checkpoint, old, tmp_path / "m.onnx", match="format 0")
    three = make_checkpoint(tmp_path / "three", bits=3)
    one_line_error(export_checkpoint, three, tmp_path / "m.onnx", match="bits=3 cannot be exported")
    one_line_error(export_checkpoint, phm4_checkpoint, tmp_path / "m.onnx", accuracy_level=7, match="accuracy_level")
    one_line_error(export_checkpoint, phm4_checkpoint, tmp_path / "m.onnx", opset=9, match="opset")
    one_line_error(export_checkpoint, phm4_checkpoint, tmp_path / "m.txt", match="ending in .onnx")
    if "CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers():
        one_line_error(export_checkpoint, phm4_checkpoint, tmp_path / "m.onnx", device="cuda",
                       match="CUDAExecutionProvider")
    assert not list(tmp_path.glob("*.onnx"))


def test_existing_output_needs_overwrite(phm4_checkpoint, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"keep me")
    one_line_error(export_command, str(phm4_checkpoint), str(out), no_cache=True, match="already exists")
    assert out.read_bytes() == b"keep me"
    report = export_command(str(phm4_checkpoint), str(out), no_cache=True, overwrite=True)
    assert report["passed"] and onnx.load(str(out)).graph.output[0].name == "logits"
    assert "wrote" in capsys.readouterr().out


def test_external_data_beyond_the_limit(phm4_checkpoint, tmp_path, monkeypatch):
    """Models over the protobuf limit keep their weights in model.onnx.data (limit lowered to 0 here)."""
    import hyperquant.exporters.export as export_module

    monkeypatch.setattr(export_module, "EXTERNAL_DATA_LIMIT", 0)
    out = tmp_path / "ext" / "model.onnx"
    report = export_checkpoint(phm4_checkpoint, out, with_cache=False)
    assert report["external_data"] and report["passed"]
    data = out.with_name("model.onnx.data")
    assert data.stat().st_size > 0
    proto = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    moved = tmp_path / "moved"
    (tmp_path / "ext").rename(moved)  # the data file is found relative to the model
    assert OnnxCausalLM(moved / "model.onnx").step(np.array([[1, 2]]), np.ones((1, 2)))[0].shape == (1, 2, 128)

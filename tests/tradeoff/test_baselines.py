"""The comparison baselines (bitsandbytes NF4, GPTQModel) on a tiny random Llama: FFN linears only.

A baseline whose library is not installed is skipped with its reason; an installed one must work.
"""

import importlib.util

import pytest
import torch
from torch import nn

from hyperquant.errors import HyperquantError
from hyperquant.tradeoff import baselines
from hyperquant.tradeoff.baselines import BASELINES, BaselineResult, run_baseline, unavailable_reason
from tests.conftest import minilm_dir, tiny_llama

# Sizes the libraries accept: GPTQ groups of 128 along in_features, NF4 blocks of 64.
HIDDEN, INTERMEDIATE = 128, 256
FFN = [f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama-128")
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    model = tiny_llama(vocab_size=len(tokenizer), hidden=HIDDEN, intermediate=INTERMEDIATE, layers=2)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def original(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def results(model_dir, tmp_path_factory):
    """One run of each available baseline, shared by the tests below."""
    cache = {}

    def get(name: str) -> BaselineResult:
        reason = unavailable_reason(name)
        if reason is not None:
            pytest.skip(reason)
        if name not in cache:
            gen = torch.Generator().manual_seed(1)
            calib = torch.randint(0, 1000, (8, 64), generator=gen)
            out = tmp_path_factory.mktemp(name) / "quantized"
            cache[name] = run_baseline(name, model_dir, FFN, calib, bits=4, group_size=128, out_dir=out)
        return cache[name]

    return get


@pytest.mark.parametrize("name", BASELINES)
def test_quantizes_only_the_ffn_linears(name, results, original):
    result = results(name)
    modules = dict(result.model.named_modules())
    for ffn in FFN:
        assert type(modules[ffn]) is not nn.Linear, f"{ffn} was not quantized"
    reference = dict(original.named_modules())
    others = [n for n, m in reference.items() if isinstance(m, nn.Linear) and n not in FFN]
    assert "lm_head" in others and "model.layers.0.self_attn.q_proj" in others
    for n in others:
        assert type(modules[n]) is nn.Linear, f"{n} should stay an nn.Linear, is {type(modules[n]).__name__}"
        assert modules[n].weight.dtype == torch.float32
        # stored in float16 (rest_dtype, as hyperquant stores them), computed in float32
        want = reference[n].weight.half().float()
        assert torch.equal(modules[n].weight, want), f"{n} weights changed beyond the float16 rounding"
    assert result.details["quantized_modules"] == len(FFN)


@pytest.mark.parametrize("name", BASELINES)
def test_logits_close_to_the_original(name, results, original):
    result = results(name)
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = original(input_ids=ids).logits
        got = result.model(input_ids=ids).logits
    assert got.shape == want.shape
    assert torch.isfinite(got).all()
    cosine = torch.nn.functional.cosine_similarity(got.flatten().double(), want.flatten().double(), dim=0)
    assert cosine > 0.9
    assert not torch.equal(got, want)  # the FFN really is quantized


@pytest.mark.parametrize("name", BASELINES)
def test_saved_weights_are_smaller(name, results, model_dir):
    result = results(name)
    assert result.folder.is_dir() and result.weight_files
    assert all(f.is_file() and f.parent == result.folder for f in result.weight_files)
    assert all(f.suffix in (".safetensors", ".bin") for f in result.weight_files)
    quantized = sum(f.stat().st_size for f in result.weight_files)
    fp32 = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    ffn_fp32 = 4 * len(FFN) * HIDDEN * INTERMEDIATE
    # 4-bit codes plus per-block scales: at least half of the FFN's fp32 bytes are saved.
    assert quantized < fp32 - ffn_fp32 // 2
    assert result.seconds > 0
    assert result.label.endswith("(FFN)")
    assert result.details["bits"] == 4 and result.details["torch"] == torch.__version__


def test_details_record_the_settings(results):
    for name in BASELINES:
        if unavailable_reason(name) is not None:
            continue
        details = results(name).details
        if name == "bnb-nf4":
            assert details["quant_type"] == "nf4" and details["blocksize"] == 64
            assert details["bitsandbytes"]
            assert results(name).label == "bitsandbytes NF4 (FFN)"
        else:
            assert details["group_size"] == 128 and details["sym"] is True and details["desc_act"] is False
            assert details["calibration_samples"] == 8 and details["gptqmodel"]
            assert results(name).label == "GPTQModel GPTQ-4 g128 (FFN)"


def test_unknown_baseline():
    with pytest.raises(HyperquantError, match="unknown baseline"):
        unavailable_reason("awq")
    with pytest.raises(HyperquantError, match="unknown baseline"):
        run_baseline("awq", ".", FFN, None, 4, 128, ".")


@pytest.mark.parametrize("name, module", [("bnb-nf4", "bitsandbytes"), ("gptqmodel", "gptqmodel")])
def test_missing_library_is_reported(name, module, monkeypatch, model_dir, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == module else real(n, *a))
    baselines._bnb_reason.cache_clear()
    baselines._gptqmodel_reason.cache_clear()
    try:
        reason = unavailable_reason(name)
        assert module in reason and "pip install 'hyperquant[baselines]'" in reason
        with pytest.raises(HyperquantError, match="not available"):
            run_baseline(name, model_dir, FFN, None, 4, 128, tmp_path / "out")
    finally:
        monkeypatch.undo()
        baselines._bnb_reason.cache_clear()
        baselines._gptqmodel_reason.cache_clear()


def test_bad_arguments(model_dir, tmp_path):
    name = next((n for n in BASELINES if unavailable_reason(n) is None), None)
    if name is None:
        pytest.skip("no baseline library is installed")
    with pytest.raises(HyperquantError, match="not linears"):
        run_baseline(name, model_dir, FFN + ["model.layers.0.mlp.nope"], None, 4, 128, tmp_path / "a")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(HyperquantError, match="not empty"):
        run_baseline(name, model_dir, FFN, None, 4, 128, busy)


def test_gptqmodel_needs_calibration(model_dir, tmp_path):
    reason = unavailable_reason("gptqmodel")
    if reason is not None:
        pytest.skip(reason)
    with pytest.raises(HyperquantError, match="calibration"):
        run_baseline("gptqmodel", model_dir, FFN, None, 4, 128, tmp_path / "out")

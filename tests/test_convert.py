"""Conversion on several architectures built from small configs."""

import pytest
import torch

from hyperquant import CompressConfig, HyperquantError, compress
from hyperquant.convert import find_ffn_linears
from hyperquant.phm.layer import PHMLinear
from hyperquant.quant.modules import QuantLinear, QuantPHMLinear


def _llama():
    from tests.conftest import tiny_llama

    return tiny_llama()


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)).eval()


def _opt():
    from transformers import OPTConfig, OPTForCausalLM

    return OPTForCausalLM(OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=64)).eval()


def _neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, max_position_embeddings=64)).eval()


def _bert():
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=64)).eval()


ARCHS = {
    "llama": (_llama, {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}),
    "gpt2": (_gpt2, {"mlp.c_fc", "mlp.c_proj"}),
    "opt": (_opt, {"fc1", "fc2"}),
    "gpt_neox": (_neox, {"mlp.dense_h_to_4h", "mlp.dense_4h_to_h"}),
    "bert": (_bert, {"intermediate.dense", "output.dense"}),
}


def _output(model, ids):
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("arch", ARCHS)
def test_finds_only_ffn_linears(arch):
    build, suffixes = ARCHS[arch]
    names = list(find_ffn_linears(build()))
    assert len(names) == 2 * len(suffixes)
    for name in names:
        assert any(name.endswith(s) for s in suffixes), name
        assert "attn" not in name and "attention" not in name and "lm_head" not in name


@pytest.mark.parametrize("arch", ARCHS)
def test_full_basis_phm_reproduces_the_model(arch):
    # With B = n^2 the fixed bases span every matrix, so the projection is exact: any transposition
    # (GPT-2's Conv1D) or block-layout mistake shows up as a changed output.
    build, _ = ARCHS[arch]
    model = build()
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        ref = _output(model, ids)
        compress(model, CompressConfig(bits=None, n=2, num_bases=4, init="frobenius", rest_dtype="float32"),
                 progress=False)
        out = _output(model, ids)
    assert sum(isinstance(m, PHMLinear) for m in model.modules()) == len(find_ffn_linears(build()))
    assert torch.allclose(out, ref, atol=1e-4), (out - ref).abs().max()


@pytest.mark.parametrize("arch", ARCHS)
def test_calibrated_phm_gptq_runs_on_every_architecture(arch):
    build, _ = ARCHS[arch]
    model = build()
    ids = torch.randint(0, 128, (4, 16))
    with torch.no_grad():
        ref = _output(model, ids)
        compress(model, CompressConfig(bits=4, n=2, num_bases=2, group_size=16, calib_samples=4), ids, progress=False)
        out = _output(model, ids)
    kinds = {r["kind"] for r in model.hyperquant_log}
    assert all(r["calib_tokens"] == 64 for r in model.hyperquant_log if r["kind"] != "embed-quant")
    assert any(isinstance(m, QuantPHMLinear) for m in model.modules())
    # the whole model: attention with the dense quantizer, the embedding table quantized
    assert {"phm-quant", "dense-quant", "embed-quant"} <= kinds, kinds
    assert torch.isfinite(out).all() and not torch.allclose(out, ref)


def test_attention_and_head_are_untouched_and_patterns_override():
    model = _llama()
    q_before = model.model.layers[0].self_attn.q_proj.weight.clone()
    compress(model, CompressConfig(bits=4, n=1, method="rtn", group_size=16, rest_dtype="float32",
                                   target_patterns=[r"\.down_proj$"]), progress=False)
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
    assert isinstance(model.model.layers[0].mlp.up_proj, torch.nn.Linear)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, q_before)


def test_per_layer_bases_and_size_threshold():
    model = _llama()
    ids = torch.randint(0, 128, (2, 16))
    cfg = CompressConfig(bits=4, n=2, num_bases=2, layer_bases={r"layers\.1\.": 3}, group_size=16)
    compress(model, cfg, ids, progress=False)
    assert model.model.layers[0].mlp.up_proj.num_bases == 2 and model.model.layers[1].mlp.up_proj.num_bases == 3
    with pytest.raises(HyperquantError, match="no FFN linears"):
        compress(_llama(), CompressConfig(bits=4, n=2, min_features=1000), ids, progress=False)


def test_n_that_does_not_divide_is_a_clear_error_before_any_change():
    model = _llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(HyperquantError, match="n=3 must divide"):
        compress(model, CompressConfig(bits=4, n=3, num_bases=2), torch.randint(0, 128, (2, 16)), progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_calibration_is_required_for_gptq():
    with pytest.raises(HyperquantError, match="calibration"):
        compress(_llama(), CompressConfig(bits=4), progress=False)


def test_fit_to_original_outputs_only_differs_downstream_of_the_first_compressed_layer():
    ids = torch.randint(0, 128, (4, 16))
    models = {}
    for target in ("original", "current"):
        torch.manual_seed(1)
        model = _llama()
        compress(model, CompressConfig(bits=None, n=2, num_bases=2, fit_target=target, rest_dtype="float32"),
                 ids, progress=False)
        models[target] = model
    first = [m.model.layers[0].mlp for m in models.values()]
    # Block 0's gate/up see the same inputs in both streams: identical fits. Later layers do not.
    assert torch.allclose(first[0].up_proj.factors, first[1].up_proj.factors, atol=1e-6)
    last = [m.model.layers[1].mlp.down_proj.factors for m in models.values()]
    assert not torch.allclose(last[0], last[1], atol=1e-4)
    log = {r["name"]: r for r in models["original"].hyperquant_log}
    down = log["model.layers.1.mlp.down_proj"]
    assert 0 <= down["output_error_to_original"] and "output_error_to_original" not in models["current"].hyperquant_log[-1]


@pytest.mark.parametrize("arch,expected", [("llama", [["gate_proj", "up_proj"], ["down_proj"]]),
                                           ("gpt2", [["c_fc"], ["c_proj"]])])
def test_layers_sharing_an_input_are_grouped(arch, expected):
    from hyperquant.pipeline import _capture_block_inputs, _input_groups

    model = ARCHS[arch][0]()
    block = model.model.layers[0] if arch == "llama" else model.transformer.h[0]
    names = [(n, m) for n, m in block.named_modules() if n.startswith("mlp.") and hasattr(m, "weight")]
    with torch.no_grad():
        calls = _capture_block_inputs(model, block, [{"input_ids": torch.randint(0, 128, (2, 8))}])
        groups = _input_groups(block, names, calls[0])
    assert [[n.split(".")[-1] for n in g] for g in groups] == expected


def test_a_config_that_changes_nothing_is_rejected():
    with pytest.raises(HyperquantError, match="leave every layer"):
        CompressConfig(bits=None, n=1)

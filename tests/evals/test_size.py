"""Bytes as counted equal bytes as stored, for models whose compressed layers carry a bias."""

import pytest
import torch
from hyperquant.evals import model_size
from hyperquant.evals.size import dtype_bytes
from safetensors import safe_open

import hyperquant
from hyperquant import CompressConfig


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=64, n_embd=32, n_layer=2, n_head=2)).eval()


def _tiny_opt():
    from transformers import OPTConfig, OPTForCausalLM

    return OPTForCausalLM(OPTConfig(vocab_size=96, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                    num_attention_heads=2, max_position_embeddings=64,
                                    word_embed_proj_dim=32)).eval()


@pytest.mark.parametrize("make", [_tiny_gpt2, _tiny_opt], ids=["gpt2", "opt"])
@pytest.mark.parametrize("n", [1, 2])
def test_counted_bytes_are_the_stored_tensor_bytes(make, n, tmp_path):
    model = make()
    cfg = CompressConfig(bits=4, n=n, method="rtn", init="frobenius", group_size=16, scope="ffn")
    hyperquant.compress(model, cfg, progress=False)
    counted = model_size(model, rest_bytes_per_param=dtype_bytes(cfg.rest_dtype))["bytes"]
    folder = hyperquant.save_compressed(model, tmp_path / "ckpt")
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        stored = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()  # noqa: SIM118 - safe_open is no dict
                     if not k.endswith(".attn.bias") and not k.endswith("masked_bias"))
    from hyperquant.kinds import kind_of

    biased = [m for m in model.modules() if kind_of(m) is not None and m.bias is not None]
    assert biased and all(m.bias.dtype == torch.float32 for m in biased)  # stored in fp32, beside fp16 rest
    assert counted == stored

"""Tiny random Llama models and hyperquant checkpoints of them, shared by the exporter tests."""

from __future__ import annotations

import pytest
import torch

import hyperquant
from hyperquant import CompressConfig

TINY = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2}


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    # Random init gives near-uniform logits; scale up the head so greedy choices are well separated.
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model


def tiny_checkpoint(folder, bits=4, n=2, num_bases=2, method="rtn", seed=0, **kw):
    model = tiny_llama(seed)
    cfg = CompressConfig(bits=bits, n=n, num_bases=num_bases, method=method, group_size=16, calib_samples=8,
                         calib_seq_len=32, init="frobenius" if method == "rtn" else "activation", **kw)
    calib = torch.randint(0, TINY["vocab_size"], (8, 32), generator=torch.Generator().manual_seed(seed))
    hyperquant.compress(model, cfg, calib, progress=False)
    hyperquant.save_compressed(model, folder)
    return folder


@pytest.fixture(scope="session")
def phm4_checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ck") / "phm4", bits=4, n=2, num_bases=2)


@pytest.fixture(scope="session")
def make_checkpoint():
    return tiny_checkpoint


@pytest.fixture(scope="session")
def make_tiny_llama():
    return tiny_llama

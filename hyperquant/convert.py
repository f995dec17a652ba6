"""Finding the FFN linears of a transformers model, by architecture, and swapping modules."""

from __future__ import annotations

import re

import torch
from torch import nn

from hyperquant.errors import HyperquantError

# The FFN projections of each architecture family. Attention, embeddings and the LM head never match.
_LLAMA_LIKE = r"\.mlp\.(gate_proj|up_proj|down_proj)$"
FFN_PATTERNS: dict[str, str] = {
    **{t: _LLAMA_LIKE for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "granite")},
    "gpt2": r"\.mlp\.(c_fc|c_proj)$",
    "opt": r"\.layers\.\d+\.(fc1|fc2)$",
    "bert": r"\.layer\.\d+\.(intermediate\.dense|output\.dense)$",
    "roberta": r"\.layer\.\d+\.(intermediate\.dense|output\.dense)$",
    "gpt_neox": r"\.mlp\.(dense_h_to_4h|dense_4h_to_h)$",
}

# The attention projections and the LM head: compressed with the dense quantizer in scope "model".
_LLAMA_ATTN = r"\.self_attn\.(q_proj|k_proj|v_proj|o_proj)$"
ATTENTION_PATTERNS: dict[str, str] = {
    **{t: _LLAMA_ATTN for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "granite")},
    "phi3": r"\.self_attn\.(qkv_proj|o_proj)$",
    "gpt2": r"\.attn\.(c_attn|c_proj)$",
    "opt": r"\.self_attn\.(q_proj|k_proj|v_proj|out_proj)$",
    "bert": r"\.attention\.(self\.query|self\.key|self\.value|output\.dense)$",
    "roberta": r"\.attention\.(self\.query|self\.key|self\.value|output\.dense)$",
    "gpt_neox": r"\.attention\.(query_key_value|dense)$",
}
HEAD_PATTERNS: dict[str, str] = {"gpt_neox": r"^embed_out$"}
DEFAULT_HEAD_PATTERN = r"^lm_head$"


def is_conv1d(module: nn.Module) -> bool:
    # GPT-2's Conv1D stores its weight as (in, out); recognized by name to avoid importing its module.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of an nn.Linear or a transformers Conv1D."""
    return module.weight.detach().T if is_conv1d(module) else module.weight.detach()


def linear_bias(module: nn.Module) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    return None if bias is None else bias.detach()


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def ffn_patterns(model: nn.Module) -> list[str]:
    from hyperquant.multimodal.towers import find_towers, text_model_type

    model_type = text_model_type(model) if find_towers(model) else model_type_of(model)
    if model_type in FFN_PATTERNS:
        return [FFN_PATTERNS[model_type]]
    return sorted(set(FFN_PATTERNS.values()))


def _in_towers(model: nn.Module, towers: tuple[str, ...]):
    """name -> whether a module of a vision-language model belongs to the selected towers' FFN/MLPs
    (None for a text model: every name does). Vision MLPs count only inside the encoder's blocks (a
    pooling head's MLP is never run for the language model); the projector gives all its linears."""
    from hyperquant.multimodal.towers import VISION_MLP, find_towers

    found = find_towers(model)
    if found is None:
        return None
    language, vision = [re.compile(p) for p in ffn_patterns(model)], re.compile(VISION_MLP)

    def selected(name: str) -> bool:
        tower = found.tower_of(name)
        if tower not in towers:
            return False
        if tower == "language":
            return any(r.search("." + name) for r in language)
        if tower == "vision":
            return bool(vision.search("." + name)) and _BLOCK_RE.match(name[len(found.vision) + 1:]) is not None
        return True  # projector

    return selected


def find_ffn_linears(
    model: nn.Module, patterns: list[str] | None = None, min_features: int = 0,
    extra_types: tuple[type, ...] = (), towers: tuple[str, ...] = ("language",),
) -> dict[str, nn.Module]:
    """Name -> module for the linears to compress, in module order.

    ``extra_types``: also match these (already compressed) module types, which carry in/out_features.
    ``towers``: in a vision-language model without explicit ``patterns``, the towers whose FFN / MLP
    linears are selected (language, vision, projector).
    """
    tower_filter = _in_towers(model, towers) if patterns is None else None
    regexes = [re.compile(p) for p in (patterns or ffn_patterns(model))]
    found = {}
    for name, module in model.named_modules():
        if not (_is_linear(module) or isinstance(module, extra_types)):
            continue
        if tower_filter is not None:
            if not tower_filter(name):
                continue
        elif not any(r.search("." + name) for r in regexes):
            continue
        out_f, in_f = (module.out_features, module.in_features) if isinstance(module, extra_types) \
            else linear_weight(module).shape
        if min(out_f, in_f) >= min_features:
            found[name] = module
    if not found:
        model_type = getattr(getattr(model, "config", None), "model_type", "?")
        raise HyperquantError(
            f"no FFN linears found in this {model_type} model (hyperquant knows the FFN names of "
            f"{', '.join(sorted(FFN_PATTERNS))}); for another architecture set target_patterns "
            f"(regexes on module names) in a YAML config (compress: in --train-config or a report point) or in "
            f"hyperquant.CompressConfig"
        )
    return found


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


_BLOCK_RE = re.compile(r"^(.*?)\.(\d+)\.")


def block_index(name: str) -> tuple[str, int]:
    """'model.layers.3.mlp.up_proj' -> ('model.layers', 3): the ModuleList and the block's index."""
    m = _BLOCK_RE.match(name)
    if m is None:
        raise HyperquantError(f"module {name!r} is not inside a list of transformer blocks")
    return m.group(1), int(m.group(2))


def model_type_of(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def find_attention_and_head(model: nn.Module, min_features: int = 0) -> dict[str, nn.Module]:
    """Name -> module for the attention projections and the LM head of a known architecture (empty for
    an unknown one), in module order."""
    from hyperquant.multimodal.towers import find_towers, text_model_type

    towers = find_towers(model)  # a vision-language model: the language tower's attention only
    model_type = text_model_type(model) if towers else model_type_of(model)
    if model_type not in ATTENTION_PATTERNS:
        return {}
    regexes = [re.compile(ATTENTION_PATTERNS[model_type]), re.compile(HEAD_PATTERNS.get(model_type, DEFAULT_HEAD_PATTERN))]
    found = {}
    for name, module in model.named_modules():
        if towers is not None and towers.tower_of(name) not in ("language", None):
            continue
        if _is_linear(module) and any(r.search("." + name) or r.search(name) for r in regexes) \
                and min(linear_weight(module).shape) >= min_features:
            found[name] = module
    return found


def input_embedding_name(model: nn.Module) -> str | None:
    """The module name of the token embedding table (``model.embed_tokens``, ``transformer.wte``, ...)."""
    getter = getattr(model, "get_input_embeddings", None)
    embed = getter() if getter is not None else None
    # exactly nn.Embedding: a subclass may change the lookup (Gemma 3 scales it by sqrt(hidden)), which a
    # quantized table would not reproduce
    if type(embed) is not nn.Embedding:
        return None
    return next((name for name, module in model.named_modules() if module is embed), None)


def output_embedding_name(model: nn.Module) -> str | None:
    """The module name of the LM head (``lm_head``, ``embed_out``, ...), or None."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if getter is not None else None
    if head is None:
        return None
    return next((name for name, module in model.named_modules() if module is head), None)

"""The towers of a vision-language model: the language model, the vision encoder and the projector
between them, found by the module names transformers gives them (LLaVA, Qwen2-VL, Idefics3, Gemma 3)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from hyperquant.errors import HyperquantError

TOWERS = ("language", "vision", "projector")
DEFAULT_TOWERS = ("language",)  # as in the paper: vision encoder frozen, projector dense
# The last component of each tower's module name, by family (LLaVA / Gemma 3, Idefics3, Qwen2-VL).
_VISION_NAMES = ("vision_tower", "vision_model", "visual")
_PROJECTOR_NAMES = ("multi_modal_projector", "connector", "merger")
_LANGUAGE_NAMES = ("language_model", "text_model")
# MLP linears of the vision encoders: fc1/fc2 (CLIP, SigLIP, Qwen2-VL) or gated (Qwen2.5-VL).
VISION_MLP = r"\.mlp\.(fc1|fc2|gate_proj|up_proj|down_proj)$"
# The language tower's config type -> the key of its FFN / attention patterns in hyperquant.convert.
TEXT_TYPES = {"gemma3_text": "gemma", "qwen2_vl_text": "qwen2", "qwen2_5_vl_text": "qwen2", "qwen3_vl_text": "qwen3"}


def is_vision_language(config) -> bool:
    """Whether a transformers config is a vision-language model's (a vision and a text sub-config)."""
    return getattr(config, "vision_config", None) is not None and getattr(config, "text_config", None) is not None


def is_vision_language_dict(config: dict) -> bool:
    return isinstance(config.get("vision_config"), dict) and isinstance(config.get("text_config"), dict)


@dataclass(frozen=True)
class Towers:
    """Module-name prefixes of each tower ("" when the model has none)."""

    language: str
    vision: str
    projector: str

    def prefix(self, tower: str) -> str:
        return getattr(self, tower)

    def tower_of(self, name: str) -> str | None:
        """The tower a module belongs to (the innermost: Qwen2-VL's merger lies inside its vision module)."""
        inside = [t for t in TOWERS if self.prefix(t) and (name == self.prefix(t) or name.startswith(self.prefix(t) + "."))]
        return max(inside, key=lambda t: len(self.prefix(t)), default=None)


def _named(model: nn.Module, last: tuple[str, ...]) -> str:
    # the outermost module whose own name is one of ``last`` (the merger of Qwen2-VL sits in `visual`)
    names = [name for name, _ in model.named_modules() if name.rpartition(".")[2] in last]
    return min(names, key=lambda n: n.count("."), default="")


def tower_of_name(name: str) -> str:
    """The tower of a module name, from its components alone (for a checkpoint's config without its model)."""
    parts = name.split(".")
    for tower, names in (("projector", _PROJECTOR_NAMES), ("vision", _VISION_NAMES)):
        if any(p in names for p in parts):
            return tower
    return "language"


def find_towers(model: nn.Module) -> Towers | None:
    """The towers of a vision-language model, None for any other model."""
    if not is_vision_language(getattr(model, "config", None)):
        return None
    towers = Towers(_named(model, _LANGUAGE_NAMES), _named(model, _VISION_NAMES), _named(model, _PROJECTOR_NAMES))
    if not towers.language:
        raise HyperquantError(f"{type(model).__name__}: no language tower found (a module named "
                              f"{' or '.join(_LANGUAGE_NAMES)}); set target_patterns in a YAML config")
    return towers


def text_model_type(model: nn.Module) -> str | None:
    """The language tower's model type, as hyperquant.convert keys its patterns (llama, gemma, qwen2...)."""
    text = getattr(model.config, "text_config", None)
    kind = getattr(text, "model_type", None)
    return TEXT_TYPES.get(kind, kind)


def parse_towers(text: str | tuple | list) -> tuple[str, ...]:
    """``"language,vision"`` -> ("language", "vision"), refusing unknown towers."""
    items = [t.strip() for t in text.split(",")] if isinstance(text, str) else [str(t).strip() for t in text]
    items = [t for t in items if t]
    unknown = [t for t in items if t not in TOWERS]
    if unknown or not items:
        raise HyperquantError(f"towers {unknown[0] if unknown else '(none)'!r}: choose from {', '.join(TOWERS)} "
                              f"(comma-separated, e.g. language,vision)")
    return tuple(t for t in TOWERS if t in items)

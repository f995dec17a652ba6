"""LoRA (peft) on the attention projections, trained alongside the PHM factors and merged before export."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from hyperquant.convert import set_module


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def add_lora(model: nn.Module, targets: list[str] | str, r: int, alpha: float) -> list[str]:
    """Inject LoRA adapters in place into the linears whose names end with one of ``targets`` (or, a
    string, whose names match it as a regular expression).

    Only the adapters are made trainable here; the caller decides about the other parameters.
    Returns the adapted module names."""
    from peft import LoraConfig, inject_adapter_in_model

    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets if isinstance(targets, str) else list(targets), bias="none")
    inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
        elif name in grads:
            p.requires_grad_(grads[name])
        else:  # the base layer of an adapted module, renamed by peft
            p.requires_grad_(False)
    return sorted(_lora_layers(model))


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model without the LoRA updates (the teacher)."""
    layers = list(_lora_layers(model).values())
    saved = [m._disable_adapters for m in layers]
    try:
        for m in layers:
            m._disable_adapters = True
        yield
    finally:
        for m, s in zip(layers, saved):
            m._disable_adapters = s


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA update into its base weight and put the plain base layer back; return the count."""
    layers = _lora_layers(model)
    for name, m in layers.items():
        m.merge()
        base = m.get_base_layer()
        for p in base.parameters():
            p.requires_grad_(False)
        set_module(model, name, base)
    return len(layers)

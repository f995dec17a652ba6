"""Block offloading: the model stays on the host, and its decoder blocks visit the device one at a time.

This is how GPTQModel and llm-compressor calibrate models larger than the accelerator: everything that is
not a block (embeddings, final norm, LM head, rotary tables) sits on the device for the whole run, each
block is moved there for its own statistics, fit and GPTQ, and is then sent back, so peak device memory
is about one block plus the calibration activations.

A block's own weights are frozen while it visits (calibration and evaluation run under no_grad and never
write them), so going back costs nothing: each tensor the block had on entry is restored from the host
copy kept at entry. Only what was created on the device (the compressed layers that replaced dense ones)
is copied to the host.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11


def offload_units(model: nn.Module) -> list[nn.Module]:
    """The modules that visit the device one at a time: the elements of every outermost ``nn.ModuleList``
    (the decoder blocks of each tower). Everything else stays on the device for the whole run."""
    units: list[nn.Module] = []
    inside: set[int] = set()
    for _name, module in model.named_modules():
        if id(module) in inside:
            continue
        if isinstance(module, nn.ModuleList):
            for element in module:
                units.append(element)
                inside.update(id(m) for m in element.modules())
            inside.update(id(m) for m in module.modules())
    return units


def _slots(module: nn.Module):
    """(table, name, tensor) of each parameter and buffer the module holds itself."""
    for table in (module._parameters, module._buffers):
        for name, tensor in table.items():
            if tensor is not None:
                yield table, name, tensor


class _Visit:
    """Some modules' own tensors put on the device, and the host objects they replaced.

    Each host parameter or buffer is swapped for a device copy, and the very host object goes back on
    leaving; a tensor shared by two modules (a tied embedding and LM head) gets one device copy. The
    record is weakly keyed by module: a dense layer replaced and freed during the visit takes its host
    copy with it."""

    def __init__(self, modules, device: torch.device) -> None:
        self.host: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        copies: dict[int, torch.Tensor] = {}
        for module in modules:
            kept = {}
            for table, name, tensor in _slots(module):
                moved = copies.get(id(tensor))
                if moved is None:
                    data = tensor.detach().to(device)
                    moved = nn.Parameter(data, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else data
                    copies[id(tensor)] = moved
                kept[name] = (tensor, moved)
                table[name] = moved
            if hasattr(module, "_dequantized"):  # a packed layer's cached weight is on the old device
                module._dequantized = None
            self.host[module] = kept

    def leave(self, modules, host: torch.device) -> None:
        """Back to the host: what a module had on entry as it was, anything else (a layer created on the
        device, the compressed replacement of a dense one) copied."""
        for module in modules:
            kept = self.host.get(module)
            if kept is None:
                module._apply(lambda t: t.to(host), recurse=False)
                continue
            for table, name, tensor in list(_slots(module)):
                before, moved = kept.get(name, (None, None))
                if tensor is moved:
                    table[name] = before
                elif tensor.device != host:
                    table[name] = (nn.Parameter(tensor.detach().to(host), tensor.requires_grad)
                                   if isinstance(tensor, nn.Parameter) else tensor.to(host))
            if hasattr(module, "_dequantized"):
                module._dequantized = None


class BlockOffload:
    """While entered: the parts of ``model`` that are not blocks on ``device``; each block moved there by
    a forward pre-hook when it is called and sent back after it, unless ``resident(block)`` holds it.

    ``peak_blocks`` is the most blocks that were on the device at once (1 when offloading works)."""

    def __init__(self, model: nn.Module, device: torch.device | str, host: torch.device | str = "cpu") -> None:
        self.model, self.device, self.host = model, torch.device(device), torch.device(host)
        self.units = {id(u): u for u in offload_units(model)}
        self._visits: dict[int, _Visit] = {}
        self._pinned: set[int] = set()
        self._rest: _Visit | None = None
        self._handles: list = []
        self.peak_blocks = 0

    def _rest_modules(self) -> list[nn.Module]:
        in_units = {id(m) for u in self.units.values() for m in u.modules()}
        return [m for m in self.model.modules() if id(m) not in in_units]

    def bring(self, unit: nn.Module) -> None:
        if id(unit) not in self._visits:
            self._visits[id(unit)] = _Visit(list(unit.modules()), self.device)
            self.peak_blocks = max(self.peak_blocks, len(self._visits))

    def send_back(self, unit: nn.Module) -> None:
        visit = self._visits.pop(id(unit), None)
        if visit is not None:
            visit.leave(list(unit.modules()), self.host)

    @contextlib.contextmanager
    def resident(self, unit: nn.Module):
        """Keep ``unit`` on the device for the body (its calibration), then send it back."""
        self.bring(unit)
        self._pinned.add(id(unit))
        try:
            yield
        finally:
            self._pinned.discard(id(unit))
            self.send_back(unit)

    def __enter__(self) -> Self:
        self._rest = _Visit(self._rest_modules(), self.device)
        units, pinned = self.units, self._pinned

        # Plain closures, not bound methods: a deep copy of a block (the untouched original the pipeline
        # runs beside it) copies its hooks, and deep-copying a bound method would copy this object and the
        # model. The hooks look at the module called, so on the copy (not a unit) they do nothing.
        def pre(module, _args):
            if id(module) in units and id(module) not in pinned:
                self.bring(module)

        def post(module, _args, _out):
            if id(module) in units and id(module) not in pinned:
                self.send_back(module)

        for unit in units.values():
            self._handles.append(unit.register_forward_pre_hook(pre))
            self._handles.append(unit.register_forward_hook(post))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for key in list(self._visits):
            self.send_back(self.units[key])
        if self._rest is not None:
            self._rest.leave(self._rest_modules(), self.host)
            self._rest = None


def to_device(value, device: torch.device):
    """``value`` (a tensor, or tuples, lists and dicts of them) with every tensor on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    return value


@contextlib.contextmanager
def offloaded(model: nn.Module, device: torch.device | str | None):
    """``BlockOffload(model, device)`` when ``device`` is not where the model already is; else nothing."""
    if device is None:
        yield None
        return
    device = torch.device(device)
    host = next(model.parameters()).device
    if device == host or (device.type == host.type and device.type == "cpu"):
        yield None
        return
    with BlockOffload(model, device, host) as offload:
        yield offload

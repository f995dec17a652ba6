"""FSDP for `hyperquant train` (``fsdp: true``): torch's per-parameter sharding (``fully_shard``, FSDP2)
over the processes `accelerate launch --multi_gpu` (or torchrun) started.

Each decoder block (every element of an outermost ``nn.ModuleList``, as in `hyperquant.offload`) is one
FSDP unit and the root holds the rest, so a process keeps 1/N of every parameter, frozen dense weights
included, and gathers one block's at a time for its forward and backward. Gradients are reduce-scattered
(averaged over the processes, as DDP does), and AdamW's moments are sharded with the parameters.

The rest of the run reads whole tensors, so the places that touch parameters outside a forward go
through here: checkpoints gather every trained tensor (`full`, a collective: every process calls it in
the same order), a resumed optimizer's moments are cut to this process's shard (`shard_like`), and QAT's
scales are written into the shards (`copy_full_`). The export is rebuilt unsharded from the gathered
state (see `runner._finish`).

Not done: loading the model straight into shards (each process loads it whole before sharding, as
accelerate's FSDP does without ``cpu_ram_efficient_loading``), and freeing the dense branches Stage B drops
(FSDP's parameter groups are fixed when sharding: they stay, sharded, until the run ends).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded parameter, gradient or moment (a collective); others as they are."""
    return t.full_tensor() if is_sharded(t) else t


def local_numel(model: nn.Module) -> int:
    """Parameter elements this process holds: its shards, and whole tensors where unsharded."""
    return sum((p.to_local() if is_sharded(p) else p).numel() for p in model.parameters())


def shard_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``value`` (whole, the same on every process) cut as ``param`` is sharded, without communication."""
    if not is_sharded(param) or value.shape != param.shape:
        return value  # Adam's step counter, or an unsharded parameter's state
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


@torch.no_grad()
def copy_full_(param: torch.Tensor, value: torch.Tensor) -> None:
    """param[...] = value, where ``value`` is whole and ``param`` may be a shard."""
    if is_sharded(param):
        param.to_local().copy_(shard_like(value, param).to_local())
    else:
        param.copy_(value)


def shard_model(model: nn.Module, device: torch.device) -> None:
    """In place: one FSDP unit per decoder block, then the root (embeddings, norm, head)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from hyperquant.offload import offload_units

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # fully_shard moves each unit's parameters to the device as it shards them, so the device never holds
    # more than one whole unit (the root's rest last)
    for unit in offload_units(model):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)


@contextlib.contextmanager
def gradient_sync_off(model: nn.Module) -> Iterator[None]:
    """The micro-batches before the last of an accumulated step: gradients accumulate unreduced (DDP's
    ``no_sync``)."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)

"""`compress(model, config)`: sequential, block-by-block calibration and layer replacement.

Each transformer block is calibrated on the outputs of the already-compressed blocks before it (as GPTQ
does), so later layers see, and fit against, the errors of earlier ones. Within a block, layers that
share an input (gate/up) are compressed together, then the block is re-run to collect the inputs of
the next group (down) when ``true_sequential``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Iterable

import torch
from torch import nn

from hyperquant.config import CompressConfig
from hyperquant.convert import (
    block_index,
    input_embedding_name,
    linear_weight,
    output_embedding_name,
    set_module,
)
from hyperquant.errors import HyperquantError
from hyperquant.kinds import LayerStats, kind_of, kind_of_entry
from hyperquant.layer_compress import compress_layer
from hyperquant.offload import BlockOffload, offloaded, to_device
from hyperquant.plan import Plan, plan_needs_calibration, plan_to_dict, resolve_plan
from hyperquant.textsets import chooses

FORMAT_VERSION = 2


class _StopForward(Exception):
    pass


def _batches(calib_inputs, batch_size: int) -> list[dict[str, torch.Tensor]]:
    if isinstance(calib_inputs, torch.Tensor):
        if calib_inputs.ndim != 2 or calib_inputs.shape[0] == 0:
            raise HyperquantError("calibration input_ids must be a non-empty (samples, seq_len) tensor")
        return [{"input_ids": calib_inputs[i : i + batch_size]} for i in range(0, len(calib_inputs), batch_size)]
    batches = list(calib_inputs)
    if not batches:
        raise HyperquantError("calibration data is empty; give at least one sample of text")
    return batches


def calibration_tokens(batches: list[dict]) -> int:
    """Tokens in the calibration batches (those the attention mask keeps, when there is one)."""
    total = 0
    for batch in batches:
        mask = batch.get("attention_mask")
        ids = batch.get("input_ids")
        total += int(mask.sum()) if mask is not None else (ids.numel() if ids is not None else 0)
    return total


def calibration_minimum(targets: dict[str, nn.Module], plan: Plan) -> tuple[int, str | None]:
    """The fewest calibration tokens the plan can use: a layer's input statistics (Hessian, activation
    fit) are rank-deficient below its input dimension, and GPTQ or the fit then reproduce those few
    tokens exactly while erring everywhere else. Returns (tokens, the layer that needs them)."""
    need, widest = 0, None
    for name, module in targets.items():
        entry = plan[name]
        if kind_of_entry(entry).needs_calibration(entry) and not _shares_head(entry):
            width = linear_weight(module).shape[1]
            if width > need:
                need, widest = width, name
    return need, widest


def check_calibration_size(targets: dict[str, nn.Module], plan: Plan, tokens: int, refuse: bool = True) -> None:
    """Refuse (the command line, before any work) or warn about (the library) too few calibration tokens."""
    need, widest = calibration_minimum(targets, plan)
    if widest is None or tokens >= need:
        return
    message = (f"{tokens} calibration tokens are too few: layer {widest} has {need} inputs, so its statistics "
               f"would be rank-deficient and its in-sample error meaningless; give at least {need} tokens "
               f"(calib_samples x calib_seq_len, e.g. --calib-samples {-(-need // 512)} --calib-seq-len 512)")
    if refuse:
        raise HyperquantError(message)
    logging.getLogger(__name__).warning(message)


def _call_model(model: nn.Module, batch: dict) -> None:
    try:
        model(**batch, use_cache=False)
    except TypeError:  # encoders that take no use_cache
        model(**batch)


def _capture_block_inputs(model: nn.Module, first_block: nn.Module, batches: list[dict]) -> list[tuple | None]:
    """(args, kwargs) with which the model calls its first block, one per batch (None for a batch whose
    forward never reaches it: a text-only batch and a vision encoder)."""
    captured: list[tuple | None] = []

    def hook(_module, args, kwargs):
        captured[-1] = (args, kwargs)
        raise _StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            captured.append(None)
            with contextlib.suppress(_StopForward):
                _call_model(model, batch)
    finally:
        handle.remove()
    return captured


def _run_block(block: nn.Module, inputs: list[tuple]) -> list[tuple]:
    """Run ``block`` on each captured call; return the calls the next block will receive."""
    outputs = []
    for args, kwargs in inputs:
        out = block(*args, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
        outputs.append(((hidden, *args[1:]), kwargs))
    return outputs


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(-1, x.shape[-1]).float()


@torch.no_grad()
def input_covariances(model: nn.Module, modules: dict[str, nn.Module], ids: torch.Tensor | list[dict],
                      batch_size: int = 4) -> dict[str, torch.Tensor]:
    """sum_t x_t x_t^T (float64) of each module's input over one eval-mode pass of ``model`` on ``ids``
    (token ids, or model-input dicts such as image-caption batches; not block-sequential: every module
    sees the model as it is)."""
    covs: dict[str, torch.Tensor] = {}

    def hook_for(name):
        def hook(_module, args):
            x = _flat(args[0])
            xx = (x.T @ x).double().cpu()
            covs[name] = covs[name] + xx if name in covs else xx
        return hook

    handles = [m.register_forward_pre_hook(hook_for(name)) for name, m in modules.items()]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in _batches(ids, batch_size):
            _call_model(model, {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return covs


class _InputStats:
    """Accumulates sum_t x_t x_t^T (float64) of a linear's input.

    Calls past the first ``fit_calls`` are held-out batches: they go to a separate sum the fit never
    sees. With ``original_inputs`` (the inputs the uncompressed model gave this layer, one tensor per
    batch, in the same order) it also accumulates sum_t x_t xo_t^T and sum_t xo_t xo_t^T over the fit
    batches. Layers fed the same tensor (gate/up) share one product through ``shared``, a per-batch cache
    keyed by the tensor.
    """

    def __init__(self, in_features: int, shared: dict, original_inputs: list[torch.Tensor] | None = None,
                 fit_calls: int | None = None, device: torch.device | str = "cpu") -> None:
        # on the device the inputs arrive on (the offload device, or where the model is)
        self.cov = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.shared = shared
        self.original_inputs = original_inputs
        if original_inputs is not None:
            self.cross_cov = torch.zeros_like(self.cov)
            self.original_cov = torch.zeros_like(self.cov)
        self.fit_calls = fit_calls
        self.heldout_cov = None
        self.tokens = self.heldout_tokens = 0
        self.calls = 0

    def __call__(self, _module, args) -> None:
        key = args[0].data_ptr()
        if key not in self.shared:
            x = _flat(args[0])
            # Holding args[0] keeps its address from being reused by another tensor in this forward.
            self.shared[key] = (args[0], x, (x.T @ x).double())  # per-batch fp32 sums, accumulated in fp64
        _, x, xx = self.shared[key]
        call, self.calls = self.calls, self.calls + 1
        if self.fit_calls is not None and call >= self.fit_calls:
            self.heldout_cov = xx.clone() if self.heldout_cov is None else self.heldout_cov + xx
            self.heldout_tokens += x.shape[0]
            return
        self.cov += xx
        if self.original_inputs is not None:
            xo = self.original_inputs[call]
            self.cross_cov += (x.T @ xo).double()
            self.original_cov += (xo.T @ xo).double()
        self.tokens += x.shape[0]

    def layer_stats(self) -> LayerStats:
        held = {"heldout_cov": self.heldout_cov, "heldout_tokens": self.heldout_tokens}
        if self.original_inputs is None:
            return LayerStats(self.cov, self.tokens, **held)
        return LayerStats(self.cov, self.tokens, self.cross_cov, self.original_cov, **held)


def _input_groups(block: nn.Module, names: list[str], first_call: tuple) -> list[list[str]]:
    """Partition the block's targets into groups fed the same tensor, in execution order (gate+up, down),
    by running the block once on one batch."""
    order: list[tuple[str, torch.Tensor]] = []  # holding the tensors keeps their addresses unique
    handles = [
        block_module.register_forward_pre_hook(lambda _m, args, name=name: order.append((name, args[0])))
        for name, block_module in names
    ]
    try:
        _run_block(block, [first_call])
    finally:
        for h in handles:
            h.remove()
    groups: dict[int, list[str]] = {}
    for name, tensor in order:
        if name not in groups.setdefault(tensor.data_ptr(), []):
            groups[tensor.data_ptr()].append(name)
    return list(groups.values())


def _run_original_block(block: nn.Module, names: list[str], prefix: str, inputs: list[tuple]):
    """Run an untouched copy of ``block`` on the original model's stream; return the next block's
    original inputs and, per target, the inputs it received (one flattened tensor per batch)."""
    original = copy.deepcopy(block)
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    handles = [
        original.get_submodule(name[len(prefix):]).register_forward_pre_hook(
            lambda _m, args, name=name: seen[name].append(_flat(args[0])))
        for name in names
    ]
    try:
        next_inputs = _run_block(original, inputs)
    finally:
        for h in handles:
            h.remove()
    return next_inputs, seen


def round_rest(model: nn.Module, compressed: set[str], dtype_name: str) -> None:
    """Round the weights hyperquant leaves alone to their storage dtype, so the in-memory model is
    exactly the one `hyperquant.load` rebuilds."""
    if dtype_name == "float32":
        return
    dtype = getattr(torch, dtype_name)
    with torch.no_grad():
        for name, param in model.named_parameters():
            owner = name.rpartition(".")[0]
            if owner in compressed or not param.is_floating_point():
                continue
            param.copy_(param.to(dtype).to(param.dtype))


@chooses("calibration")
def compress(
    model: nn.Module,
    config: CompressConfig,
    calib_inputs: torch.Tensor | Iterable[dict] | None = None,
    batch_size: int = 8,
    progress: bool = True,
    plan: Plan | None = None,
    heldout_inputs: torch.Tensor | Iterable[dict] | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Compress the selected linears of ``model`` in place, as ``config`` (or an explicit ``plan``,
    {module name: plan entry}) says; return the model.

    ``calib_inputs``: token ids (samples, seq_len) or an iterable of model-input dicts; needed for GPTQ,
    the activation-aware PHM fit and other kinds that calibrate. ``heldout_inputs`` (same form, never
    fitted on) go through the same sequential passes so that every layer's output error is also measured
    on them (``output_error_heldout``). The per-layer log is at
    ``model.hyperquant_log``; the plan is stored in ``model.config.hyperquant["plan"]``.

    ``device``: where the calibration runs when it is not where the model is (a CUDA device for a model
    on the CPU). The model stays where it is and its blocks visit the device one at a time
    (`hyperquant.offload`), so device memory holds one block, the calibration activations and the
    parts outside the blocks; each layer's record has the block's peak device memory on CUDA.
    """
    model.eval()
    plan = resolve_plan(model, config) if plan is None else plan
    work = {name: entry for name, entry in plan.items() if kind_of_entry(entry).replaces_module}
    targets = {name: model.get_submodule(name) for name in work}
    log: list[dict] = []
    start = time.perf_counter()
    with torch.no_grad(), _progress(progress) as bar:
        if plan_needs_calibration(work):
            if calib_inputs is None:
                raise HyperquantError(
                    "this configuration needs calibration data (GPTQ, activation-aware PHM or the Fourier "
                    "method's channel scales); pass calib_inputs, or use method='rtn' with init='frobenius' "
                    "(fourier: diag_calibration=False)"
                )
            batches = _batches(calib_inputs, batch_size)
            check_calibration_size(targets, work, calibration_tokens(batches), refuse=False)
            heldout = _batches(heldout_inputs, batch_size) if heldout_inputs is not None else []
            with offloaded(model, device) as offload:
                if offload is not None:
                    batches, heldout = to_device(batches, offload.device), to_device(heldout, offload.device)
                _compress_sequential(model, targets, work, batches, heldout, log, bar, config.true_sequential,
                                     offload)
                if offload is not None:
                    model.hyperquant_offload = {"device": str(offload.device), "peak_blocks": offload.peak_blocks}
        else:
            task = bar.add_task("compressing layers", total=len(targets)) if bar else None
            for name, module in targets.items():
                new, record = _build_layer(model, name, module, work[name], None)
                set_module(model, name, new)
                targets[name] = new
                log.append(record)
                if bar:
                    bar.advance(task)
    # modules compressed before this call (training's FFN) keep their tensors as they are, too
    already = {name for name, module in model.named_modules() if kind_of(module) is not None}
    round_rest(model, set(targets) | already, config.rest_dtype)
    _untie_compressed(model, set(targets))
    model.config.hyperquant = {
        "format_version": FORMAT_VERSION,
        "compress_config": config.to_dict(),
        "plan": plan_to_dict(plan),
    }
    model.hyperquant_log = log
    # the time goes to the log and summary, not config.json: the same command gives the same checkpoint
    model.hyperquant_seconds = time.perf_counter() - start
    return model


def _untie_compressed(model: nn.Module, compressed: set[str]) -> None:
    """A tied embedding / LM head pair of which one side was replaced is no longer tied: say so in the
    config, so that `load` (and transformers' tie_weights) leaves each side its own weights."""
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return
    embed, head = input_embedding_name(model), output_embedding_name(model)
    if head is None or embed in compressed or head in compressed:
        config.tie_word_embeddings = False


@contextlib.contextmanager
def _progress(enabled: bool):
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=False) as bar:
        yield bar


def _split_by_block(targets) -> tuple[dict[str, dict[int, list[str]]], list[str]]:
    """({block list name: {block index: targets in it}}, targets outside any block, e.g. the LM head). A
    vision-language model has two block lists (the vision encoder's and the language model's)."""
    lists: dict[str, dict[int, list[str]]] = {}
    tail: list[str] = []
    for name in targets:
        try:
            list_name, idx = block_index(name)
        except HyperquantError:
            tail.append(name)
            continue
        lists.setdefault(list_name, {}).setdefault(idx, []).append(name)
    return lists, tail


def _forward_order(model: nn.Module, list_names: list[str], batches: list[dict]) -> list[str]:
    """The block lists in the order the model's forward reaches them (the vision encoder before the
    language model), from the first batch that reaches them all (a text-only batch skips the vision
    encoder)."""
    if len(list_names) < 2:
        return list_names
    order: list[str] = []
    seen: set[str] = set()
    handles = [model.get_submodule(name)[0].register_forward_pre_hook(
        lambda _m, _args, name=name: order.append(name) if name not in order else None) for name in list_names]
    try:
        for batch in batches:
            order.clear()
            _call_model(model, batch)
            seen.update(order)
            if len(order) == len(list_names):
                return list(order)
    finally:
        for h in handles:
            h.remove()
    missing = [name for name in list_names if name not in seen]
    raise HyperquantError(f"no calibration batch reaches {missing[0] if missing else 'every block list'} (a vision "
                          f"tower runs only on batches with images): give image-caption calibration data")


def _compress_tail(model, targets, names: list[str], plan: Plan, batches, heldout, log, bar, layer_task,
                   stop_at: nn.Module | None = None) -> None:
    """Targets outside the blocks (the LM head; a vision-language model's projector): calibrated on the
    whole model as compressed so far, so they see the errors of every block before them. ``stop_at``: a
    module before which the forward can stop (the language model, for the projector)."""
    shared: dict = {}
    stats = {name: _InputStats(linear_weight(targets[name]).shape[1], shared,
                               device=linear_weight(targets[name]).device) for name in names}
    handles = [targets[n].register_forward_pre_hook(stats[n]) for n in names]
    output = getattr(model, "get_output_embeddings", lambda: None)()
    if output is not None and any(targets[n] is output for n in names):
        stop_at = output  # the head is the last layer: its inputs are all we need, not the logits
    if stop_at is not None:
        def stop(_module, _args):
            raise _StopForward

        handles.append(stop_at.register_forward_pre_hook(stop))
    try:
        for i, batch in enumerate([*batches, *heldout]):
            if i == len(batches):  # a projector sees only the batches with images: count the calls
                for s in stats.values():
                    s.fit_calls = s.calls
            with contextlib.suppress(_StopForward):
                _call_model(model, batch)
            shared.clear()
    finally:
        for h in handles:
            h.remove()
    _replace_calibrated(model, targets, names, plan, stats, None, log, bar, layer_task)


def _replace_calibrated(model, targets, names, plan: Plan, stats: dict, block: int | None, log, bar,
                        layer_task) -> None:
    """Compress each of ``names`` from its collected input statistics and put it in place."""
    for name in names:
        if stats[name].tokens == 0:
            raise HyperquantError(f"layer {name} saw no calibration tokens; check the model's forward")
        new, record = _build_layer(model, name, targets[name], plan[name], stats[name].layer_stats())
        record["block"], record["calib_tokens"] = block, stats[name].tokens
        set_module(model, name, new)
        targets[name] = new  # the dense layer is freed now, not when compress returns
        log.append(record)
        if bar:
            bar.update(layer_task, advance=1, description=f"quantizing {name}")


def _compress_sequential(model, targets, plan: Plan, batches, heldout, log, bar, true_sequential: bool,
                         offload: BlockOffload | None = None) -> None:
    lists, tail = _split_by_block(targets)
    layer_task = bar.add_task("quantizing layers", total=len(targets)) if bar else None
    # Outside the blocks, what needs no calibration (an embedding table of its own) goes first, so that
    # the blocks calibrate on the embeddings the compressed model will have; a table that is the LM
    # head's codes goes last, after the head.
    built_from_head = [n for n in tail if _shares_head(plan[n])]
    first = [n for n in tail if n not in built_from_head and not kind_of_entry(plan[n]).needs_calibration(plan[n])]
    tail = [n for n in tail if n not in built_from_head and n not in first]

    def without_calibration(names):
        for name in names:
            new_module, record = _build_layer(model, name, targets[name], plan[name], None)
            set_module(model, name, new_module)
            targets[name] = new_module
            log.append(record)
            if bar:
                bar.update(layer_task, advance=1, description=f"quantizing {name}")

    without_calibration(first)
    # A vision-language model's projector runs between the vision encoder and the language model.
    from hyperquant.multimodal.towers import find_towers

    towers = find_towers(model)
    projector = [n for n in tail if towers is not None and towers.tower_of(n) in ("vision", "projector")]
    tail = [n for n in tail if n not in projector]
    # each block list is calibrated on what the compressed towers before it give it
    for list_name in _forward_order(model, list(lists), batches):
        if projector and towers.tower_of(list_name) == "language":
            _compress_tail(model, targets, projector, plan, batches, heldout, log, bar, layer_task,
                           stop_at=model.get_submodule(towers.language))
            projector = []
        _compress_blocks(model, targets, plan, batches, heldout, log, bar, true_sequential, list_name,
                         lists[list_name], layer_task, offload)
    if projector:
        _compress_tail(model, targets, projector, plan, batches, heldout, log, bar, layer_task,
                       stop_at=model.get_submodule(towers.language))
    if tail:
        _compress_tail(model, targets, tail, plan, batches, heldout, log, bar, layer_task)
    without_calibration(built_from_head)


def _shares_head(entry) -> bool:
    return getattr(entry, "share_head", False)


def _build_layer(model: nn.Module, name: str, module: nn.Module, entry, stats):
    """compress_layer, except for a table built from the already compressed LM head (a tied model)."""
    if not _shares_head(entry):
        return compress_layer(name, module, entry, stats)
    start = time.perf_counter()
    head_name = output_embedding_name(model)
    output = model.get_submodule(head_name)
    record = {"name": name, "in_features": module.weight.shape[1], "out_features": module.weight.shape[0],
              **entry.to_dict()}
    new = kind_of_entry(entry).build_shared(module.weight.detach().float(), output, head_name, record)
    record["time_s"] = time.perf_counter() - start
    return new, record


def _compress_blocks(model, targets, plan: Plan, batches, heldout, log, bar, true_sequential: bool,
                     list_name: str, by_block: dict[int, list[str]], layer_task,
                     offload: BlockOffload | None = None) -> None:
    blocks = model.get_submodule(list_name)
    captured = _capture_block_inputs(model, blocks[0], [*batches, *heldout])
    fit = [c for c in captured[: len(batches)] if c is not None]
    if not fit:
        raise HyperquantError(f"no calibration batch reaches {list_name} (a vision tower runs only on batches "
                              f"with images): give image-caption calibration data")
    inputs = fit + [c for c in captured[len(batches):] if c is not None]  # held-out calls come last
    fits_original = any(getattr(entry, "fits_original_outputs", False) for entry in plan.values())
    original_inputs = inputs if fits_original else None
    last = max(by_block)
    block_task = bar.add_task(f"calibrating {list_name}", total=last + 1) if bar else None
    device = offload.device if offload is not None else next(blocks[0].parameters()).device
    on_cuda = device.type == "cuda"
    for idx in range(last + 1):
        block = blocks[idx]
        first_record = len(log)
        if on_cuda:
            torch.cuda.reset_peak_memory_stats(device)
        with offload.resident(block) if offload is not None else contextlib.nullcontext():
            inputs, original_inputs = _calibrate_block(model, targets, plan, block, idx, list_name, by_block, inputs,
                                                       original_inputs, len(fit), idx < last, log, bar, layer_task,
                                                       true_sequential)
        if on_cuda:
            for record in log[first_record:]:
                record["block_peak_device_bytes"] = torch.cuda.max_memory_allocated(device)
        if bar:
            bar.advance(block_task)


def _calibrate_block(model, targets, plan: Plan, block: nn.Module, idx: int, list_name: str, by_block, inputs,
                     original_inputs, fit_calls: int, more: bool, log, bar, layer_task, true_sequential: bool):
    """Calibrate and replace block ``idx``'s targets; return the next block's inputs (compressed and
    original streams)."""
    pending = list(by_block.get(idx, []))
    seen_original = {}
    if original_inputs is not None:
        original_inputs, seen_original = _run_original_block(block, pending, f"{list_name}.{idx}.", original_inputs)
    if true_sequential and pending:
        groups = _input_groups(block, [(n, targets[n]) for n in pending], inputs[0])
    else:
        groups = [pending] if pending else []
    for group in groups:
        shared: dict = {}
        stats = {name: _InputStats(linear_weight(targets[name]).shape[1], shared, seen_original.get(name),
                                   fit_calls=fit_calls, device=linear_weight(targets[name]).device)
                 for name in group}

        def clear_shared(_module, _args, _out, shared=shared):
            shared.clear()  # inputs of one batch only: tensor addresses are reused later

        handles = [targets[n].register_forward_pre_hook(stats[n]) for n in group]
        handles.append(block.register_forward_hook(clear_shared))
        try:
            _run_block(block, inputs)
        finally:
            for h in handles:
                h.remove()
        _replace_calibrated(model, targets, group, plan, stats, idx, log, bar, layer_task)
    if more:
        inputs = _run_block(block, inputs)
    return inputs, original_inputs

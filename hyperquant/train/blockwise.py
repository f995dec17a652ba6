"""Block-wise distillation, the cheap first stage before end-to-end KD (as AQLM, QuIP# and OmniQuant
reconstruct block by block): each decoder block's PHM layers are trained to reproduce the dense block's
output on cached inputs from the already trained (compressed) blocks before it.

Block i sees the hidden states that blocks 0..i-1 give at alpha = 1 (their PHM branch, as trained just
before), its target is the dense block on those same inputs, and its loss a relative squared error, each
block's error measured by the same on held-out rows before and after its training. A block whose training
did not lower the error on its fit rows keeps its initial factors. The errors:

- "token": the mean over tokens of ||phm_t - dense_t||^2 / ||dense_t||^2. The next block reads each token
  through an RMSNorm, i.e. scaled to unit RMS, so this is the error it sees.
- "whole": ||phm - dense||^2 / ||dense||^2 over the whole batch. In the middle blocks of the default model
  the first token of a row (the attention sink) holds 90-99 % of the hidden states' squared norm (a
  "massive activation" of ~22,000 against a median token norm of ~160), so this loss is almost only that
  token's error.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable

import torch
from torch import nn

from hyperquant.convert import block_index
from hyperquant.pipeline import _capture_block_inputs, _run_block
from hyperquant.textsets import chooses
from hyperquant.train.config import BLOCKWISE_ERRORS
from hyperquant.train.interp import InterpolatedLinear, interpolated_layers

log = logging.getLogger(__name__)


def _hidden(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _set_alpha(layers: list[InterpolatedLinear], alpha: float) -> None:
    for layer in layers:
        layer.alpha = alpha


def error_terms(out: torch.Tensor, target: torch.Tensor, error: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(numerator, denominator) of the relative error ``error`` of ``out`` against ``target`` (..., hidden):
    summed over batches, numerator / denominator is the error of all of them together."""
    diff, ref = (out - target).pow(2).sum(-1), target.pow(2).sum(-1)
    if error == "token":
        return (diff / ref.clamp_min(1e-30)).sum(), torch.tensor(float(diff.numel()), device=diff.device)
    return diff.sum(), ref.sum()


@torch.no_grad()
def _relative_error(block: nn.Module, inputs: list[tuple], targets: list[torch.Tensor], error: str) -> float:
    num = den = 0.0
    for (args, kwargs), target in zip(inputs, targets):
        a, b = error_terms(_hidden(block(*args, **kwargs)).float(), target, error)
        num, den = num + float(a), den + float(b)
    return num / max(den, 1e-30)


@chooses("the block-wise stage")
def blockwise_stage(model: nn.Module, fit_ids: torch.Tensor, heldout_ids: torch.Tensor, steps: int, lr: float,
                    batch_size: int = 4, progress=None, error: str = "token",
                    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> list[dict]:
    """Train each block's interpolated layers (their PHM factors, at alpha = 1) for ``steps`` Adam steps
    on ``fit_ids``, block by block, on the relative error ``error`` ("token" or "whole"), keeping the trained
    factors when they lower the error on ``fit_ids`` (else the initial ones); returns one record per block
    with its held-out error before, after training, and as kept. Every layer's alpha is 0 again afterwards (the
    end-to-end schedule sets it). ``autocast``: the context the forwards run in (the training's mixed
    precision); the errors and the loss are computed in fp32."""
    if error not in BLOCKWISE_ERRORS:
        raise ValueError(f"error={error!r} must be one of {BLOCKWISE_ERRORS}")
    layers = interpolated_layers(model)
    by_list: dict[str, dict[int, list[InterpolatedLinear]]] = {}
    for name, layer in layers.items():
        list_name, idx = block_index(name)
        by_list.setdefault(list_name, {}).setdefault(idx, []).append(layer)
    if not by_list:
        return []
    was_training = model.training
    model.eval()  # no dropout, and no reconstruction bookkeeping in the layers
    everything = list(layers.values())
    _set_alpha(everything, 0.0)

    from hyperquant.evals.perplexity import model_device

    device = model_device(model)

    def batches(ids):
        return [{"input_ids": ids[i : i + batch_size].to(device)} for i in range(0, len(ids), batch_size)]

    # The blocks the text rows reach: a vision-language model's vision encoder runs only on images, so its
    # layers are left to the end-to-end steps.
    with torch.no_grad():
        for list_name in list(by_list):
            fit = _capture_block_inputs(model, model.get_submodule(list_name)[0], batches(fit_ids))
            if all(call is not None for call in fit):
                break
            log.info("block-wise stage: %s is not reached by text rows; its layers train end to end only", list_name)
        else:
            _set_alpha(everything, 0.0)
            model.train(was_training)
            return []
        held = _capture_block_inputs(model, model.get_submodule(list_name)[0], batches(heldout_ids))
    blocks, by_block = model.get_submodule(list_name), by_list[list_name]
    records = []
    try:
        with autocast():
            _train_blocks(blocks, by_block, fit, held, steps, lr, error, records, progress)
    finally:
        _set_alpha(everything, 0.0)
        model.train(was_training)
    return records


def _train_blocks(blocks: nn.ModuleList, by_block: dict[int, list[InterpolatedLinear]], fit: list[tuple],
                  held: list[tuple], steps: int, lr: float, error: str, records: list[dict], progress) -> None:
    """The stage's loop over the blocks in order (see `blockwise_stage`), appending to ``records``."""
    for idx in range(max(by_block) + 1):
        block, trained = blocks[idx], by_block.get(idx, [])
        if trained:
            start = time.perf_counter()
            _set_alpha(trained, 0.0)
            with torch.no_grad():  # the dense block on the compressed prefix's outputs
                fit_targets = [_hidden(block(*a, **k)).float() for a, k in fit]
                held_targets = [_hidden(block(*a, **k)).float() for a, k in held]
            _set_alpha(trained, 1.0)
            before = _relative_error(block, held, held_targets, error)
            fit_before = _relative_error(block, fit, fit_targets, error)
            params = [p for layer in trained for p in layer.phm.parameters() if p.requires_grad]
            initial = [p.detach().clone() for p in params]
            optimizer = torch.optim.Adam(params, lr=lr)
            losses = []
            for step in range(steps):
                args, kwargs = fit[step % len(fit)]
                target = fit_targets[step % len(fit)]
                out = _hidden(block(*args, **kwargs)).float()
                num, den = error_terms(out, target, error)
                loss = num / den.clamp_min(1e-30)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
            trained_error = _relative_error(block, held, held_targets, error)
            # Adam moves by about lr a step even where the fit is already near exact (block 0 with n^2 bases:
            # 1.5e-5 -> 3.3e-4), so the block keeps its initial factors when training did not lower the
            # error on its fit rows (the decision never reads the held-out rows it reports)
            keep_initial = _relative_error(block, fit, fit_targets, error) > fit_before
            if keep_initial:
                with torch.no_grad():
                    for p, p0 in zip(params, initial):
                        p.copy_(p0)
            after = before if keep_initial else trained_error
            log.info("block-wise stage: block %d/%d, held-out error %.4f -> %.4f%s (%.1f s)", idx + 1,
                     max(by_block) + 1, before, trained_error, ", initial kept" if keep_initial else "",
                     time.perf_counter() - start)
            records.append({"block": idx, "layers": len(trained), "steps": steps,
                            "heldout_error_before": before, "heldout_error_trained": trained_error,
                            "kept": "initial" if keep_initial else "trained", "heldout_error_after": after,
                            "fit_loss_first": losses[0] if losses else None,
                            "fit_loss_last": losses[-1] if losses else None,
                            "time_s": time.perf_counter() - start})
        with torch.no_grad():  # the next block's inputs: this block as compressed
            fit, held = _run_block(block, fit), _run_block(block, held)
        if progress is not None:
            progress(idx + 1, len(blocks))

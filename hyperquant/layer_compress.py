"""Compressing one linear as its plan entry says (the kind builds the module), with the generic error
accounting every kind shares."""

from __future__ import annotations

import time

import torch
from torch import nn

from hyperquant.convert import linear_bias, linear_weight
from hyperquant.device import memory_now
from hyperquant.errors import HyperquantError
from hyperquant.kinds import LayerStats, PlanEntry, kind_of_entry
from hyperquant.phm.projection import relative_error_to_original, relative_output_error


def compress_layer(name: str, module: nn.Module, entry: PlanEntry, stats: LayerStats | None) -> tuple[nn.Module, dict]:
    """The replacement of ``module`` and its log record.

    Errors are relative: output errors are sum_t ||W x_t - W' x_t||^2 / sum_t ||W x_t||^2 over the
    calibration tokens the fit saw (``output_error``) and over held-out ones (``output_error_heldout``,
    when the statistics carry them); ``output_error_to_original`` compares with the uncompressed model's layer output.
    """
    start = time.perf_counter()
    weight = linear_weight(module).float()
    bias = linear_bias(module)
    for what, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and not torch.isfinite(tensor).all():
            raise HyperquantError(f"layer {name}: its {what} holds NaN or Inf; the model is damaged, so there "
                                  f"is nothing sound to compress (check the model file)")
    out_f, in_f = weight.shape
    record: dict = {"name": name, "in_features": in_f, "out_features": out_f, **entry.to_dict()}
    new = kind_of_entry(entry).build(entry, weight, bias, stats, record)
    if stats is not None and hasattr(new, "effective_weight"):
        effective = new.effective_weight()
        record["output_error"] = relative_output_error(weight, effective, stats.input_cov)
        if stats.heldout_cov is not None:
            record["output_error_heldout"] = relative_output_error(weight, effective, stats.heldout_cov)
            record["heldout_tokens"] = stats.heldout_tokens
        if stats.cross_cov is not None:
            record["output_error_to_original"] = relative_error_to_original(
                weight, effective, stats.input_cov, stats.cross_cov, stats.original_cov)
    record["time_s"] = time.perf_counter() - start
    record.update(memory_now())  # where the peak of a run happens (bench_memory reads these)
    return new.to(module.weight.device), record

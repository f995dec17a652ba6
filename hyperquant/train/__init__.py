"""Progressive PHM training: residual interpolation dense -> PHM, distillation, QAT on A_cat, Fisher
capacity assignment and LoRA on attention, on accelerate; exports a `hyperquant.load`-able checkpoint.

Public API: ``TrainConfig``, ``train(model_dir_or_None, cfg)``, ``train_command(model, config)``,
``assign_capacity``, ``InterpolatedLinear``, ``FakeQuantizer``, ``fake_quantize``, ``kd_loss``,
``causal_lm_loss``, ``finalize``.
"""

from hyperquant.train.capacity import CapacityPlan, allocate, assign_capacity, fisher_traces
from hyperquant.train.cli import train_command
from hyperquant.train.config import TrainConfig
from hyperquant.train.export import finalize
from hyperquant.train.fakequant import FakeQuantizer, fake_quantize
from hyperquant.train.interp import InterpolatedLinear, drop_dense, fixed_alpha, layer_alpha, set_alphas
from hyperquant.train.losses import causal_lm_loss, kd_loss
from hyperquant.train.runner import prepare_model, train

__all__ = [
    "CapacityPlan",
    "FakeQuantizer",
    "InterpolatedLinear",
    "TrainConfig",
    "allocate",
    "assign_capacity",
    "causal_lm_loss",
    "drop_dense",
    "fake_quantize",
    "finalize",
    "fisher_traces",
    "fixed_alpha",
    "kd_loss",
    "layer_alpha",
    "prepare_model",
    "set_alphas",
    "train",
    "train_command",
]

"""The training behind `hyperquant compress` (PHM layers are trained by default).

The recipe is TrainConfig's defaults; `compress_train_config` only adds what the command says: the
CompressConfig of the layers, the time budget, the work folder and QAT (which starts at 60 % of the steps
and exports on the QAT grid, RTN, so the checkpoint computes what was trained).
"""

from __future__ import annotations

import dataclasses

from hyperquant.config import CompressConfig, ConfigError
from hyperquant.train.config import TrainConfig

DEFAULT_MINUTES = 30.0
DEFAULT_STEPS = TrainConfig.max_steps
QAT_START_FRACTION = 0.6


def compress_train_config(cfg: CompressConfig, output_dir: str, minutes: float | None = DEFAULT_MINUTES,
                          qat: bool = False, overrides: dict | None = None) -> TrainConfig:
    """The TrainConfig that trains the PHM layers ``cfg`` describes for about ``minutes`` of steps
    (None: exactly DEFAULT_STEPS, or overrides['max_steps']), then quantizes them as ``cfg`` says."""
    if cfg.n < 2:
        raise ConfigError("training applies to PHM layers (n >= 2); dense quantization (n=1) has nothing to train")
    if cfg.learn_bases or cfg.init != "activation":
        raise ConfigError("training starts from the activation-aware fit with fixed bases; "
                          "drop --learn-bases / --init frobenius, or pass --no-train")
    if qat and cfg.bits is None:
        raise ConfigError("--qat needs --bits")
    if minutes is not None and minutes <= 0:
        raise ConfigError(f"--train-minutes={minutes} must be > 0")
    values = {
        "compress": dataclasses.replace(cfg, method="rtn") if qat else cfg,
        "max_minutes": minutes,
        "qat_start_step": round(QAT_START_FRACTION * DEFAULT_STEPS) if qat else None,
        "output_dir": output_dir,
        "progress": True,
    }
    values.update(overrides or {})
    return TrainConfig.from_dict(values)

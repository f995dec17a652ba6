"""The training recipe behind `hyperquant compress` (PHM layers are trained by default).

`compress_train_config` maps a CompressConfig (what the user asked for: n, B, bits, group size, GPTQ or
RTN) and a time budget onto a TrainConfig. The step-valued options below describe the schedule's
shape for DEFAULT_STEPS; a budgeted run stretches or shrinks it to the steps that fit
(`TrainConfig.scaled_to`).
"""

from __future__ import annotations

from hyperquant.config import CompressConfig, ConfigError
from hyperquant.train.config import TrainConfig

DEFAULT_MINUTES = 30.0
DEFAULT_STEPS = 100

# Distillation from the dense model, PHM branch faded in over the first 30 % of the steps (cosine,
# bottom-up stagger), then PHM-only (Stage B) with KD from a frozen dense copy and a light
# reconstruction term. With --qat, fake-quantization of A_cat starts at 60 % and the export uses
# the QAT grid (RTN) so the checkpoint computes what was trained.
RECIPE = {
    "seq_len": 256,
    "per_device_batch_size": 4,
    "lr": 5e-4,
    "warmup_steps": 5,
    "lr_schedule": "cosine",
    "alpha_schedule": "cosine",
    "fade_steps": 30,
    "stagger": 0.5,
    "teacher": "separate",
    "kd_weight": 1.0,
    "kd_temperature": 4.0,
    "recon_weight": 0.1,
    "init_samples": 16,
    "eval_every": 0,
    "save_every": 10,
}
QAT_START_FRACTION = 0.6
# Training text: up to this many seq_len sequences of the calibration split (512k tokens; a 30-minute
# CPU run reads about a third of it, so no sequence is seen twice).
TRAIN_SEQUENCES = 2048


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
    steps = DEFAULT_STEPS
    values = {
        **RECIPE,
        "max_steps": steps,
        "max_minutes": minutes,
        "train_samples": TRAIN_SEQUENCES,
        "n": cfg.n,
        "num_bases": cfg.num_bases,
        "layer_bases": dict(cfg.layer_bases),
        "ridge": cfg.ridge,
        "target_patterns": cfg.target_patterns,
        "bits": cfg.bits,
        "group_size": cfg.group_size,
        "symmetric": cfg.symmetric,
        "export_method": "rtn" if qat else cfg.method,
        "qat_start_step": round(QAT_START_FRACTION * steps) if qat else None,
        "rest_dtype": cfg.rest_dtype,
        "output_dir": output_dir,
        "progress": True,
    }
    values.update(overrides or {})
    return TrainConfig.from_dict(values)

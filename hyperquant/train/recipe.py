"""The training behind `hyperquant compress` (PHM layers are trained by default).

The recipe is TrainConfig's defaults plus ``COMPRESS_RECIPE`` (the distillation data and the block-wise
first stage, chosen with scripts/bench_distill.py: see that table in docs/bench_distill); the user's
--train-config overrides both. `compress_train_config` adds what the command says: the CompressConfig of
the layers, the budget, the work folder and QAT (which starts at 60 % of the steps and exports on the QAT
grid, RTN, so the checkpoint computes what was trained).

The budget is a number of training tokens by default: seeded, the same command gives the same model on
any machine. A time budget (``--train-minutes``) fits as many steps as the machine manages, so its
result depends on the machine and its load.
"""

from __future__ import annotations

import dataclasses

from hyperquant.config import CompressConfig, ConfigError
from hyperquant.train.config import TrainConfig

DEFAULT_STEPS = TrainConfig.max_steps  # the step count the recipe's schedule is stated for
# 200 optimizer steps of 4 x 256 tokens (204,800): for the default model on 2 CPU cores 8-15 s a step in
# fp32 (30-50 minutes of steps), 3-5 s in bf16 on a CPU with AMX (13 minutes)
DEFAULT_TOKENS = DEFAULT_STEPS * TrainConfig.per_device_batch_size * TrainConfig.grad_accum_steps * TrainConfig.seq_len
QAT_START_FRACTION = 0.6
# Text-only training relearns the calibration text's domain. Half the rows sampled from the dense model
# (LLM-QAT's data-free distillation) and a block-wise first stage (then 72 Adam steps per block on 96 rows)
# scored best on the Python docs at 25,600 tokens (a validation set: the test set, hyperquant.textsets, was
# never read by these choices): Python docs 311 against 1,169 for text alone, with
# Wikipedia better too (215 against 235). LLM-QAT's objective on top, the teacher's distribution at T = 1
# and no cross-entropy on the rows' own tokens (which pulls towards the text's domain), scored 278 / 208
# there, and the block-wise stage on each token's error (TrainConfig's blockwise_error default) 256 / 197;
# docs/bench_distill. Not applied to vision-language models, where it was not measured (their training
# rows are text plus image-caption pairs).
# Capacity: a mean of num_bases + 1 bases per FFN linear (the paper's budget, num_bases + 1/3, left the docs
# at 4.4x the original's perplexity at 204,800 tokens), spent where a measured KL says the PHM fit costs most
# (capacity_cost "kl": the first ten blocks' FFN and the last ones'; the Fisher trace ranks layers otherwise),
# never fewer bases than num_bases; 40 of the default model's 90 FFN linears then get n^2 bases and export
# as dense GPTQ layers. The block-wise stage at 200 steps per block on 256 rows, and no fade (the block-wise
# stage has already fitted every block at alpha = 1): at 25,600 tokens each of these three, against the
# recipe of the morning of 2026-12-07, scored 74 (budget num_bases + 2/3), 79 and 87 on the docs against
# 98; together, at 204,800 tokens, 27.7 / 36.2 (Wikipedia / docs, 2.4x the original there) against
# 49.8 / 64.9, for 64.9 MB against 57.6 (docs/bench_distill/tokens-204800 and tokens-25600).
# bf16 where the processor multiplies it natively (mixed_precision "auto"): the same figures 1.7x faster on
# an AMX CPU (docs/bench_distill/precision-25600).
COMPRESS_RECIPE = {"generated_fraction": 0.5, "blockwise_steps": 200, "blockwise_samples": 256,
                   "ce_weight": 0.0, "kd_temperature": 1.0, "mixed_precision": "auto",
                   "capacity": "knapsack", "capacity_cost": "kl", "capacity_budget": "num_bases+1",
                   "capacity_min_bases": "num_bases", "capacity_max_bases": "n^2", "fade_steps": 0}


def tokens_per_step(tcfg: TrainConfig) -> int:
    return tcfg.per_device_batch_size * tcfg.grad_accum_steps * tcfg.seq_len


def compress_train_config(cfg: CompressConfig, output_dir: str, minutes: float | None = None,
                          qat: bool = False, overrides: dict | None = None,
                          tokens: int | None = DEFAULT_TOKENS, vision_language: bool = False) -> TrainConfig:
    """The TrainConfig that trains the PHM layers ``cfg`` describes on ``tokens`` training tokens (the
    recipe's schedule scaled to the steps they make), or for about ``minutes`` of steps (a time budget:
    not reproducible), then quantizes them as ``cfg`` says. With neither, or when ``overrides`` sets
    max_steps, the steps are the overrides' / the recipe's."""
    if cfg.n < 2:
        raise ConfigError("training applies to PHM layers (n >= 2); dense quantization (n=1) has nothing to train")
    if cfg.learn_bases or cfg.init != "activation":
        raise ConfigError("training starts from the activation-aware fit with fixed bases; "
                          "drop --learn-bases / --init frobenius, or pass --no-train")
    if qat and cfg.bits is None:
        raise ConfigError("--qat needs --bits")
    if minutes is not None and minutes <= 0:
        raise ConfigError(f"--train-minutes={minutes} must be > 0")
    if tokens is not None and tokens <= 0:
        raise ConfigError(f"--train-tokens={tokens} must be > 0")
    values = {
        "compress": dataclasses.replace(cfg, method="rtn") if qat else cfg,
        "max_minutes": minutes,
        "qat_start_step": round(QAT_START_FRACTION * DEFAULT_STEPS) if qat else None,
        "output_dir": output_dir,
        "progress": True,
        **({} if vision_language else COMPRESS_RECIPE),
    }
    values.update(overrides or {})
    tcfg = TrainConfig.from_dict(values)
    if minutes is None and tokens is not None and "max_steps" not in (overrides or {}):
        per_step = tokens_per_step(tcfg)
        if tokens < per_step:
            raise ConfigError(f"--train-tokens={tokens} is less than one step of {per_step} tokens "
                              f"(per_device_batch_size x grad_accum_steps x seq_len); give at least {per_step}")
        tcfg = tcfg.scaled_to(tokens // per_step)
    return tcfg

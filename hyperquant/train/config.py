"""TrainConfig: the typed, validated configuration of a progressive PHM training run (YAML-loadable).

It holds the CompressConfig of the layers it trains (n, B, bits, quantizer of the export, targets, rest
dtype) instead of repeating its fields, and its defaults are the one training recipe: `hyperquant
compress` (which trains by default) and `hyperquant train` without a YAML file train the same way.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hyperquant.config import CompressConfig, ConfigError, from_known_fields

ALPHA_SCHEDULES = ("linear", "cosine")
LR_SCHEDULES = ("constant", "linear", "cosine")
TEACHERS = ("dense", "self", "separate", "none")
EXPORT_METHODS = ("gptq", "rtn")
CAPACITY_METHODS = ("none", "topk", "greedy", "knapsack")
CAPACITY_COSTS = ("fisher", "kl")  # hyperquant.train.capacity
CAPACITY_BOUNDS = ("num_bases", "n^2")  # capacity_min_bases / capacity_max_bases relative to the layers' shape
BUDGET_ABOVE_NUM_BASES = r"num_bases\s*\+\s*(\d+(?:\.\d+)?)"  # capacity_budget relative to compress.num_bases
PAPER_EXTRA_BASES = 1 / 3  # the paper's capacity budget: num_bases + 1/3 bases per layer on average
MIXED_PRECISION = ("no", "bf16", "fp16", "auto")
BLOCKWISE_ERRORS = ("token", "whole")  # hyperquant.train.blockwise.error_terms


@dataclass
class TrainConfig:
    """Everything `hyperquant.train.train` does. Steps count optimizer steps (after accumulation).

    Stage A: each FFN linear computes y = (1 - alpha) dense(x) + alpha phm(x), alpha rising from 0 to 1
    over ``fade_steps`` (per layer, staggered bottom-up by ``stagger``). Stage B, from ``stage_b_step``:
    the dense branches are dropped and only the PHM layers remain. QAT fake-quantizes A_cat from
    ``qat_start_step``. At the end the factors are quantized (``export_method``) and saved.
    """

    # the layers trained and how they are exported (compress.method = the export's quantizer)
    compress: CompressConfig = field(default_factory=CompressConfig)
    # data and optimization
    seq_len: int = 256
    # calibration-split sequences of seq_len tokens used as training text (512k tokens: the default budget
    # reads 40 % of it, so no sequence is seen twice)
    train_samples: int = 2048
    data_seed: int = 0
    # Teacher-generated distillation data (hyperquant.train.generated): this share of the rows the steps
    # read are sequences sampled from the dense model itself (seeded, cached), the rest calibration text.
    generated_fraction: float = 0.0
    generation_temperature: float = 1.0
    generation_top_k: int = 0  # 0: sample from the whole vocabulary
    generation_seed: int = 0
    # sequences sampled at once: decoding 64 rows gives about twice the tokens/s of 16 on 2 CPU cores
    # (the batch sets the order of the generator's draws, so it is part of the cache key)
    generation_batch_size: int = 64
    generation_cache: str | None = None  # folder of the cached samples; None = ~/.cache/hyperquant/generated
    per_device_batch_size: int = 4
    grad_accum_steps: int = 1
    # The schedule's shape is stated for max_steps (200 steps x 1024 tokens: `hyperquant compress`'s
    # default budget); a token budget of another size or a time budget stretches or shrinks it.
    max_steps: int = 200
    # Time budget (minutes) of the optimizer steps. The first step is timed and the run is re-planned to
    # the steps that fit: max_steps and every step-valued option below (warmup, fade, Stage B, QAT start,
    # save/eval intervals) are scaled by the same factor, so the schedule keeps its shape.
    max_minutes: float | None = None
    seed: int = 0
    lr: float = 5e-4
    lora_lr: float | None = None  # None = lr
    weight_decay: float = 0.0
    warmup_steps: int = 10
    lr_schedule: str = "cosine"
    max_grad_norm: float = 1.0  # 0 = no clipping
    # "bf16" (CPU or GPU autocast) / "fp16" (GPU only) / "auto": bf16 where the device multiplies bf16
    # natively (hyperquant.device.fast_bf16: AMX or AVX512-BF16 CPUs, bf16 GPUs), else "no"
    mixed_precision: str = "no"
    device: str = "auto"  # auto (CUDA when visible), cpu, cuda or cuda:<i>; `accelerate launch` sets it per process
    # recompute each decoder block's activations in the backward instead of keeping them (less memory,
    # about a third more compute); the gradients are the same
    gradient_checkpointing: bool = False
    # shard parameters, gradients and AdamW's moments over the processes (torch's fully_shard, one unit per
    # decoder block; train/sharding.py) instead of DDP's whole copy per process
    fsdp: bool = False
    # PHM initialization: the activation-aware fit of compress.init, block by block on the outputs of the
    # already-PHM blocks before it (as `hyperquant compress` calibrates), i.e. fitted for alpha = 1;
    # False: every layer on dense inputs
    init_sequential: bool = True
    # calibration sequences (of seq_len tokens) for the initial fit and the export Hessians; training
    # does not read compress.calib_samples / calib_seq_len
    init_samples: int = 16
    # Block-wise first stage (hyperquant.train.blockwise): before the end-to-end steps, each block's PHM
    # layers train this many Adam steps to reproduce the dense block on the compressed prefix's outputs
    # (0: none), on the first blockwise_samples training rows, batch per_device_batch_size.
    blockwise_steps: int = 0
    blockwise_lr: float = 1e-3
    blockwise_samples: int = 16
    # the block's relative error it trains on and reports: "token" (mean over tokens, what the next block's
    # RMSNorm sees) or "whole" (over the batch, dominated by the first token's massive activations; the
    # error before 2026-12-04, kept to reproduce the rows measured with it)
    blockwise_error: str = "token"
    train_bias: bool = True
    # residual interpolation: the PHM branch fades in over the first 30 % of the steps (cosine, bottom-up
    # stagger), then Stage B keeps only the PHM layers
    alpha_schedule: str = "cosine"
    fade_steps: int = 60
    stagger: float = 0.5  # 0: all layers fade together; s in (0, 1): layer l starts at s * fade * l / (L - 1)
    stage_b_step: int | None = None  # drop the dense branches at this step; None = fade_steps
    # losses: KD from a frozen dense copy and a light reconstruction term
    ce_weight: float = 1.0
    label_smoothing: float = 0.0
    kd_weight: float = 1.0
    kd_temperature: float = 4.0
    kd_ramp: bool = True  # lambda_KD scaled by the mean alpha of the PHM layers
    # "dense": the model's own frozen dense weights at alpha = 0, LoRA off (kept through Stage B; no copy);
    # "self": the same but Stage A only (Stage B frees them); "separate": a second frozen copy of the model
    teacher: str = "dense"
    recon_weight: float = 0.1
    recon_relative: bool = True  # ||phm(x) - dense(x)||^2 / ||dense(x)||^2 instead of the plain mean square
    # QAT on A_cat at compress.bits / group_size / symmetric
    qat_start_step: int | None = None  # None = no QAT
    qat_learn_scales: bool = False
    # capacity assignment (train/capacity.py): how many bases each FFN linear gets
    capacity: str = "none"
    # the cost of B bases: "fisher" (Fisher trace x weight error) or "kl" (measured: the KL of the model with
    # that layer alone replaced by its B-basis fit, on capacity_samples rows the fit did not see)
    capacity_cost: str = "fisher"
    # mean number of bases per FFN linear: a number, or "num_bases+K" (K more than compress.num_bases);
    # None = num_bases + 1/3 (the paper's budget)
    capacity_budget: float | str | None = None
    capacity_topk: int | None = None  # the paper's rule: these many most sensitive layers get B = num_bases + 1
    capacity_samples: int = 8
    # the most and (knapsack and greedy) the fewest bases a layer gets: a number, or "num_bases" or "n^2"
    # (compress.num_bases, compress.n squared: what the layers' shape allows); None = num_bases + 1 and 1
    capacity_max_bases: int | str | None = None
    capacity_min_bases: int | str | None = None
    # LoRA on attention
    lora_r: int = 0  # 0 = no LoRA
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])
    lora_include_o: bool = False
    # runner
    output_dir: str = "hyperquant-train"
    save_every: int = 20  # 0 = only the final checkpoint
    resume: bool = True  # continue from the latest checkpoint in output_dir/checkpoints
    eval_every: int = 0  # 0 = only at the end
    eval_tokens: int = 2048
    eval_context: int = 512
    eval_alphas: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    progress: bool = True
    num_threads: int | None = None  # torch.set_num_threads for this process; None = leave as is
    export: bool = True
    overwrite: bool = True  # replace output_dir/final if it exists

    def __post_init__(self) -> None:
        def need(cond: bool, message: str) -> None:
            if not cond:
                raise ConfigError(message)

        if isinstance(self.compress, dict):
            self.compress = CompressConfig.from_dict(self.compress)
        need(isinstance(self.compress, CompressConfig), "compress must be a mapping of compress options")
        c = self.compress

        positive = ("seq_len", "train_samples", "per_device_batch_size", "grad_accum_steps", "max_steps",
                    "init_samples", "capacity_samples", "eval_tokens", "eval_context")
        for name in positive:
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, f"{name} must be an integer >= 1")
        need(self.seq_len >= 8, "seq_len must be >= 8")
        need(isinstance(self.blockwise_steps, int) and self.blockwise_steps >= 0 and self.blockwise_lr > 0
             and isinstance(self.blockwise_samples, int) and self.blockwise_samples >= 1,
             "blockwise_steps must be an integer >= 0, blockwise_lr > 0 and blockwise_samples >= 1")
        need(self.blockwise_error in BLOCKWISE_ERRORS,
             f"blockwise_error={self.blockwise_error!r} must be one of {list(BLOCKWISE_ERRORS)}")
        need(isinstance(self.generated_fraction, (int, float)) and 0 <= self.generated_fraction <= 1,
             f"generated_fraction={self.generated_fraction} must be in [0, 1] (the share of teacher-generated rows)")
        if self.generated_fraction > 0:
            self.generation_settings(1)  # validates temperature and top_k
        need(self.lr > 0 and (self.lora_lr is None or self.lora_lr > 0), "lr and lora_lr must be > 0")
        need(self.weight_decay >= 0 and self.max_grad_norm >= 0, "weight_decay and max_grad_norm must be >= 0")
        need(self.warmup_steps >= 0, "warmup_steps must be >= 0")
        for name, allowed in (("lr_schedule", LR_SCHEDULES), ("alpha_schedule", ALPHA_SCHEDULES),
                              ("teacher", TEACHERS),
                              ("capacity", CAPACITY_METHODS), ("mixed_precision", MIXED_PRECISION)):
            need(getattr(self, name) in allowed, f"{name}={getattr(self, name)!r} must be one of {list(allowed)}")
        need(isinstance(self.fsdp, bool), "fsdp must be true or false")
        need(not (self.fsdp and self.mixed_precision == "fp16"),
             "fsdp with mixed_precision: fp16 is not supported (its loss scaling is untested on sharded gradients); "
             "use bf16")
        need(c.n >= 2, f"compress.n={c.n} must be >= 2 (training targets PHM layers)")
        need(not c.layers, "compress.layers (per-layer kinds) is not trained; training targets PHM layers only")
        need(not c.learn_bases, "training starts from fixed bases; drop learn_bases")
        need(c.method in EXPORT_METHODS, f"compress.method={c.method!r} must be one of {list(EXPORT_METHODS)}")
        need(self.fade_steps >= 0, "fade_steps must be >= 0")
        need(0.0 <= self.stagger < 1.0, f"stagger={self.stagger} must be in [0, 1)")
        if self.stage_b_step is not None:
            need(self.stage_b_step >= self.fade_steps,
                 f"stage_b_step={self.stage_b_step} must be >= fade_steps={self.fade_steps} (alpha must reach 1)")
        need(self.ce_weight >= 0 and self.kd_weight >= 0 and self.recon_weight >= 0, "loss weights must be >= 0")
        need(self.ce_weight + self.kd_weight + self.recon_weight > 0, "at least one loss weight must be > 0")
        # after Stage B only CE and KD from a teacher that outlives it remain: without them nothing trains
        need(self.ce_weight > 0 or (self.kd_weight > 0 and self.teacher in ("dense", "separate")),
             f"ce_weight=0 with teacher={self.teacher!r} and kd_weight={self.kd_weight} leaves no loss after "
             "Stage B; set ce_weight > 0, or kd_weight > 0 with teacher: dense or separate")
        need(0.0 <= self.label_smoothing < 1.0, "label_smoothing must be in [0, 1)")
        need(self.kd_temperature > 0, "kd_temperature must be > 0")
        if self.qat_start_step is not None:
            need(c.bits is not None, "QAT needs compress.bits (2, 3, 4 or 8)")
            need(0 <= self.qat_start_step <= self.max_steps, "qat_start_step must be in [0, max_steps]")
        need(not self.qat_learn_scales or self.qat_start_step is not None, "qat_learn_scales needs qat_start_step")
        budget = self.capacity_budget
        need(budget is None or (isinstance(budget, (int, float)) and not isinstance(budget, bool))
             or (isinstance(budget, str) and re.fullmatch(BUDGET_ABOVE_NUM_BASES, budget) is not None),
             f"capacity_budget={budget!r} must be a mean number of bases per layer or 'num_bases+K' (e.g. num_bases+1)")
        need(1 <= self.capacity_mean_bases <= c.n * c.n,
             f"capacity_budget={budget!r} is {self.capacity_mean_bases:g} bases per layer; it must be in [1, n^2]")
        for name in ("capacity_max_bases", "capacity_min_bases"):
            value = getattr(self, name)
            need(value is None or value in CAPACITY_BOUNDS or (isinstance(value, int) and not isinstance(value, bool)),
                 f"{name}={value!r} must be a number of bases, {' or '.join(map(repr, CAPACITY_BOUNDS))}")
        low, top = self.capacity_bounds
        need(1 <= top <= c.n * c.n, f"capacity_max_bases={top} must be in [1, n^2={c.n * c.n}]")
        need(1 <= low <= top, f"capacity_min_bases={low} must be in [1, capacity_max_bases={top}]")
        need(self.capacity_cost in CAPACITY_COSTS,
             f"capacity_cost={self.capacity_cost!r} must be one of {list(CAPACITY_COSTS)}")
        if self.capacity_topk is not None:
            need(self.capacity_topk >= 0, "capacity_topk must be >= 0")
        need(self.lora_r >= 0 and self.lora_alpha > 0, "lora_r must be >= 0 and lora_alpha > 0")
        need(bool(self.lora_targets) or self.lora_r == 0, "lora_targets must not be empty")
        need(self.num_threads is None or self.num_threads >= 1, "num_threads must be >= 1 or null")
        need(isinstance(self.device, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device.lower()) is not None,
             f"device={self.device!r} must be auto, cpu, cuda or cuda:<index>")
        need(self.max_minutes is None or self.max_minutes > 0, "max_minutes must be > 0 or null")
        need(self.save_every >= 0 and self.eval_every >= 0, "save_every and eval_every must be >= 0")
        need(all(0.0 <= a <= 1.0 for a in self.eval_alphas), "eval_alphas must lie in [0, 1]")

    @property
    def capacity_bounds(self) -> tuple[int, int]:
        """(fewest, most) bases the capacity assignment may give a layer, the named bounds resolved."""
        c = self.compress
        named = {"num_bases": c.num_bases, "n^2": c.n * c.n}

        def resolve(value, default: int) -> int:
            return default if value is None else named.get(value, value)

        return (resolve(self.capacity_min_bases, 1),
                resolve(self.capacity_max_bases, min(c.num_bases + 1, c.n * c.n)))

    @property
    def capacity_mean_bases(self) -> float:
        """capacity_budget as a mean number of bases per layer (None: num_bases + 1/3, the paper's)."""
        budget, num_bases = self.capacity_budget, self.compress.num_bases
        if budget is None:
            return num_bases + PAPER_EXTRA_BASES
        if isinstance(budget, str):
            return num_bases + float(re.fullmatch(BUDGET_ABOVE_NUM_BASES, budget).group(1))
        return float(budget)

    @property
    def stage_b(self) -> int:
        return self.fade_steps if self.stage_b_step is None else self.stage_b_step

    def generation_settings(self, sequences: int):
        """The GenerationSettings of ``sequences`` teacher-generated rows of seq_len tokens."""
        from hyperquant.train.generated import GenerationSettings

        return GenerationSettings(sequences=sequences, seq_len=self.seq_len, temperature=self.generation_temperature,
                                  top_k=self.generation_top_k, seed=self.generation_seed,
                                  batch_size=self.generation_batch_size)

    def scaled_to(self, max_steps: int) -> TrainConfig:
        """This schedule stretched or shrunk to ``max_steps`` optimizer steps (every step-valued option
        scaled by the same factor; intervals that were on stay >= 1)."""
        factor = max_steps / self.max_steps

        def scale(value: int | None, keep_on: bool = False) -> int | None:
            if value is None:
                return None
            scaled = min(round(value * factor), max_steps)
            return max(scaled, 1) if keep_on and value > 0 else scaled

        fade = scale(self.fade_steps)
        stage_b = scale(self.stage_b_step)
        return self.replace(max_steps=max_steps, warmup_steps=scale(self.warmup_steps), fade_steps=fade,
                            stage_b_step=None if stage_b is None else max(stage_b, fade),
                            qat_start_step=scale(self.qat_start_step),
                            save_every=scale(self.save_every, keep_on=True),
                            eval_every=scale(self.eval_every, keep_on=True))

    SCHEDULE_FIELDS = ("max_steps", "warmup_steps", "fade_steps", "stage_b_step", "qat_start_step", "save_every",
                       "eval_every")

    def schedule(self) -> dict:
        return {name: getattr(self, name) for name in self.SCHEDULE_FIELDS}

    def replanned(self, template: TrainConfig, done: int, max_steps: int) -> TrainConfig:
        """``template`` scaled to ``max_steps``, keeping this schedule's milestones (warmup end, fade end,
        Stage B, QAT start) that step ``done`` has already reached: a re-plan never moves the past."""
        values = template.scaled_to(max_steps).schedule()
        for name in ("warmup_steps", "fade_steps", "qat_start_step"):
            old = getattr(self, name)
            if old is not None and old <= done:
                values[name] = old
        if self.stage_b <= done:
            values["stage_b_step"] = self.stage_b
        if values["stage_b_step"] is not None:
            values["stage_b_step"] = max(values["stage_b_step"], values["fade_steps"])
        return self.replace(**values)

    def lora_modules(self) -> list[str]:
        return list(self.lora_targets) + (["o_proj"] if self.lora_include_o and "o_proj" not in self.lora_targets else [])

    def to_dict(self) -> dict:
        return {**asdict(self), "compress": self.compress.to_dict()}

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        return from_known_fields(cls, data, "training option")

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(read_yaml_options(path))


def read_yaml_options(path: str | Path) -> dict:
    """The option: value mapping of a YAML file (not yet validated: TrainConfig.from_dict does that)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"training config {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of option: value")
    return data

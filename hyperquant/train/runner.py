"""`train(model, TrainConfig)`: progressive PHM training on accelerate, resumable, then export.

One optimizer step consumes a global batch of per_device_batch_size x processes x grad_accum_steps
sequences; which sequences is a function of the step alone (a seeded permutation per epoch), so a
resumed run, or a run on more processes with a smaller per-device batch, sees exactly the same data.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from hyperquant.atomic import atomic_output_dir
from hyperquant.convert import find_ffn_linears, set_module
from hyperquant.errors import HyperquantError
from hyperquant.multimodal.inputs import with_image_batches
from hyperquant.phm.functional import factors_to_cat
from hyperquant.pipeline import input_covariances
from hyperquant.textsets import chooses
from hyperquant.train.capacity import CapacityPlan, assign_capacity
from hyperquant.train.config import TrainConfig
from hyperquant.train.export import finalize
from hyperquant.train.interp import (
    block_of,
    drop_dense,
    fixed_alpha,
    has_dense,
    has_teacher_dense,
    interpolated_layers,
    reconstruction_loss,
    set_alphas,
    wrap_linear,
)
from hyperquant.train.lora import adapters_disabled, add_lora
from hyperquant.train.losses import causal_lm_loss, kd_loss
from hyperquant.train.sharding import (
    full,
    gradient_sync_off,
    is_sharded,
    local_numel,
    shard_like,
    shard_model,
)

log = logging.getLogger(__name__)
CSV_FIELDS = ["step", "stage", "mean_alpha", "lr", "loss", "ce", "kd", "recon", "lambda_kd", "qat", "tokens",
              "time_s"]
KEEP_CHECKPOINTS = 2
PLAN_AFTER_STEPS = 2  # a budgeted run is first planned from the time of its second step
REPLAN_AT = (0.25, 0.5, 0.75)  # then re-planned at these fractions of its time budget


# ----------------------------------------------------------------------------------------------- model
def bases_for(cfg: TrainConfig, layer_bases: dict[str, int], name: str) -> int:
    for pattern, b in layer_bases.items():
        if re.search(pattern, name):
            return b
    return cfg.compress.num_bases


def sequential_phm_init(model: nn.Module, cfg: TrainConfig, layer_bases: dict[str, int], names: list[str],
                        init_ids: torch.Tensor) -> dict[str, nn.Module]:
    """Float PHM layers fitted by `hyperquant.compress` (bits=None) on a copy of ``model``: block by
    block, each on the inputs produced by the PHM blocks below it."""
    import copy
    import dataclasses

    from hyperquant.pipeline import compress

    pinned = {re.escape(name) + "$": bases_for(cfg, layer_bases, name) for name in names}
    ccfg = dataclasses.replace(cfg.compress, bits=None, layer_bases=pinned, init="activation", rest_dtype="float32")
    clone = compress(copy.deepcopy(model), ccfg, init_ids, progress=False)
    return {name: clone.get_submodule(name) for name in names}


def prepare_model(model: nn.Module, cfg: TrainConfig, layer_bases: dict[str, int],
                  init_ids: torch.Tensor | None) -> list[str]:
    """In place: wrap each FFN linear (PHM branch initialized from the dense weight), add LoRA, and set
    which parameters train. Returns the wrapped layer names."""
    c = cfg.compress
    targets = find_ffn_linears(model, c.target_patterns, c.min_features, towers=tuple(c.towers))
    activation = c.init == "activation" and init_ids is not None
    covs: dict[str, torch.Tensor] = {}
    fitted: dict[str, nn.Module] = {}
    if activation and cfg.init_sequential:
        fitted = sequential_phm_init(model, cfg, layer_bases, list(targets), init_ids)
    elif activation:
        covs = input_covariances(model, targets, init_ids)
    quant = None
    if cfg.qat_start_step is not None:
        quant = {"bits": c.bits, "group_size": c.group_size, "symmetric": c.symmetric,
                 "learn_scales": cfg.qat_learn_scales}
    for name, module in targets.items():
        b = bases_for(cfg, layer_bases, name)
        try:
            wrapper = wrap_linear(module, c.n, b, covs.get(name), c.ridge, quant, block_of(name),
                                  fitted.get(name))
        except ValueError as e:
            raise HyperquantError(f"layer {name}: {e}") from None
        wrapper.track_recon = cfg.recon_weight > 0
        wrapper.recon_relative = cfg.recon_relative
        set_module(model, name, wrapper)
    for p in model.parameters():
        p.requires_grad_(False)
    for m in interpolated_layers(model).values():
        m.phm.factors.requires_grad_(True)
        if m.phm.bias is not None:
            m.phm.bias.requires_grad_(cfg.train_bias)
        if m.quantizer is not None and m.quantizer.learn_scales:
            m.quantizer.scales.requires_grad_(True)
    if cfg.lora_r > 0:
        added = add_lora(model, lora_targets(model, cfg.lora_modules()), cfg.lora_r, cfg.lora_alpha)
        if not added:
            raise HyperquantError(f"no attention linears match lora_targets={cfg.lora_modules()}")
    return list(targets)


def lora_targets(model: nn.Module, suffixes: list[str]) -> list[str] | str:
    """peft's target_modules: the name suffixes, or in a vision-language model a regular expression that
    keeps them to the language tower (a CLIP or SigLIP encoder has q_proj/k_proj/v_proj too)."""
    from hyperquant.multimodal.towers import find_towers

    towers = find_towers(model)
    if towers is None:
        return suffixes
    return rf"{re.escape(towers.language)}\..*\.({'|'.join(re.escape(t) for t in suffixes)})"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a training checkpoint stores: the trained parameters and the QAT state (the rest is rebuilt)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    # under FSDP each tensor is gathered from its shards: a collective, in the same order on every process
    return {k: full(v.detach()).cpu().clone() for k, v in model.state_dict().items()
            if k in names or ".quantizer." in k}


# ------------------------------------------------------------------------------------------------ data
def training_batch(train_ids: torch.Tensor, image_samples: list | None, rows: list[int], pad_id: int) -> dict:
    """The model inputs of ``rows``: text rows are 0..len(train_ids)-1, image-caption pairs follow. Text
    alone gives {"input_ids"} (every token scored); with pairs, sequences are padded and ``labels``
    score the text rows everywhere and the pairs on their caption tokens."""
    if not image_samples:
        return {"input_ids": train_ids[rows]}
    from hyperquant.multimodal.inputs import collate

    text = len(train_ids)
    samples = [{"input_ids": train_ids[r : r + 1]} if r < text else image_samples[r - text].inputs for r in rows]
    return collate(samples, pad_id)


def global_batch_rows(step: int, global_batch: int, num_rows: int, seed: int) -> list[int]:
    """Row indices of the global batch of optimizer step ``step`` (epochs reshuffled with seed + epoch)."""
    rows = []
    for i in range(step * global_batch, (step + 1) * global_batch):
        epoch, pos = divmod(i, num_rows)
        perm = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        rows.append(int(perm[pos]))
    return rows


def lr_factor(step: int, cfg: TrainConfig) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    t = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    if cfg.lr_schedule == "linear":
        return 1.0 - t
    return 0.5 * (1.0 + math.cos(math.pi * t))


# ------------------------------------------------------------------------------------------ checkpoints
STATE_TENSORS, STATE_JSON = "state.safetensors", "state.json"
# TrainConfig fields that only say how a run is watched or where it goes: a resume may change them.
RUNNER_FIELDS = ("output_dir", "resume", "progress", "num_threads", "device", "overwrite", "export", "eval_every", "save_every",
                 "eval_tokens", "eval_context", "eval_alphas", "generation_cache")


def latest_checkpoint(output_dir: Path) -> Path | None:
    folder = output_dir / "checkpoints"
    if not folder.is_dir():
        return None
    pickled = sorted(folder.glob("step-*/state.pt"))
    if pickled:  # never unpickled: loading a pickle runs whatever code it holds
        raise HyperquantError(f"{pickled[-1].parent} is a training checkpoint of an older hyperquant (a pickle, "
                              f"which is never loaded); remove {output_dir} to start the run again")
    found = sorted(folder.glob(f"step-*/{STATE_JSON}"))
    return found[-1].parent if found else None


def save_checkpoint(output_dir: Path, step: int, model: nn.Module, optimizer, scheduler, extra: dict,
                    write: bool = True) -> tuple[Path, dict[str, torch.Tensor]]:
    """A resumable checkpoint without pickle: tensors (trained parameters, optimizer moments, RNG state) in
    safetensors, everything else (step, schedule, history, fingerprint, optimizer hyperparameters) in JSON.
    Returns its folder and the trained parameters' whole tensors. A sharded model's tensors are gathered
    on every process (which all call this); only the one with ``write`` writes them."""
    tensors = {f"model.{k}": v for k, v in trainable_state(model).items()}
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, rng in enumerate(torch.cuda.get_rng_state_all()):  # dropout and sampling on the GPU
            tensors[f"rng.cuda.{i}"] = rng
    saved = optimizer.state_dict()
    plain: dict[str, dict] = {}
    for index, values in saved["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = full(value.detach()).cpu().contiguous()
            else:
                plain.setdefault(str(index), {})[key] = value
    meta = {"step": step, "scheduler": scheduler.state_dict(), **extra,
            "optimizer": {"param_groups": saved["param_groups"], "indices": sorted(saved["state"]), "plain": plain}}
    folder = output_dir / "checkpoints"
    target = folder / f"step-{step:07d}"
    trained = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    if not write:
        return target, trained
    with atomic_output_dir(target, overwrite=True) as tmp:
        save_file(tensors, str(tmp / STATE_TENSORS))
        (tmp / STATE_JSON).write_text(json.dumps(meta, indent=1))
    for old in sorted(folder.glob("step-*"))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return target, trained


def load_checkpoint(folder: Path) -> dict:
    """What `save_checkpoint` wrote: {"step", "model": {name: tensor}, "optimizer": state dict,
    "scheduler": state dict, "torch_rng": tensor, and the extra fields}."""
    try:
        meta = json.loads((folder / STATE_JSON).read_text())
        tensors = load_file(str(folder / STATE_TENSORS))
    except (OSError, ValueError) as e:
        raise HyperquantError(f"training checkpoint {folder} is damaged ({e}); remove it to resume from the one "
                              f"before, or remove the run folder to start again") from None
    optimizer_meta = meta.pop("optimizer")
    state = {}
    for index in optimizer_meta["indices"]:
        prefix = f"optimizer.{index}."
        values = dict(optimizer_meta["plain"].get(str(index), {}))
        values.update({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        state[int(index)] = values
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in optimizer_meta["param_groups"]]
    return {**meta, "model": {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")},
            "optimizer": {"state": state, "param_groups": groups}, "torch_rng": tensors["rng.torch"],
            "cuda_rng": [tensors[f"rng.cuda.{i}"] for i in range(sum(k.startswith("rng.cuda.") for k in tensors))]}


def restore_cuda_rng(states: list[torch.Tensor]) -> None:
    """Put back the CUDA generators a checkpoint saved (none when it was written without CUDA; a run
    resumed on fewer devices restores the first ones)."""
    if states and torch.cuda.is_available():
        for i, rng in enumerate(states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(rng, i)


def run_fingerprint(source, cfg: TrainConfig, train_ids: torch.Tensor, image_samples: list | None = None) -> dict:
    """What a resumed run must share with the one that wrote the checkpoint: the model's files, the
    training configuration (less where it is written and how it is watched) and the training tokens
    (and image-caption inputs, pixels included)."""
    from hyperquant.models import model_identity

    config = {k: v for k, v in cfg.to_dict().items() if k not in RUNNER_FIELDS}
    digest = hashlib.sha256(train_ids.to(torch.int64).contiguous().numpy().tobytes())
    for sample in image_samples or []:
        for key in sorted(sample.inputs):
            digest.update(key.encode())
            digest.update(sample.inputs[key].contiguous().numpy().tobytes())
    return {"model": model_identity(source), "config": config, "data": digest.hexdigest()}


def check_fingerprint(saved: dict | None, current: dict, folder: Path) -> None:
    if saved is None:
        raise HyperquantError(f"{folder} has no fingerprint of the run that wrote it; remove {folder.parent.parent} "
                              f"to start again")
    differs = [what for what in ("model", "data") if saved.get(what) != current[what]]
    old, new = saved.get("config", {}), current["config"]
    differs += [f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if differs:
        run = folder.parent.parent
        raise HyperquantError(f"the interrupted training run in {run} was started with another "
                              f"{', '.join(differs)[:300]}; run the same command again to resume it, or remove "
                              f"{run} (or use another --out) to start a new one")


# ----------------------------------------------------------------------------------------------- logs
class RunLog:
    """metrics.csv and metrics.jsonl (one row per optimizer step) and eval.jsonl, appended across resumes."""

    def __init__(self, output_dir: Path, enabled: bool, resume_step: int) -> None:
        self.enabled = enabled
        self.csv_path, self.jsonl_path = output_dir / "metrics.csv", output_dir / "metrics.jsonl"
        self.eval_path = output_dir / "eval.jsonl"
        if enabled:
            output_dir.mkdir(parents=True, exist_ok=True)
            for path in (self.csv_path, self.jsonl_path, self.eval_path):
                self._truncate(path, resume_step)

    @staticmethod
    def _truncate(path: Path, resume_step: int) -> None:
        """Drop rows logged after the checkpoint we resume from (a crashed run may have logged them)."""
        if not path.exists():
            return
        lines = path.read_text().splitlines()
        if path.suffix == ".csv":
            kept = lines[:1] + [line for line in lines[1:] if int(line.split(",")[0]) <= resume_step]
        else:
            kept = [line for line in lines if json.loads(line)["step"] <= resume_step]
        path.write_text("".join(line + "\n" for line in kept))

    def step(self, row: dict) -> None:
        if not self.enabled:
            return
        new = not self.csv_path.exists()
        with open(self.csv_path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def evaluation(self, row: dict) -> None:
        if self.enabled:
            with open(self.eval_path, "a") as f:
                f.write(json.dumps(row) + "\n")


# ------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def validation_perplexity(model: nn.Module, eval_ids: torch.Tensor, cfg: TrainConfig) -> dict[str, float]:
    """Perplexity at each of cfg.eval_alphas (only alpha = 1 once the dense branches are gone)."""
    from hyperquant.evals import PerplexityProtocol, perplexity

    context = min(cfg.eval_context, len(eval_ids))
    protocol = PerplexityProtocol(context=context, stride=context, num_tokens=len(eval_ids))
    was_training = model.training
    model.eval()
    alphas = list(cfg.eval_alphas) if has_dense(model) else [1.0]
    result = {}
    try:
        for a in alphas:
            with fixed_alpha(model, a):
                result[f"{a:g}"] = perplexity(model, eval_ids, protocol)["perplexity"]
    finally:
        model.train(was_training)
    return result


# ---------------------------------------------------------------------------------------------- runner
def _accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    # accelerate keeps one process-wide state; a second `train` call in the same process (another
    # mixed_precision) needs it cleared. The distributed (partial) state is kept.
    if AcceleratorState._shared_state:
        AcceleratorState._reset_state(reset_partial_state=False)

    from hyperquant.device import resolve_device, resolve_mixed_precision

    device = resolve_device(cfg.device, "device")
    precision = resolve_mixed_precision(cfg.mixed_precision, device)
    if precision == "fp16" and device.type != "cuda":
        raise HyperquantError("mixed_precision: fp16 needs a GPU; use bf16 or no on CPU")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device.index)  # accelerate's single process uses the current CUDA device
    # Layers at alpha = 0 (or before QAT's learned scales start) give some parameters no gradient.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true"):
        # accelerate's own FSDP wrapping: on the CPU it quietly runs as DDP (cpu=True) or as unconnected
        # single processes; hyperquant shards the model itself (sharding.py), the same way on CPU and GPU.
        raise HyperquantError("accelerate launch --use_fsdp is not how hyperquant train shards: set fsdp: true in "
                              "the config and launch with accelerate launch --multi_gpu --num_processes N")
    # cpu=True: several processes (`accelerate launch --multi_gpu`, torchrun) then use gloo.
    accelerator = Accelerator(mixed_precision=precision, kwargs_handlers=[ddp], cpu=device.type == "cpu")
    if cfg.fsdp and accelerator.num_processes < 2:
        raise HyperquantError("fsdp: true shards the model over several processes; launch with accelerate launch "
                              "--multi_gpu --num_processes N (N >= 2), or set fsdp: false")
    return accelerator


def _progress(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="training", dynamic_ncols=True)


@dataclass
class _Run:
    """The state one training run carries from step to step (its pieces below read and update it)."""

    cfg: TrainConfig  # as (re-)planned
    template: TrainConfig  # as given: re-plans scale this one
    accelerator: object
    model: nn.Module  # unwrapped
    wrapped: nn.Module  # as accelerate prepared it (DDP when several processes)
    optimizer: torch.optim.Optimizer
    scheduler: object
    teacher: nn.Module | None
    trainable: list
    train_ids: torch.Tensor
    eval_ids: torch.Tensor
    image_samples: list | None  # a vision-language model's image-caption pairs (multimodal.inputs.CaptionSample)
    pad_id: int
    output_dir: Path
    layer_bases: dict[str, int]
    history: list[dict]
    log: RunLog
    start_step: int
    replans: list  # fractions of the time budget still to re-plan at (None: after PLAN_AFTER_STEPS)
    capacity: CapacityPlan | None = None
    fingerprint: dict | None = None
    first_step_end: float = 0.0
    heldout_ids: torch.Tensor | None = None  # calibration rows never trained on (per-layer errors)
    source: object = None  # models.ModelSource the run trains (a sharded run's export rebuilds it)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def collective(self) -> bool:
        """Whether saving and evaluating need every process (a sharded model's forward and gathers do);
        otherwise the main process does them alone."""
        return self.cfg.fsdp

    @property
    def takes_part(self) -> bool:
        """Whether this process saves and evaluates (writing stays the main process's)."""
        return self.main or self.collective

    def save(self, at_step: int) -> dict[str, torch.Tensor]:
        """The checkpoint of ``at_step``; call on the main process, or on all when `collective`."""
        return save_checkpoint(self.output_dir, at_step, self.model, self.optimizer, self.scheduler,
                               {"layer_bases": self.layer_bases, "history": self.history,
                                "config": self.cfg.to_dict(),
                                "schedule": self.cfg.schedule(),  # as re-planned at the time of saving
                                "fingerprint": self.fingerprint}, write=self.main)[1]

    def evaluate(self, step: int) -> dict:
        row = {"step": step, "ppl": validation_perplexity(self.model, self.eval_ids, self.cfg)}
        self.log.evaluation(row)
        self.history.append(row)
        return row


def _resume_state(cfg: TrainConfig, output_dir: Path, fingerprint: dict) -> tuple[dict | None, Path | None]:
    ckpt = latest_checkpoint(output_dir) if cfg.resume else None
    if ckpt is None:
        return None, None
    state = load_checkpoint(ckpt)
    check_fingerprint(state.get("fingerprint"), fingerprint, ckpt)
    return state, ckpt


def _assign_bases(cfg: TrainConfig, model: nn.Module, train_ids: torch.Tensor, state: dict | None, main: bool,
                  output_dir: Path, autocast=contextlib.nullcontext) -> tuple[dict[str, int], CapacityPlan | None]:
    """B per layer: the config's, the Fisher capacity plan's on a new run, the checkpoint's on resume."""
    c = cfg.compress
    if state is not None:
        return state["layer_bases"], None
    if cfg.capacity == "none":
        return dict(c.layer_bases), None
    if cfg.capacity_cost == "kl":  # measured on rows the layers' fits (the initial fit's rows) do not see
        fit_ids = train_ids[: cfg.init_samples]
        measured = train_ids[cfg.init_samples : cfg.init_samples + cfg.capacity_samples]  # _check_capacity_rows
    else:
        fit_ids, measured = None, train_ids[: cfg.capacity_samples]
    min_bases, max_bases = cfg.capacity_bounds
    plan = assign_capacity(model, measured, c.n, c.num_bases, cfg.capacity, cfg.capacity_mean_bases, cfg.capacity_topk,
                           max_bases, c.bits, c.group_size, c.symmetric, c.target_patterns,
                           cost=cfg.capacity_cost, min_bases=min_bases, fit_ids=fit_ids,
                           ridge=c.ridge, autocast=autocast)
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "capacity.json").write_text(json.dumps(plan.to_dict(), indent=2))
        (output_dir / "capacity.md").write_text(plan.table() + "\n")
    return {**plan.layer_bases, **c.layer_bases}, plan


def _frozen_teacher(cfg: TrainConfig, source, device: torch.device | str) -> nn.Module | None:
    """teacher: separate, a second frozen copy of the model on ``device`` (the other teachers are the
    student's own frozen dense weights)."""
    from hyperquant.models import load_model

    if cfg.teacher != "separate" or cfg.kd_weight <= 0:
        return None
    teacher = load_model(source)[0].eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if cfg.fsdp:
        shard_model(teacher, torch.device(device))
        return teacher
    return teacher.to(device)


def keeps_teacher(cfg: TrainConfig) -> bool:
    """Whether Stage B keeps the frozen dense branches for the teacher (teacher: dense)."""
    return cfg.teacher == "dense" and cfg.kd_weight > 0


def _optimizer(model: nn.Module, cfg_ref: list[TrainConfig], state: dict | None):
    """AdamW over the trainable parameters (LoRA in its own group) and the LR schedule; the schedule reads
    the current config through ``cfg_ref`` so a re-plan changes it in place."""
    cfg = cfg_ref[0]
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in trainable if "lora_" not in n], "lr": cfg.lr}]
    lora_params = [p for n, p in trainable if "lora_" in n]
    if lora_params:
        groups.append({"params": lora_params, "lr": cfg.lora_lr or cfg.lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg_ref[0]))
    if state is not None:
        # the checkpoint holds whole moments; a sharded parameter's are cut to this process's shard
        params = [p for g in optimizer.param_groups for p in g["params"]]
        saved = state["optimizer"]
        saved = {**saved, "state": {i: {k: shard_like(v, params[i]) if torch.is_tensor(v) else v
                                        for k, v in values.items()} for i, values in saved["state"].items()}}
        optimizer.load_state_dict(saved)
        scheduler.load_state_dict(state["scheduler"])
    return trainable, optimizer, scheduler


def _step(run: _Run, step: int) -> dict:
    """One optimizer step (gradient accumulation over micro-batches); returns its log row."""
    cfg, model, accelerator = run.cfg, run.model, run.accelerator
    if step >= cfg.stage_b and has_dense(model):
        drop_dense(model, keep_teacher=keeps_teacher(cfg))
    qat_on = cfg.qat_start_step is not None and step >= cfg.qat_start_step
    if qat_on:
        for m in interpolated_layers(model).values():
            if not m.quantizer.is_enabled:
                m.quantizer.enable(factors_to_cat(full(m.phm.factors.detach())))
    # optimizer step s trains at the schedule's value after s + 1 steps: alpha = 1 after fade_steps
    mean_alpha = set_alphas(model, step + 1, cfg.fade_steps, cfg.alpha_schedule, cfg.stagger)
    dense_alive = has_dense(model)
    kd_available = cfg.kd_weight > 0 and (run.teacher is not None or (cfg.teacher == "self" and dense_alive)
                                          or (cfg.teacher == "dense" and has_teacher_dense(model)))
    lambda_kd = cfg.kd_weight * (mean_alpha if cfg.kd_ramp else 1.0) if kd_available else 0.0
    global_batch = cfg.per_device_batch_size * run.world * cfg.grad_accum_steps
    rows = global_batch_rows(step, global_batch, len(run.train_ids) + len(run.image_samples or []), cfg.data_seed)
    sums = torch.zeros(4, device=accelerator.device)  # loss, ce, kd, recon (means over micro-batches)
    for micro in range(cfg.grad_accum_steps):
        first = (micro * run.world + accelerator.process_index) * cfg.per_device_batch_size
        batch = training_batch(run.train_ids, run.image_samples, rows[first : first + cfg.per_device_batch_size],
                               run.pad_id)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        last = micro == cfg.grad_accum_steps - 1
        no_sync = gradient_sync_off(run.model) if run.collective else accelerator.no_sync(run.wrapped)
        with contextlib.nullcontext() if last else no_sync:
            sums += _micro_step(run, batch, lambda_kd) / cfg.grad_accum_steps
    if cfg.max_grad_norm > 0:
        accelerator.clip_grad_norm_([p for _, p in run.trainable], cfg.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    means = accelerator.reduce(sums, reduction="mean").cpu()
    return {"step": step + 1, "stage": "A" if dense_alive else "B", "mean_alpha": round(mean_alpha, 6),
            "lr": run.scheduler.get_last_lr()[0], "loss": float(means[0]), "ce": float(means[1]),
            "kd": float(means[2]), "recon": float(means[3]), "lambda_kd": lambda_kd, "qat": qat_on,
            "tokens": (step + 1) * global_batch * cfg.seq_len}


def _micro_step(run: _Run, batch: dict[str, torch.Tensor], lambda_kd: float) -> torch.Tensor:
    """Forward and backward of one micro-batch (model inputs; ``labels`` when some positions are not
    scored); returns (loss, ce, kd, recon), detached, on the batch's device (read once per step, not
    synchronized per micro-batch)."""
    cfg, accelerator = run.cfg, run.accelerator
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    teacher_logits = None
    if lambda_kd > 0:
        with torch.no_grad(), accelerator.autocast():
            if run.teacher is not None:
                teacher_logits = run.teacher(**inputs, use_cache=False).logits
            else:
                with fixed_alpha(run.model, 0.0), adapters_disabled(run.model):
                    teacher_logits = run.model(**inputs, use_cache=False).logits
    with accelerator.autocast():
        logits = run.wrapped(**inputs, use_cache=False).logits
    labels = batch.get("labels", batch["input_ids"])
    if cfg.ce_weight > 0:
        ce = causal_lm_loss(logits, labels, cfg.label_smoothing)
        loss = cfg.ce_weight * ce
    else:  # logged only: no graph through a second pass over the logits
        with torch.no_grad():
            ce = causal_lm_loss(logits.detach(), labels, cfg.label_smoothing)
        loss = torch.zeros((), device=logits.device)
    # padding is not distilled (every position of an unpadded batch is)
    kd = kd_loss(logits, teacher_logits, cfg.kd_temperature, batch.get("attention_mask")) \
        if teacher_logits is not None else None
    if kd is not None:
        loss = loss + lambda_kd * kd
    recon = reconstruction_loss(run.model) if cfg.recon_weight > 0 else None
    if recon is not None:
        loss = loss + cfg.recon_weight * recon
    if loss.requires_grad:  # False only while every layer is still at alpha = 0 without recon
        accelerator.backward(loss / cfg.grad_accum_steps)
    zero = torch.zeros((), device=loss.device)
    return torch.stack([t.detach().float() if t is not None else zero for t in (loss, ce, kd, recon)])


def _maybe_replan(run: _Run, done: int, elapsed: float, cfg_ref: list[TrainConfig], bar) -> None:
    """A budgeted run re-plans its steps from their measured time: after PLAN_AFTER_STEPS steps, then at
    REPLAN_AT fractions of the budget. A re-plan never moves a milestone already passed."""
    cfg = run.cfg
    if not run.replans or not (done == cfg.max_steps or (done >= PLAN_AFTER_STEPS and (
            run.replans[0] is None or elapsed >= run.replans[0] * 60 * cfg.max_minutes))):
        return
    run.replans.pop(0)
    accelerator = run.accelerator
    # Seconds per step since the first (which carries one-off costs); every process must agree.
    seconds = (time.perf_counter() - run.first_step_end) / (done - 1) if done > 1 else elapsed
    seconds = accelerator.reduce(torch.tensor([seconds], device=accelerator.device), reduction="mean").item()
    fit = max(done, done + int((cfg.max_minutes * 60 - elapsed) / max(seconds, 1e-6)))
    run.cfg = cfg_ref[0] = cfg.replanned(run.template, done, fit)
    if bar is not None:
        bar.total = run.cfg.max_steps
        bar.refresh()
    if run.main:
        with open(run.output_dir / "plan.jsonl", "a") as f:
            f.write(json.dumps({"after_step": done, "elapsed_s": round(elapsed, 2), "step_s": seconds,
                                "max_minutes": run.cfg.max_minutes, **run.cfg.schedule()}) + "\n")


def _sharded(model: nn.Module) -> bool:
    """Whether FSDP sharded the model (its parameters are DTensors)."""
    return any(is_sharded(p) for p in model.parameters())


def _unsharded_copy(run: _Run, trained: dict[str, torch.Tensor]) -> nn.Module:
    """The sharded model as one whole model on the CPU, for the export: rebuilt as a resume rebuilds it
    (the frozen weights from the source, the same PHM wrappers and LoRA) with the gathered trained state."""
    from hyperquant.models import load_model

    model = load_model(run.source)[0]
    prepare_model(model, run.cfg, run.layer_bases, None)
    if not has_dense(run.model):
        drop_dense(model, keep_teacher=keeps_teacher(run.cfg))
    _, unexpected = model.load_state_dict(trained, strict=False)
    if unexpected:  # the rebuild is the resume's: it cannot differ from the trained model's structure
        raise RuntimeError(f"the unsharded copy does not match the trained model: {unexpected[:3]}")
    return model.eval()


def _finish(run: _Run, tokenizer, t0: float) -> dict:
    """The last checkpoint, the final evaluation, the export to final/ and summary.json."""
    cfg, done = run.cfg, run.cfg.max_steps
    if done >= cfg.stage_b and has_dense(run.model):
        drop_dense(run.model, keep_teacher=keeps_teacher(cfg))
    summary: dict = {"steps": done, "processes": run.world, "train_time_s": time.perf_counter() - t0,
                     "mixed_precision": str(run.accelerator.mixed_precision),
                     "distributed": str(run.accelerator.distributed_type.value), "sharded": _sharded(run.model),
                     "layer_bases": run.layer_bases, "output_dir": str(run.output_dir)}
    if summary["sharded"]:  # what one process holds of the model's parameters (the main process's shards)
        summary["parameters_per_process"] = local_numel(run.model)
        summary["parameters"] = sum(p.numel() for p in run.model.parameters())
    if run.collective:  # every process gathers and evaluates; the main one goes on alone to the export
        trained = run.save(done) if done > run.start_step or run.start_step == 0 else trainable_state(run.model)
        ev = run.evaluate(done)
        model = _unsharded_copy(run, trained) if run.main and cfg.export else None
    elif run.main:
        if done > run.start_step or run.start_step == 0:
            run.save(done)
        ev = run.evaluate(done)
        model = run.model
    if run.main:
        summary["eval"] = run.history
        if run.capacity is not None:
            summary["capacity"] = {"method": run.capacity.method, "cost": run.capacity.cost,
                                   "total_params": run.capacity.total_params, "total_bytes": run.capacity.total_bytes}
        if cfg.export:
            from hyperquant.checkpoint import save_compressed

            # the export (GPTQ of the trained factors, then of attention and the head) is the CPU pipeline
            model.to("cpu")

            final = finalize(model, cfg, with_image_batches(run.train_ids[: cfg.init_samples], run.image_samples, 4),
                             {"steps": done, "final_eval": ev["ppl"]}, heldout_ids=run.heldout_ids)
            summary["exported_ppl"] = validation_perplexity(final, run.eval_ids, cfg)["1"]
            summary["final_dir"] = str(save_compressed(final, run.output_dir / "final", tokenizer,
                                                       overwrite=cfg.overwrite))
        (run.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    run.accelerator.wait_for_everyone()
    return summary


def _blockwise_rows(cfg: TrainConfig, train_ids: torch.Tensor, text_ids: torch.Tensor) -> torch.Tensor:
    """The block-wise stage's ``blockwise_samples`` fit rows: the first training rows, topped up with the
    text rows the steps do not read when a small budget keeps fewer (with teacher samples a run keeps only
    the rows its steps read); fewer only when the text has no more, and then said."""
    fit = train_ids[: cfg.blockwise_samples]
    if len(fit) < cfg.blockwise_samples:
        unread = text_ids[len(train_ids):]  # the text rows after those the steps read
        fit = torch.cat([fit, unread[: cfg.blockwise_samples - len(fit)]])
    if len(fit) < cfg.blockwise_samples:
        log.warning("block-wise stage: blockwise_samples=%d asked, the run has %d training rows: it fits on %d "
                    "(raise train_samples or lower blockwise_samples)", cfg.blockwise_samples, len(fit), len(fit))
    return fit


def _blockwise_first_stage(cfg: TrainConfig, model: nn.Module, train_ids: torch.Tensor, text_ids: torch.Tensor,
                           heldout_ids, output_dir: Path, accelerator) -> list[dict]:
    """The block-wise stage of a new run (a resumed one has its result in the checkpoint), on the training
    device (every process its own copy under FSDP, on the host) in the training's precision; its per-block
    held-out errors go to blockwise.json."""
    from hyperquant.train.blockwise import blockwise_stage

    fit = _blockwise_rows(cfg, train_ids, text_ids)
    # held-out rows: the calibration rows never trained on, else the last training rows (not fitted here)
    held = heldout_ids if heldout_ids is not None else train_ids[-max(1, cfg.per_device_batch_size):]
    if not cfg.fsdp:  # accelerate would move it later; the stage runs where the steps will
        model.to(accelerator.device)
    records = blockwise_stage(model, fit, held, cfg.blockwise_steps, cfg.blockwise_lr, cfg.per_device_batch_size,
                              error=cfg.blockwise_error, autocast=accelerator.autocast)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        tokens = cfg.blockwise_steps * len(records) * min(cfg.per_device_batch_size, len(fit)) * cfg.seq_len
        (output_dir / "blockwise.json").write_text(json.dumps(
            {"block_tokens": tokens, "fit_rows": len(fit), "asked_rows": cfg.blockwise_samples,
             "heldout_rows": len(held), "error": cfg.blockwise_error, "blocks": records},
            indent=2))
    return records


def default_generation_cache() -> Path:
    return Path(os.environ.get("HYPERQUANT_CACHE", Path.home() / ".cache" / "hyperquant")) / "generated"


def _rows_read(cfg: TrainConfig, train_ids: torch.Tensor) -> torch.Tensor:
    """The training rows a run with teacher samples keeps. Only the rows the run reads are mixed (the steps
    draw a seeded permutation of all rows, so a mixture of the whole text set would put a diluted share in
    front of the model): the training set becomes as many rows as the steps read, a share of them
    generated. (A time budget does not know its steps yet: there, all rows.)"""
    if cfg.max_minutes is not None:
        return train_ids
    read = cfg.max_steps * cfg.per_device_batch_size * cfg.grad_accum_steps
    return train_ids[: max(1, min(len(train_ids), read))]


def _check_capacity_rows(cfg: TrainConfig, train_ids: torch.Tensor) -> None:
    """capacity_cost: kl measures on training rows after the initial fit's: refused before any work when
    there are none."""
    if cfg.capacity == "none" or cfg.capacity_cost != "kl":
        return
    rows = len(_rows_read(cfg, train_ids)) if cfg.generated_fraction > 0 else len(train_ids)
    if rows <= cfg.init_samples:
        raise HyperquantError(f"capacity_cost: kl measures on the training rows after the first init_samples="
                              f"{cfg.init_samples}, and this run trains on {rows}: lower init_samples or raise "
                              f"the budget")


def _with_teacher_samples(cfg: TrainConfig, source, model: nn.Module, tokenizer, train_ids: torch.Tensor):
    """The training rows with ``generated_fraction`` of them sampled from the (still dense) model: cached
    by model and settings, so a resumed or repeated run trains on the same rows."""
    from hyperquant.models import model_identity
    from hyperquant.train.generated import mix_rows, teacher_sequences

    train_ids = _rows_read(cfg, train_ids)
    count = round(cfg.generated_fraction * len(train_ids))
    if count == 0:
        return train_ids, None
    settings = cfg.generation_settings(count)
    cache = Path(cfg.generation_cache) if cfg.generation_cache else default_generation_cache()
    vocab = model.config.get_text_config().vocab_size
    generated, info = teacher_sequences(model, settings, model_identity(source), cache,
                                        getattr(tokenizer, "bos_token_id", None), vocab)
    return mix_rows(train_ids, generated, cfg.generated_fraction, cfg.data_seed), {**info, "rows": count}


def _vision_language_data(source, model: nn.Module, tokenizer, image_samples: list | None):
    """(what the export saves beside the checkpoint, the image-caption pairs to train on): a vision-
    language model's processor and, unless given, the shipped calibration photographs' pairs."""
    from hyperquant.multimodal.towers import is_vision_language

    if not is_vision_language(model.config):
        if image_samples:
            raise HyperquantError("image-caption pairs need a vision-language model; this one is text-only")
        return tokenizer, None
    if not hasattr(tokenizer, "image_processor"):
        from hyperquant.models import load_processor

        tokenizer = load_processor(source.folder)
    if image_samples is None:
        from hyperquant.multimodal.images import shipped_pairs
        from hyperquant.multimodal.inputs import caption_samples

        image_samples = caption_samples(tokenizer, shipped_pairs("calibration"))
    return tokenizer, image_samples


@chooses("training")
def train(model_dir, cfg: TrainConfig, *, train_ids: torch.Tensor | None = None,
          eval_ids: torch.Tensor | None = None, stop_after: int | None = None,
          model: nn.Module | None = None, tokenizer=None, image_samples: list | None = None) -> dict:
    """Train the PHM replacement of ``model_dir``'s FFNs (None = the embedded default model) and export it.

    Writes to cfg.output_dir: checkpoints/step-N (resumable), metrics.csv/.jsonl, eval.jsonl,
    capacity.json/.md (when capacity != none), summary.json and final/ (a `hyperquant.load`-able
    checkpoint, when cfg.export). ``train_ids`` (rows of seq_len tokens) and ``eval_ids`` (1-D) replace
    the default Wikipedia calibration/evaluation text. ``stop_after``: leave after this many optimizer steps
    with a checkpoint (a time-limited job; run again with resume to continue). ``model`` and ``tokenizer``:
    the already loaded ``model_dir`` (trained in place) instead of loading it again. ``image_samples``: a
    vision-language model's image-caption pairs (`multimodal.inputs.CaptionSample`), trained on beside
    the text rows and part of the PHM fit's and the export's calibration. Returns the summary."""
    from hyperquant.data import calibration_ids, eval_tokens
    from hyperquant.models import load_model, resolve_source

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    accelerator = _accelerator(cfg)
    main = accelerator.is_main_process
    output_dir = Path(cfg.output_dir)
    torch.manual_seed(cfg.seed)

    source = resolve_source(model_dir)
    if model is None or tokenizer is None:
        model, tokenizer = load_model(source)
    tokenizer, image_samples = _vision_language_data(source, model, tokenizer, image_samples)
    text_tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor holds the tokenizer
    from hyperquant.models import check_sequence_length

    check_sequence_length(model.config, cfg.seq_len, "seq_len")
    if train_ids is None:
        train_ids = calibration_ids(text_tokenizer, cfg.train_samples, cfg.seq_len, cfg.data_seed)
    train_ids = train_ids[:, : cfg.seq_len]
    fingerprint = run_fingerprint(source, cfg, train_ids, image_samples)  # of all the rows, held-out ones included
    # a resume of another run is refused here, before the teacher samples anything or a file is written
    state, ckpt = _resume_state(cfg, output_dir, fingerprint)
    heldout_ids = None
    held = cfg.compress.heldout_samples
    if held and cfg.export and len(train_ids) > held + cfg.init_samples:
        # the last rows are never trained on: the export measures each layer's error on them
        train_ids, heldout_ids = train_ids[:-held], train_ids[-held:]
    if state is None:
        _check_capacity_rows(cfg, train_ids)
    text_ids = train_ids  # before the teacher samples: the block-wise stage may top its rows up from them
    if cfg.generated_fraction > 0:
        train_ids, generation = _with_teacher_samples(cfg, source, model, text_tokenizer, train_ids)
        if generation is not None and main:
            output_dir.mkdir(parents=True, exist_ok=True)
            (output_dir / "generation.json").write_text(json.dumps(
                {**generation, "settings": cfg.generation_settings(generation["rows"]).key()}, indent=2))
    if eval_ids is None:
        eval_ids = eval_tokens(text_tokenizer, cfg.eval_tokens)
    eval_ids = eval_ids[: cfg.eval_tokens]

    start_step = state["step"] if state else 0
    # A budgeted run re-plans its steps from their measured time; a resumed one keeps the schedule its
    # checkpoint recorded.
    template = cfg
    replans = [] if cfg.max_minutes is None or start_step > 0 else [None, *REPLAN_AT]
    if state is not None and cfg.max_minutes is not None and state.get("schedule"):
        cfg = cfg.replace(**state["schedule"])
    layer_bases, capacity = _assign_bases(cfg, model, train_ids, state, main, output_dir, accelerator.autocast)
    teacher = _frozen_teacher(cfg, source, accelerator.device)

    prepare_model(model, cfg, layer_bases,
                  None if state is not None else with_image_batches(train_ids[: cfg.init_samples], image_samples, 4))
    if state is None and cfg.blockwise_steps > 0:
        _blockwise_first_stage(cfg, model, train_ids, text_ids, heldout_ids, output_dir, accelerator)
    if state is not None:
        if start_step >= cfg.stage_b:
            drop_dense(model, keep_teacher=keeps_teacher(cfg))
        _, unexpected = model.load_state_dict(state["model"], strict=False)
        if unexpected:
            raise HyperquantError(f"checkpoint {ckpt} does not match this configuration (unexpected {unexpected[:3]})")
        torch.set_rng_state(state["torch_rng"])
        restore_cuda_rng(state["cuda_rng"])
    if cfg.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise HyperquantError(f"gradient_checkpointing: {type(model).__name__} does not support it; set it to false")
        # non-reentrant: the frozen embeddings give inputs without grad, which the reentrant variant would cut
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x's name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    if cfg.fsdp:  # before the optimizer: sharding replaces the parameters
        shard_model(model, accelerator.device)
    cfg_ref = [cfg]  # the LR schedule reads the re-planned config through this
    trainable, optimizer, scheduler = _optimizer(model, cfg_ref, state)
    if cfg.fsdp:
        wrapped, optimizer = model, accelerator.prepare(optimizer)  # not wrapped in DDP
    else:
        wrapped, optimizer = accelerator.prepare(model, optimizer)
    run = _Run(cfg=cfg, template=template, accelerator=accelerator, model=accelerator.unwrap_model(wrapped),
               wrapped=wrapped, optimizer=optimizer, scheduler=scheduler, teacher=teacher, trainable=trainable,
               train_ids=train_ids, eval_ids=eval_ids, image_samples=image_samples,
               pad_id=getattr(text_tokenizer, "pad_token_id", None) or 0, output_dir=output_dir, layer_bases=layer_bases,
               history=list(state.get("history", [])) if state else [], log=RunLog(output_dir, main, start_step),
               start_step=start_step, replans=replans, capacity=capacity, fingerprint=fingerprint,
               heldout_ids=heldout_ids, source=source)

    bar = _progress(cfg.progress and main, cfg.max_steps, start_step)
    if start_step == 0 and run.takes_part and cfg.eval_every:
        run.evaluate(0)
    t0 = time.perf_counter()
    step = start_step
    end_step = run.cfg.max_steps if stop_after is None else min(stop_after, run.cfg.max_steps)
    while step < end_step:
        row = {**_step(run, step), "time_s": time.perf_counter() - t0}
        run.log.step(row)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}", alpha=f"{row['mean_alpha']:.2f}", stage=row["stage"])
        step = done = step + 1
        if done == 1:
            run.first_step_end = time.perf_counter()
        _maybe_replan(run, done, time.perf_counter() - t0, cfg_ref, bar)
        end_step = run.cfg.max_steps if stop_after is None else min(stop_after, run.cfg.max_steps)
        if done >= end_step:
            run.replans.clear()
        if run.cfg.eval_every and done % run.cfg.eval_every == 0 and done < run.cfg.max_steps and run.takes_part:
            run.evaluate(done)
        if run.cfg.save_every and done % run.cfg.save_every == 0 and done < run.cfg.max_steps:
            if run.takes_part:
                run.save(done)
            accelerator.wait_for_everyone()
    if bar is not None:
        bar.close()
    if end_step < run.cfg.max_steps:
        if run.takes_part and end_step > start_step:
            run.save(end_step)
        accelerator.wait_for_everyone()
        return {"steps": end_step, "stopped": True, "processes": run.world, "layer_bases": layer_bases,
                "output_dir": str(output_dir), "train_time_s": time.perf_counter() - t0}
    return _finish(run, tokenizer, t0)

"""Run a tradeoff sweep: build and measure every point (cached by its id), time the ONNX exports side by
side, and write the report.

Cache layout (``cache_dir``): ``points/<id>/point.json`` (the measured point), ``points/<id>/checkpoint``
(its weights, removed after measuring unless keep_checkpoints), ``points/<id>/onnx/model.onnx`` (kept,
so a re-run re-times without re-exporting), ``original-hf/`` (the model as a plain HF folder, for the
baseline libraries), ``sweep_log.jsonl`` (what each run did).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import logging
import os
import platform
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from hyperquant.atomic import atomic_output_dir, check_output_dir, write_json_atomic
from hyperquant.config import CompressConfig
from hyperquant.errors import HyperquantError
from hyperquant.models import model_identity
from hyperquant.tradeoff.spec import PointSpec, SweepConfig

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


@dataclass
class Context:
    """What every point shares: the model, its text, and where things go."""

    cfg: SweepConfig
    source: object
    model: nn.Module
    tokenizer: object
    calib: torch.Tensor
    heldout: torch.Tensor | None  # calibration-text sequences never fitted on: the per-layer errors' data
    eval_ids: torch.Tensor
    second_ids: torch.Tensor  # the second validation domain (data.second_domain_tokens)
    test_ids: dict[str, torch.Tensor]  # the test set (textsets.load_test_set), only ever reported
    protocol: object
    cache: Path
    ffn_names: list[str]
    original_params: int
    ffn_weights: int  # weights of the dense FFN linears (the denominator of FFN bits per weight)


def weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def stored_tensor_bytes(files: list[Path], prefixes: list[str]) -> int:
    """Bytes of the stored tensors whose names start with one of ``prefixes`` (safetensors headers)."""
    total = 0
    starts = tuple(p + "." for p in prefixes)
    for f in files:
        if f.suffix != ".safetensors":
            continue
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                if key.startswith(starts):
                    sl = handle.get_slice(key)
                    numel = 1
                    for d in sl.get_shape():
                        numel *= d
                    total += numel * _dtype_bytes(sl.get_dtype())
    return total


def _dtype_bytes(name: str) -> int:
    return {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
            "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}.get(name, 1)


def _layer_errors(log: list[dict]) -> list[dict]:
    return [{"name": r["name"], "output_error": r.get("output_error"),
             "output_error_heldout": r.get("output_error_heldout")} for r in log if "name" in r]


# --------------------------------------------------------------------------------------------- building
def _build_hyperquant(spec: PointSpec, ctx: Context, folder: Path) -> tuple[nn.Module, list[dict], float]:
    from hyperquant.job import Evaluation, compress_to_folder

    ccfg = spec.compress_config(ctx.cfg.calib_samples, ctx.cfg.calib_seq_len)
    # perplexity is measured below for every kind of point alike, so the job measures size only
    result = compress_to_folder(copy.deepcopy(ctx.model), ctx.tokenizer, ccfg, folder, source=str(ctx.source),
                                calib=ctx.calib if ccfg.needs_calibration else None, evaluation=Evaluation(),
                                heldout=ctx.heldout if ccfg.needs_calibration else None,
                                overwrite=True, label=ctx.cfg.label_of(spec), progress=False)
    return result.model, _layer_errors(result.log), result.seconds


def _build_checkpoint(spec: PointSpec) -> tuple[nn.Module, list[dict], float, Path]:
    import hyperquant

    folder = Path(spec.checkpoint)
    model = hyperquant.load(folder)
    log_path = folder / "quant_log.json"
    log = json.loads(log_path.read_text()) if log_path.is_file() else []
    summary_path = folder / "summary.json"
    seconds = json.loads(summary_path.read_text()).get("compress_seconds") if summary_path.is_file() else None
    return model, _layer_errors(log), seconds, folder


def original_hf_folder(ctx: Context) -> Path:
    """The model as a plain fp32 Hugging Face folder (written once; the baselines load from it)."""
    folder = ctx.cache / "original-hf"
    if not (folder / "config.json").is_file():
        with atomic_output_dir(folder, overwrite=True) as tmp:
            ctx.model.save_pretrained(tmp)
            ctx.tokenizer.save_pretrained(tmp)
    return folder


def _export_onnx(spec: PointSpec, ctx: Context, model: nn.Module, folder: Path | None, onnx_path: Path) -> dict:
    """The point's deployment export: the fused onnxruntime-genai folder where the architecture has one
    (what `hyperquant export DIR --out FOLDER` writes), else one traced file. Returns the report with
    ``file_bytes`` = the model's bytes on disk."""
    from hyperquant.exporters import export_checkpoint, export_dense, export_genai_folder, fused_reason

    source = copy.deepcopy(model) if spec.method == "original" else None
    if fused_reason(model) is None:
        tokens_from = original_hf_folder(ctx) if spec.method == "original" else folder
        if source is None:
            from hyperquant.checkpoint import load

            source = load(folder)
        report = export_genai_folder(source, onnx_path.parent, ctx.tokenizer, tokens_from,
                                     accuracy_level=ctx.cfg.accuracy_level, overwrite=True)
        return {**report, "file_bytes": report["model_bytes"], "graph": "fused"}
    if spec.method == "original":
        return {**export_dense(source, onnx_path, ctx.tokenizer, overwrite=True), "graph": "traced"}
    return {**export_checkpoint(folder, onnx_path, accuracy_level=ctx.cfg.accuracy_level, overwrite=True),
            "graph": "traced"}


def point_family(spec: PointSpec) -> str:
    """The legend group; a checkpoint is grouped by what its plan holds (PHM trained, PHM, dense)."""
    if spec.method != "checkpoint":
        return spec.family()
    try:
        section = json.loads((Path(spec.checkpoint) / "config.json").read_text())["hyperquant"]
    except (OSError, ValueError, KeyError):
        return spec.family()
    if any(str(layer.get("kind", "")).startswith("phm") for layer in section.get("layers", {}).values()):
        return "PHM trained" if "train_config" in section else "PHM (checkpoint)"
    return "dense (checkpoint)"


def why_no_latency(spec: PointSpec, model: nn.Module | None = None) -> str | None:
    """None if the point's model exports to ONNX; else the reason (its layer kinds' own)."""
    from hyperquant.kinds import kind_of, kind_of_entry

    if spec.baseline:
        return f"{spec.baseline} models are not exported by hyperquant"
    reasons = []
    if model is not None:
        for module in model.modules():
            kind = kind_of(module)
            if kind is not None:
                reasons.append(kind.no_export_reason(module))
    elif spec.compress is not None:
        entries = [spec.main_entry(), *spec.compress.layers.values()]
        reasons = [kind_of_entry(e).no_export_reason(e) for e in entries]
    return next((r for r in reasons if r), None)


def measure_point(spec: PointSpec, ctx: Context, point_dir: Path) -> dict:
    """Build ``spec``'s model, measure size, compute and perplexity, export it to ONNX; return the point."""
    from hyperquant.evals import model_size, perplexity
    from hyperquant.evals.perplexity import reported
    from hyperquant.evals.size import dtype_bytes

    ckpt = point_dir / "checkpoint"
    shutil.rmtree(ckpt, ignore_errors=True)
    details: dict = {}
    if spec.method == "original":
        ctx.model.save_pretrained(ckpt)  # fp32 safetensors: the bytes a user of the original model stores
        model, layers, seconds, folder = ctx.model, [], None, ckpt
        size = model_size(model)
    elif spec.compress is not None:
        model, layers, seconds = _build_hyperquant(spec, ctx, ckpt)
        folder = ckpt
        size = model_size(model, rest_bytes_per_param=dtype_bytes(model.config.hyperquant["compress_config"]["rest_dtype"]))
    elif spec.method == "checkpoint":
        model, layers, seconds, folder = _build_checkpoint(spec)
        size = model_size(model, rest_bytes_per_param=dtype_bytes(model.config.hyperquant["compress_config"]["rest_dtype"]))
    else:
        from hyperquant.tradeoff.baselines import run_baseline, unavailable_reason

        reason = unavailable_reason(spec.baseline)
        if reason is not None:
            return {"status": "skipped", "error": reason}
        result = run_baseline(spec.baseline, original_hf_folder(ctx), ctx.ffn_names, ctx.calib, spec.bits,
                              spec.group_size, ckpt)
        model, layers, seconds, folder = result.model, [], result.seconds, result.folder
        details = dict(result.details)
        size = {"params": ctx.original_params, "macs_per_token": model_size(ctx.model)["macs_per_token"]}
    files = weight_files(folder)
    on_disk = sum(f.stat().st_size for f in files)
    ffn_bytes = stored_tensor_bytes(files, ctx.ffn_names)
    metrics = {
        "bytes_on_disk": on_disk,
        "weight_files": {str(f.relative_to(folder)): f.stat().st_size for f in files},
        "bits_per_weight": 8 * on_disk / ctx.original_params,
        "ffn_bytes_stored": ffn_bytes,
        "ffn_bits_per_weight": 8 * ffn_bytes / ctx.ffn_weights if ffn_bytes else None,
        "params": size["params"],
        "macs_per_token": size["macs_per_token"],
        "compress_seconds": seconds,
    }
    start = time.perf_counter()
    for key, ids in (("perplexity", ctx.eval_ids), ("perplexity_second_domain", ctx.second_ids)):  # validation
        result = perplexity(model, ids, ctx.protocol)
        metrics[key], metrics[f"{key}_stderr"] = result["perplexity"], result["perplexity_stderr"]
    test_protocol = dataclasses.replace(ctx.protocol, num_tokens=ctx.cfg.test_tokens)
    metrics["test"] = {name: reported(perplexity(model, ids, test_protocol)) for name, ids in ctx.test_ids.items()}
    metrics["eval_seconds"] = time.perf_counter() - start
    onnx = None
    no_latency = why_no_latency(spec, model if spec.method == "checkpoint" else None) if ctx.cfg.latency \
        else "latency disabled (latency: false)"
    if no_latency is None:
        onnx_path = point_dir / "onnx" / "model.onnx"
        try:
            report = _export_onnx(spec, ctx, model, folder, onnx_path)
        except HyperquantError as e:  # e.g. parity at accuracy_level 4 on 2-bit weights: keep the rest
            no_latency = f"ONNX export failed: {e}"
        else:
            onnx = {"path": str(onnx_path), "file_bytes": report["file_bytes"], "graph": report["graph"],
                    "parity_rel": report["max_rel_error"], "export_seconds": report["export_seconds"]}
    if spec.method != "checkpoint" and not ctx.cfg.keep_checkpoints:
        shutil.rmtree(ckpt, ignore_errors=True)
        metrics["checkpoint_removed"] = True
    return {"status": "ok", "error": None, "metrics": metrics, "layers": layers, "onnx": onnx,
            "no_latency_reason": no_latency, "details": details}


# ---------------------------------------------------------------------------------------------- running
def _load_context(cfg: SweepConfig, cache: Path) -> Context:
    from hyperquant.convert import find_ffn_linears, linear_weight
    from hyperquant.data import calibration_split, eval_tokens, second_domain_tokens
    from hyperquant.evals import PerplexityProtocol
    from hyperquant.models import load_model, resolve_source
    from hyperquant.textsets import load_test_set

    source = resolve_source(cfg.model)
    model, tokenizer = load_model(source)
    model.eval()
    ffn = find_ffn_linears(model, None)
    needed = max(cfg.eval_tokens, cfg.prompt_tokens + cfg.decode_tokens)
    calib, heldout = calibration_split(tokenizer, cfg.calib_samples, CompressConfig.heldout_samples, cfg.calib_seq_len)
    return Context(
        cfg=cfg, source=source, model=model, tokenizer=tokenizer, calib=calib, heldout=heldout,
        eval_ids=eval_tokens(tokenizer, needed), second_ids=second_domain_tokens(tokenizer, cfg.eval_tokens),
        test_ids=load_test_set(getattr(tokenizer, "tokenizer", tokenizer), cfg.test_tokens),
        protocol=PerplexityProtocol(context=cfg.eval_context, stride=cfg.eval_context, num_tokens=cfg.eval_tokens),
        cache=cache, ffn_names=list(ffn),
        original_params=sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
        ffn_weights=sum(linear_weight(m).numel() for m in ffn.values()),
    )


def run_sweep(cfg: SweepConfig, out_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
              overwrite: bool = False, command: str = "", progress: bool = True) -> dict:
    """Measure every point of ``cfg`` (reusing cached ones), time the ONNX exports side by side and write
    the report to ``out_dir`` (atomically). Returns {"points": [...], "files": {...}, "computed": [ids]}."""
    from hyperquant.tradeoff.render import write_report

    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite)
    cache = Path(cache_dir) if cache_dir else out_dir.parent / f".{out_dir.name}.cache"
    (cache / "points").mkdir(parents=True, exist_ok=True)
    ctx = _load_context(cfg, cache)
    identity = model_identity(ctx.source)
    specs = cfg.expanded()
    points: list[dict] = []
    computed: list[str] = []
    bar = _bar(progress, len(specs))
    try:
        for spec in specs:
            pid = cfg.point_id(spec, identity)
            label = cfg.label_of(spec)
            if bar is not None:
                bar.set_description(label[:40])
            point_dir = cache / "points" / pid
            cached = point_dir / "point.json"
            base = {"id": pid, "label": label, "family": point_family(spec), "method": spec.method,
                    "config": spec.key()}
            if cached.is_file() and json.loads(cached.read_text()).get("status") == "ok":
                point = {**json.loads(cached.read_text()), **base}
            else:
                point_dir.mkdir(parents=True, exist_ok=True)
                start = time.perf_counter()
                try:
                    point = {**base, **measure_point(spec, ctx, point_dir)}
                except HyperquantError as e:
                    point = {**base, "status": "failed", "error": str(e)}
                except Exception as e:  # noqa: BLE001 (one broken point must not lose the others)
                    point = {**base, "status": "failed", "error": f"{type(e).__name__}: {e}",
                             "traceback": traceback.format_exc()}
                point["seconds"] = time.perf_counter() - start
                write_json_atomic(cached, point, default=str)
                computed.append(pid)
                with open(cache / "sweep_log.jsonl", "a") as handle:
                    handle.write(json.dumps({"time": _now(), "id": pid, "label": label, "status": point["status"],
                                          "seconds": round(point["seconds"], 1), "error": point.get("error")}) + "\n")
                if point["status"] != "ok":
                    log.warning("%s: %s %s", label, point["status"], point.get("error"))
            points.append(point)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    _time_exports(points, ctx)
    from hyperquant.data import second_domain_name

    meta = {
        "model": str(ctx.source),
        "command": command,
        "created": _now(),
        "machine": _machine(cfg.latency_threads),
        "protocol": {"perplexity": ctx.protocol.to_dict(), "text": "held-out Wikipedia split (hash of title)",
                     "second_domain": second_domain_name(),
                     "calibration": f"{cfg.calib_samples} x {cfg.calib_seq_len} tokens of the calibration split",
                     "latency": (f"onnxruntime CPU, {cfg.latency_threads} threads, batch 1, prefill "
                                 f"{cfg.prompt_tokens} tokens then {cfg.decode_tokens} decode steps with the KV "
                                 f"cache, median of {cfg.latency_rounds} interleaved rounds, MatMulNBits "
                                 f"accuracy_level {cfg.accuracy_level}; the fused graph of `hyperquant export "
                                 "DIR --out FOLDER` (GroupQueryAttention, SkipSimplifiedLayerNormalization, "
                                 "MatMulNBits for every quantized linear) where the architecture has one, else "
                                 "the traced graph") if cfg.latency else "not measured",
                     "bits_per_weight": "8 x bytes of the weight files / parameters of the original model; FFN: "
                                        "bytes of the stored FFN tensors (codes, scales, zero points, bases) / "
                                        "weights of the dense FFN linears"},
        "notes_md": Path(cfg.notes).read_text() if cfg.notes else None,
        "sweep_config": cfg.to_dict(),
    }
    with atomic_output_dir(out_dir, overwrite) as tmp:
        files = write_report(points, tmp, meta)
        files = {k: out_dir / Path(v).name for k, v in files.items()}
    return {"points": points, "files": files, "computed": computed}


def _time_exports(points: list[dict], ctx: Context) -> None:
    """Side-by-side onnxruntime timing of every point that has an export (not cached: machines change)."""
    from hyperquant.evals.ort_latency import interleaved_latency

    exported = {p["id"]: p["onnx"]["path"] for p in points
                if p.get("status") == "ok" and p.get("onnx") and Path(p["onnx"]["path"]).is_file()}
    for p in points:
        if p.get("status") == "ok":
            p["metrics"]["prefill_ms"] = p["metrics"]["decode_ms"] = None
    if not exported:
        return
    cfg = ctx.cfg
    log.info("timing %d ONNX exports side by side (%d rounds)", len(exported), cfg.latency_rounds)
    timings = interleaved_latency(exported, ctx.eval_ids.numpy(), cfg.prompt_tokens, cfg.decode_tokens,
                                  cfg.latency_rounds, cfg.latency_threads)
    for p in points:
        if p["id"] in timings:
            t = timings[p["id"]]
            p["metrics"]["prefill_ms"], p["metrics"]["decode_ms"] = t["prefill_ms"], t["decode_ms"]
            p["latency"] = t


def _bar(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="points", unit="point", dynamic_ncols=True)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _machine(threads: int) -> str:
    import onnxruntime

    return (f"{platform.machine()}, {os.cpu_count()} CPUs, onnxruntime {onnxruntime.__version__} "
            f"({threads} threads), torch {torch.__version__}")

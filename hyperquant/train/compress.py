"""`hyperquant compress` with training (the default for PHM layers): train, export, evaluate, publish.

The training run lives in a work folder beside the output (``.<out>.train``): if the job is interrupted,
running the same command again resumes from its last checkpoint. On success the exported checkpoint,
the report and the training logs are published to the output folder in one rename, and the work
folder is removed.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from hyperquant.config import CompressConfig
from hyperquant.train.config import TrainConfig

TRAIN_LOGS = ("metrics.csv", "eval.jsonl", "plan.jsonl", "summary.json", "capacity.json", "capacity.md")


def work_dir_for(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.train"


def train_and_compress(source, model, tokenizer, ccfg: CompressConfig, tcfg: TrainConfig, out_dir: Path,
                       overwrite: bool, train_ids, eval_ids, protocol, rows: list[dict], console) -> dict:
    """Train ``model`` (loaded from ``source``) as ``tcfg`` says, evaluate the exported checkpoint and
    write it with its report to ``out_dir``. ``rows`` holds the original model's row; the compressed
    row is appended. Returns the training summary."""
    from hyperquant.checkpoint import atomic_output_dir, load
    from hyperquant.evals import model_size, perplexity
    from hyperquant.evals.size import dtype_bytes
    from hyperquant.report import compress_report_md
    from hyperquant.train.runner import latest_checkpoint, train

    work = Path(tcfg.output_dir)
    if latest_checkpoint(work) is not None:
        console.print(f"resuming the interrupted training run in {work}")
    start = time.perf_counter()
    summary = train(source, tcfg, train_ids=train_ids, eval_ids=eval_ids, model=model, tokenizer=tokenizer)
    seconds = time.perf_counter() - start
    final_dir = Path(summary["final_dir"])
    trained = load(final_dir)
    steps, minutes = summary["steps"], summary["train_time_s"] / 60
    label = (f"PHM n={ccfg.n} B={ccfg.num_bases} {tcfg.export_method.upper()}-{ccfg.bits} g{ccfg.group_size}, "
             f"trained {steps} steps" + (" with QAT" if tcfg.qat_start_step is not None else "")
             if ccfg.bits else f"PHM n={ccfg.n} B={ccfg.num_bases} float, trained {steps} steps")
    row = {"label": label, "size": model_size(trained, rest_bytes_per_param=dtype_bytes(ccfg.rest_dtype))}
    if protocol is not None:
        console.print("perplexity of the trained, compressed model")
        row["perplexity"] = perplexity(trained, eval_ids, protocol)["perplexity"]
    rows.append(row)
    log = json.loads((final_dir / "quant_log.json").read_text())
    with atomic_output_dir(out_dir, overwrite) as tmp:
        for item in final_dir.iterdir():
            shutil.copy2(item, tmp / item.name)
        (tmp / "train").mkdir()
        for name in TRAIN_LOGS:
            if (work / name).is_file():
                shutil.copy2(work / name, tmp / "train" / name)
        row["size"]["bytes_on_disk"] = (tmp / "model.safetensors").stat().st_size
        text = compress_report_md(str(source), ccfg.to_dict(), rows, log,
                                  protocol.to_dict() if protocol else None, seconds)
        tokens = steps * tcfg.per_device_batch_size * tcfg.grad_accum_steps * tcfg.seq_len
        text += "\n".join([
            "## Training", "",
            (f"{steps} optimizer steps in {minutes:.1f} min (budget {tcfg.max_minutes} min) on {tokens:,} "
             "tokens; the time above includes the initial PHM fit, the export and the evaluations."),
            ("Per-step losses: train/metrics.csv; the schedule as (re-)planned: train/plan.jsonl; "
             "the full training configuration: config.json (hyperquant.train_config)."), ""])
        (tmp / "report.md").write_text(text)
        (tmp / "summary.json").write_text(json.dumps(
            {"source": str(source), "config": ccfg.to_dict(), "train_config": tcfg.to_dict(), "rows": rows,
             "protocol": protocol.to_dict() if protocol else None, "compress_seconds": seconds,
             "train_summary": summary}, indent=2, default=str))
    shutil.rmtree(work, ignore_errors=True)
    return summary

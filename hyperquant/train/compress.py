"""`hyperquant compress` with training (the default for PHM layers): train, export, evaluate, publish.

The training run lives in a work folder beside the output (``.<out>.train``): if the job is interrupted,
running the same command again resumes from its last checkpoint. On success the exported checkpoint,
the report and the training logs are published to the output folder in one rename (the same
`job.write_output` as every compress), and the work folder is removed.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from hyperquant.config import CompressConfig
from hyperquant.train.config import TrainConfig

TRAIN_LOGS = ("metrics.csv", "eval.jsonl", "plan.jsonl", "summary.json", "capacity.json", "capacity.md",
              "generation.json", "blockwise.json")
log = logging.getLogger(__name__)


def work_dir_for(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.train"


def train_and_compress(source, model, tokenizer, ccfg: CompressConfig, tcfg: TrainConfig, out_dir: Path,
                       overwrite: bool, train_ids, evaluation, rows: list[dict], image_samples=None) -> dict:
    """Train ``model`` (loaded from ``source``) as ``tcfg`` says, evaluate the exported checkpoint and
    write it with its report to ``out_dir``. ``rows`` holds the original model's row; the compressed
    row is appended. Returns the training summary."""
    from hyperquant.checkpoint import load
    from hyperquant.job import measure, model_label, write_output
    from hyperquant.train.runner import latest_checkpoint, train

    work = Path(tcfg.output_dir)
    if latest_checkpoint(work) is not None:
        log.warning("resuming the interrupted training run in %s", work)
    start = time.perf_counter()
    eval_ids = evaluation.eval_ids
    summary = train(source, tcfg, train_ids=train_ids, eval_ids=eval_ids, model=model, tokenizer=tokenizer,
                    image_samples=image_samples)
    seconds = time.perf_counter() - start
    final_dir = Path(summary["final_dir"])
    trained = load(final_dir)
    trained.hyperquant_log = json.loads((final_dir / "quant_log.json").read_text())
    steps, minutes = summary["steps"], summary["train_time_s"] / 60
    qat = " with QAT" if tcfg.qat_start_step is not None else ""
    rows.append(measure(trained, model_label(trained, f", trained {steps} steps{qat}"), evaluation,
                        ccfg.rest_dtype))

    def copy_train_logs(folder: Path) -> None:
        (folder / "train").mkdir()
        for name in TRAIN_LOGS:
            if (work / name).is_file():
                shutil.copy2(work / name, folder / "train" / name)

    tokens = steps * tcfg.per_device_batch_size * tcfg.grad_accum_steps * tcfg.seq_len
    budget = f"budget {tcfg.max_minutes} min" if tcfg.max_minutes else f"{tcfg.max_steps} steps planned"
    training_md = "\n".join([
        "## Training", "",
        (f"{steps} optimizer steps in {minutes:.1f} min ({budget}) on {tokens:,} tokens; the time above "
         "includes the initial PHM fit, the export and the evaluations."),
        ("Per-step losses: train/metrics.csv; the schedule as (re-)planned: train/plan.jsonl; "
         "the full training configuration: config.json (hyperquant.train_config)."), ""])
    write_output(trained, out_dir, tokenizer, source=str(source), rows=rows, seconds=seconds, evaluation=evaluation,
                 overwrite=overwrite, report_extra=training_md,
                 summary_extra={"train_config": tcfg.to_dict(), "train_summary": summary},
                 extra_files=copy_train_logs)
    shutil.rmtree(work, ignore_errors=True)
    return summary

"""Peak host memory and time of `hyperquant compress --no-train` and of one training step, side by side.

    python scripts/bench_memory.py --out docs/bench_memory            # compress + training step
    python scripts/bench_memory.py --out docs/bench_memory --skip-compress
    python scripts/bench_memory.py --out docs/bench_memory/processes --skip-compress --skip-train --processes

Each measurement runs in a fresh process (peak RSS is per process). The compress row is the real
command on the embedded default model (eval skipped: --eval-tokens 0); its per-layer log gives where the
peak happens. The training rows run one optimizer step of the default recipe (Stage A: dense and PHM
branches both alive, its memory peak) with the teacher as the student's own frozen dense weights
(`teacher: dense`, the default) and as a second copy of the model (`teacher: separate`, the old
default). With --processes, one step on 2 CPU processes (gloo) as DDP and as FSDP (`fsdp: true`): each
process's peak and its resident memory after the step, and how many parameter elements it holds.
Beside them it lists, from shapes alone, the pieces that grow with the model for the default
model and a 7B Llama: a projection, not a measurement. Prints a table and writes bench_memory.json and bench_memory.md to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 2**30

_STEP_CHILD = r"""
import json, sys, time
from hyperquant.device import memory_now
from hyperquant.models import load_model, resolve_source
from hyperquant.train import TrainConfig, train

teacher, out = sys.argv[1], sys.argv[2]
source = resolve_source(None)
model, tokenizer = load_model(source)
before = memory_now()
cfg = TrainConfig(teacher=teacher, output_dir=out, progress=False, export=False, save_every=0, eval_every=0,
                  eval_tokens=256, num_threads=2, init_sequential=False, compress={"init": "frobenius"})
start = time.perf_counter()
train(source, cfg, model=model, tokenizer=tokenizer, stop_after=1)
row = {"teacher": teacher, "seconds": time.perf_counter() - start, "loaded": before, "after_step": memory_now()}
print("RESULT " + json.dumps(row))
"""

# one step on each of the processes `accelerate launch` started; each prints its own figures
_PROCESS_CHILD = r"""
import json, resource, sys, time
import torch.distributed as dist
from hyperquant.device import memory_now
from hyperquant.models import load_model, resolve_source
from hyperquant.train import TrainConfig, train
from hyperquant.train.sharding import local_numel

fsdp, out = sys.argv[1] == "fsdp", sys.argv[2]
source = resolve_source(None)
model, tokenizer = load_model(source)
cfg = TrainConfig(fsdp=fsdp, output_dir=out, progress=False, export=False, save_every=0, eval_every=0,
                  eval_tokens=256, num_threads=1, init_sequential=False, compress={"init": "frobenius"},
                  per_device_batch_size=2)
start = time.perf_counter()
train(source, cfg, model=model, tokenizer=tokenizer, stop_after=1)
row = {"rank": dist.get_rank(), "seconds": time.perf_counter() - start, "after_step": memory_now(),
       "peak_host_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
       "parameters_local": local_numel(model), "parameters": sum(p.numel() for p in model.parameters())}
print("RESULT " + json.dumps(row), flush=True)
"""


def _peak_kib(cmd: list[str], env: dict) -> tuple[int, float, str]:
    """Run ``cmd``; return its peak RSS (KiB, from GNU time) and seconds, and its output."""
    timer = ["/usr/bin/time", "-f", "PEAK_KIB %M"]
    start = time.perf_counter()
    proc = subprocess.run(timer + cmd, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed:\n{proc.stderr[-2000:]}")
    peak = int(next(line.split()[1] for line in proc.stderr.splitlines() if line.startswith("PEAK_KIB")))
    return peak, seconds, proc.stdout


def measure_compress(work: Path, env: dict) -> dict:
    out = work / "compressed"
    peak, seconds, _ = _peak_kib([sys.executable, "-m", "hyperquant", "compress", "--no-train", "--eval-tokens", "0",
                                  "--out", str(out)], env)
    layers = json.loads((out / "quant_log.json").read_text())
    at_peak = max(layers, key=lambda r: r.get("peak_host_bytes", 0))
    first_peak = next(r for r in layers if r.get("peak_host_bytes", 0) == at_peak["peak_host_bytes"])
    return {"peak_host_bytes": peak * 1024, "seconds": seconds, "layers": len(layers),
            "peak_reached_at_layer": first_peak["name"],
            # a table built from the head's codes has no memory record of its own
            "rss_after_first_layer": next(r["host_rss_bytes"] for r in layers if "host_rss_bytes" in r),
            "rss_after_last_layer": [r["host_rss_bytes"] for r in layers if "host_rss_bytes" in r][-1]}


def measure_step(work: Path, env: dict, teacher: str) -> dict:
    peak, seconds, stdout = _peak_kib([sys.executable, "-c", _STEP_CHILD, teacher, str(work / f"train-{teacher}")], env)
    row = json.loads(next(line[7:] for line in stdout.splitlines() if line.startswith("RESULT ")))
    return {**row, "peak_host_bytes": peak * 1024, "process_seconds": seconds}


def measure_processes(work: Path, env: dict, mode: str) -> dict:
    """One training step on 2 CPU processes (gloo), as DDP or FSDP: each process's own figures."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    child = work / "process_child.py"
    child.write_text(_PROCESS_CHILD)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), str(child),
           mode, str(work / f"train-{mode}")]
    start = time.perf_counter()
    # glibc otherwise keeps freed large blocks in its heap (its mmap threshold rises as they are freed), and
    # resident memory would not show the whole tensors sharding freed
    env = {**env, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} on 2 processes failed:\n{proc.stderr[-2000:]}")
    ranks = sorted((json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")),
                   key=lambda r: r["rank"])
    return {"mode": mode, "process_seconds": time.perf_counter() - start, "ranks": ranks}


def project_7b(default_params: int) -> dict:
    """Byte counts of the pieces that grow with the model, for the default model and a 7B Llama (32 blocks,
    hidden 4096, FFN 11008, vocabulary 32000): a projection from shapes, not a measurement."""
    shapes = {"default": {"params": default_params, "blocks": 30, "hidden": 576, "ffn": 1536, "vocab": 49152},
              "7B": {"params": 6.74e9, "blocks": 32, "hidden": 4096, "ffn": 11008, "vocab": 32000}}
    tokens_step, tokens_calib = 4 * 256, 36 * 512  # a training batch; calibration + held-out rows
    out = {}
    for name, m in shapes.items():
        block = 4 * m["hidden"] ** 2 + 3 * m["hidden"] * m["ffn"]  # attention (no GQA saving counted) + FFN
        out[name] = {
            "weights_fp32_bytes": m["params"] * 4,
            "block_fp32_bytes": block * 4,
            "calibration_stream_bytes": tokens_calib * m["hidden"] * 4 * 2,  # a block's inputs and outputs
            "gptq_head_slice_bytes": 4096 * m["hidden"] * 8 * 6,  # float64 working copies of one row slice
            "logits_per_step_bytes": tokens_step * m["vocab"] * 4,
            "phm_factors_with_adam_bytes": m["blocks"] * 3 * m["hidden"] * m["ffn"] / 2 * 4 * 3,  # n=2, B=2
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/bench_memory"))
    parser.add_argument("--skip-compress", action="store_true")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--processes", action="store_true", help="also one step on 2 processes, DDP and FSDP")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    from hyperquant.models import load_model, resolve_source

    default_params = sum(p.numel() for p in load_model(resolve_source(None))[0].parameters())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        compress_row = None if args.skip_compress else measure_compress(work, env)
        steps = {} if args.skip_train else {t: measure_step(work, env, t) for t in ("dense", "separate")}
        processes = {m: measure_processes(work, env, m) for m in ("ddp", "fsdp")} if args.processes else {}
    projection = project_7b(default_params)
    rows = []
    if compress_row:
        rows.append(["compress --no-train (whole model, GPTQ-4)", f"{compress_row['peak_host_bytes'] / GIB:.2f}",
                     f"{compress_row['seconds']:.0f}"])
    for teacher, row in steps.items():
        rows.append([f"1 training step, teacher: {teacher}", f"{row['peak_host_bytes'] / GIB:.2f}",
                     f"{row['seconds']:.0f}"])
    from hyperquant.report import markdown_table

    table = markdown_table(["run (default model)", "peak host GiB", "s"], rows) if rows else ""
    if processes:
        table += "\n\n" if table else ""
        table += markdown_table(
            ["1 training step, 2 CPU processes", "peak host GiB per process", "resident after the step, GiB",
             "parameters per process", "s"],
            [[mode.upper(), " / ".join(f"{r['peak_host_bytes'] / GIB:.2f}" for r in row["ranks"]),
              " / ".join(f"{r['after_step']['host_rss_bytes'] / GIB:.2f}" for r in row["ranks"]),
              " / ".join(f"{r['parameters_local'] / 1e6:.1f} M of {r['parameters'] / 1e6:.1f} M" for r in row["ranks"]),
              f"{row['process_seconds']:.0f}"] for mode, row in processes.items()])
    pieces = projection["default"]
    table += "\n\n" + markdown_table(["piece (projection from shapes)", "default model, GiB", "7B Llama, GiB"],
                                      [[k.removesuffix("_bytes"), f"{pieces[k] / GIB:.3f}",
                                        f"{projection['7B'][k] / GIB:.2f}"] for k in pieces])
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"default_params": default_params, "python": sys.version.split()[0], "threads": env["OMP_NUM_THREADS"],
            "command": "python scripts/bench_memory.py " + " ".join(sys.argv[1:])}
    (args.out / "bench_memory.json").write_text(json.dumps(
        {"meta": meta, "compress": compress_row, "train_step": steps, "processes": processes,
         "projection_7b": projection}, indent=2))
    (args.out / "bench_memory.md").write_text(
        table + f"\n\nCommand: `{meta['command']}`. The second table is computed from shapes (a projection, not a "
        f"measurement); s: wall time of the whole process, on a shared machine.\n")


if __name__ == "__main__":
    main()

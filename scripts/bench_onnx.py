"""Benchmark onnxruntime latency of exported LMs: dense fp32, onnxruntime's own MatMulNBits-4, hyperquant
dense GPTQ-4, float PHM and PHM + 4-bit, on the same inputs in one run.

    python scripts/bench_onnx.py --out bench_onnx            # default model (SmolLM2-135M-Instruct)
    python scripts/bench_onnx.py --out bench_onnx --profile  # plus onnxruntime profiles of one decode

Every variant is exported (and parity-checked) by hyperquant.exporters into --work (reused when already
there). Timing: prefill of --prefill real tokens and --decode single-token steps with the KV cache,
batch 1; the variants are timed interleaved (round robin, one prefill + decode pass each per round) so
that background load hits all of them alike. Reported: medians over rounds, ratios to the onnxruntime
MatMulNBits-4 baseline, tokens/s and file sizes. Writes results.json and results.md to --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from hyperquant.evals.ort_latency import interleaved_latency, run_pass, session_options
from hyperquant.exporters import OnnxCausalLM, export_checkpoint, export_dense, export_ort_rtn

from hyperquant import CompressConfig
from hyperquant.data import calibration_ids, eval_tokens
from hyperquant.job import Evaluation, compress_to_folder
from hyperquant.models import default_model_source, load_model

BASELINE = "dense_ort_rtn4"


def variants(ort_block: int) -> dict[str, dict]:
    """name -> how to build it. ``rest``: onnxruntime RTN-4 (block ort_block) on the MatMuls hyperquant
    leaves in float (attention; the tied LM head has no constant MatMul weight and stays fp32 everywhere)."""
    phm4 = {"bits": 4, "method": "rtn", "init": "frobenius", "num_bases": 2}
    return {
        "dense_fp32": {"label": "dense fp32", "kind": "dense"},
        BASELINE: {"label": f"dense MatMulNBits-4 (onnxruntime RTN, block {ort_block})", "kind": "ort"},
        "hq_dense_gptq4": {"label": "hyperquant dense GPTQ-4 (n=1) + attn RTN-4", "rest": 4,
                           "config": {"bits": 4, "n": 1, "method": "gptq", "calib_samples": 8, "calib_seq_len": 128}},
        "phm_fp32": {"label": "PHM fp32 (n=2, B=2)",
                     "config": {"bits": None, "n": 2, "num_bases": 2, "init": "frobenius"}},
        "phm4_n2b2_ffn_only": {"label": "PHM+4-bit n=2 B=2, attention fp32", "config": dict(n=2, **phm4)},
        "phm4_n2b2": {"label": "PHM+4-bit n=2 B=2 + attn RTN-4", "rest": 4, "config": dict(n=2, **phm4),
                      "checkpoint": "phm4_n2b2_ffn_only"},
        "phm4_n4b2": {"label": "PHM+4-bit n=4 B=2 + attn RTN-4", "rest": 4, "config": dict(n=4, **phm4)},
    }


def build(name: str, spec: dict, base, tokenizer, work: Path, ort_block: int, calib, accuracy_level: int) -> Path:
    out = work / name / "model.onnx"
    if out.is_file():
        print(f"[{name}] reusing {out}")
        return out
    started = time.perf_counter()
    if spec.get("kind") == "dense":
        export_dense(base, out, tokenizer, overwrite=True)
    elif spec.get("kind") == "ort":
        export_ort_rtn(base, out, tokenizer, bits=4, block_size=ort_block, accuracy_level=accuracy_level,
                       overwrite=True)
    else:
        ckpt = work / spec.get("checkpoint", name) / "checkpoint"  # variants may share a checkpoint
        if not (ckpt / "config.json").is_file():
            cfg = CompressConfig(**spec["config"])
            compress_to_folder(copy.deepcopy(base), tokenizer, cfg, ckpt, source=name, calib=calib,
                               evaluation=Evaluation(), overwrite=True, progress=False)
        export_checkpoint(ckpt, out, rest_bits=spec.get("rest"), accuracy_level=accuracy_level, overwrite=True)
    report = json.loads((out.parent / "export_report.json").read_text())
    print(f"[{name}] exported in {time.perf_counter() - started:.0f}s, parity max rel {report['max_rel_error']:.2e}")
    return out


def profile_decode(path: Path, prompt, follow, threads: int, out_dir: Path, name: str) -> dict:
    """onnxruntime profile of one prefill + decode pass: total microseconds per op type, decode only."""
    lm = OnnxCausalLM(path, options=session_options(threads, str(out_dir / f"profile_{name}")))
    run_pass(lm, prompt, follow)
    trace = Path(lm.session.end_profiling())
    events = json.loads(trace.read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    decode_start = runs[1]["ts"] if len(runs) > 1 else 0  # skip the prefill run
    per_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= decode_start:
            op = e["args"].get("op_name", "?")
            per_op[op] = per_op.get(op, 0.0) + e["dur"]
    steps = max(len(runs) - 1, 1)
    return {op: us / steps for op, us in sorted(per_op.items(), key=lambda kv: -kv[1])}


def markdown(rows: list[dict], meta: dict, profiles: dict) -> str:
    lines = [
        (f"Model: {meta['model']}; prefill {meta['prefill']} tokens, decode {meta['decode']} tokens with KV cache, "
        f"batch 1, {meta['threads']} threads, MatMulNBits accuracy_level {meta['accuracy_level']}, "
        f"{meta['rounds']} interleaved rounds (medians); onnxruntime "
        f"{meta['onnxruntime']}, {meta['cpu']}."),
        "",
        ("| variant | file MB | prefill ms | prefill tok/s | decode ms/token | decode tok/s "
        f"| prefill × {BASELINE} | decode × {BASELINE} | parity rel err |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['file_mb']:.1f} | {r['prefill_ms']:.1f} | {r['prefill_tok_s']:.0f} | "
            f"{r['decode_ms']:.2f} | {r['decode_tok_s']:.1f} | {r['prefill_ratio']:.2f} | {r['decode_ratio']:.2f} | "
            f"{r['parity_rel']:.1e} |")
    for name, per_op in profiles.items():
        total = sum(per_op.values())
        lines += ["", (f"Decode profile of {name} (onnxruntime profiler, µs per decode step by op type, "
                      f"kernel time {total:.0f} µs):"), "", "| op | µs/token | share |", "|---|---:|---:|"]
        lines += [f"| {op} | {us:.0f} | {us / total:.0%} |" for op, us in list(per_op.items())[:10]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json / results.md")
    parser.add_argument("--work", type=Path, default=Path("bench_onnx_work"), help="exports (reused)")
    parser.add_argument("--prefill", type=int, default=128)
    parser.add_argument("--decode", type=int, default=32, help="decode steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ort-block", type=int, default=128, choices=(32, 128))
    parser.add_argument("--accuracy-level", type=int, default=4, choices=range(5),
                        help="MatMulNBits accuracy_level of every quantized variant (4 = int8 compute)")
    parser.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    parser.add_argument("--profile", action="store_true", help="profile the decode of the baseline and PHM-4")
    args = parser.parse_args()

    import onnxruntime as ort

    torch.manual_seed(0)
    base, tokenizer = load_model(default_model_source())
    calib = calibration_ids(tokenizer, 8, 128)
    specs = {k: v for k, v in variants(args.ort_block).items() if not args.only or k in args.only or k == BASELINE}
    paths = {name: build(name, spec, base, tokenizer, args.work / f"acc{args.accuracy_level}", args.ort_block,
                          calib, args.accuracy_level) for name, spec in specs.items()}
    del base

    tokens = eval_tokens(tokenizer, args.prefill + args.decode + 1).numpy().reshape(-1)
    prompt, follow = tokens[None, : args.prefill], tokens[args.prefill : args.prefill + args.decode]
    timings = interleaved_latency(paths, tokens, args.prefill, args.decode, args.rounds, args.threads)

    rows = []
    for name, path in paths.items():
        folder = path.parent
        report = json.loads((folder / "export_report.json").read_text())
        size = sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith("model.onnx"))
        t = timings[name]
        pf, dc = t["prefill_ms"], t["decode_ms"]
        rows.append({"name": name, "label": specs[name]["label"], "file_mb": size / 1e6,
                     "prefill_ms": pf, "prefill_tok_s": args.prefill / pf * 1e3, "decode_ms": dc,
                     "decode_tok_s": 1e3 / dc, "prefill_rounds_ms": t["prefill_rounds_ms"],
                     "decode_rounds_ms": t["decode_rounds_ms"], "parity_rel": report["max_rel_error"],
                     "nodes": report["nodes"], "ort_rtn_nodes": report.get("ort_rtn_nodes")})
    base_row = next(r for r in rows if r["name"] == BASELINE)
    for r in rows:
        r["prefill_ratio"] = r["prefill_ms"] / base_row["prefill_ms"]
        r["decode_ratio"] = r["decode_ms"] / base_row["decode_ms"]

    profiles = {}
    args.out.mkdir(parents=True, exist_ok=True)
    if args.profile:
        for name in [BASELINE, *[n for n in paths if n.startswith("phm4")]]:
            profiles[name] = profile_decode(paths[name], prompt, follow[:8], args.threads, args.out, name)

    import platform

    meta = {"model": str(default_model_source()), "prefill": args.prefill, "decode": args.decode,
            "rounds": args.rounds, "threads": args.threads, "accuracy_level": args.accuracy_level, "onnxruntime": ort.__version__,
            "cpu": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"}
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows, "profiles": profiles}, indent=2))
    md = markdown(rows, meta, profiles)
    (args.out / "results.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()

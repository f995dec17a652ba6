"""Deployment benchmark: hyperquant's onnxruntime-genai folders against onnxruntime-genai's own model
builder (int4) on the same dense weights, timed interleaved in one run.

    python scripts/bench_onnx.py --out docs/bench_onnx --work bench_onnx_work

Rows: the builder's int4 model (``python -m onnxruntime_genai.models.builder -p int4 -e cpu``, RTN,
what a user would otherwise run), and hyperquant's whole-model compressions (dense GPTQ-4, PHM n=2 / n=4
with GPTQ-4 factors and GPTQ-4 attention and LM head, RTN-4 embeddings), each exported with
``export_genai_folder`` (fused graph, parity-checked against torch). Any extra ``--checkpoint DIR``
(e.g. a trained one) is exported and timed too.

Measured for every folder, in one process: bytes on disk (model.onnx + data), nodes, build time,
prefill ms (``--prefill`` real tokens) and decode ms/token with the KV cache (batch 1, ``--threads``
threads, medians of ``--rounds`` interleaved rounds, plain onnxruntime sessions fed the same tokens),
the weight bytes each decode step must read (every initializer but the embedding table, of which a
step reads one row) and the bandwidth that implies, perplexity through onnxruntime on the README's
held-out protocol (4,096 wiki tokens, windows of 512), and greedy generation through
onnxruntime-genai's Generator (its first tokens must equal the onnxruntime session's). Writes
results.json and results.md to --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from hyperquant.evals.ort_latency import interleaved_latency
from hyperquant.evals.perplexity import PerplexityProtocol, perplexity
from hyperquant.exporters import (
    OnnxCausalLM,
    export_checkpoint_folder,
    export_genai_folder,
    genai_generate_ids,
    generate_ids,
)

from hyperquant import CompressConfig, HyperquantError
from hyperquant.data import calibration_ids, eval_tokens
from hyperquant.job import Evaluation, compress_to_folder
from hyperquant.models import default_model_source, load_model

BUILDER = "builder_int4"


def variants() -> dict[str, dict]:
    gptq4 = {"bits": 4, "method": "gptq", "group_size": 128}
    return {
        BUILDER: {"label": "onnxruntime-genai builder int4 (RTN, block 32, symmetric)", "how": "builder"},
        "hq_dense_gptq4": {"label": "hyperquant dense GPTQ-4 (every linear, LM head; the tied table = the head's codes)",
                           "config": {"n": 1, **gptq4}},
        "hq_phm4_n2b2": {"label": "hyperquant PHM n=2 B=2 GPTQ-4 FFN + GPTQ-4 attention/head, post-training",
                         "config": {"n": 2, "num_bases": 2, **gptq4}},
        "hq_phm4_n4b2": {"label": "hyperquant PHM n=4 B=2 GPTQ-4 FFN + GPTQ-4 attention/head, post-training",
                         "config": {"n": 4, "num_bases": 2, **gptq4}},
    }


def dense_hf_folder(base, tokenizer, work: Path) -> Path:
    """The default model's dense fp32 weights as a transformers safetensors folder (the builder's input)."""
    folder = work / "dense_hf"
    if (folder / "config.json").is_file():
        return folder
    model = copy.deepcopy(base)
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.float().contiguous()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_builder(hf: Path, out: Path, accuracy_level: int) -> float:
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out), "-p", "int4",
           "-e", "cpu", "-c", str(out.parent / "builder_cache"), "--extra_options",
           f"int4_accuracy_level={accuracy_level}"]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise SystemExit(f"the builder failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - started


def build(name: str, spec: dict, base, tokenizer, work: Path, calib, accuracy_level: int) -> dict:
    out = work / name
    info_path = work / f"{name}.build.json"
    if (out / "model.onnx").is_file() and info_path.is_file():
        print(f"[{name}] reusing {out}")
        return json.loads(info_path.read_text())
    shutil.rmtree(out, ignore_errors=True)
    if spec["how"] == "builder":
        seconds = run_builder(dense_hf_folder(base, tokenizer, work), out, accuracy_level)
        info = {"build_seconds": seconds, "parity_rel": None}
    elif spec["how"] == "checkpoint":
        started = time.perf_counter()
        report = export_checkpoint_folder(spec["checkpoint"], out, accuracy_level=accuracy_level)
        info = {"build_seconds": time.perf_counter() - started, "parity_rel": report["max_rel_error"]}
    else:
        ckpt = work / f"{name}_checkpoint"
        started = time.perf_counter()
        if not (ckpt / "config.json").is_file():
            result = compress_to_folder(copy.deepcopy(base), tokenizer, CompressConfig(**spec["config"]), ckpt,
                                        source=name, calib=calib, evaluation=Evaluation(), overwrite=True,
                                        progress=False)
            model = result.model
        else:
            from hyperquant.checkpoint import load

            model = load(ckpt)
        compress_seconds = time.perf_counter() - started
        started = time.perf_counter()
        try:
            report = export_genai_folder(model, out, tokenizer, ckpt, accuracy_level=accuracy_level, source=name)
            failure = None
        except HyperquantError as e:  # e.g. a post-training model whose activations blow up at int8
            print(f"[{name}] {e}; exported anyway to time it (parity marked failed)")
            failure = str(e)
            report = export_genai_folder(model, out, tokenizer, ckpt, accuracy_level=accuracy_level, source=name,
                                         tolerance=math.inf)  # NaN or Inf still fails
        info = {"build_seconds": compress_seconds + time.perf_counter() - started,
                "compress_seconds": compress_seconds, "parity_rel": report["max_rel_error"],
                "parity_failure": failure}
    (info_path).write_text(json.dumps(info))
    print(f"[{name}] built in {info['build_seconds']:.0f}s")
    return info


def graph_facts(folder: Path) -> dict:
    """Nodes, op counts, bytes on disk and the weight bytes a decode step reads (all initializers but
    the embedding table, which a step reads one row of)."""
    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    table = {n.input[0] for n in proto.graph.node if n.op_type in ("Gather", "GatherBlockQuantized")}
    # a table gathered through a Reshape (the builder's tied embedding) is the LM head's codes: read anyway
    sizes = {}
    for init in proto.graph.initializer:
        length = next((int(e.value) for e in init.external_data if e.key == "length"), None)
        sizes[init.name] = length if length is not None else len(init.raw_data) or onnx.numpy_helper.to_array(init).nbytes
    embedding_only = {name for name in table if name in sizes}
    disk = sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith("model.onnx"))
    return {"nodes": len(proto.graph.node), "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1])),
            "disk_bytes": disk, "decode_read_bytes": sum(v for k, v in sizes.items() if k not in embedding_only)}


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        (f"Model: {meta['model']}. onnxruntime {meta['onnxruntime']}, onnxruntime-genai {meta['onnxruntime_genai']}, "
         f"{meta['threads']} threads, batch 1, prefill {meta['prefill']} tokens, {meta['decode']} decode steps with "
         f"the KV cache, medians of {meta['rounds']} interleaved rounds, MatMulNBits accuracy_level "
         f"{meta['accuracy_level']}. Perplexity through onnxruntime: {meta['ppl_tokens']} held-out wiki tokens, "
         f"windows of {meta['ppl_context']}."),
        "",
        ("| model | build s | on disk MB | × builder | nodes | prefill ms | decode ms/token | × builder "
         "| MB read/token | GB/s | perplexity (ORT) | parity rel err | genai = ORT tokens |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['build_seconds']:.0f} | {r['disk_bytes'] / 1e6:.1f} | {r['bytes_ratio']:.2f} | "
            f"{r['nodes']} | {r['prefill_ms']:.1f} | {r['decode_ms']:.2f} | {r['decode_ratio']:.2f} | "
            f"{r['decode_read_bytes'] / 1e6:.1f} | {r['decode_read_bytes'] / r['decode_ms'] / 1e6:.1f} | "
            f"{r['perplexity']:.2f} | {_parity(r)} | {r['genai_matches']} |")
    lines += ["", "Ops per graph:", ""]
    for r in rows:
        lines.append(f"- {r['name']}: " + ", ".join(f"{k} {v}" for k, v in r["ops"].items()))
    return "\n".join(lines) + "\n"


def _parity(row: dict) -> str:
    if row.get("parity_rel") is None:
        return "–"
    return f"{row['parity_rel']:.3f}" + (" (fails)" if row.get("parity_failure") else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json / results.md")
    parser.add_argument("--work", type=Path, default=Path("bench_onnx_work"), help="builds (reused when there)")
    parser.add_argument("--prefill", type=int, default=128)
    parser.add_argument("--decode", type=int, default=32, help="decode steps per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--accuracy-level", type=int, default=4, choices=range(5))
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--checkpoint", nargs="*", default=[], metavar="LABEL=DIR",
                        help="hyperquant checkpoints to export and time too (e.g. trained=hyperquant-out/...)")
    parser.add_argument("--only", nargs="*", help="variant names to run (the builder always runs)")
    args = parser.parse_args()

    import onnxruntime as ort
    import onnxruntime_genai as og

    torch.manual_seed(0)
    base, tokenizer = load_model(default_model_source())
    calib = calibration_ids(tokenizer, args.calib_samples, 512)
    specs = {k: {"how": "compress", **v} for k, v in variants().items()
             if not args.only or k in args.only or k == BUILDER}
    for item in args.checkpoint:
        label, _, folder = item.partition("=")
        specs[label] = {"how": "checkpoint", "label": f"checkpoint {folder}", "checkpoint": folder}
    work = args.work / f"acc{args.accuracy_level}"
    work.mkdir(parents=True, exist_ok=True)
    infos = {name: build(name, spec, base, tokenizer, work, calib, args.accuracy_level) for name, spec in specs.items()}
    del base
    folders = {name: work / name for name in specs}

    tokens = eval_tokens(tokenizer, args.prefill + args.decode + 1).numpy().reshape(-1)
    timings = interleaved_latency({n: f / "model.onnx" for n, f in folders.items()}, tokens, args.prefill,
                                  args.decode, args.rounds, args.threads)
    protocol = PerplexityProtocol()
    ppl_ids = eval_tokens(tokenizer, protocol.num_tokens)
    prompt = [int(t) for t in tokens[:32]]
    rows = []
    for name, folder in folders.items():
        lm = OnnxCausalLM(folder / "model.onnx")
        ppl = perplexity(lm, ppl_ids, protocol)["perplexity"]
        ort_tokens = generate_ids(lm, prompt, 16)
        og_tokens = genai_generate_ids(folder, prompt, 16)
        rows.append({"name": name, "label": specs[name]["label"], **infos[name], **graph_facts(folder),
                     **{k: timings[name][k] for k in ("prefill_ms", "decode_ms", "prefill_rounds_ms", "decode_rounds_ms")},
                     "perplexity": ppl, "genai_tokens": og_tokens, "ort_tokens": ort_tokens,
                     "genai_matches": "yes" if og_tokens == ort_tokens else
                     f"first {next((i for i, (a, b) in enumerate(zip(og_tokens, ort_tokens)) if a != b), 16)}"})
        print(f"[{name}] perplexity {ppl:.2f}, decode {timings[name]['decode_ms']:.2f} ms/token")
    ref = next(r for r in rows if r["name"] == BUILDER)
    for r in rows:
        r["bytes_ratio"] = r["disk_bytes"] / ref["disk_bytes"]
        r["decode_ratio"] = r["decode_ms"] / ref["decode_ms"]
        r["prefill_ratio"] = r["prefill_ms"] / ref["prefill_ms"]
    meta = {"model": str(default_model_source()), "prefill": args.prefill, "decode": args.decode,
            "rounds": args.rounds, "threads": args.threads, "accuracy_level": args.accuracy_level,
            "onnxruntime": ort.__version__, "onnxruntime_genai": og.__version__,
            "ppl_tokens": protocol.num_tokens, "ppl_context": protocol.context, "calib_samples": args.calib_samples,
            "cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=_plain))
    md = markdown(rows, meta)
    (args.out / "results.md").write_text(md)
    print(md)


def _plain(value):
    return value.item() if isinstance(value, np.generic) else str(value)


if __name__ == "__main__":
    main()

"""Size / perplexity / time of dense and PHM settings on one model, side by side in one run.

    python scripts/bench_compress.py --out docs/bench_compress

Prints a table and writes bench_compress.json and bench_compress.md to --out. Every row starts from the
same loaded model and uses the same calibration and evaluation tokens.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import sys
from pathlib import Path

import torch
from hyperquant.evals import PerplexityProtocol

from hyperquant import CompressConfig
from hyperquant.data import calibration_ids, eval_tokens
from hyperquant.job import Evaluation, compress_and_measure, measure
from hyperquant.models import load_model, resolve_source
from hyperquant.report import fmt_ppl, human_bytes, markdown_table

FFN = {"scope": "ffn"}  # the FFN study: what PHM and the quantizers do to the FFN, the rest left in fp16
SETTINGS: dict[str, CompressConfig | None] = {
    "dense fp32": None,
    "dense RTN-4": CompressConfig(bits=4, n=1, method="rtn", **FFN),
    "dense GPTQ-4": CompressConfig(bits=4, n=1, method="gptq", **FFN),
    "PHM n2 B2 fp32, Frobenius projection": CompressConfig(bits=None, n=2, num_bases=2, init="frobenius", **FFN),
    "PHM n2 B2 fp32, activation-aware": CompressConfig(bits=None, n=2, num_bases=2, init="activation", **FFN),
    "PHM n2 B2 + RTN-4": CompressConfig(bits=4, n=2, num_bases=2, method="rtn", **FFN),
    "PHM n2 B2 + GPTQ-4": CompressConfig(bits=4, n=2, num_bases=2, method="gptq", **FFN),
    "PHM n2 B2 + GPTQ-4, fit to original outputs": CompressConfig(bits=4, n=2, num_bases=2, method="gptq",
                                                                   fit_target="original", **FFN),
    "PHM n4 B2 + GPTQ-4": CompressConfig(bits=4, n=4, num_bases=2, method="gptq", **FFN),
}  # the whole model (the default scope) is measured by scripts/bench_onnx.py, deployed
COLUMNS = ["setting", "total bytes", "FFN bytes", "bits/FFN weight", "MACs/token (FFN)", "perplexity",
           "compress s"]


def write_results(rows: list[dict], meta: dict, out: Path) -> str:
    """Write bench_compress.json and bench_compress.md to ``out``; return the Markdown table."""
    cells = [[r["setting"], human_bytes(r["size"]["bytes"]), human_bytes(r["size"]["ffn_bytes"]),
              f"{r['size']['ffn_bits_per_weight']:.2f}",
              f"{r['size']['macs_per_token'] / 1e6:.1f} M ({r['size']['ffn_macs_per_token'] / 1e6:.1f} M)",
              fmt_ppl(r["perplexity"]), f"{r['compress_seconds']:.0f}"] for r in rows]
    table = markdown_table(COLUMNS, cells)
    protocol = meta["protocol"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_compress.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    notes = (f"Model: {meta['model']}. Calibration: {meta['calibration']} of the Wikipedia calibration split. "
             f"Perplexity: {protocol['num_tokens']} held-out tokens, context {protocol['context']}, stride "
             f"{protocol['stride']}. Group size {meta['group_size']}; FFN only (scope ffn): non-FFN weights stored "
             f"in float16 for every compressed row (fp32 in the first); float PHM factors in fp32. MACs/token: all linear layers "
             f"(FFN only in parentheses), PHM counting its input mixing. {meta['torch_threads']} torch "
             f"threads.\n\nCommand: `{meta['command']}`\n")
    (out / "bench_compress.md").write_text("# bench_compress\n\n" + table + "\n\n" + notes)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF folder or .gguf (default: embedded SmolLM2-135M)")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--only", nargs="*", help="substrings of setting names to run")
    parser.add_argument("--out", type=Path, default=Path("docs/bench_compress"))
    args = parser.parse_args(argv)

    source = resolve_source(args.model)
    original, tokenizer = load_model(source)
    calib = calibration_ids(tokenizer, args.calib_samples, args.calib_seq_len)
    evaluation = Evaluation(eval_tokens(tokenizer, args.eval_tokens), PerplexityProtocol(num_tokens=args.eval_tokens))
    protocol = evaluation.protocol
    rows = []
    for label, cfg in SETTINGS.items():
        if args.only and not any(s in label for s in args.only):
            continue
        print(f"== {label}", file=sys.stderr, flush=True)
        model = copy.deepcopy(original)
        if cfg is None:
            row, seconds, log = measure(model, label, evaluation), 0.0, []
        else:
            cfg = dataclasses.replace(cfg, group_size=args.group_size, calib_samples=args.calib_samples,
                                      calib_seq_len=args.calib_seq_len)
            result = compress_and_measure(model, cfg, calib, evaluation, label)
            row, seconds, log = result.row, result.seconds, result.log
        rows.append({"setting": label, "config": cfg.to_dict() if cfg else None, "size": row["size"],
                     "perplexity": row["perplexity"], "compress_seconds": seconds, "layers": log})
        print(f"   ppl {row['perplexity']:.4g}, FFN {row['size']['ffn_bytes'] / 1e6:.1f} MB, {seconds:.0f} s",
              file=sys.stderr, flush=True)
        del model

    meta = {"model": str(source), "calibration": f"{calib.shape[0]} x {calib.shape[1]} tokens",
            "protocol": protocol.to_dict(), "group_size": args.group_size, "torch_threads": torch.get_num_threads(),
            "machine": platform.platform(), "command": "python scripts/bench_compress.py " + " ".join(argv or sys.argv[1:])}
    print(write_results(rows, meta, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

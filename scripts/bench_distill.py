"""Distillation recipes side by side at one token budget, on both evaluation domains (issue #14's table).

    python scripts/bench_distill.py --out docs/bench_distill                       # default model, 204,800 tokens
    python scripts/bench_distill.py --out /tmp/d --tokens 25600 --model DIR --set eval_context=256

Each recipe is the real command, `hyperquant compress MODEL --bits 4 --train-tokens T --train-config R.yaml`,
in a fresh process with its own output folder (reused when present: delete it to measure again), so every
row has the same budget, data seed and protocol (4,096 held-out tokens of Wikipedia and of the Python
language reference). Recipes:

- text: today's recipe (calibration text only);
- generated: every row the steps read sampled from the dense model (generated_fraction 1);
- mixture: half text, half teacher samples (generated_fraction 0.5);
- blockwise+best: a block-wise first stage (blockwise_steps per block) before the better of the two above
  on the second domain.

The token budget counts the end-to-end steps; the block-wise stage's tokens are reported beside it.
Writes results.json and results.md to --out and prints the table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RECIPES = {"text": {}, "generated": {"generated_fraction": 1.0}, "mixture": {"generated_fraction": 0.5}}


def run_recipe(name: str, options: dict, args, work: Path, shown: dict) -> dict:
    out = work / name
    if not (out / "summary.json").is_file():
        yaml_file = work / f"{name}.yaml"
        yaml_file.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in options.items()) or "{}\n")
        command = [sys.executable, "-m", "hyperquant", "compress", *([args.model] if args.model else []), "--bits", "4",
                   "--train-tokens", str(args.tokens), "--train-config", str(yaml_file), "--out", str(out),
                   "--eval-tokens", str(args.eval_tokens)]
        print("$", " ".join(command), flush=True)
        start = time.perf_counter()
        subprocess.run(command, check=True)
        (out / "bench_seconds.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
    summary = json.loads((out / "summary.json").read_text())
    blockwise = out / "train" / "blockwise.json"
    seconds = out / "bench_seconds.txt"
    return {"recipe": name, "options": options, "shown": shown, "rows": summary["rows"],
            "steps": summary["train_summary"]["steps"],
            "blockwise_tokens": json.loads(blockwise.read_text())["block_tokens"] if blockwise.is_file() else 0,
            "seconds": float(seconds.read_text()) if seconds.is_file() else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default=None, help="model folder (default: the embedded default model)")
    parser.add_argument("--tokens", type=int, default=204_800, help="end-to-end training tokens of every recipe")
    parser.add_argument("--blockwise-steps", type=int, default=50)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="a training option for every recipe, e.g. --set eval_context=256 (repeatable)")
    args = parser.parse_args()
    common = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    work = args.out / "runs"
    work.mkdir(parents=True, exist_ok=True)
    results = [run_recipe(name, {**common, **options}, args, work, options) for name, options in RECIPES.items()]
    best = min(results[1:], key=lambda r: r["rows"][-1]["perplexity_second_domain"])
    shown = {**best["shown"], "blockwise_steps": args.blockwise_steps}
    results.append(run_recipe("blockwise+best", {**common, **shown}, args, work, shown))
    original = results[0]["rows"][0]
    lines = ["| recipe | steps | block-wise tokens | Wikipedia | Python docs | × original (docs) | minutes |",
             "|---|---:|---:|---:|---:|---:|---:|",
             (f"| original fp32 | - | - | {original['perplexity']:.2f} | "
              f"{original['perplexity_second_domain']:.2f} | 1.0 | - |")]
    for r in results:
        row = r["rows"][-1]
        minutes = "-" if r["seconds"] is None else f"{r['seconds'] / 60:.1f}"
        lines.append(f"| {r['recipe']} {json.dumps(r['shown'])} | {r['steps']} | {r['blockwise_tokens']:,} | "
                     f"{row['perplexity']:.2f} | {row['perplexity_second_domain']:.2f} | "
                     f"{row['perplexity_second_domain'] / original['perplexity_second_domain']:.1f} | {minutes} |")
    table = "\n".join(lines)
    print(table)
    (args.out / "results.md").write_text(f"Budget: {args.tokens:,} end-to-end training tokens per recipe; "
                                         f"options for all: {json.dumps(common)}.\n\n{table}\n")
    (args.out / "results.json").write_text(json.dumps({"tokens": args.tokens, "results": results}, indent=2))


if __name__ == "__main__":
    main()

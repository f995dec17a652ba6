"""Distillation recipes side by side at one token budget, on the validation domains and the test set (issue #14's
table).

    python scripts/bench_distill.py --out docs/bench_distill/tokens-204800        # default model, 204,800 tokens
    python scripts/bench_distill.py --out /tmp/d --tokens 25600 --model DIR --set eval_context=256

Each recipe is the real command, `hyperquant compress MODEL --bits 4 --train-tokens T --train-config R.yaml`,
in a fresh process with its own output folder (reused when present: delete it to measure again), so every
row has the same budget, data seed, precision and protocol (4,096 held-out tokens of Wikipedia and of the
Python language reference: validation, which the choice of blockwise+best reads; and the test set, 16,384
tokens of each of dialogue, drama and code with their standard errors, which nothing here chooses on).
Recipes:

- text: the recipe before issue #14 (calibration text only, no block-wise stage);
- generated: every row the steps read sampled from the dense model (generated_fraction 1);
- mixture: half text, half teacher samples (generated_fraction 0.5);
- blockwise+best: a block-wise first stage (blockwise_steps per block) before the best of the three above
  on the Python docs, a validation figure (or --best NAME);
- kd1-token: blockwise+mixture with LLM-QAT's objective (KD alone at T = 1) and the block-wise stage on each
  token's error, B = num_bases everywhere (the compress recipe of 2026-12-04);
- same-size-capacity: that, with the bases moved where the measured KL says (capacity_cost kl) within the same
  parameter count (capacity_budget 2 = num_bases, B from 1 to n^2);
- kl-capacity: kd1-token with the paper's capacity budget, num_bases + 1/3 bases per layer, assigned by
  measured KL (the compress recipe of the morning of 2026-12-07);
- no-fade: kl-capacity with the end-to-end steps on the PHM-only model from the first step (fade_steps 0:
  the block-wise stage has already fitted every block at alpha = 1);
- longer-blockwise: kl-capacity with 200 block-wise steps per block on 256 rows (instead of 72 on 96);
- higher-lr: kl-capacity at lr 1e-3 (instead of 5e-4);
- budget-2.67: kl-capacity with num_bases + 2/3 bases per layer (instead of 1/3);
- default: the compress recipe as it is (`hyperquant compress --bits 4` at this budget; since the afternoon of
  2026-12-07 no fade, the longer block-wise stage and a budget of num_bases + 1 bases per layer);
- --recipe NAME=JSON: any other recipe, beside them.

The first four keep the objective they were measured with before the compress recipe changed,
cross-entropy plus KD at T=4 (ce_weight 1, kd_temperature 4), the block-wise stage on the batch's whole
relative error (blockwise_error whole), the stage-A fade over 30 % of the steps and no capacity assignment,
so their rows stay comparable; each later row spells out what the recipe changed after it. Every row
trains in the compress recipe's precision (mixed_precision auto: bf16 on a CPU with AMX or AVX512-BF16).

--recipes runs a subset (one long run per session on a slow machine); runs already in --out are reused
when their options are the same, and refused when not, and the table lists every recipe measured there.

The token budget counts the end-to-end steps; the block-wise stage's tokens are reported beside it, and
each row's model size (MB of weights as stored).
Writes results.json and results.md to --out and prints the table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from hyperquant.textsets import TEST_DOMAINS

# explicit against the compress recipe (which now has a block-wise stage, half generated rows, KD alone at
# T = 1, measured capacity and no fade): the data recipes are compared under the objective and the stage-A
# fade (30 % of the steps) they were first measured with
CE_AND_KD4 = {"ce_weight": 1.0, "kd_temperature": 4.0, "capacity": "none", "fade_steps": 60}
RECIPES = {"text": {"generated_fraction": 0.0, "blockwise_steps": 0, **CE_AND_KD4},
           "generated": {"generated_fraction": 1.0, "blockwise_steps": 0, **CE_AND_KD4},
           "mixture": {"generated_fraction": 0.5, "blockwise_steps": 0, **CE_AND_KD4}}
# after blockwise+best: the later steps of the compress recipe, in the order they were added. Each row spells
# out what the recipe changed after it (the stage-A fade of 30 % of the steps, 72 block-wise steps per block
# on 96 rows, the capacity budget num_bases + 1/3), so a stored run keeps meaning what it measured.
BEFORE_2026_12_07_PM = {"fade_steps": 60, "blockwise_steps": 72, "blockwise_samples": 96, "capacity_budget": None}
LATER = {"kd1-token": {"capacity": "none", **BEFORE_2026_12_07_PM},
         # the bench runs `compress --bits 4` with its default B = 2: a mean of 2 bases is the same size
         "same-size-capacity": {"capacity_budget": 2.0, "capacity_min_bases": 1,
                                **{k: v for k, v in BEFORE_2026_12_07_PM.items() if k != "capacity_budget"}},
         "kl-capacity": BEFORE_2026_12_07_PM,
         "no-fade": {**BEFORE_2026_12_07_PM, "fade_steps": 0},
         "longer-blockwise": {**BEFORE_2026_12_07_PM, "blockwise_steps": 200, "blockwise_samples": 256},
         "higher-lr": {**BEFORE_2026_12_07_PM, "lr": 0.001},
         "budget-2.67": {**BEFORE_2026_12_07_PM, "capacity_budget": "num_bases+0.6667"},
         "default": {}}


def finished_options(work: Path, name: str) -> dict | None:
    """The options of recipe ``name``'s finished run in ``work`` (from its YAML), or None."""
    yaml_file = work / f"{name}.yaml"
    if not (work / name / "summary.json").is_file() or not yaml_file.is_file():
        return None
    return {k: json.loads(v) for k, v in (line.split(": ", 1) for line in yaml_file.read_text().splitlines()
                                          if ": " in line)}


def best_on_validation(results: list[dict]) -> dict:
    """The recipe with the lowest Python-docs perplexity: a validation figure. The choice sees each row
    without its test-set and chat figures, so it cannot read them."""
    def validation(result: dict) -> float:
        row = {k: v for k, v in result["rows"][-1].items() if k not in ("test", "chat")}
        return row["perplexity_second_domain"]

    return min(results, key=validation)


def test_cells(row: dict) -> str:
    test = row.get("test") or {}
    return " | ".join(f"{test[n]['perplexity']:.2f} ± {test[n]['stderr']:.2f}" if n in test else "-"
                      for n in TEST_DOMAINS)


def run_recipe(name: str, options: dict, args, work: Path, shown: dict) -> dict:
    out = work / name
    yaml_file = work / f"{name}.yaml"
    recipe_text = "".join(f"{k}: {json.dumps(v)}\n" for k, v in options.items()) or "{}\n"
    if (out / "summary.json").is_file() and finished_options(work, name) != options:
        sys.exit(f"error: {out} was measured with other options than {json.dumps(options)}; delete it or use "
                 f"another --out")
    if not (out / "summary.json").is_file():
        yaml_file.write_text(recipe_text)
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
    record = json.loads(blockwise.read_text()) if blockwise.is_file() else {}
    return {"recipe": name, "options": options, "shown": shown, "rows": summary["rows"],
            "steps": summary["train_summary"]["steps"], "blockwise_tokens": record.get("block_tokens", 0),
            "blockwise_seconds": sum(b["time_s"] for b in record.get("blocks", [])),
            "seconds": float(seconds.read_text()) if seconds.is_file() else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default=None, help="model folder (default: the embedded default model)")
    parser.add_argument("--tokens", type=int, default=204_800, help="end-to-end training tokens of every recipe")
    parser.add_argument("--blockwise-steps", type=int, default=72)
    parser.add_argument("--blockwise-samples", type=int, default=96,
                        help="training rows the block-wise stage fits on")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="a training option for every recipe, e.g. --set eval_context=256 (repeatable)")
    named = [*RECIPES, "blockwise+best", *LATER]
    parser.add_argument("--recipes", default=",".join(named),
                        help=f"the recipes to run, comma-separated (a subset of {', '.join(named)}); runs already "
                             f"in --out are reused")
    parser.add_argument("--best", choices=[*RECIPES], default=None,
                        help="the recipe blockwise+best builds on (default: the best of those run on the docs)")
    parser.add_argument("--recipe", action="append", default=[], metavar="NAME=JSON",
                        help='an extra recipe, e.g. --recipe \'bw-long={"blockwise_steps": 72}\' (repeatable)')
    args = parser.parse_args()
    common = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    chosen = [name.strip() for name in args.recipes.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(named))
    if unknown:
        sys.exit(f"error: --recipes {unknown[0]}: choose from {', '.join(named)}")
    if "blockwise+best" in chosen and args.best is None and not set(RECIPES) <= set(chosen):
        sys.exit("error: blockwise+best without all of text, generated and mixture needs --best NAME")
    work = args.out / "runs"
    work.mkdir(parents=True, exist_ok=True)
    # the table holds every recipe measured in --out, by this call or an earlier one
    results = []
    for name, options in RECIPES.items():
        if name in chosen:
            results.append(run_recipe(name, {**common, **options}, args, work, options))
        elif (found := finished_options(work, name)) is not None:
            results.append(run_recipe(name, found, args, work, {k: v for k, v in found.items() if k not in common}))
    if "blockwise+best" in chosen:
        base = RECIPES[args.best] if args.best else best_on_validation(results)["shown"]
        shown = {**base, "blockwise_steps": args.blockwise_steps}
        shown["blockwise_samples"] = args.blockwise_samples
        shown["blockwise_error"] = "whole"  # the block-wise error of the first table (now "token")
        results.append(run_recipe("blockwise+best", {**common, **shown}, args, work, shown))
    elif (found := finished_options(work, "blockwise+best")) is not None:
        results.append(run_recipe("blockwise+best", found, args, work,
                                  {k: v for k, v in found.items() if k not in common}))
    for name, options in LATER.items():
        if name in chosen:
            results.append(run_recipe(name, {**common, **options}, args, work, options))
        elif (found := finished_options(work, name)) is not None:
            results.append(run_recipe(name, found, args, work, {k: v for k, v in found.items() if k not in common}))
    for item in args.recipe:
        name, _, text = item.partition("=")
        shown = json.loads(text)
        results.append(run_recipe(name, {**common, **shown}, args, work, shown))
    original = results[0]["rows"][0]
    lines = [("| recipe | steps | block-wise tokens | MB | val: Wikipedia | val: Python docs | × original (docs) | "
              + " | ".join(f"test: {n}" for n in TEST_DOMAINS) + " | minutes (block-wise) |"),
             "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(TEST_DOMAINS) + "---:|",
             (f"| original fp32 | - | - | {original['size']['bytes'] / 1e6:.1f} | "
              f"{original['perplexity']:.2f} | {original['perplexity_second_domain']:.2f} | 1.0 | "
              f"{test_cells(original)} | - |")]
    for r in results:
        row = r["rows"][-1]
        minutes = "-" if r["seconds"] is None else f"{r['seconds'] / 60:.1f}"
        if r["blockwise_seconds"]:
            minutes += f" ({r['blockwise_seconds'] / 60:.1f})"
        lines.append(f"| {r['recipe']} {json.dumps(r['shown'])} | {r['steps']} | {r['blockwise_tokens']:,} | "
                     f"{row['size']['bytes_on_disk'] / 1e6:.1f} | {row['perplexity']:.2f} | "
                     f"{row['perplexity_second_domain']:.2f} | "
                     f"{row['perplexity_second_domain'] / original['perplexity_second_domain']:.1f} | "
                     f"{test_cells(row)} | {minutes} |")
    table = "\n".join(lines)
    print(table)
    (args.out / "results.md").write_text(f"Budget: {args.tokens:,} end-to-end training tokens per recipe; "
                                         f"options for all: {json.dumps(common)}.\n\n{table}\n")
    (args.out / "results.json").write_text(json.dumps({"tokens": args.tokens, "results": results}, indent=2))


if __name__ == "__main__":
    main()

"""Benchmark of progressive PHM training on the default model (SmolLM2-135M-Instruct).

Measures held-out perplexity (Wikipedia eval split, context 512) of: the dense model; PHM (n=2, B=2)
+ GPTQ-4 by post-training compression (`hyperquant.compress`); the same after training (float
training, then GPTQ-4 export); and with QAT-4 (fake-quantized A_cat in the last part of training,
exported on the QAT grid). Each trained model is exported with `save_compressed` and re-loaded with
`hyperquant.load` before it is evaluated.

    python scripts/bench_train.py --steps 80 --threads 1 --out bench-train
    python scripts/bench_train.py --only dense,ptq            # the baselines only
    python scripts/bench_train.py --only trained --steps 80  # one training run (runs can go in parallel)
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=80, help="optimizer steps of each training run")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--only", default="dense,ptq,trained,qat", help="comma list of dense,ptq,trained,qat")
    parser.add_argument("--out", default="bench-train")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from hyperquant.evals import PerplexityProtocol, perplexity

    import hyperquant
    from hyperquant.data import calibration_ids, eval_tokens
    from hyperquant.models import default_model_source, load_model
    from hyperquant.train import TrainConfig, train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(","))
    model, tokenizer = load_model(default_model_source())
    ev = eval_tokens(tokenizer, args.eval_tokens)
    protocol = PerplexityProtocol(context=512, stride=512, num_tokens=args.eval_tokens)
    results: dict = {}

    def record(key: str, ppl: float, **extra) -> None:
        results[key] = {"perplexity": ppl, **extra}
        print(f"{key}: ppl {ppl:.2f} {extra}", flush=True)
        (out / f"results-{'-'.join(sorted(only))}.json").write_text(json.dumps(results, indent=2))

    if "dense" in only:
        record("dense fp32", perplexity(model, ev, protocol)["perplexity"])
    if "ptq" in only:
        t = time.perf_counter()
        ptq = hyperquant.compress(copy.deepcopy(model), hyperquant.CompressConfig(bits=4, method="gptq", n=2, num_bases=2),
                                  calibration_ids(tokenizer, 32, 512, seed=0), progress=False)
        record("PHM n=2 B=2 + GPTQ-4, PTQ only", perplexity(ptq, ev, protocol)["perplexity"],
               time_s=round(time.perf_counter() - t, 1))
        del ptq
    del model
    fade = max(1, int(0.4 * args.steps))
    base = TrainConfig(seq_len=args.seq_len, train_samples=max(256, args.steps * args.batch // 2),
                       per_device_batch_size=args.batch, max_steps=args.steps, lr=args.lr, warmup_steps=5,
                       fade_steps=fade, alpha_schedule="cosine", stagger=0.5, kd_weight=1.0, kd_temperature=4.0, teacher="separate",
                       recon_weight=0.1, init_samples=16, bits=4, group_size=128, save_every=20, eval_every=0,
                       eval_tokens=2048, progress=False, num_threads=args.threads, resume=True)
    runs = {
        "trained": ("PHM n=2 B=2, trained, then GPTQ-4", base.replace(export_method="gptq",
                                                                        output_dir=str(out / "trained"))),
        "qat": ("PHM n=2 B=2, trained with QAT-4 (RTN grid export)",
                base.replace(export_method="rtn", qat_start_step=int(0.6 * args.steps),
                             output_dir=str(out / "qat"))),
    }
    for key, (label, cfg) in runs.items():
        if key not in only:
            continue
        t = time.perf_counter()
        summary = train(None, cfg)
        loaded = hyperquant.load(summary["final_dir"])
        record(label, perplexity(loaded, ev, protocol)["perplexity"], steps=cfg.max_steps,
               tokens=cfg.max_steps * cfg.per_device_batch_size * cfg.seq_len,
               train_time_s=round(summary["train_time_s"], 1), total_time_s=round(time.perf_counter() - t, 1),
               config=cfg.to_dict())


if __name__ == "__main__":
    main()

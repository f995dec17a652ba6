"""`python -m hyperquant.train [MODEL] --config train.yaml` (also under `accelerate launch -m`)."""

from __future__ import annotations

import argparse
import sys

from hyperquant.errors import HyperquantError
from hyperquant.train.cli import train_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hyperquant.train", description=__doc__)
    parser.add_argument("model", nargs="?", default=None, help="HF model folder or .gguf; default: embedded model")
    parser.add_argument("--config", default=None, help="YAML file of TrainConfig options")
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None)
    args = parser.parse_args(argv)
    try:
        train_command(args.model, args.config, args.output_dir, args.max_steps, args.resume)
    except HyperquantError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

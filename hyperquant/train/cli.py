"""`train_command`: the body of `hyperquant train MODEL --config train.yaml` (and `python -m hyperquant.train`)."""

from __future__ import annotations

import os
from pathlib import Path

from hyperquant.train.config import TrainConfig


def load_train_config(config: str | os.PathLike | None, overrides: dict | None = None,
                      vision_language: bool = False) -> TrainConfig:
    """The recipe (TrainConfig's defaults and, for a text model, `recipe.COMPRESS_RECIPE`: the same
    training `hyperquant compress` does), then the options of the YAML file ``config``, then
    ``overrides`` (option -> value)."""
    from hyperquant.train.config import read_yaml_options
    from hyperquant.train.recipe import COMPRESS_RECIPE

    data = {} if vision_language else dict(COMPRESS_RECIPE)
    if config is not None:
        data.update(read_yaml_options(config))
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return TrainConfig.from_dict(data)


def train_command(model: str | None = None, config: str | os.PathLike | None = None,
                  output_dir: str | None = None, max_steps: int | None = None, resume: bool | None = None,
                  overrides: dict | None = None, print_summary: bool = True) -> dict:
    """Load the YAML ``config``, apply the explicit options, run `train`, print a summary; return it.

    Wire as: ``hyperquant train [MODEL] --config train.yaml [--output-dir D] [--max-steps N]
    [--resume/--no-resume]``. Raises HyperquantError (incl. ConfigError) for user mistakes."""
    from hyperquant.errors import HyperquantError
    from hyperquant.models import is_vision_language_source, resolve_source
    from hyperquant.train.runner import train

    source = resolve_source(model)  # a wrong path fails before any work
    cfg = load_train_config(config, {**(overrides or {}), "output_dir": output_dir, "max_steps": max_steps,
                                     "resume": resume}, vision_language=is_vision_language_source(source))
    run_dir = Path(cfg.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise HyperquantError(f"--output-dir {run_dir} is a file; the run folder holds checkpoints and logs: choose "
                              f"another --output-dir")
    from hyperquant.atomic import check_writable_parent

    check_writable_parent(run_dir / "final")
    summary = train(model, cfg)
    if print_summary and summary.get("eval") is not None:
        from rich.console import Console
        from rich.table import Table

        table = Table("step", *[f"ppl @ alpha={a}" for a in ("0", "0.25", "0.5", "0.75", "1")],
                      title=f"hyperquant train -> {Path(cfg.output_dir)}")
        for row in summary["eval"]:
            table.add_row(str(row["step"]), *[f"{row['ppl'][a]:.2f}" if a in row["ppl"] else "-"
                                              for a in ("0", "0.25", "0.5", "0.75", "1")])
        console = Console()
        console.print(table)
        if "exported_ppl" in summary:
            console.print(f"exported checkpoint {summary['final_dir']}: perplexity {summary['exported_ppl']:.2f}")
    return summary

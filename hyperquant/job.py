"""The one compress -> measure -> write-folder path, shared by `hyperquant compress` (with and without
training), the tradeoff sweep and the bench scripts.

``measure`` gives a table row (label, size, perplexity); ``write_output`` publishes a compressed model as
a checkpoint folder with report.md and summary.json in one atomic rename; ``compress_and_measure`` and
``compress_to_folder`` put them together.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from hyperquant.config import CompressConfig
from hyperquant.plan import plan_from_dict, plan_label

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    """What every row of one run is measured on (None: no perplexity). A vision-language model is also
    measured on ``captions`` (image-caption pairs never calibrated or trained on, as
    `multimodal.inputs.CaptionSample`s): caption perplexity, and the agreement of its greedy captions
    with ``reference_captions`` (the uncompressed model's, taken by the first row measured)."""

    eval_ids: torch.Tensor | None = None
    protocol: object | None = None  # evals.PerplexityProtocol
    # the second domain's tokens (`data.second_domain_tokens`), scored with the same protocol
    second_ids: torch.Tensor | None = None
    # the test set (`textsets.load_test_set`): {domain: tokens}, only ever reported, same windows
    test_ids: dict[str, torch.Tensor] | None = None
    # the instruction-model check (`evals.chat.ChatReference`: the original's greedy replies to fixed prompts)
    chat: object | None = None
    captions: list | None = None
    reference_captions: list[list[int]] | None = None

    def to_dict(self) -> dict | None:
        if self.protocol is None and not self.captions:
            return None
        data = self.protocol.to_dict() if self.protocol is not None else {}
        if self.second_ids is not None:
            from hyperquant.data import second_domain_name

            data["second_domain"] = second_domain_name()
        if self.test_ids:
            from hyperquant.textsets import TEST_DOMAINS

            data["test_domains"] = {name: {"title": TEST_DOMAINS[name].title, "source": TEST_DOMAINS[name].source,
                                           "tokens": len(ids)} for name, ids in self.test_ids.items()}
        if self.chat is not None:
            data["chat"] = self.chat.describe()
        if self.captions:
            data["caption_pairs"] = len(self.captions)
            data["caption_tokens"] = sum(s.caption_tokens for s in self.captions)
        return data


@dataclass
class CompressResult:
    model: nn.Module
    row: dict  # {"label", "size", "perplexity"}
    seconds: float
    folder: Path | None = None
    log: list[dict] = field(default_factory=list)


def model_label(model: nn.Module, suffix: str = "") -> str:
    """The label of a compressed model, from the plan it carries."""
    section = getattr(model.config, "hyperquant", None) or {}
    plan = plan_from_dict(section.get("plan") or {})
    return (plan_label(plan) if plan else "compressed") + suffix


def measure(model: nn.Module, label: str, evaluation: Evaluation, rest_dtype: str | None = None,
            device: torch.device | str | None = None) -> dict:
    """A table row: size (bytes as stored, rest weights at ``rest_dtype``) and held-out perplexity,
    measured on ``device`` when given (the model's blocks visit it one at a time: `hyperquant.offload`)."""
    from hyperquant.offload import offloaded

    with offloaded(model, device):
        return _measure(model, label, evaluation, rest_dtype)


def _measure(model: nn.Module, label: str, evaluation: Evaluation, rest_dtype: str | None) -> dict:
    from hyperquant.evals import model_size, perplexity
    from hyperquant.evals.perplexity import reported
    from hyperquant.evals.size import dtype_bytes

    row = {"label": label, "size": model_size(model, rest_bytes_per_param=dtype_bytes(rest_dtype) if rest_dtype
                                              else None)}
    if evaluation.protocol is not None:
        log.info("perplexity of %s", label)
        _put(row, "perplexity", perplexity(model, evaluation.eval_ids, evaluation.protocol))
        if evaluation.second_ids is not None:
            _put(row, "perplexity_second_domain", perplexity(model, evaluation.second_ids, evaluation.protocol))
        if evaluation.test_ids:
            log.info("test-set perplexity of %s (%s)", label, ", ".join(evaluation.test_ids))
            protocol = dataclasses.replace(evaluation.protocol, num_tokens=max(map(len, evaluation.test_ids.values())))
            row["test"] = {name: reported(perplexity(model, ids, protocol)) for name, ids in evaluation.test_ids.items()}
    if evaluation.chat is not None:
        log.info("chat check of %s", label)
        row["chat"] = evaluation.chat.score(model)
    if evaluation.captions:
        measure_captions(model, evaluation, row)
    return row


def _put(row: dict, key: str, result: dict) -> None:
    """A validation figure as the row has always carried it, with its standard error beside it."""
    row[key] = result["perplexity"]
    row[f"{key}_stderr"] = result["perplexity_stderr"]


def measure_captions(model: nn.Module, evaluation: Evaluation, row: dict) -> None:
    """Caption perplexity and greedy-caption agreement into ``row``; the first model measured (the
    original) gives the reference captions."""
    from hyperquant.evals import caption_agreement, caption_perplexity, greedy_captions

    log.info("caption perplexity and greedy captions of %s", row["label"])
    row["caption_perplexity"] = caption_perplexity(model, evaluation.captions)["perplexity"]
    captions = greedy_captions(model, evaluation.captions)
    if evaluation.reference_captions is None:
        evaluation.reference_captions = captions
    agreement = caption_agreement(evaluation.reference_captions, captions)
    row["caption_agreement"] = agreement["token_agreement"]
    row["caption_exact_match"] = agreement["exact_match"]


def write_output(model: nn.Module, out_dir: Path, tokenizer, *, source: str, rows: list[dict], seconds: float,
                 evaluation: Evaluation, overwrite: bool, report_extra: str = "", summary_extra: dict | None = None,
                 extra_files: Callable[[Path], None] | None = None) -> Path:
    """Save ``model`` (compressed) as a checkpoint folder with report.md and summary.json; ``rows`` are the
    table rows (the last one is this model's; its on-disk bytes are filled in here)."""
    from hyperquant.checkpoint import WEIGHTS_NAME, save_compressed
    from hyperquant.report import compress_report_md

    section = model.config.hyperquant
    config = section["compress_config"]

    def write_report(folder: Path) -> None:
        rows[-1]["size"]["bytes_on_disk"] = (folder / WEIGHTS_NAME).stat().st_size
        if extra_files is not None:
            extra_files(folder)
        text = compress_report_md(source, config, rows, getattr(model, "hyperquant_log", []),
                                  evaluation.to_dict(), seconds)
        (folder / "report.md").write_text(text + report_extra)
        summary = {"source": source, "config": config, "plan": section.get("plan"), "rows": rows,
                   "protocol": evaluation.to_dict(), "compress_seconds": seconds, **(summary_extra or {})}
        if getattr(model, "hyperquant_offload", None):  # calibrated block by block on another device
            summary["calibration_offload"] = model.hyperquant_offload
        if evaluation.reference_captions is not None:  # `hyperquant eval` compares with them later
            summary["reference_captions"] = {"images": "shipped evaluation photographs",
                                             "tokens": evaluation.reference_captions}
        (folder / "summary.json").write_text(json.dumps(summary, indent=2, default=str))

    return save_compressed(model, out_dir, tokenizer, overwrite=overwrite, extra_files=write_report)


def compress_and_measure(model: nn.Module, cfg: CompressConfig, calib: torch.Tensor | None, evaluation: Evaluation,
                         label: str | None = None, progress: bool = True,
                         heldout: torch.Tensor | None = None, device: torch.device | str | None = None) -> CompressResult:
    """Compress ``model`` in place as ``cfg`` says and measure it (no folder written); ``heldout``:
    calibration-text sequences never fitted on, on which every layer's error is also measured;
    ``device``: where calibration and measurement run, the model's blocks visiting it one at a time."""
    from hyperquant.pipeline import compress

    start = time.perf_counter()
    # it refuses a plan that needs calibration without any
    compress(model, cfg, calib, progress=progress, heldout_inputs=heldout, device=device)
    seconds = time.perf_counter() - start
    row = measure(model, label or model_label(model), evaluation, cfg.rest_dtype, device)
    return CompressResult(model, row, seconds, log=model.hyperquant_log)


def compress_to_folder(model: nn.Module, tokenizer, cfg: CompressConfig, out_dir: Path, *, source: str,
                       calib: torch.Tensor | None, evaluation: Evaluation, overwrite: bool,
                       rows: list[dict] | None = None, label: str | None = None,
                       progress: bool = True, heldout: torch.Tensor | None = None,
                       device: torch.device | str | None = None) -> CompressResult:
    """Compress, measure and publish: the checkpoint folder with its report. ``rows``: rows measured
    before (the original model's), shown above this one in the report."""
    result = compress_and_measure(model, cfg, calib, evaluation, label, progress, heldout, device)
    all_rows = [*(rows or []), result.row]
    result.folder = write_output(model, out_dir, tokenizer, source=source, rows=all_rows, seconds=result.seconds,
                                 evaluation=evaluation, overwrite=overwrite)
    return result

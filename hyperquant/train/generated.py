"""Teacher-generated distillation data (data-free distillation, as in LLM-QAT): sequences sampled from
the dense model itself, so that what the PHM layers relearn is the model's own behaviour rather than one
text domain's.

Sampling is seeded (a torch.Generator, CPU) and cached on disk as safetensors with the settings and the
model's identity in its metadata: the same model and settings load the cached tokens, any change (the
model's files, a setting, this module's ``GENERATOR_VERSION``) generates anew.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from hyperquant.errors import ConfigError, HyperquantError

GENERATOR_VERSION = 1
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationSettings:
    """How the teacher's sequences are sampled: ``sequences`` rows of ``seq_len`` tokens, each started
    from the BOS token (or, without one, a token drawn uniformly from the vocabulary), then sampled at
    ``temperature`` from the top ``top_k`` tokens (0: all), ``batch_size`` sequences at a time, in fp32
    (bf16 autocast sampled only 1.3x faster on a bf16 host: decoding is bound by per-step overhead)."""

    sequences: int = 256
    seq_len: int = 256
    temperature: float = 1.0
    top_k: int = 0
    seed: int = 0
    batch_size: int = 16

    def __post_init__(self) -> None:
        if not (isinstance(self.sequences, int) and self.sequences >= 1 and isinstance(self.seq_len, int)
                and self.seq_len >= 2 and isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise ConfigError("generation needs sequences >= 1, seq_len >= 2 and batch_size >= 1")
        if not self.temperature > 0 or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"temperature={self.temperature} must be > 0 and top_k={self.top_k} >= 0")

    def key(self) -> dict:
        """What the tokens depend on: every setting (the batch size too: it sets the order in which the
        generator's numbers are drawn) and the generator's version."""
        return {**asdict(self), "version": GENERATOR_VERSION}


def _sample(logits: torch.Tensor, settings: GenerationSettings, generator: torch.Generator) -> torch.Tensor:
    logits = logits.float().cpu() / settings.temperature
    if settings.top_k:
        kth = torch.topk(logits, min(settings.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


@torch.no_grad()
def generate_sequences(model: nn.Module, settings: GenerationSettings, bos_id: int | None,
                       vocab_size: int) -> torch.Tensor:
    """(sequences, seq_len) token ids sampled from ``model`` (eval mode, KV cache); reproducible from the
    seed: the sampling runs on the CPU generator whatever the model's device."""
    import inspect

    generator = torch.Generator().manual_seed(settings.seed)
    device = next(model.parameters()).device
    # transformers 5 names the KV cache `cache` (older releases: past_key_values)
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    was_training = model.training
    model.eval()
    rows = []
    began = time.perf_counter()
    try:
        for start in range(0, settings.sequences, settings.batch_size):
            count = min(settings.batch_size, settings.sequences - start)
            if bos_id is not None:
                tokens = torch.full((count, 1), bos_id, dtype=torch.long)
            else:
                tokens = torch.randint(0, vocab_size, (count, 1), generator=generator)
            out = model(input_ids=tokens.to(device), use_cache=True)
            for _ in range(settings.seq_len - 1):
                step = _sample(out.logits[:, -1], settings, generator)
                tokens = torch.cat([tokens, step], dim=1)
                past = getattr(out, cache_name, None)
                if past is None:
                    past = out.past_key_values
                out = model(input_ids=step.to(device), use_cache=True, **{cache_name: past})
            rows.append(tokens)
            log.info("teacher-generated data: %d/%d sequences (%.0f s)", start + count, settings.sequences,
                     time.perf_counter() - began)
    finally:
        model.train(was_training)
    return torch.cat(rows)


def cache_key(model_identity: str, settings: GenerationSettings) -> str:
    text = json.dumps({"model": model_identity, "settings": settings.key()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def teacher_sequences(model: nn.Module, settings: GenerationSettings, model_identity: str, cache_dir: Path,
                      bos_id: int | None, vocab_size: int) -> tuple[torch.Tensor, dict]:
    """The teacher's sequences for ``settings``: loaded from ``cache_dir`` when this model and these
    settings made them before, else generated and cached. Returns (ids, {"cache": path, "reused": bool})."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    key = cache_key(model_identity, settings)
    path = Path(cache_dir) / f"generated-{key}.safetensors"
    meta = {"model": model_identity, "settings": json.dumps(settings.key(), sort_keys=True)}
    if path.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                stored = f.metadata() or {}
            ids = load_file(str(path))["ids"]
            if stored == meta and tuple(ids.shape) == (settings.sequences, settings.seq_len):
                log.info("teacher-generated data: reusing %s", path)
                return ids, {"cache": str(path), "reused": True}
        except (SafetensorError, OSError, KeyError, ValueError):
            pass
        log.warning("teacher-generated data: %s is damaged or from other settings; generating it again", path)
    log.info("teacher-generated data: sampling %d x %d tokens from the dense model", settings.sequences,
             settings.seq_len)
    ids = generate_sequences(model, settings, bos_id, vocab_size)
    if not torch.all((ids >= 0) & (ids < vocab_size)):
        raise HyperquantError("the teacher sampled tokens outside its vocabulary; the model is damaged")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"ids": ids.contiguous()}, str(tmp), metadata=meta)
    tmp.replace(path)  # a cache file appears whole or not at all
    return ids, {"cache": str(path), "reused": False}


def mix_rows(text_ids: torch.Tensor, generated: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Training rows of which ``fraction`` are teacher-generated: the total stays len(text_ids) rows,
    generated rows replace text rows, interleaved in a seeded order."""
    total = len(text_ids)
    take = min(round(fraction * total), len(generated))
    rows = torch.cat([text_ids[: total - take], generated[:take, : text_ids.shape[1]]])
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    return rows[order]

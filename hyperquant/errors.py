"""User-facing errors, and the one helper that builds typed configs from untrusted mappings."""

from __future__ import annotations

import dataclasses


class HyperquantError(Exception):
    """A user-facing problem: the message names the problem and the fix. The CLI prints it on one line."""


class ConfigError(HyperquantError, ValueError):
    pass


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name when it has none), for a one-line error."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__


# The plain types a config field's annotation (a string, under `from __future__ import annotations`) names.
_PLAIN_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "None": (type(None),),
                "list": (list, tuple), "dict": (dict,)}
_TYPE_WORDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
               "None": "null", "list": "a list", "dict": "a mapping"}


def _check_type(name: str, value, annotation, what: str) -> None:
    """Refuse a value whose type the field's annotation rules out (a YAML ``lr: "fast"``), before the
    config's own checks meet it as a TypeError deep inside."""
    if not isinstance(annotation, str):
        return
    options = [part.strip().split("[")[0] for part in annotation.split("|")]
    if not all(option in _PLAIN_TYPES for option in options):
        return  # a config type of its own (e.g. CompressConfig): its constructor checks it
    allowed = tuple(t for option in options for t in _PLAIN_TYPES[option])
    if isinstance(value, bool) and "bool" not in options:
        ok = False  # YAML's yes/no is no number
    else:
        ok = isinstance(value, allowed)
    if not ok:
        words = " or ".join(_TYPE_WORDS[o] for o in options)
        raise ConfigError(f"{what} {name}={value!r} must be {words}; fix it in the config")


def from_known_fields(cls, data: dict, what: str):
    """``cls(**data)`` for a config dataclass, with a clear error for keys it does not have and for
    values of the wrong type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{what}s must be a mapping of name: value, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown {what}(s) {unknown}; known: {sorted(fields)}")
    for name, value in data.items():
        _check_type(name, value, fields[name].type, what)
    try:
        return cls(**data)
    except TypeError as e:
        raise ConfigError(f"invalid {what}: {e}") from None

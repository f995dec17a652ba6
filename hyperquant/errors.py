"""User-facing errors, and the one helper that builds typed configs from untrusted mappings."""

from __future__ import annotations

import dataclasses


class HyperquantError(Exception):
    """A user-facing problem: the message names the problem and the fix. The CLI prints it on one line."""


class ConfigError(HyperquantError, ValueError):
    pass


def from_known_fields(cls, data: dict, what: str):
    """``cls(**data)`` for a config dataclass, with a clear error for keys it does not have and for
    values of the wrong type (a TypeError inside validation)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{what}s must be a mapping of name: value, got {data!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown {what}(s) {unknown}; known: {sorted(known)}")
    try:
        return cls(**data)
    except TypeError as e:
        raise ConfigError(f"invalid {what}: {e}") from None

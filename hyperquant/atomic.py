"""Atomic outputs: a folder or file appears whole or not at all (a failure or Ctrl-C leaves nothing)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from hyperquant.errors import HyperquantError


def _staging_dir(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private (0700); the output is an ordinary folder
    return tmp


# Every folder hyperquant publishes carries this file; --overwrite replaces only such folders.
OUTPUT_MARKER = ".hyperquant-output"


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool, inputs: tuple[Path, ...] = ()) -> None:
    """Refuse, before any work, an output folder that would lose something: one that exists (without
    ``overwrite``), one hyperquant did not write (no marker), or one that is or holds an input."""
    out_dir = Path(out_dir)
    for source in inputs:
        source = Path(source).resolve()
        if out_dir.resolve() == source or out_dir.resolve() in source.parents:
            raise HyperquantError(f"--out {out_dir} is (or holds) the input {source}; choose another --out")
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if not overwrite:
        raise HyperquantError(f"output {out_dir} already exists; pass --overwrite or choose another --out")
    if not out_dir.is_dir() or out_dir.is_symlink():
        raise HyperquantError(f"--out {out_dir} is not a folder; --overwrite replaces only a folder hyperquant "
                              f"wrote, so choose another --out")
    if not (out_dir / OUTPUT_MARKER).is_file() and any(out_dir.iterdir()):
        raise HyperquantError(f"{out_dir} was not written by hyperquant (no {OUTPUT_MARKER}); --overwrite never "
                              f"replaces other folders: choose another --out or remove it yourself")


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder beside ``out_dir``; on success it replaces ``out_dir``, on any error
    (or Ctrl-C) it is removed, so no half-written output is ever left. An existing ``out_dir`` is
    replaced only with ``overwrite`` and only if hyperquant wrote it (``check_output_dir``)."""
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite)
    tmp = _staging_dir(out_dir)
    try:
        yield tmp
        (tmp / OUTPUT_MARKER).write_text('{"written_by": "hyperquant"}\n')
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out_dir)


@contextlib.contextmanager
def atomic_output_files(targets: list[Path], overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder beside ``targets[0]``; files written there under the targets' names
    replace them on success (in reverse order, so the first target, e.g. the model, appears last). A
    target the new output lacks is removed, so no stale companion file (external data) survives."""
    existing = [p for p in targets if p.exists()]
    if existing and not overwrite:
        raise HyperquantError(f"output {existing[0]} already exists; pass --overwrite or choose another --out")
    tmp = _staging_dir(targets[0])
    try:
        yield tmp
        for target in reversed(targets):
            staged = tmp / target.name
            if staged.exists():
                os.replace(staged, target)
            elif target.exists() and target != targets[0]:
                target.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json_atomic(path: Path, data, **dump_kwargs) -> None:
    """Write JSON to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, **dump_kwargs))
    os.replace(tmp, path)

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
    remove_stale_staging(target)
    # the PID in the name tells a later run whether the process that made it is still alive
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
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
    check_writable_parent(out_dir)
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


def _existing_ancestor(path: Path) -> Path:
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    return parent


def check_writable_parent(out_dir: Path) -> None:
    """The output's folder must be creatable and writable: found now, not after the work."""
    ancestor = _existing_ancestor(out_dir)
    if not ancestor.is_dir():
        raise HyperquantError(f"--out {out_dir}: {ancestor} is a file, so no folder can be made there; choose "
                              f"another --out")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise HyperquantError(f"--out {out_dir}: {ancestor} is not writable; choose another --out or fix its "
                              f"permissions")


def check_free_space(out_dir: str | os.PathLike, needed_bytes: int, what: str = "the output") -> None:
    """Refuse, before the work, an output whose file system has less free space than ``needed_bytes``."""
    ancestor = _existing_ancestor(Path(out_dir))
    free = shutil.disk_usage(ancestor).free
    if free < needed_bytes:
        raise HyperquantError(f"{ancestor} has {free / 1e6:.1f} MB free, but {what} needs about "
                              f"{needed_bytes / 1e6:.1f} MB; free some space or choose another --out")


def remove_stale_staging(target: Path) -> None:
    """Remove what a killed run (SIGKILL, power loss) left beside ``target``: staging folders and
    half-replaced old copies of processes that no longer run."""
    parent = target.parent
    if not parent.is_dir():
        return
    for leftover in [*parent.glob(f".{target.name}.tmp-*"), *parent.glob(f".{target.name}.old-*")]:
        pid = leftover.name.rsplit("-", 2)[-2] if leftover.name.count("-") >= 2 else ""
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}-0")
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

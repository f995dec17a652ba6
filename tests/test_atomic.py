"""Outputs appear whole or not at all, and what a killed run left behind is cleaned up."""

import os
import subprocess
import sys

import pytest

from hyperquant.atomic import OUTPUT_MARKER, atomic_output_dir, check_free_space
from hyperquant.errors import HyperquantError


def _dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_leftovers_of_a_killed_run_are_removed_by_the_next_one(tmp_path):
    dead = _dead_pid()
    stale = tmp_path / f".out.tmp-{dead}-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half written")
    old = tmp_path / f".out.old-{dead}-0"
    old.mkdir()
    live = tmp_path / f".out.tmp-{os.getpid()}-zzz"  # a run in progress (this process): left alone
    live.mkdir()
    other = tmp_path / f".other.tmp-{dead}-abc"  # another output's staging: not ours to judge
    other.mkdir()
    with atomic_output_dir(tmp_path / "out", overwrite=False) as tmp:
        (tmp / "file").write_text("new")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["out", live.name, other.name])
    assert (tmp_path / "out" / OUTPUT_MARKER).is_file()


def test_sigkill_during_save_leaves_nothing_a_later_run_keeps(tmp_path):
    """A real SIGKILL while the output is being written: the staging folder stays (nothing can remove it
    then); the next run into the same --out removes it."""
    code = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from hyperquant.atomic import atomic_output_dir\n"
        "with atomic_output_dir(Path(sys.argv[1]), overwrite=False) as tmp:\n"
        "    (tmp / 'part').write_bytes(b'x' * 1000)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], check=False)
    assert result.returncode == -9
    assert [p.name.startswith(".out.tmp-") for p in tmp_path.iterdir()] == [True]
    with atomic_output_dir(tmp_path / "out", overwrite=False) as tmp:
        (tmp / "file").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_free_space_is_checked_before_the_work(tmp_path, monkeypatch):
    import shutil

    check_free_space(tmp_path / "out", 1000)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 10**6))
    with pytest.raises(HyperquantError, match=r"has 1.0 MB free, but the output needs about 5.0 MB"):
        check_free_space(tmp_path / "out" / "deeper", 5 * 10**6)


def test_ctrl_c_says_nothing_was_written_and_exits_130(monkeypatch, capsys):
    from hyperquant import cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "app", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 130
    assert "interrupted: nothing was written" in capsys.readouterr().err

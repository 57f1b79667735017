"""Scratch directories: removed by their owner, swept once their process is dead (SIGKILL runs no
cleanup), never while it lives."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from worker.io.scratch import ScratchDir, sweep_orphans

HOLD_SCRATCH = textwrap.dedent(
    """
    import sys, time
    from worker.io.scratch import ScratchDir
    scratch = ScratchDir("out", sys.argv[1])
    (scratch.path / "model.safetensors").write_bytes(b"x" * 1000)
    print(scratch.path, flush=True)
    time.sleep(600)
    """
)


def _holder(parent: Path) -> tuple[subprocess.Popen, Path]:
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD_SCRATCH, str(parent)], stdout=subprocess.PIPE, text=True
    )
    return child, Path(child.stdout.readline().strip())


def test_the_owner_removes_its_directory_and_lock(tmp_path):
    with ScratchDir("eval", tmp_path) as path:
        (path / "config.json").write_text("{}")
        assert path.name.startswith("fapm-eval-")
        assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, path.name + ".lock"]
    assert list(tmp_path.iterdir()) == []


def test_a_killed_process_s_scratch_is_swept_and_a_live_one_is_not(tmp_path):
    live_child, live = _holder(tmp_path)
    dead_child, dead = _holder(tmp_path)
    mine = ScratchDir("calib", tmp_path)
    (tmp_path / "fapm-unlocked-dir").mkdir()  # not a locked scratch directory: not ours to judge
    (tmp_path / "other.lock").write_text("")
    try:
        assert sweep_orphans(tmp_path) == []  # every owner is alive
        dead_child.send_signal(signal.SIGKILL)
        dead_child.wait(10)
        assert dead.exists()  # SIGKILL ran no cleanup
        assert sweep_orphans(tmp_path) == [dead]
        assert not dead.exists() and not Path(f"{dead}.lock").exists()
        assert (live / "model.safetensors").exists() and mine.path.exists()
        assert (tmp_path / "fapm-unlocked-dir").exists() and (tmp_path / "other.lock").exists()
    finally:
        live_child.kill()
        live_child.wait(10)
        mine.remove()
    assert sweep_orphans(tmp_path) == [live]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fapm-unlocked-dir", "other.lock"]


def test_remove_twice_is_harmless(tmp_path):
    scratch = ScratchDir("out", tmp_path)
    scratch.remove()
    scratch.remove()
    assert list(tmp_path.iterdir()) == []
    assert os.listdir(tmp_path) == []

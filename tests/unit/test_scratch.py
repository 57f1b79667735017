"""Scratch directories: removed by their owner, swept once their process is dead (SIGKILL runs no
cleanup), never while it lives."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import tempfile
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


def test_a_process_killed_while_setting_up_leaves_nothing_behind(tmp_path):
    # What a process killed inside ScratchDir._create leaves: the pending lock, unlocked, with or
    # without its (empty) directory. Each is swept; a pending lock that is held is not.
    (tmp_path / "fapm-out-dead1.lock.new").write_text("")
    (tmp_path / "fapm-out-dead2.lock.new").write_text("")
    (tmp_path / "fapm-out-dead2").mkdir()
    held = tmp_path / "fapm-out-live.lock.new"
    fd = os.open(held, os.O_CREAT | os.O_WRONLY, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    (tmp_path / "fapm-out-live").mkdir()
    try:
        assert sweep_orphans(tmp_path) == []  # no scratch with data was an orphan
        assert sorted(p.name for p in tmp_path.iterdir()) == ["fapm-out-live", held.name]
    finally:
        os.close(fd)


def test_the_directory_never_exists_without_its_held_lock(tmp_path, monkeypatch):
    seen = []
    real_mkdir = Path.mkdir

    def watched_mkdir(self, *args, **kwargs):
        # At the moment the directory is made, its (pending) lock exists and is held.
        pending = self.with_name(self.name + ".lock.new")
        probe = os.open(pending, os.O_RDONLY)
        try:
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                seen.append("unlocked")
            except BlockingIOError:
                seen.append("held")
        finally:
            os.close(probe)
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", watched_mkdir)
    with ScratchDir("out", tmp_path) as path:
        assert path.is_dir() and Path(f"{path}.lock").exists()
    assert seen == ["held"]
    assert list(tmp_path.iterdir()) == []


def test_a_name_taken_meanwhile_is_tried_again(tmp_path, monkeypatch):
    # An older directory of the same name (its lock renamed away long ago): another name is used.
    names = iter(["fapm-out-taken.lock.new", "fapm-out-free.lock.new"])
    real_mkstemp = tempfile.mkstemp

    def fixed_mkstemp(prefix, suffix, dir):
        path = Path(dir) / next(names)
        return os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600), str(path)

    (tmp_path / "fapm-out-taken").mkdir()
    monkeypatch.setattr(tempfile, "mkstemp", fixed_mkstemp)
    scratch = ScratchDir("out", tmp_path)
    monkeypatch.setattr(tempfile, "mkstemp", real_mkstemp)
    assert scratch.path.name == "fapm-out-free"
    scratch.remove()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fapm-out-taken"]

"""Progress reporting (callback and the CLI's bar on a TTY) and cancellation between tensors."""

from __future__ import annotations

import itertools
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from worker.engine.pipeline import Progress, run_prune
from worker.errors import JobCancelled
from worker.spec import JobSpec

REPO = Path(__file__).resolve().parents[2]


def test_progress_is_monotone_and_complete(bf16_pair, tmp_path):
    events: list[Progress] = []
    spec = JobSpec(
        base=str(bf16_pair.base), finetuned=str(bf16_pair.finetuned), output=str(tmp_path / "o")
    )
    run_prune(spec, progress=events.append)
    stages = [e.stage for e in events]
    assert stages[0] == "plan" and stages[-1] == "done" and "finalize" in stages
    prune = [e for e in events if e.stage == "prune"]
    assert [e.tensors_done for e in prune] == list(range(len(prune)))
    assert all(a.bytes_done <= b.bytes_done for a, b in itertools.pairwise(prune))
    assert prune[-1].bytes_done == prune[-1].bytes_total > 0
    assert prune[-1].tensors_done == prune[-1].tensors_total


def test_cancel_stops_between_tensors_and_leaves_nothing(bf16_pair, tmp_path):
    out = tmp_path / "o"
    seen = []

    def progress(event: Progress) -> None:
        seen.append(event)

    spec = JobSpec(base=str(bf16_pair.base), finetuned=str(bf16_pair.finetuned), output=str(out))
    with pytest.raises(JobCancelled):
        run_prune(spec, progress=progress, should_cancel=lambda: len(seen) >= 5)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []
    assert max(e.tensors_done for e in seen) < max(e.tensors_total for e in seen)


def test_cli_shows_a_progress_bar_on_a_tty_and_is_quiet_otherwise(bf16_pair, tmp_path):
    args = [sys.executable, "-m", "worker.cli", "prune", "--base", str(bf16_pair.base),
            "--finetuned", str(bf16_pair.finetuned)]  # fmt: skip
    quiet = subprocess.run([*args, "--out", str(tmp_path / "quiet")], cwd=REPO,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr

    leader, follower = pty.openpty()
    proc = subprocess.Popen([*args, "--out", str(tmp_path / "tty")], cwd=REPO,
                            stdin=follower, stdout=follower, stderr=follower)  # fmt: skip
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=120) == 0
    screen = b"".join(chunks).decode(errors="replace")
    assert "tensors" in screen and "100%" in screen and "B/s" in screen, screen

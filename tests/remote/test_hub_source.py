"""Reading checkpoints from the Hugging Face Hub through huggingface_hub, offline, from a cache
directory laid out exactly as huggingface_hub lays it out (blobs named by sha256, snapshot
symlinks, refs). The CLI runs as a user runs it, with HF_HUB_OFFLINE=1 and HF_HUB_CACHE set."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def add_to_hub_cache(cache: Path, repo_id: str, directory: Path, commit: str, ref: str) -> None:
    """huggingface_hub's cache format: models--org--name/{blobs,snapshots/<commit>,refs/<ref>}."""
    root = cache / ("models--" + repo_id.replace("/", "--"))
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for path in sorted(directory.iterdir()):
        if not path.is_file():
            continue
        data = path.read_bytes()
        blob = hashlib.sha256(data).hexdigest()  # LFS blobs are named by their sha256
        (root / "blobs" / blob).write_bytes(data)
        (snapshot / path.name).symlink_to(os.path.relpath(root / "blobs" / blob, snapshot))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / ref).write_text(commit)


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, sharded_pair) -> Path:
    cache = tmp_path_factory.mktemp("hub-cache")
    add_to_hub_cache(cache, "acme/llama-base", sharded_pair.base, "a" * 40, "main")
    add_to_hub_cache(cache, "acme/llama-chat", sharded_pair.finetuned, "b" * 40, "v1")
    return cache


def _fapm(args: list[str], cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(cache)}
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", "prune", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_hub_pair_prunes_to_the_local_bytes(hub_cache, sharded_pair, tmp_path):
    local = _fapm(
        [
            "--base",
            str(sharded_pair.base),
            "--finetuned",
            str(sharded_pair.finetuned),
            "--out",
            str(tmp_path / "local"),
            "--kernel",
            "torch",
        ],
        hub_cache,
    )
    assert local.returncode == 0, local.stderr
    hub = _fapm(
        [
            "--base",
            "hf://acme/llama-base",
            "--finetuned",
            "hf://acme/llama-chat@v1",
            "--out",
            str(tmp_path / "hub"),
            "--kernel",
            "torch",
        ],
        hub_cache,
    )
    assert hub.returncode == 0, hub.stderr
    for path in sorted((tmp_path / "local").iterdir()):
        if path.name not in ("pruning_report.json", "README.md"):
            assert (tmp_path / "hub" / path.name).read_bytes() == path.read_bytes(), path.name
    report = json.loads((tmp_path / "hub" / "pruning_report.json").read_text())
    # Revisions are resolved to commit SHAs and recorded.
    assert report["inputs"]["base"]["revision"] == "a" * 40
    assert report["inputs"]["finetuned"]["revision"] == "b" * 40
    card = (tmp_path / "hub" / "README.md").read_text()
    assert 'base_model: "acme/llama-base"' in card
    assert f"| base revision | `{'a' * 40}` |" in card
    local_report = json.loads((tmp_path / "local" / "pruning_report.json").read_text())
    assert report["inputs"]["base"]["shards"] == local_report["inputs"]["base"]["shards"]


def test_unknown_revision_and_repo_fail_with_codes(hub_cache, tmp_path):
    missing_rev = _fapm(
        [
            "--base",
            "hf://acme/llama-base@nope",
            "--finetuned",
            "hf://acme/llama-chat@v1",
            "--out",
            str(tmp_path / "o1"),
        ],
        hub_cache,
    )
    assert missing_rev.returncode == 1
    assert (
        "[source_unavailable]" in missing_rev.stderr or "[source_not_found]" in missing_rev.stderr
    )
    missing_repo = _fapm(
        [
            "--base",
            "hf://acme/nope",
            "--finetuned",
            "hf://acme/llama-chat@v1",
            "--out",
            str(tmp_path / "o2"),
        ],
        hub_cache,
    )
    assert missing_repo.returncode == 1 and "acme/nope" in missing_repo.stderr
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()

"""Input digests started before the engine is imported (io/checkpoint.py start_early_digests):
the job's digests must be the files' sha256 whatever was hashed early, and a file that changed
after its early hash must never get the old digest."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from worker.io import checkpoint as checkpoint_module
from worker.io.checkpoint import SafetensorsCheckpoint, start_early_digests
from worker.io.digest_cache import file_key
from worker.io.source import LocalDirSource


@pytest.fixture(autouse=True)
def _no_digest_cache(monkeypatch):
    monkeypatch.setenv("FAPM_DIGEST_CACHE", "off")  # only the early digests may answer


def _sharded(directory, seed):
    directory.mkdir()
    gen = torch.Generator().manual_seed(seed)
    save_file({"a": torch.randn(300, 70, generator=gen)}, directory / "model-1.safetensors")
    save_file({"b": torch.randn(50, generator=gen)}, directory / "model-2.safetensors")
    weight_map = {"a": "model-1.safetensors", "b": "model-2.safetensors"}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return ["model-1.safetensors", "model-2.safetensors"]


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _early(path):
    entry = checkpoint_module._EARLY.get(file_key(os.stat(path)))
    assert entry is not None and entry.done.wait(10)
    return entry.sha256


def test_early_digests_are_the_files_sha256_and_the_job_gets_them(tmp_path):
    files = _sharded(tmp_path / "m", seed=1)
    start_early_digests([tmp_path / "m", tmp_path / "missing", tmp_path])  # two are skipped
    expected = {f: _sha256(tmp_path / "m" / f) for f in files}
    assert {f: _early(tmp_path / "m" / f) for f in files} == expected

    checkpoint = SafetensorsCheckpoint(LocalDirSource(tmp_path / "m"), hash_in_background=True)
    assert checkpoint.shard_digests() == expected


def test_a_file_changed_after_its_early_digest_is_hashed_again(tmp_path):
    files = _sharded(tmp_path / "m", seed=2)
    start_early_digests([tmp_path / "m"])
    old = _early(tmp_path / "m" / files[0])
    # Same size, other bytes: a new mtime and ctime, so a new key.
    gen = torch.Generator().manual_seed(3)
    save_file({"a": torch.randn(300, 70, generator=gen)}, tmp_path / "m" / files[0])
    new = _sha256(tmp_path / "m" / files[0])
    assert new != old

    checkpoint = SafetensorsCheckpoint(LocalDirSource(tmp_path / "m"), hash_in_background=True)
    assert checkpoint.shard_digests()[files[0]] == new

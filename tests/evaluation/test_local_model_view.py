"""Evaluation hands transformers a directory path, and transformers opens files by name: for a
local model that directory is a view of links to the files the job opened and checked against
its roots (worker/evaluation/model.py local_model_dir), so a name swapped in the model's
directory after the check is never what gets read."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from worker.errors import InvalidLocation
from worker.evaluation.model import local_model_dir
from worker.io.source import LocalDirSource, confine_local_reads


@pytest.fixture
def confined_model(tmp_path):
    root = (tmp_path / "root").resolve()
    model = root / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text('{"checked": true}')
    (model / "model.safetensors").write_bytes(b"weights-checked")
    secret = tmp_path / "secret.json"
    secret.write_text('{"outside": true}')
    confine_local_reads([root])
    try:
        yield model, secret
    finally:
        confine_local_reads(None)


def test_a_file_swapped_after_the_check_is_not_read(confined_model, tmp_path):
    model, secret = confined_model
    with local_model_dir(f"file://{model}") as directory:
        assert directory != model
        # The swap: each name now leads out of the roots, or to other bytes.
        (model / "config.json").unlink()
        (model / "config.json").symlink_to(secret)
        (model / "other").write_bytes(b"weights-swapped")
        os.replace(model / "other", model / "model.safetensors")
        assert (directory / "config.json").read_text() == '{"checked": true}'
        assert (directory / "model.safetensors").read_bytes() == b"weights-checked"
        assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]
        # The job's own readers (the candidate builder opens the view as a source) accept it.
        assert LocalDirSource(directory).read_file("config.json") == b'{"checked": true}'
    assert not directory.exists()  # the view is scratch, removed on leaving


def test_a_file_leading_out_before_the_check_is_refused(confined_model):
    model, secret = confined_model
    (model / "tokenizer_config.json").symlink_to(secret)
    with pytest.raises(InvalidLocation, match=r"tokenizer_config\.json"):
        with local_model_dir(f"file://{model}"):
            pass


def test_an_unconfined_local_model_is_viewed_too(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with local_model_dir(str(model)) as directory:
        assert directory != model and (directory / "config.json").is_symlink()
        assert Path(directory, "config.json").read_text() == "{}"

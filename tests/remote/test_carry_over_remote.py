"""The whole fine-tuned repo is carried over from and to remote stores too: nested files of an S3
prefix or a Hub repo are listed, copied and published under the same names (moto_server for S3,
an offline Hub cache laid out as huggingface_hub lays it out, the HfApi stand-in for Hub output)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_carry_over import (
    assert_carried_over,
    assert_drop_in,
    make_sentence_finetune,
    repo_files,
)
from tests.remote.test_publish import HubApiStandIn
from worker.engine.pipeline import run_prune
from worker.io.publish import MANIFEST_FILE, HubTarget
from worker.spec import JobSpec

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sentence_pair(tmp_path_factory):
    return make_sentence_finetune(tmp_path_factory.mktemp("sentence"))


def upload_tree(s3, directory: Path, bucket: str, prefix: str) -> str:
    """Upload every file under `directory`, nested ones under their folders."""
    for name in repo_files(directory):
        s3.upload_file(str(directory / name), bucket, f"{prefix}/{name}")
    return f"s3://{bucket}/{prefix}/"


def download_tree(s3, bucket: str, prefix: str, directory: Path) -> list[str]:
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]]
    for key in keys:
        path = directory / key[len(prefix) :]
        path.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(bucket, key, str(path))
    return sorted(key[len(prefix) :] for key in keys)


def test_s3_finetune_to_s3_output_carries_every_nested_file(
    s3, bucket, sentence_pair, tmp_path, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    finetuned = upload_tree(s3, sentence_pair.finetuned, bucket, "models/ft")
    # A key no file system path can take (an empty segment): listed, never written.
    s3.put_object(Bucket=bucket, Key="models/ft/docs//odd.txt", Body=b"odd")
    output = f"s3://{bucket}/out/minilm-pruned/"
    spec = JobSpec(base=str(sentence_pair.base), finetuned=finetuned, output=output)
    report = run_prune(spec).report
    not_carried = {n["name"]: n["reason"] for n in report["output"]["not_carried"]}
    assert "empty" in not_carried.pop("docs//odd.txt")
    report["output"]["not_carried"] = [{"name": k, "reason": v} for k, v in not_carried.items()]

    local = tmp_path / "downloaded"
    names = download_tree(s3, bucket, "out/minilm-pruned/", local)
    assert "1_Pooling/config.json" in names and "docs/figures/loss.svg" in names
    manifest = json.loads((local / MANIFEST_FILE).read_bytes())
    (local / MANIFEST_FILE).unlink()
    listed = {f["name"]: f["sha256"] for f in manifest["files"]}
    assert listed == {
        name: hashlib.sha256(data).hexdigest() for name, data in repo_files(local).items()
    }
    assert_carried_over(sentence_pair.finetuned, local, report)
    assert_drop_in(sentence_pair.finetuned, local)

    # The published output holds carried folders; a re-run with overwrite replaces it.
    again = run_prune(
        JobSpec(
            base=str(sentence_pair.base),
            finetuned=finetuned,
            output=output,
            overwrite=True,
            sparsity=0.5,
        )
    ).report
    assert again["spec"]["sparsity"] == 0.5
    assert "1_Pooling/config.json" in again["output"]["carried"]


def add_tree_to_hub_cache(cache: Path, repo_id: str, directory: Path, commit: str) -> None:
    """huggingface_hub's cache format, nested folders included: snapshot files are symlinks to
    blobs named by sha256, folders real ones."""
    root = cache / ("models--" + repo_id.replace("/", "--"))
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = root / "snapshots" / commit
    for name, data in repo_files(directory).items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)


def test_hub_finetune_carries_every_nested_file(sentence_pair, tmp_path):
    cache = tmp_path / "hub-cache"
    add_tree_to_hub_cache(cache, "acme/minilm-ft", sentence_pair.finetuned, "f" * 40)
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(cache)}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "worker.cli",
            "prune",
            *("--base", str(sentence_pair.base), "--finetuned", "hf://acme/minilm-ft"),
            *("--out", str(out)),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads((out / "pruning_report.json").read_text())
    assert_carried_over(sentence_pair.finetuned, out, report)


def test_hub_output_commits_nested_files_under_their_folders(tmp_path):
    api = HubApiStandIn()
    target = HubTarget("hf://acme/pruned", "acme/pruned", None, False, api=api)
    files = {
        "model.safetensors": b"w",
        "modules.json": b"[]",
        "1_Pooling/config.json": b"{}",
        "docs/figures/loss.svg": b"<svg/>",
    }
    for name, data in files.items():
        (target.local_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (target.local_dir / name).write_bytes(data)
    target.commit("fapm prune")
    paths, _, contents = api.calls[-1][1]
    assert sorted(paths) == sorted(files)
    assert contents == files

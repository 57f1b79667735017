"""Sparse deltas with remote inputs and outputs: made from S3 inputs onto S3 (moto's server) and
materialized from there; made from Hub inputs and materialized from the Hub (an offline cache in
huggingface_hub's layout, the CLI run as a user runs it). The result is the local dense output
of the same job, byte for byte."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.remote.conftest import upload_dir
from tests.remote.test_hub_source import add_to_hub_cache
from worker.evaluation.job import run_job_spec
from worker.spec import JobSpec

REPO = Path(__file__).resolve().parents[2]


def _same_weights(out: Path, dense: Path) -> None:
    names = sorted(p.name for p in dense.iterdir() if p.name not in ("README.md",))
    for name in names:
        if name != "pruning_report.json":
            assert (out / name).read_bytes() == (dense / name).read_bytes(), name
    assert json.loads((out / "pruning_report.json").read_text())["kind"] == "materialize"


def _run(**spec) -> dict:
    return run_job_spec(JobSpec.model_validate({"kernel": "torch", **spec})).report


def test_s3_delta_round_trip(s3, bucket, sharded_pair, tmp_path):
    base = upload_dir(s3, sharded_pair.base, bucket, "base")
    finetuned = upload_dir(s3, sharded_pair.finetuned, bucket, "chat")
    common = {"base": base, "finetuned": finetuned, "method": "dare", "seed": 1, "sparsity": 0.9}
    dense = tmp_path / "dense"
    _run(
        output=str(dense),
        shard_size="12KB",
        **{**common, "base": str(sharded_pair.base), "finetuned": str(sharded_pair.finetuned)},
    )
    delta = f"s3://{bucket}/chat-delta/"
    report = _run(output=delta, output_format="sparse-delta", shard_size="12KB", **common)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="chat-delta/")["Contents"]}
    assert {"chat-delta/fapm-delta.json", "chat-delta/fapm-manifest.json"} <= keys
    manifest = json.loads(
        s3.get_object(Bucket=bucket, Key="chat-delta/fapm-delta.json")["Body"].read()
    )
    assert manifest["base"]["uri"] == base
    assert report["sparse_delta"]["bytes"] < report["sparse_delta"]["dense_output_bytes"] / 2

    # From S3 to S3, then from S3 with a local copy of the base (its sha256 are the same).
    _run(base=base, output=f"s3://{bucket}/chat-dense/", materialize={"delta": delta})
    back = tmp_path / "back"
    back.mkdir()
    for obj in s3.list_objects_v2(Bucket=bucket, Prefix="chat-dense/")["Contents"]:
        name = obj["Key"].removeprefix("chat-dense/")
        if name != "fapm-manifest.json":
            s3.download_file(bucket, obj["Key"], str(back / name))
    _same_weights(back, dense)
    _run(base=str(sharded_pair.base), output=str(tmp_path / "local"), materialize={"delta": delta})
    _same_weights(tmp_path / "local", dense)


def _fapm(args: list[str], cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(cache)}
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_hub_delta_round_trip(sharded_pair, tmp_path):
    cache = tmp_path / "hub-cache"
    add_to_hub_cache(cache, "acme/llama-base", sharded_pair.base, "a" * 40, "main")
    add_to_hub_cache(cache, "acme/llama-chat", sharded_pair.finetuned, "b" * 40, "main")
    dense = tmp_path / "dense"
    _run(
        base=str(sharded_pair.base),
        finetuned=str(sharded_pair.finetuned),
        output=str(dense),
        method="breadcrumbs",
    )
    delta = tmp_path / "delta"
    made = _fapm(
        [
            "prune",
            "--base",
            "hf://acme/llama-base",
            "--finetuned",
            "hf://acme/llama-chat",
            "--out",
            str(delta),
            "--method",
            "breadcrumbs",
            "--format",
            "sparse-delta",
            "--kernel",
            "torch",
        ],
        cache,
    )
    assert made.returncode == 0, made.stderr
    manifest = json.loads((delta / "fapm-delta.json").read_text())
    assert manifest["base"]["revision"] == "a" * 40
    add_to_hub_cache(cache, "acme/llama-chat-delta", delta, "c" * 40, "main")
    out = tmp_path / "out"
    rebuilt = _fapm(
        [
            "materialize",
            "--base",
            "hf://acme/llama-base",
            "--delta",
            "hf://acme/llama-chat-delta",
            "--out",
            str(out),
        ],
        cache,
    )
    assert rebuilt.returncode == 0, rebuilt.stderr
    _same_weights(out, dense)

"""Reading checkpoints from S3 (moto_server over HTTP): the output equals the local run's bytes,
tensor reads are ranged, and store errors end as stable error codes."""

from __future__ import annotations

import math

import pytest

from tests.remote.conftest import upload_dir
from worker.engine.pipeline import run_prune
from worker.errors import FapmError
from worker.io import s3 as s3_module
from worker.io.s3 import S3Source
from worker.spec import JobSpec


def _files(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def _same_output(local_dir, remote_dir) -> None:
    local, remote = _files(local_dir), _files(remote_dir)
    assert set(local) == set(remote)
    for name in local:
        if name in ("pruning_report.json", "README.md"):
            continue  # they name the inputs' URIs
        assert local[name] == remote[name], name


def test_s3_pair_prunes_to_the_local_bytes(s3, bucket, sharded_pair, tmp_path):
    base = upload_dir(s3, sharded_pair.base, bucket, "models/base")
    finetuned = upload_dir(s3, sharded_pair.finetuned, bucket, "models/ft")
    local = run_prune(
        JobSpec(
            base=str(sharded_pair.base),
            finetuned=str(sharded_pair.finetuned),
            output=str(tmp_path / "local"),
            shard_size="20KB",
        )
    )
    remote = run_prune(
        JobSpec(base=base, finetuned=finetuned, output=str(tmp_path / "remote"), shard_size="20KB")
    )
    _same_output(tmp_path / "local", tmp_path / "remote")
    assert remote.report["inputs"]["base"]["uri"] == base
    # Every tensor was read in file order, so the inputs' sha256 equal the local files' digests.
    assert remote.report["inputs"]["base"]["shards"] == local.report["inputs"]["base"]["shards"]


def test_s3_reads_are_ranged(s3, bucket, bf16_pair, tmp_path):
    """Excluded tensors keep the fine-tuned update and are never read from the base: a job that
    excludes all but the attention projections fetches a small part of the base's bytes."""
    base = upload_dir(s3, bf16_pair.base, bucket, "base")
    finetuned = upload_dir(s3, bf16_pair.finetuned, bucket, "ft")
    result = run_prune(
        JobSpec(
            base=base,
            finetuned=finetuned,
            output=str(tmp_path / "out"),
            # All but q_proj, spelled without lookahead (exclude runs on RE2).
            exclude=r"embed|norm|lm_head|[kvo]_proj|mlp\.",
        )
    )
    base_bytes = sum(p.stat().st_size for p in bf16_pair.shards("base"))
    fetched = result.report["inputs"]["base"]["bytes_fetched"]
    q_proj = sum(
        2 * math.prod(t["shape"]) for t in result.report["tensors"] if "q_proj" in t["name"]
    )
    assert 0 < fetched < 0.2 * base_bytes
    assert fetched >= q_proj
    # The unread gaps are not downloaded to hash them: the store's ETag identifies the file.
    assert all(d.startswith("etag:") for d in result.report["inputs"]["base"]["shards"].values())


def test_large_tensor_reads_in_parallel_parts(s3, bucket, tmp_path, monkeypatch):
    payload = bytes(range(256)) * 4096  # 1 MiB
    s3.put_object(Bucket=bucket, Key="blob/data.bin", Body=payload)
    monkeypatch.setattr(s3_module, "PART_BYTES", 100_000)  # 11 part GETs
    source = S3Source(f"s3://{bucket}/blob/", bucket, "blob/")
    buffer = bytearray(900_001)
    source.read_into("data.bin", 12_345, memoryview(buffer))
    source.close()
    assert bytes(buffer) == payload[12_345 : 12_345 + 900_001]
    assert source.bytes_fetched == 900_001


@pytest.mark.parametrize(
    ("where", "code"),
    [
        ("missing-bucket-zz/base/", "source_not_found"),
        ("{bucket}/nothing-here/", "source_not_found"),
    ],
)
def test_missing_store_locations_fail_with_a_code(s3, bucket, tmp_path, where, code):
    uri = "s3://" + where.format(bucket=bucket)
    spec = JobSpec(base=uri, finetuned=uri, output=str(tmp_path / "out"))
    with pytest.raises(FapmError) as info:
        run_prune(spec)
    assert info.value.code == code
    assert not (tmp_path / "out").exists()


def test_truncated_object_is_a_clear_error(s3, bucket, bf16_pair, tmp_path):
    base = upload_dir(s3, bf16_pair.base, bucket, "base")
    finetuned = upload_dir(s3, bf16_pair.finetuned, bucket, "ft")
    shard = bf16_pair.shards("finetuned")[0]
    s3.put_object(Bucket=bucket, Key=f"ft/{shard.name}", Body=shard.read_bytes()[:-100])
    with pytest.raises(FapmError) as info:
        run_prune(JobSpec(base=base, finetuned=finetuned, output=str(tmp_path / "out")))
    assert info.value.code in ("corrupt_checkpoint", "source_not_found")
    assert not (tmp_path / "out").exists()


def test_unreachable_store_is_retried_then_source_unavailable(tmp_path, monkeypatch):
    from worker.localstack import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    spec = JobSpec(
        base="s3://unreachable-store/base/",
        finetuned="s3://unreachable-store/ft/",
        output=str(tmp_path / "out"),
    )
    with pytest.raises(FapmError) as info:
        run_prune(spec)
    assert info.value.code == "source_unavailable"
    assert "s3://unreachable-store/base/" in info.value.message
    assert not (tmp_path / "out").exists()

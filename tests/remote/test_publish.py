"""Publishing targets on their own: S3 through moto_server (real protocol), the Hub through a
stand-in at the HfApi boundary (the one double allowed: no machine here reaches the Hub)."""

from __future__ import annotations

import hashlib
import json

import pytest

from worker.errors import OutputExists, OutputNotReplaceable
from worker.io.publish import MANIFEST_FILE, REPORT_FILE, HubTarget, S3Target
from worker.io.writer import WrittenShard


def _stage(target, files: dict[str, bytes], shards: tuple[str, ...]) -> None:
    for name, data in files.items():
        (target.local_dir / name).write_bytes(data)
        if name in shards:
            target.shard_done(WrittenShard(name, len(data), hashlib.sha256(data).hexdigest()))


FILES = {
    "model-00001-of-00002.safetensors": b"a" * 7_000_000,
    "model-00002-of-00002.safetensors": b"b" * 1000,
    "config.json": b"{}",
}
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def _objects(s3, bucket: str, prefix: str = "") -> dict[str, bytes]:
    listing = s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {o["Key"]: s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listing}


def test_s3_commit_publishes_every_file_and_the_manifest_last(s3, bucket):
    target = S3Target(f"s3://{bucket}/out/m/", bucket, "out/m/", False, "job1")
    _stage(target, FILES, SHARDS)
    assert target.commit("job job1") == f"s3://{bucket}/out/m/"
    objects = _objects(s3, bucket)
    assert set(objects) == {f"out/m/{n}" for n in FILES} | {f"out/m/{MANIFEST_FILE}"}
    manifest = json.loads(objects[f"out/m/{MANIFEST_FILE}"])
    assert {f["name"]: f["sha256"] for f in manifest["files"]} == {
        n: hashlib.sha256(d).hexdigest() for n, d in FILES.items()
    }
    for name, data in FILES.items():
        assert objects[f"out/m/{name}"] == data
    assert not target.local_dir.exists()


def test_s3_abort_leaves_nothing_and_no_open_multipart_upload(s3, bucket):
    target = S3Target(f"s3://{bucket}/out/", bucket, "out/", False, "job2")
    # An interrupted multipart upload, as a killed attempt leaves it.
    s3.create_multipart_upload(Bucket=bucket, Key=target.staging + SHARDS[0])
    _stage(target, FILES, SHARDS[:1])
    target.abort()
    assert _objects(s3, bucket) == {}
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_s3_refuses_an_existing_output_unless_overwrite(s3, bucket):
    s3.put_object(Bucket=bucket, Key="out/old.txt", Body=b"x")
    with pytest.raises(OutputExists):
        S3Target(f"s3://{bucket}/out/", bucket, "out/", False, "job3")
    with pytest.raises(OutputNotReplaceable):  # overwrite replaces only what fapm published
        S3Target(f"s3://{bucket}/out/", bucket, "out/", True, "job3")
    report = json.dumps({"format": "fapm-pruning-report/1"}).encode()
    s3.put_object(Bucket=bucket, Key=f"out/{REPORT_FILE}", Body=report)
    target = S3Target(f"s3://{bucket}/out/", bucket, "out/", True, "job3")
    _stage(target, FILES, SHARDS)
    target.commit("job job3")
    assert "out/old.txt" not in _objects(s3, bucket)  # replaced, not mixed


def test_s3_rerun_reuses_shards_staged_with_the_same_sha256(s3, bucket):
    first = S3Target(f"s3://{bucket}/out/", bucket, "out/", False, "job4")
    _stage(first, FILES, SHARDS)
    first._uploads.wait()  # the attempt dies here: shards staged, nothing published
    staged = first.staging + SHARDS[0]
    before = s3.head_object(Bucket=bucket, Key=staged)["LastModified"]
    second = S3Target(f"s3://{bucket}/out/", bucket, "out/", False, "job4")
    _stage(second, FILES, SHARDS)
    second._uploads.wait()
    assert s3.head_object(Bucket=bucket, Key=staged)["LastModified"] == before
    second.commit("job job4")
    assert _objects(s3, bucket, "out/")[f"out/{SHARDS[0]}"] == FILES[SHARDS[0]]


class _Killed(BaseException):
    """The worker dying mid-promote: commit's exception handling never runs (no abort)."""


def _killed_after_first_copy(target, monkeypatch) -> None:
    copies = []
    real_copy = target.client.copy

    def copy_then_die(*args, **kwargs):
        if copies:
            raise _Killed
        copies.append(args)
        return real_copy(*args, **kwargs)

    monkeypatch.setattr(target.client, "copy", copy_then_die)
    with pytest.raises(_Killed):
        target.commit("job job5")


def test_s3_rerun_completes_a_promote_its_killed_attempt_began(s3, bucket, monkeypatch):
    first = S3Target(f"s3://{bucket}/out/", bucket, "out/", False, "job5")
    _stage(first, FILES, SHARDS)
    _killed_after_first_copy(first, monkeypatch)
    partial = _objects(s3, bucket, "out/")
    assert len(partial) == 1 and f"out/{MANIFEST_FILE}" not in partial  # one object, no commit
    # What a kill during a multipart copy to the output leaves, and someone else's upload.
    s3.create_multipart_upload(Bucket=bucket, Key=f"out/{SHARDS[1]}")
    s3.create_multipart_upload(Bucket=bucket, Key="out/not-ours.bin")

    # Another job finds objects it did not stage: refused as before.
    with pytest.raises(OutputExists):
        S3Target(f"s3://{bucket}/out/", bucket, "out/", False, "other-job")
    second = S3Target(f"s3://{bucket}/out/", bucket, "out/", False, "job5")  # the re-run
    uploads = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert [u["Key"] for u in uploads] == ["out/not-ours.bin"]  # its own copy's upload aborted
    _stage(second, FILES, SHARDS)
    second.commit("job job5")
    objects = _objects(s3, bucket)
    assert set(objects) == {f"out/{n}" for n in FILES} | {f"out/{MANIFEST_FILE}"}
    assert json.loads(objects[f"out/{MANIFEST_FILE}"])["job_id"] == "job5"
    assert all(objects[f"out/{n}"] == data for n, data in FILES.items())


def test_s3_overwrite_rerun_after_a_kill_mid_promote_of_a_fresh_output(s3, bucket, monkeypatch):
    # A fresh output holds no report of fapm's yet: the job's own copies are recognised first.
    files = {**FILES, REPORT_FILE: json.dumps({"format": "fapm-pruning-report/1"}).encode()}
    first = S3Target(f"s3://{bucket}/fresh/", bucket, "fresh/", True, "job7")
    _stage(first, files, SHARDS)
    _killed_after_first_copy(first, monkeypatch)
    assert set(_objects(s3, bucket, "fresh/")) == {f"fresh/{SHARDS[0]}"}
    second = S3Target(f"s3://{bucket}/fresh/", bucket, "fresh/", True, "job7")
    _stage(second, files, SHARDS)
    second.commit("job job7")
    assert set(_objects(s3, bucket, "fresh/")) == {f"fresh/{n}" for n in files} | {
        f"fresh/{MANIFEST_FILE}"
    }


def test_s3_rerun_completes_a_promote_whose_report_differs_from_its_own(s3, bucket, monkeypatch):
    """Killed after every copy but before the manifest: the re-run writes a report of its own
    (other timings, another size) and still completes the promote it found at open."""
    report = {"format": "fapm-pruning-report/1", "seconds": 1.5}
    first = S3Target(f"s3://{bucket}/out/", bucket, "out/", False, "job10")
    _stage(first, {**FILES, REPORT_FILE: json.dumps(report).encode()}, SHARDS)
    real_put = first.client.put_object

    def die_at_the_manifest(**kwargs):
        if kwargs["Key"].endswith(MANIFEST_FILE):
            raise _Killed
        return real_put(**kwargs)

    monkeypatch.setattr(first.client, "put_object", die_at_the_manifest)
    with pytest.raises(_Killed):
        first.commit("job job10")
    monkeypatch.undo()
    second = S3Target(f"s3://{bucket}/out/", bucket, "out/", False, "job10")
    rerun_report = json.dumps({**report, "seconds": 12.25}).encode()
    _stage(second, {**FILES, REPORT_FILE: rerun_report}, SHARDS)
    second.commit("job job10")
    objects = _objects(s3, bucket, "out/")
    assert objects[f"out/{REPORT_FILE}"] == rerun_report and f"out/{MANIFEST_FILE}" in objects


def test_s3_abort_takes_back_a_promote_the_job_began(s3, bucket, monkeypatch):
    first = S3Target(f"s3://{bucket}/out/", bucket, "out/", False, "job8")
    _stage(first, FILES, SHARDS)
    _killed_after_first_copy(first, monkeypatch)
    second = S3Target(f"s3://{bucket}/out/", bucket, "out/", False, "job8")
    second.abort()  # the re-run fails or is cancelled before it publishes
    assert _objects(s3, bucket) == {}  # the next attempt finds the output free


def test_s3_same_size_other_bytes_at_the_output_are_not_taken_for_the_job_s(s3, bucket):
    first = S3Target(f"s3://{bucket}/out/", bucket, "out/", False, "job9")
    _stage(first, FILES, SHARDS)
    first._uploads.wait()
    other = b"z" * len(FILES[SHARDS[1]])  # the same name and size, another upload's bytes
    s3.put_object(Bucket=bucket, Key=f"out/{SHARDS[1]}", Body=other,
                  Metadata={"sha256": hashlib.sha256(other).hexdigest()})  # fmt: skip
    with pytest.raises(OutputExists):
        S3Target(f"s3://{bucket}/out/", bucket, "out/", False, "job9")
    assert _objects(s3, bucket) == {f"out/{SHARDS[1]}": other}


def test_s3_objects_that_differ_from_what_the_job_staged_are_refused(s3, bucket, monkeypatch):
    first = S3Target(f"s3://{bucket}/out/", bucket, "out/", False, "job6")
    _stage(first, FILES, SHARDS)
    first._uploads.wait()  # staged, then killed
    s3.put_object(Bucket=bucket, Key=f"out/{SHARDS[0]}", Body=b"someone else's")  # other size
    with pytest.raises(OutputExists):
        S3Target(f"s3://{bucket}/out/", bucket, "out/", False, "job6")
    # Refused: the attempt's staging is removed with the refusal, not stranded.
    assert _objects(s3, bucket) == {f"out/{SHARDS[0]}": b"someone else's"}


class HubApiStandIn:
    """Records what HubTarget asks of HfApi, in order."""

    def __init__(self, existing: list[str] | None = None) -> None:
        self.calls: list[tuple[str, object]] = []
        self.existing = existing or []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", (repo_id, kw.get("private"))))

    def list_repo_files(self, repo_id, revision=None):
        return self.existing

    def preupload_lfs_files(self, repo_id, additions, revision=None):
        self.calls.append(("preupload", [op.path_in_repo for op in additions]))

    def create_commit(self, repo_id, operations, commit_message, revision=None):
        paths = [op.path_in_repo for op in operations]
        contents = {op.path_in_repo: open(op.path_or_fileobj, "rb").read() for op in operations}
        self.calls.append(("create_commit", (paths, commit_message, contents)))

        class Info:
            oid = "c" * 40

        return Info()


def test_hub_preuploads_each_shard_then_one_commit_with_every_file():
    api = HubApiStandIn()
    target = HubTarget("hf://acme/pruned", "acme/pruned", None, False, api=api)
    _stage(target, FILES, SHARDS)
    assert target.commit("fapm job j: fapm sparsity 0.9") == "hf://acme/pruned@" + "c" * 40
    names = [c[0] for c in api.calls]
    assert names == ["create_repo", "preupload", "preupload", "create_commit"]
    assert api.calls[0][1] == ("acme/pruned", True)  # private by default
    paths, message, contents = api.calls[-1][1]
    assert sorted(paths) == sorted(FILES) and message.startswith("fapm job j")
    assert contents == FILES


def test_hub_refuses_a_repo_that_holds_a_model_unless_overwrite():
    with pytest.raises(OutputExists):
        HubTarget("hf://acme/x", "acme/x", None, False, api=HubApiStandIn(["model.safetensors"]))
    HubTarget("hf://acme/x", "acme/x", None, True, api=HubApiStandIn(["model.safetensors"]))

"""Where a finished model goes, published atomically: a local directory, an S3 prefix or a Hub repo.

The engine always writes into a local staging directory (`OutputTarget.local_dir`); the writer
calls `shard_done` as each shard is closed, so remote targets start uploading it while the next
shard is computed. `commit` publishes everything at once; `abort` removes whatever was staged.

- Local: a hidden sibling directory renamed into place (worker/engine/staging.py).
- S3: shards uploaded under a staging prefix as they complete (multipart above a threshold), then
  the small files, then every object is copied to the final prefix and `fapm-manifest.json`
  (every object with its size and sha256) is written LAST: the manifest is the commit point a
  consumer waits for. A failed or cancelled job aborts its multipart uploads and deletes its
  staging objects; a re-run of the same job reuses shards already staged with the same sha256.
- Hub: the repo is created if missing (private), each shard is pre-uploaded as it completes
  (`preupload_lfs_files`), and one `create_commit` publishes every file at the end.
- MLflow: each file is logged as an artifact of a run as it completes, and the new model version
  registered from them is the commit point (worker/io/mlflow_registry.py).
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import time
import uuid
from abc import ABC, abstractmethod
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from worker.errors import FapmError, InvalidOutput, OutputExists, OutputNotReplaceable
from worker.io import strict_json
from worker.io.safe_json import JsonLimits, check_size, load_json
from worker.io.scratch import ScratchDir
from worker.io.writer import WrittenShard

MANIFEST_FILE = "fapm-manifest.json"
# The report every fapm output carries (worker/engine/pipeline.py writes it); its `format` marks
# a directory or prefix as a model fapm published, the only thing `overwrite` may replace.
REPORT_FILE = "pruning_report.json"
REPORT_FORMAT_PREFIX = "fapm-pruning-report/"
_HASH_CHUNK = 8 * 2**20
# What a report or manifest found at an output location may be: whoever can write there can put
# anything there, so it is read capped and parsed by the one safe loader (worker/io/safe_json.py),
# never whole and never by json.loads alone. fapm's own are far smaller (a manifest lists at most
# carry-over's 10,000 files; a report a few entries per tensor).
PUBLISHED_JSON_LIMITS = JsonLimits(max_bytes=64 * 2**20, max_depth=32, max_values=4 * 2**20)


class _UnreadableJson(FapmError):
    """A report or manifest at an output that is too large, too deep or not JSON: fapm did not
    write it (callers turn this into "not fapm's")."""


def _published_json(raw: bytes, where: str) -> dict:
    """A JSON object read from an output location (_UnreadableJson if it is not one within
    PUBLISHED_JSON_LIMITS)."""
    return load_json(raw, where, PUBLISHED_JSON_LIMITS, _UnreadableJson)  # type: ignore[return-value]


def _read_s3_json_bytes(client, bucket: str, key: str) -> bytes:
    """An S3 object's bytes, for JSON: its size is checked before a byte is read, and no more
    than the limit is read even if the store misreports it (the loader then refuses it)."""
    obj = client.get_object(Bucket=bucket, Key=key)
    body = obj["Body"]
    try:
        size = int(obj.get("ContentLength") or 0)
        check_size(size, f"s3://{bucket}/{key}", PUBLISHED_JSON_LIMITS, _UnreadableJson)
        return body.read(PUBLISHED_JSON_LIMITS.max_bytes + 1)
    finally:
        body.close()


def fapm_report(data: bytes, where: str = REPORT_FILE) -> dict | None:
    """The pruning report in `data` if it is one as fapm writes it, else None."""
    try:
        report = _published_json(data, where)
    except _UnreadableJson:
        return None
    if str(report.get("format", "")).startswith(REPORT_FORMAT_PREFIX):
        return report
    return None


def carried_folders(report: dict) -> set[str]:
    """The top-level folders of an output that its report says fapm carried over from the
    fine-tune (`1_Pooling`, ...): the only folders a model fapm published holds."""
    output = report.get("output")
    carried = output.get("carried") if isinstance(output, dict) else None
    if not isinstance(carried, list):
        return set()
    return {name.split("/")[0] for name in carried if isinstance(name, str) and "/" in name}


def staged_files(directory: Path) -> list[str]:
    """Every file under a staging directory, nested ones as `folder/name`, sorted."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())


def _read_no_follow(path: Path, max_bytes: int = PUBLISHED_JSON_LIMITS.max_bytes) -> bytes:
    """A regular file's bytes, never through a symlink, and never more than `max_bytes` of
    them (OSError otherwise)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"{path}: not a regular file")
        if info.st_size > max_bytes:
            raise OSError(f"{path}: {info.st_size:,} bytes, over the {max_bytes:,}-byte limit")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(max_bytes + 1)  # it may have grown since the fstat
        if len(data) > max_bytes:
            raise OSError(f"{path}: over the {max_bytes:,}-byte limit")
        return data
    finally:
        os.close(fd)


def check_replaceable(output: Path) -> None:
    """OutputNotReplaceable unless the local `output` holds a model fapm published: a real
    directory (not a symlink) with fapm's report, holding files and only the folders its report
    lists as carried over from the fine-tune. Anything else (a root, a directory of models,
    someone's data) is never replaced."""
    refusal = (
        f"{output} is not a model fapm published (no {REPORT_FILE} of fapm's there); "
        "overwrite replaces only those: choose another output"
    )
    try:
        if not stat.S_ISDIR(os.lstat(output).st_mode):
            raise OutputNotReplaceable(refusal)
        report = fapm_report(_read_no_follow(output / REPORT_FILE), str(output / REPORT_FILE))
        if report is None:
            raise OutputNotReplaceable(refusal)
        with os.scandir(output) as entries:
            folders = {entry.name for entry in entries if entry.is_dir(follow_symlinks=False)}
        if folders - carried_folders(report):
            raise OutputNotReplaceable(f"{refusal} (it holds directories)")
    except OSError:
        raise OutputNotReplaceable(refusal) from None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class OutputTarget(ABC):
    """One job's output: stage locally, upload as shards complete, publish all at once."""

    uri: str
    local_dir: Path
    upload_seconds: float = 0.0  # time spent in uploads (overlapping compute), for the report

    def shard_done(self, shard: WrittenShard) -> None:  # noqa: B027 - local targets need nothing
        """Called (from the writer thread) when a shard file is complete in local_dir."""

    @abstractmethod
    def commit(self, message: str) -> str:
        """Publish everything in local_dir; returns where the model now is."""

    @abstractmethod
    def abort(self) -> None:
        """Remove everything staged; safe to call twice and after a failed commit."""


class LocalTarget(OutputTarget):
    """A local directory, published by renaming a hidden sibling staging directory."""

    def __init__(self, uri: str, path: Path, overwrite: bool, job_id: str | None) -> None:
        from worker.io.staging import StagingDir

        self.uri = uri
        self.path = path
        self._staging = StagingDir(path, overwrite, job_id)
        self.local_dir = self._staging.path

    def commit(self, message: str) -> str:
        self._staging.commit()
        return self.uri

    def abort(self) -> None:
        self._staging.abort()


def published_report(uri: str, job_id: str, report_file: str) -> dict | None:
    """The report of an output that job `job_id` itself already published (its worker died after
    publishing, before the job was marked done), else None: a re-run then returns it instead of
    failing with output_exists."""
    from worker.io.uri import parse_uri

    target = parse_uri(uri)
    try:
        if target.scheme == "file":
            path = target.local_path / report_file
            report = _published_json(_read_no_follow(path), str(path))
        elif target.scheme == "s3":
            from worker.io.s3 import s3_client, split_s3_uri

            bucket, prefix = split_s3_uri(target.path)
            client = s3_client()
            manifest_key, report_key = prefix + MANIFEST_FILE, prefix + report_file
            manifest = _published_json(
                _read_s3_json_bytes(client, bucket, manifest_key), manifest_key
            )
            if manifest.get("job_id") != job_id:
                return None
            report = _published_json(_read_s3_json_bytes(client, bucket, report_key), report_key)
        elif target.scheme == "mlflow":
            from worker.io.mlflow_registry import published_version_report

            report = published_version_report(target.path, job_id)
        else:
            return None  # the Hub's single commit: a re-run publishes a second, identical one
    except Exception:  # no such output, or unreadable: not published by this job
        return None
    return report if isinstance(report, dict) and report.get("job_id") == job_id else None


def open_target(uri: str, overwrite: bool, job_id: str | None) -> OutputTarget:
    """The OutputTarget for a job's `output` URI (checks `overwrite` against what is there)."""
    from worker.io.uri import parse_uri

    target = parse_uri(uri)
    if target.scheme == "file":
        return LocalTarget(uri, target.local_path, overwrite, job_id)
    if target.scheme == "s3":
        from worker.io.s3 import split_s3_uri

        bucket, prefix = split_s3_uri(target.path)
        return S3Target(uri, bucket, prefix, overwrite, job_id or uuid.uuid4().hex[:16])
    if target.scheme == "mlflow":
        from worker.io.mlflow_registry import MlflowTarget

        return MlflowTarget(uri, target.path, job_id)  # a new version: nothing to overwrite
    return HubTarget(uri, target.path, target.revision, overwrite)


class _BackgroundUploads:
    """Uploads run one shard at a time on a side thread (each may use parallel parts), in
    order; errors surface at the next call or at `wait`."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fapm-upload")
        self._futures: list[Future] = []
        self.seconds = 0.0
        self._lock = threading.Lock()

    def submit(self, fn, *args) -> None:
        self.raise_if_failed()

        def timed() -> None:
            started = time.perf_counter()
            try:
                fn(*args)
            finally:
                with self._lock:
                    self.seconds += time.perf_counter() - started

        self._futures.append(self._pool.submit(timed))

    def raise_if_failed(self) -> None:
        for future in self._futures:
            if future.done() and future.exception() is not None:
                raise future.exception()

    def wait(self) -> None:
        for future in self._futures:
            future.result()

    def cancel(self) -> None:
        for future in self._futures:
            future.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)


class S3Target(OutputTarget):
    def __init__(
        self, uri: str, bucket: str, prefix: str, overwrite: bool, job_key: str, client=None
    ) -> None:
        self.job_key = job_key
        from boto3.s3.transfer import TransferConfig

        from worker.io.s3 import s3_client

        self.uri = uri
        self.bucket = bucket
        self.prefix = prefix  # "a/b/" (never empty: a whole bucket is not a model directory)
        if not prefix:
            raise InvalidOutput(f"{uri}: give a prefix (s3://bucket/prefix/)")
        self.overwrite = overwrite
        self.client = client or s3_client()
        parent, _, leaf = prefix.rstrip("/").rpartition("/")
        # A sibling prefix keyed by the job: a re-run of the same job finds its staged shards.
        self.staging = f"{parent + '/' if parent else ''}.{leaf}.fapm-staging-{job_key}/"
        self.transfer = TransferConfig(
            multipart_threshold=64 * 2**20,
            multipart_chunksize=64 * 2**20,
            max_concurrency=8,
            use_threads=True,
        )
        self._resumed: dict[str, int] = {}  # an earlier attempt's unfinished promote: key -> size
        try:
            self._fail_if_exists()
        except (OutputExists, OutputNotReplaceable):
            # The output is not ours to write: what an earlier attempt of this job staged goes.
            self._abort_multipart_uploads()
            self._delete_prefix(self.staging)
            raise
        self._abort_multipart_uploads()  # left by a killed earlier attempt of this job
        self._scratch = ScratchDir("out")  # swept if this process is killed
        self.local_dir = self._scratch.path
        self._uploads = _BackgroundUploads()
        self._uploaded: dict[str, tuple[int, str]] = {}  # name -> (size, sha256)

    def _keys(self, prefix: str) -> list[dict]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        )
        return [obj for page in pages for obj in page.get("Contents", [])]

    def _fail_if_exists(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        from worker.io.s3 import s3_error

        try:
            existing = self._keys(self.prefix)
        except (ClientError, BotoCoreError) as exc:
            raise s3_error(exc, self.uri) from exc
        if existing and self._own_unfinished_promote(existing):
            self._resumed = {o["Key"]: o["Size"] for o in existing}
        if not existing or self._resumed:
            return
        if not self.overwrite:
            raise OutputExists(f"{self.uri} already holds objects; set overwrite to replace them")
        self._check_replaceable(existing)

    def _own_unfinished_promote(self, existing: list[dict]) -> bool:
        """Whether the objects at the output are an earlier attempt of this job killed while it
        copied its staged objects there (before the manifest, the commit point): no manifest,
        and every object is one this job staged, at the same size. The re-run then completes the
        promote instead of failing with output_exists, which would strand the job (and its
        staging). Anything else at the output is someone else's, and refused as before.

        Where the copy kept the staged object's sha256 metadata (a single-request copy does; a
        multipart copy may not), it must be the staged one too. Only asked when objects without
        a manifest are found, so the HEADs are on that path alone."""
        staged = {o["Key"][len(self.staging) :]: o["Size"] for o in self._keys(self.staging)}
        for obj in existing:
            name = obj["Key"][len(self.prefix) :]
            if name == MANIFEST_FILE or staged.get(name) != obj["Size"]:
                return False
            copied = self._sha256_metadata(obj["Key"])
            if copied is not None and copied != self._sha256_metadata(self.staging + name):
                return False
        return True

    def _ours(self, existing: list[dict]) -> bool:
        """Whether every object at the output is this job's: found at open as an earlier
        attempt's unfinished promote (as it was then: the report and card of that attempt may
        differ from this one's, timings), or a copy of what this attempt staged."""
        rest = [o for o in existing if self._resumed.get(o["Key"]) != o["Size"]]
        return not rest or self._own_unfinished_promote(rest)

    def _sha256_metadata(self, key: str) -> str | None:
        return self.client.head_object(Bucket=self.bucket, Key=key)["Metadata"].get("sha256")

    def _check_replaceable(self, existing: list[dict]) -> None:
        """OutputNotReplaceable unless the prefix holds a model fapm published: fapm's report,
        objects directly under the prefix and under only the folders its report lists as carried
        over. Its report is there at every moment of a publish, so a re-run after a kill
        mid-publish still qualifies."""
        refusal = (
            f"{self.uri} is not a model fapm published (no {REPORT_FILE} of fapm's there); "
            "overwrite replaces only those: choose another output"
        )
        key = self.prefix + REPORT_FILE
        try:
            raw = _read_s3_json_bytes(self.client, self.bucket, key)
        except (self.client.exceptions.ClientError, _UnreadableJson):
            raise OutputNotReplaceable(refusal) from None
        report = fapm_report(raw, f"s3://{self.bucket}/{key}")
        if report is None:
            raise OutputNotReplaceable(refusal)
        names = [obj["Key"][len(self.prefix) :] for obj in existing]
        folders = {name.split("/")[0] for name in names if "/" in name}
        if folders - carried_folders(report):
            raise OutputNotReplaceable(f"{refusal} (it holds deeper prefixes)")

    def _abort_multipart_uploads(self) -> None:
        """Abort the multipart uploads a killed or failed attempt of this job left open: under
        its staging prefix, and the multipart copies of its staged objects to the output (an
        object over the multipart threshold is copied in parts by the promote)."""
        staged = {o["Key"][len(self.staging) :] for o in self._keys(self.staging)}
        for prefix, ours in ((self.staging, None), (self.prefix, staged)):
            pages = self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=prefix
            )
            for page in pages:
                for upload in page.get("Uploads", []):
                    if ours is not None and upload["Key"][len(prefix) :] not in ours:
                        continue  # not a copy of what this job staged: not ours to abort
                    self.client.abort_multipart_upload(
                        Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                    )

    def _upload(self, name: str, sha256: str, remove_local: bool) -> None:
        path = self.local_dir / name
        key = self.staging + name
        size = path.stat().st_size
        try:  # staged by an earlier attempt of this job with the same bytes: keep it
            head = self.client.head_object(Bucket=self.bucket, Key=key)
            if head["ContentLength"] == size and head["Metadata"].get("sha256") == sha256:
                self._uploaded[name] = (size, sha256)
                if remove_local:
                    path.unlink()
                return
        except self.client.exceptions.ClientError:
            pass
        self.client.upload_file(
            str(path),
            self.bucket,
            key,
            ExtraArgs={"Metadata": {"sha256": sha256}},
            Config=self.transfer,
        )
        self._uploaded[name] = (size, sha256)
        if remove_local:
            path.unlink()  # local disk holds about one shard at a time

    def shard_done(self, shard: WrittenShard) -> None:
        self._uploads.submit(self._upload, shard.file, shard.sha256, True)

    @property
    def upload_seconds(self) -> float:  # type: ignore[override]
        return self._uploads.seconds

    def commit(self, message: str) -> str:
        self._uploads.wait()
        for name in staged_files(self.local_dir):  # nested files (carried folders) too
            if name not in self._uploaded:
                self._uploads.submit(self._upload, name, file_sha256(self.local_dir / name), False)
        self._uploads.wait()
        manifest = {
            "format": "fapm-manifest/1",
            "job_id": self.job_key,
            "message": message,
            "files": [
                {"name": name, "size": size, "sha256": sha}
                for name, (size, sha) in sorted(self._uploaded.items())
            ],
        }
        self._promote(manifest)
        self._delete_prefix(self.staging)
        self._scratch.remove()
        return self.uri

    def _promote(self, manifest: dict) -> None:
        """Copy staged objects to the final prefix; the manifest goes last (the commit point)."""
        existing = self._keys(self.prefix)
        if existing and not self._ours(existing):  # it may have changed while the job ran
            if not self.overwrite:
                raise OutputExists(f"{self.uri} appeared while the job ran; not replaced")
            self._check_replaceable(existing)
        if self.overwrite:  # consumers must not take the old manifest for the new files
            self.client.delete_object(Bucket=self.bucket, Key=self.prefix + MANIFEST_FILE)
        for name in self._uploaded:
            self.client.copy(
                {"Bucket": self.bucket, "Key": self.staging + name},
                self.bucket,
                self.prefix + name,
                Config=self.transfer,
            )
        if self.overwrite:
            keep = {self.prefix + name for name in self._uploaded}
            stale = [o["Key"] for o in self._keys(self.prefix) if o["Key"] not in keep]
            self._delete_keys(stale)
        self.client.put_object(
            Bucket=self.bucket,
            Key=self.prefix + MANIFEST_FILE,
            Body=strict_json.dumps(manifest, indent=2).encode(),
            ContentType="application/json",
        )

    def _delete_keys(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            batch = [{"Key": key} for key in keys[start : start + 1000]]
            if batch:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch})

    def _delete_prefix(self, prefix: str) -> None:
        self._delete_keys([o["Key"] for o in self._keys(prefix)])

    def abort(self) -> None:
        self._uploads.cancel()
        try:
            self._abort_multipart_uploads()
            # A promote this job began (an earlier attempt killed in it, or this one failing in
            # it) is taken back, or every later attempt would find the output taken.
            existing = self._keys(self.prefix)
            if existing and self._ours(existing):
                self._delete_keys([o["Key"] for o in existing])
            self._delete_prefix(self.staging)
        finally:
            self._scratch.remove()


class HubTarget(OutputTarget):
    """A model repo on the Hub; `api` is an HfApi (tests pass a stand-in with its methods)."""

    def __init__(self, uri: str, repo_id: str, branch: str | None, overwrite: bool, api=None):
        from huggingface_hub import HfApi

        from worker.io.hub import hub_calls

        self.uri = uri
        self.repo_id = repo_id
        self.branch = branch
        self.api = api or HfApi()
        with hub_calls(uri):
            self.api.create_repo(repo_id, private=True, exist_ok=True, repo_type="model")
            existing = self.api.list_repo_files(repo_id, revision=branch)
        if any(name.endswith(".safetensors") for name in existing) and not overwrite:
            raise OutputExists(f"{uri} already holds a model; set overwrite to replace it")
        self._scratch = ScratchDir("out")  # swept if this process is killed
        self.local_dir = self._scratch.path
        self._uploads = _BackgroundUploads()
        self._operations: list = []

    def _preupload(self, name: str) -> None:
        from huggingface_hub import CommitOperationAdd

        from worker.io.hub import hub_calls

        operation = CommitOperationAdd(
            path_in_repo=name, path_or_fileobj=str(self.local_dir / name)
        )
        with hub_calls(f"{self.uri}/{name}"):
            self.api.preupload_lfs_files(self.repo_id, additions=[operation], revision=self.branch)
        self._operations.append(operation)

    def shard_done(self, shard: WrittenShard) -> None:
        self._uploads.submit(self._preupload, shard.file)

    @property
    def upload_seconds(self) -> float:  # type: ignore[override]
        return self._uploads.seconds

    def commit(self, message: str) -> str:
        from huggingface_hub import CommitOperationAdd

        from worker.io.hub import hub_calls

        self._uploads.wait()
        staged = {op.path_in_repo for op in self._operations}
        for name in staged_files(self.local_dir):  # nested files (carried folders) too
            if name not in staged:
                self._operations.append(
                    CommitOperationAdd(
                        path_in_repo=name, path_or_fileobj=str(self.local_dir / name)
                    )
                )
        with hub_calls(self.uri):
            info = self.api.create_commit(
                self.repo_id,
                operations=self._operations,
                commit_message=message,
                revision=self.branch,
            )
        self._scratch.remove()
        oid = getattr(info, "oid", None)
        return f"hf://{self.repo_id}@{oid}" if oid else self.uri

    def abort(self) -> None:
        # Pre-uploaded LFS files that no commit references are invisible and garbage-collected.
        self._uploads.cancel()
        self._scratch.remove()

"""S3 model directories: `s3://bucket/prefix/` read by ranged GETs, never downloaded whole.

A checkpoint's headers come from two small ranged GETs per shard (`bytes=0-7`, then the JSON);
each tensor from a ranged GET of exactly its bytes, split into parallel part GETs when it is large
so one tensor can use more than one connection's bandwidth. Credentials and the endpoint come from
the standard AWS configuration (environment, `AWS_ENDPOINT_URL`, profiles, instance roles), never
from a job spec.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from worker.errors import (
    AccessDenied,
    FapmError,
    SourceNotFound,
    SourceUnavailable,
    UnsupportedFormat,
)
from worker.io.source import MAX_LISTED_FILES, ListedSource, TooManyFiles, byte_view

# A tensor larger than this is fetched as parallel part GETs of this size.
PART_BYTES = 16 * 2**20
PART_WORKERS = 8
_NOT_FOUND = {"NoSuchBucket", "NoSuchKey", "404", "NotFound"}
_DENIED = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"}


def s3_client():
    """A boto3 S3 client from the standard AWS configuration, with bounded adaptive retries
    (network errors and throttling are retried with backoff before a job fails)."""
    config = Config(
        # AWS_MAX_ATTEMPTS is the standard knob; 6 attempts (about half a minute of backoff).
        retries={"max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", 6)), "mode": "adaptive"},
        max_pool_connections=PART_WORKERS * 2 + 4,
        connect_timeout=10,
        read_timeout=60,
    )
    return boto3.session.Session().client("s3", config=config)


def s3_error(exc: Exception, where: str) -> FapmError:
    """Map a boto3 failure to a job error with a stable code and an actionable message."""
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in _NOT_FOUND:
            return SourceNotFound(f"{where}: not found in S3 ({code})")
        if code in _DENIED:
            return AccessDenied(f"{where}: access denied by S3 ({code}); check the credentials")
        return SourceUnavailable(f"{where}: S3 answered {code or 'an error'}: {exc}")
    return SourceUnavailable(f"{where}: S3 unreachable after retries: {exc}")


def split_s3_uri(path: str) -> tuple[str, str]:
    """`bucket/prefix` (as parse_uri gives it) -> (bucket, 'prefix/' or '')."""
    bucket, _, prefix = path.partition("/")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


class S3Source(ListedSource):
    """The objects under `s3://bucket/prefix/` (nested ones as `folder/name`), read by byte
    ranges. Opening lists the top level only (`Delimiter="/"`: the weights and their configs);
    nested objects are listed page by page as `iter_files` is consumed (carry-over), so a prefix
    with millions of objects below it is never listed whole."""

    def __init__(self, uri: str, bucket: str, prefix: str, client=None) -> None:
        self.uri = uri
        self.bucket = bucket
        self.prefix = prefix
        self.client = client or s3_client()
        self.bytes_fetched = 0  # what the GETs transferred: reads are ranged, not whole files
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._sizes: dict[str, int] = {}
        self._etags: dict[str, str] = {}
        listed = folders = 0
        try:
            for page in self._pages(Delimiter="/"):
                folders += len(page.get("CommonPrefixes", []))
                listed += len(page.get("Contents", []))
                if listed + folders > MAX_LISTED_FILES:
                    raise UnsupportedFormat(
                        f"{uri}: more than {MAX_LISTED_FILES:,} objects and folders directly "
                        "under this prefix; give the prefix of one model directory"
                    )
                for obj in page.get("Contents", []):
                    self._note(obj)
        except (ClientError, BotoCoreError) as exc:
            raise s3_error(exc, uri) from exc
        if not self._sizes and not folders:
            raise SourceNotFound(f"{uri}: no objects under this prefix")

    def _pages(self, **params: str):
        return self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix, **params
        )

    def _note(self, obj: dict) -> str | None:
        """Keep a listed object's size and ETag; its name, or None for a "folder/" marker (no
        data) or the prefix itself."""
        name = obj["Key"][len(self.prefix) :]
        if not name or name.endswith("/"):
            return None
        self._sizes[name] = obj["Size"]
        self._etags[name] = obj.get("ETag", "").strip('"')
        return name

    def iter_files(self) -> Iterator[str]:
        """Every object under the prefix, in key order, a page at a time as it is consumed."""
        looked_at = 0
        try:
            for page in self._pages():
                for obj in page.get("Contents", []):
                    looked_at += 1
                    if looked_at > MAX_LISTED_FILES:
                        raise TooManyFiles(self.uri)
                    name = self._note(obj)
                    if name is not None:
                        yield name
        except (ClientError, BotoCoreError) as exc:
            raise s3_error(exc, self.uri) from exc

    def stored_digest(self, name: str) -> str:
        return f"etag:{self._etags.get(name, '')}"

    def identity(self) -> dict[str, object]:
        # bytes_fetched shows in the report that reads were ranged (excluded tensors cost nothing).
        return {"uri": self.uri, "revision": None, "bytes_fetched": self.bytes_fetched}

    def read_into(self, name: str, offset: int, buffer: memoryview) -> None:
        view = byte_view(buffer)
        self.check_range(name, offset, len(view))
        if len(view) <= PART_BYTES:
            self._get_range(name, offset, view)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(PART_WORKERS, thread_name_prefix="fapm-s3-get")
        parts = [
            self._pool.submit(
                self._get_range, name, offset + start, view[start : start + PART_BYTES]
            )
            for start in range(0, len(view), PART_BYTES)
        ]
        for part in parts:
            part.result()

    def _get_range(self, name: str, offset: int, view: memoryview) -> None:
        if not len(view):
            return
        key = self.prefix + name
        try:
            response = self.client.get_object(
                Bucket=self.bucket, Key=key, Range=f"bytes={offset}-{offset + len(view) - 1}"
            )
            body = response["Body"]
            done = 0
            while done < len(view):
                got = body.readinto(view[done:])
                if not got:
                    break
                done += got
            body.close()
        except (ClientError, BotoCoreError) as exc:
            raise s3_error(exc, f"s3://{self.bucket}/{key}") from exc
        if done != len(view):
            raise SourceUnavailable(
                f"s3://{self.bucket}/{key}: got {done} of {len(view)} bytes at offset {offset}"
            )
        with self._lock:
            self.bytes_fetched += done

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

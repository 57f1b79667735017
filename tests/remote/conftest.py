"""Remote-storage fixtures: moto's standalone S3 server on a free loopback port (the real S3
protocol over HTTP), with this test process's boto3 pointed at it through the standard AWS
environment variables, exactly as a deployment points the service at its store."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from worker.localstack import LocalStack, s3_env


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory) -> Iterator[str]:
    stack = LocalStack(tmp_path_factory.mktemp("moto"))
    stack.workdir.mkdir(parents=True, exist_ok=True)
    saved = {k: os.environ.get(k) for k in s3_env("")}
    try:
        stack.start_s3()
        os.environ.update(s3_env(stack.s3_url))
        yield stack.s3_url
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        stack.stop()


@pytest.fixture
def s3(s3_endpoint):
    return boto3.client("s3")


@pytest.fixture
def bucket(s3) -> str:
    name = f"fapm-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


def upload_dir(s3, directory: Path, bucket: str, prefix: str) -> str:
    """Upload a model directory's files under `prefix/`; returns its s3:// URI."""
    for path in sorted(Path(directory).iterdir()):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"{prefix}/{path.name}")
    return f"s3://{bucket}/{prefix}/"

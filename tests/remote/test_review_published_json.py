"""A report or manifest found at an output location is read capped and through the safe JSON
loader: one padded past the limit (the bytes of a valid report, then megabytes of whitespace,
which plain json.loads accepts after reading it all) is not fapm's, locally and on S3 (moto_server),
and neither is a deeply nested one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from worker.errors import OutputNotReplaceable
from worker.io.publish import (
    MANIFEST_FILE,
    PUBLISHED_JSON_LIMITS,
    REPORT_FILE,
    S3Target,
    check_replaceable,
    published_report,
)

JOB = "job-review-1"
REPORT = {"format": "fapm-pruning-report/1", "job_id": JOB, "output": {"carried": []}}
# Just past the cap: valid JSON all the same.
PADDED = json.dumps(REPORT).encode() + b" " * PUBLISHED_JSON_LIMITS.max_bytes
DEEP = json.dumps({**REPORT, "extra": "@"}).encode().replace(b'"@"', b"[" * 5000 + b"]" * 5000)


def _local_output(root: Path, report: bytes) -> Path:
    output = root / "model"
    output.mkdir()
    (output / REPORT_FILE).write_bytes(report)
    (output / "config.json").write_text("{}")
    return output


def test_a_small_report_of_fapm_is_read_locally(tmp_path):
    output = _local_output(tmp_path, json.dumps(REPORT).encode())
    check_replaceable(output)
    assert published_report(output.as_uri(), JOB, REPORT_FILE) == REPORT


@pytest.mark.parametrize("report", [PADDED, DEEP], ids=["padded", "deep"])
def test_an_oversized_or_deep_local_report_is_not_fapms(tmp_path, report):
    output = _local_output(tmp_path, report)
    with pytest.raises(OutputNotReplaceable):
        check_replaceable(output)
    assert published_report(output.as_uri(), JOB, REPORT_FILE) is None


def test_an_oversized_s3_report_or_manifest_is_not_fapms(s3, bucket):
    uri = f"s3://{bucket}/out/"
    manifest = json.dumps({"job_id": JOB, "files": []}).encode()
    s3.put_object(Bucket=bucket, Key=f"out/{MANIFEST_FILE}", Body=manifest)
    s3.put_object(Bucket=bucket, Key=f"out/{REPORT_FILE}", Body=json.dumps(REPORT).encode())
    assert published_report(uri, JOB, REPORT_FILE) == REPORT  # the control

    s3.put_object(Bucket=bucket, Key=f"out/{REPORT_FILE}", Body=PADDED)
    assert published_report(uri, JOB, REPORT_FILE) is None
    with pytest.raises(OutputNotReplaceable):
        S3Target(uri, bucket, "out/", True, JOB)

    s3.put_object(Bucket=bucket, Key=f"out/{REPORT_FILE}", Body=json.dumps(REPORT).encode())
    s3.put_object(
        Bucket=bucket, Key=f"out/{MANIFEST_FILE}", Body=manifest + PADDED[len(manifest) :]
    )
    assert published_report(uri, JOB, REPORT_FILE) is None  # the manifest is refused first
    s3.put_object(Bucket=bucket, Key=f"out/{REPORT_FILE}", Body=DEEP)
    with pytest.raises(OutputNotReplaceable):
        S3Target(uri, bucket, "out/", True, JOB)

"""Malformed inputs through a real service job (API, Redis, a Celery worker): the job fails with
the reader's typed code and a message naming the problem, never `internal_error`."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from tests.service.conftest import client


def _wait(http, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        record = http.get(f"/v1/jobs/{job_id}").json()
        if record["status"] in ("succeeded", "failed", "cancelled"):
            return record
        assert time.monotonic() < deadline, record
        time.sleep(0.1)


def _break_header(path: Path, body: bytes) -> None:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    path.write_bytes(len(body).to_bytes(8, "little") + body + raw[8 + n :])


def _nested(header: bytes) -> bytes:
    return b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b", " + header[1:]


def _list_dtype(header: bytes) -> bytes:
    return header.replace(b'"dtype":"BF16"', b'"dtype":["BF16"]', 1)


@pytest.mark.parametrize(
    ("breakage", "needle"),
    [(_nested, "nested deeper"), (_list_dtype, "unknown dtype")],
    ids=["nested-header", "dtype-list"],
)
def test_a_malformed_header_fails_the_job_as_corrupt_checkpoint(
    service, service_pair, local_root, breakage, needle
):
    case = local_root / "bad_input" / breakage.__name__.strip("_")
    finetuned = case / "finetuned"
    shutil.copytree(service_pair.finetuned, finetuned)
    shard = sorted(finetuned.glob("*.safetensors"))[0]
    raw = shard.read_bytes()
    header = raw[8 : 8 + int.from_bytes(raw[:8], "little")]
    broken = breakage(header)
    assert broken != header
    _break_header(shard, broken)
    out = case / "out"
    spec = {"base": str(service_pair.base), "finetuned": str(finetuned), "output": str(out)}
    with client(service) as http:
        response = http.post("/v1/jobs", json=spec)
        assert response.status_code == 202, response.text
        record = _wait(http, response.json()["id"])
    assert record["status"] == "failed", record
    assert record["error"]["code"] == "corrupt_checkpoint", record["error"]
    assert needle in record["error"]["message"] and shard.name in record["error"]["message"]
    assert not out.exists()


def test_a_malformed_config_fails_the_job_as_corrupt_checkpoint(service, service_pair, local_root):
    finetuned = local_root / "bad_input" / "config" / "finetuned"
    shutil.copytree(service_pair.finetuned, finetuned)
    (finetuned / "config.json").write_bytes(b'{"a": ' + b"1" * 5000 + b"}")
    spec = {
        "base": str(service_pair.base),
        "finetuned": str(finetuned),
        "output": str(finetuned.parent / "out"),
    }
    with client(service) as http:
        response = http.post("/v1/jobs", json=spec)
        assert response.status_code == 202, response.text
        record = _wait(http, response.json()["id"])
    assert record["status"] == "failed", record
    assert record["error"]["code"] == "corrupt_checkpoint", record["error"]
    assert "config.json" in record["error"]["message"] and "digits" in record["error"]["message"]


def test_triton_on_a_cpu_worker_fails_as_device_unavailable(service, service_pair, local_root):
    spec = {
        "base": str(service_pair.base),
        "finetuned": str(service_pair.finetuned),
        "output": str(local_root / "bad_input" / "triton" / "out"),
        "kernel": "triton",
        "device": "cpu",
    }
    with client(service) as http:
        response = http.post("/v1/jobs", json=spec)
        assert response.status_code == 202, response.text
        record = _wait(http, response.json()["id"])
    assert record["status"] == "failed", record
    assert record["error"]["code"] == "device_unavailable", record["error"]
    assert "TRITON_INTERPRET" in record["error"]["message"]


def test_an_unreachable_hub_at_publish_is_source_unavailable():
    """Publishing to a Hub that refuses connections: a typed error, not internal_error."""
    import socket

    from huggingface_hub import HfApi

    from worker.errors import SourceUnavailable
    from worker.io.publish import HubTarget

    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    api = HfApi(endpoint=f"http://127.0.0.1:{port}", token="hf_test")
    with pytest.raises(SourceUnavailable, match="hf://org/model"):
        HubTarget("hf://org/model", "org/model", None, overwrite=False, api=api)

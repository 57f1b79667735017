"""Inputs that could pin a worker or reach what they should not are refused at submission over
HTTP (422, naming the field), and the `exclude` that used to pin a worker now runs to the end:

- `exclude` runs on RE2: what it cannot run (backreferences, lookaround, over 1,000 characters)
  is a 422 on `exclude`; `(.|.)*x$`, exponential under Python's re, finishes like any job.
- webhook URLs: only globally routable addresses (carrier-grade NAT and IPv6 forms that embed a
  private IPv4 address are refused).
- s3:// and hf:// names by their services' rules, in every field that takes a location,
  evaluation sets and the Hub webhook's rules and pushed repos included.
"""

from __future__ import annotations

import json
import os
import time
import uuid

import httpx
import pytest
import yaml

from tests.service.conftest import HF_WEBHOOK_SECRET, client
from tests.service.test_api_hooks import push


@pytest.fixture
def body(local_root) -> dict:
    return {
        "base": str(local_root / "models" / "base"),
        "finetuned": f"file://{local_root}/models/sft",
        "output": str(local_root / "out" / uuid.uuid4().hex),
        "labels": {"test": "input-guards"},
    }


def _problem(response: httpx.Response, code: str) -> dict:
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["code"] == code, problem
    return problem


def _fields(problem: dict) -> dict[str, str]:
    return {e["field"]: e["message"] for e in problem["errors"]}


# -- exclude ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "needle"),
    [
        (r"(a|aa)+\1", "backreferences"),
        ("(?=norm)weight", "lookaround"),
        ("(?<!bias)$", "RE2"),
        ("x" * 1001, "1000"),
    ],
)
def test_exclude_re2_cannot_run_is_422_naming_exclude(api_stack, body, pattern, needle):
    with client(api_stack) as http:
        problem = _problem(
            http.post("/v1/jobs", json={**body, "exclude": pattern}), "validation_error"
        )
    assert list(_fields(problem)) == ["exclude"]
    assert needle in _fields(problem)["exclude"]


def test_a_formerly_catastrophic_exclude_runs_to_success(service, service_pair, local_root):
    """Under Python's re, `(.|.)*x$` on a 40-character tensor name takes ~2^40 steps."""
    output = local_root / "out" / f"re2-{uuid.uuid4().hex}"
    spec = {
        "base": str(service_pair.base),
        "finetuned": str(service_pair.finetuned),
        "output": str(output),
        "exclude": "(.|.)*x$|norm",
        "kernel": "torch",
    }
    with client(service) as http:
        submitted = http.post("/v1/jobs", json=spec)
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["id"]
        deadline = time.monotonic() + 120
        while (record := http.get(f"/v1/jobs/{job_id}").json())["status"] not in (
            "succeeded",
            "failed",
            "cancelled",
        ):
            assert time.monotonic() < deadline, record
            time.sleep(0.1)
    assert record["status"] == "succeeded", record.get("error")
    report = json.loads((output / "pruning_report.json").read_text())
    excluded = {t["name"] for t in report["tensors"] if t.get("reason") == "excluded"}
    assert excluded and all("norm" in name for name in excluded)


# -- webhook URLs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://100.100.100.200/latest/meta-data/",  # carrier-grade NAT metadata address
        "https://100.64.0.1/hook",
        "https://[2002:7f00:1::]/hook",  # 6to4 of 127.0.0.1
        "https://[2002:a9fe:a9fe::]/hook",  # 6to4 of 169.254.169.254
        "https://[64:ff9b::a9fe:a9fe]/hook",  # NAT64 of 169.254.169.254
        "https://[::127.0.0.1]/hook",  # IPv4-compatible loopback
    ],
)
def test_webhook_to_a_non_global_address_is_422(api_stack, body, url):
    with client(api_stack) as http:
        response = http.post("/v1/jobs", json={**body, "webhook": {"url": url}})
    assert list(_fields(_problem(response, "invalid_location"))) == ["webhook.url"]


# -- s3:// and hf:// names --------------------------------------------------------------------


def test_remote_names_are_checked_in_every_location_field(api_stack, body):
    bad = {
        "base": "s3://169.254.169.254/latest/meta-data/",
        "finetuned": "hf://org/name@../../../etc",
        "output": "s3://acme-models/../other-tenant/",
    }
    with client(api_stack) as http:
        fields = _fields(_problem(http.post("/v1/jobs", json={**body, **bad}), "invalid_location"))
    assert set(fields) == set(bad)
    assert "IP address" in fields["base"]
    assert "Hub revision" in fields["finetuned"]
    assert "'..'" in fields["output"] or ".. is not allowed" in fields["output"]


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("base", "s3://Models/base/", "lowercase"),
        ("base", "s3://xn--models/base/", "reserved"),
        ("finetuned", "hf://org/na--me", "'--'"),
        ("finetuned", "hf://org/name.git", ".git"),
        ("finetuned", "hf://org/name@main.lock", "Hub revision"),
        ("output", "s3://models//pruned/", "empty segment"),
        ("output", "s3://models/pruned?versionId=1", "query"),
    ],
)
def test_one_bad_remote_name_is_422_naming_its_field(api_stack, body, field, value, needle):
    with client(api_stack) as http:
        fields = _fields(
            _problem(http.post("/v1/jobs", json={**body, field: value}), "invalid_location")
        )
    assert list(fields) == [field]
    assert needle in fields[field]


def test_good_remote_names_are_accepted(api_stack, body):
    good = {
        "base": "hf://meta-llama/Llama-3.1-8B@main",
        "finetuned": "hf://acme/llama-sft@" + "3f" * 20,
        "output": "s3://acme-models/pruned/llama.sft/",
    }
    with client(api_stack) as http:
        response = http.post("/v1/jobs", json={**body, **good})
    assert response.status_code == 202, response.text


def test_evaluation_set_uris_get_the_name_checks(api_stack, body):
    evaluate = {
        "task": "s3://100.100.100.200/evals/task.jsonl",
        "general": "hf://acme/evals@-x/general.jsonl",
    }
    request = {**body, "sparsity": 0.5, "evaluate": evaluate}
    with client(api_stack) as http:
        fields = _fields(_problem(http.post("/v1/jobs", json=request), "invalid_location"))
    assert set(fields) == {"evaluate.task", "evaluate.general"}
    assert "IP address" in fields["evaluate.task"]
    assert "Hub revision" in fields["evaluate.general"]


# -- the Hub webhook ----------------------------------------------------------------------------


def test_hub_rules_and_pushed_repos_get_the_name_checks(make_stack, local_root, tmp_path):
    rules_file = tmp_path / "rules.yaml"
    rule = {
        "repo": "acme/*",
        "tenant": "alice",
        "base": "hf://meta-llama/Llama-3.1-8B@main",
        "output": f"{local_root}/hub-guards/{{name}}/{{short_sha}}",
    }
    rules_file.write_text(yaml.safe_dump([rule]))
    stack = make_stack(FAPM_HF_WEBHOOK_RULES_FILE=str(rules_file))
    stack.start_redis()
    stack.start_api()

    def deliver(payload: dict) -> httpx.Response:
        headers = {"X-Webhook-Secret": HF_WEBHOOK_SECRET, "Content-Type": "application/json"}
        return httpx.post(
            f"{stack.api_url}/v1/hooks/huggingface", json=payload, headers=headers, timeout=30
        )

    # A pushed repo whose id the Hub's own validator refuses ('--') starts no job: the payload
    # is refused by the same rules as every hf:// location.
    refused = deliver(push("acme/llama--sft", "a" * 40))
    assert refused.status_code == 422, refused.text
    assert refused.json()["code"] == "invalid_hub_payload"
    assert "'--'" in refused.json()["detail"]
    assert deliver(push("acme/llama-sft", "b" * 40)).status_code == 202

    # A rule whose output names an IP address as a bucket is refused when the file is loaded.
    rule["output"] = "s3://169.254.169.254/{name}/"
    rules_file.write_text(yaml.safe_dump([rule]))
    stamp = time.time() + 1  # a same-second rewrite would look unchanged
    os.utime(rules_file, (stamp, stamp))
    broken = deliver(push("acme/llama-sft", "c" * 40))
    assert broken.status_code == 503, broken.text
    assert broken.json()["code"] == "hub_rules_invalid"
    assert "IP address" in broken.json()["detail"]

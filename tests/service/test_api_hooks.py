"""POST /v1/hooks/huggingface over real HTTP: secret check, rule matching, the job a push starts,
repeated deliveries, ignored events, and the rules file's own errors."""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from app.jobs.hub_rules import HubRulesError, parse_rules
from app.jobs.store import JobStore
from tests.service.conftest import FAST_ENV, HF_WEBHOOK_SECRET, client
from worker.localstack import LocalStack

SHA1 = "3f2a9c1d0b7e4f6a8c5d2e1f0a9b8c7d6e5f4a3b"
SHA2 = "9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a2f1e0d"


def push(repo: str = "acme/llama-sft", sha: str = SHA1, ref: str = "refs/heads/main") -> dict:
    """A Hub webhook payload (version 3) for a commit pushed to `ref`."""
    return {
        "event": {"action": "update", "scope": "repo.content"},
        "repo": {
            "type": "model",
            "name": repo,
            "id": "6560c33a5c7b1a9ce1bfa0d9",
            "private": False,
            "headSha": sha,
            "owner": {"id": "6560c33a5c7b1a9ce1bfa0d0"},
            "url": {
                "web": f"https://huggingface.co/{repo}",
                "api": f"https://huggingface.co/api/models/{repo}",
            },
        },
        "updatedRefs": [{"ref": ref, "oldSha": "0" * 40, "newSha": sha}],
        "webhook": {"id": "6560c3f3a1b2c3d4e5f60718", "version": 3},
    }


@pytest.fixture(scope="module")
def rules_file(tmp_path_factory, local_root) -> Path:
    path = tmp_path_factory.mktemp("hub") / "rules.yaml"
    rules = [
        {
            "repo": "acme/llama-*",
            "tenant": "alice",
            "base": "hf://meta-llama/Llama-3.1-8B@main",
            "method": "magnitude",
            "sparsity": 0.75,
            "output": f"{local_root}/hub-out/{{name}}/{{short_sha}}",
            "labels": {"from": "hub", "commit": "{sha}"},
        },
        {
            "repo": "acme/adapters-*",
            "tenant": "bob",
            "role": "adapter",
            "revision": "release",
            "base": "hf://meta-llama/Llama-3.1-8B@main",
            "output": "s3://bucket/{repo}/{sha}/",
        },
    ]
    path.write_text(yaml.safe_dump(rules))
    return path


@pytest.fixture(scope="module")
def hub_stack(tmp_path_factory, local_root, rules_file) -> Iterator[LocalStack]:
    env = {
        **FAST_ENV,
        "FAPM_LOCAL_ROOTS": str(local_root),
        "FAPM_HF_WEBHOOK_RULES_FILE": str(rules_file),
    }
    stack = LocalStack(tmp_path_factory.mktemp("hub_stack"), env=env)
    stack.workdir.mkdir(parents=True, exist_ok=True)
    try:
        stack.start_redis()
        stack.start_api()
        yield stack
    finally:
        stack.stop()


def deliver(stack: LocalStack, payload: dict | bytes, secret: str | None = HF_WEBHOOK_SECRET):
    headers = {"X-Webhook-Secret": secret} if secret is not None else {}
    content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    headers["Content-Type"] = "application/json"
    return httpx.post(
        f"{stack.api_url}/v1/hooks/huggingface", content=content, headers=headers, timeout=30
    )


@pytest.mark.parametrize(
    "secret", [None, "", "wrong", HF_WEBHOOK_SECRET + "x", HF_WEBHOOK_SECRET[:-1]]
)
def test_wrong_or_missing_secret_is_401_and_starts_nothing(hub_stack, secret):
    store = JobStore.from_url(hub_stack.redis_url)
    before = store.redis.zcard("fapm:tenant:alice:jobs")
    response = deliver(hub_stack, push(sha="a" * 40), secret=secret)
    assert response.status_code == 401
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["code"] == "unauthorized"
    assert store.redis.zcard("fapm:tenant:alice:jobs") == before


def test_matched_push_starts_one_job_and_redelivery_returns_it(hub_stack, local_root):
    first = deliver(hub_stack, push())
    assert first.status_code == 202, first.text
    answer = first.json()
    assert answer["duplicate"] is False
    assert answer["status"] == "queued"
    job_id = answer["job_id"]

    with client(hub_stack, "alice") as http:
        record = http.get(f"/v1/jobs/{job_id}").json()
    assert record["spec"]["finetuned"] == f"hf://acme/llama-sft@{SHA1}"
    assert record["spec"]["adapter"] is None
    assert record["spec"]["base"] == "hf://meta-llama/Llama-3.1-8B@main"
    assert record["spec"]["method"] == "magnitude"
    assert record["spec"]["sparsity"] == 0.75
    assert record["spec"]["output"] == f"{local_root}/hub-out/llama-sft/{SHA1[:12]}"
    assert record["labels"] == {
        "source": "huggingface",
        "hf_repo": "acme/llama-sft",
        "hf_sha": SHA1,
        "from": "hub",
        "commit": SHA1,
    }

    # The Hub re-delivers (or someone presses "replay"): the same job, no second one.
    for _ in range(3):
        again = deliver(hub_stack, push())
        assert again.status_code == 202
        assert again.json() == {"job_id": job_id, "status": "queued", "duplicate": True}
    store = JobStore.from_url(hub_stack.redis_url)
    hub_jobs = [j for j in store.list("alice", label=("hf_sha", SHA1), limit=50)[0]]
    assert [j.id for j in hub_jobs] == [job_id]
    assert sum(job_id in m for m in store.redis.lrange("cpu", 0, -1)) == 1

    # Even after the job ended, a replay does not start it again.
    store.finish(job_id, "failed", error={"code": "unsupported_format", "message": "hf://"})
    assert deliver(hub_stack, push()).json()["job_id"] == job_id

    # A new commit is a new job.
    newer = deliver(hub_stack, push(sha=SHA2))
    assert newer.status_code == 202
    assert newer.json()["job_id"] != job_id
    assert newer.json()["duplicate"] is False


def test_adapter_rule_on_its_branch(hub_stack):
    main_push = deliver(hub_stack, push("acme/adapters-lora", ref="refs/heads/main"))
    assert main_push.status_code == 202
    assert main_push.json() == {"ignored": "refs/heads/release was not updated"}
    release = deliver(hub_stack, push("acme/adapters-lora", sha=SHA2, ref="refs/heads/release"))
    assert release.status_code == 202, release.text
    with client(hub_stack, "bob") as http:
        record = http.get(f"/v1/jobs/{release.json()['job_id']}").json()
    assert record["spec"]["adapter"] == f"hf://acme/adapters-lora@{SHA2}"
    assert record["spec"]["finetuned"] is None
    assert record["spec"]["output"] == f"s3://bucket/acme/adapters-lora/{SHA2}/"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda p: p["repo"].update(name="other/model"), "no rule matches other/model"),
        (lambda p: p["repo"].update(type="dataset"), "dataset repos start no jobs"),
        (
            lambda p: p["event"].update(scope="discussion", action="create"),
            "event discussion/create starts no job",
        ),
        (lambda p: p["event"].update(action="delete"), "event repo.content/delete starts no job"),
        (lambda p: p["updatedRefs"][0].update(newSha=None), "refs/heads/main was deleted"),
        (
            lambda p: p["updatedRefs"][0].update(ref="refs/heads/dev"),
            "refs/heads/main was not updated",
        ),
    ],
    ids=["other-repo", "dataset", "discussion", "delete", "branch-deleted", "other-branch"],
)
def test_unmatched_deliveries_are_202_ignored(hub_stack, change, reason):
    payload = copy.deepcopy(push(sha="b" * 40))
    change(payload)
    response = deliver(hub_stack, payload)
    assert response.status_code == 202, response.text
    assert response.json() == {"ignored": reason}


def test_head_sha_is_used_without_updated_refs(hub_stack):
    payload = push(sha="c" * 40)
    del payload["updatedRefs"]
    response = deliver(hub_stack, payload)
    assert response.status_code == 202
    assert "job_id" in response.json()


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"{}",
        json.dumps({"event": {"action": "update"}, "repo": {}}).encode(),
        json.dumps({**push(), "repo": {**push()["repo"], "name": "../../etc"}}).encode(),
        json.dumps(
            {
                **push(),
                "repo": {**push()["repo"], "name": "acme/llama-x"},
                "updatedRefs": [{"ref": "refs/heads/main", "newSha": "zz"}],
            }
        ).encode(),
    ],
    ids=["garbage", "empty", "partial", "traversal-name", "bad-sha"],
)
def test_malformed_payloads_are_422_problems(hub_stack, payload):
    response = deliver(hub_stack, payload)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")


def test_broken_rules_file_is_503_until_fixed(hub_stack, rules_file):
    good = rules_file.read_text()
    try:
        rules_file.write_text(
            "- repo: acme/*\n  tenant: alice\n  output: /x\n  base: /b\n  sparsity: 7\n"
        )
        _bump_mtime(rules_file)
        broken = deliver(hub_stack, push(sha="d" * 40))
        assert broken.status_code == 503
        assert broken.json()["code"] == "hub_rules_invalid"
        assert "rule 1" in broken.json()["detail"]
    finally:
        rules_file.write_text(good)
        _bump_mtime(rules_file)
    assert deliver(hub_stack, push(sha="d" * 40)).status_code == 202


def test_rule_output_outside_local_roots_is_refused(hub_stack, rules_file):
    good = rules_file.read_text()
    bad = yaml.safe_load(good)
    bad[0]["output"] = "/etc/{name}"
    try:
        rules_file.write_text(yaml.safe_dump(bad))
        _bump_mtime(rules_file)
        response = deliver(hub_stack, push(sha="e" * 40))
        assert response.status_code == 422
        assert response.json()["code"] == "invalid_location"
        assert response.json()["errors"][0]["field"] == "output"
    finally:
        rules_file.write_text(good)
        _bump_mtime(rules_file)


def _bump_mtime(path: Path) -> None:
    # Same-size rewrites within one mtime tick would look unchanged; move the clock forward.
    stamp = time.time() + 1
    os.utime(path, (stamp, stamp))


def test_hub_webhooks_off_with_an_empty_secret(make_stack):
    stack = make_stack(FAPM_HF_WEBHOOK_SECRET="")
    stack.start_redis()
    stack.start_api()
    for secret in (None, "", HF_WEBHOOK_SECRET):
        assert deliver(stack, push(), secret=secret).status_code == 401


# -- the rules parser, directly ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- repo: a/*\n  tenant: t\n  base: /b\n  output: /o/{nope}\n", "unknown placeholder"),
        ("- repo: a/*\n  tenant: t\n  base: /b\n  output: /o\n  finetuned: /x\n", "use `role`"),
        ("- repo: a/*\n  tenant: t\n  base: /b\n  output: /o\n  bogus: 1\n", "bogus"),
        ("- repo: a/*\n  base: /b\n  output: /o\n", "tenant"),
        ("{not yaml", "not valid YAML"),
        ("repo: a\n", "expected a list"),
        ("- repo: a/*\n  tenant: t\n  base: /b\n  output: /o\n  method: nps\n", "evaluate"),
    ],
)
def test_rules_parser_names_the_problem(text, message):
    with pytest.raises(HubRulesError, match=message):
        parse_rules(text, "rules.yaml")


def test_a_rule_can_start_an_nps_search():
    text = (
        "- repo: a/*\n  tenant: t\n  base: /b\n  output: /o/{short_sha}\n  method: nps\n"
        "  sparsity: 0.9\n  nps: {generations: 5, objective: skill}\n"
        "  evaluate: {task: /evals/task.jsonl}\n"
    )
    spec = parse_rules(text, "rules.yaml")[0].job_request("a/b", "e" * 40).spec()
    assert spec.method == "nps" and spec.searched and spec.nps_settings.generations == 5


def test_a_rule_can_prune_the_pushed_models_weights():
    text = (
        "- repo: a/*\n  tenant: t\n  role: model\n  output: /o/{short_sha}\n  prune: weights\n"
        "  method: wanda\n  sparsity: 0.5\n  pattern: '2:4'\n"
        "  calibration: {mode: general, general: /data/c4.jsonl}\n"
    )
    spec = parse_rules(text, "rules.yaml")[0].job_request("a/b", "e" * 40).spec()
    assert spec.prune == "weights" and spec.model == "hf://a/b@" + "e" * 40


def test_rules_parser_reads_json_and_a_rules_key():
    rules = parse_rules(
        json.dumps({"rules": [{"repo": "x/*", "tenant": "t", "base": "/b", "output": "/o/{sha}"}]}),
        "rules.json",
    )
    assert rules[0].matches("x/y") and not rules[0].matches("z/y")
    assert rules[0].job_request("x/y", "f" * 40).output == "/o/" + "f" * 40

"""Standalone evaluation as a job kind: POST /v1/evaluations through the real API, redis-server and
a Celery worker. The job's numbers equal `evaluate_model` in this process (what `fapm eval`
prints); the job is a job like any other (listed with its kind, followed over SSE to its terminal
state, invisible to other tenants, idempotent); bad locations are 422 at submission and a
malformed JSONL fails the job with bad_eval_data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tests.eval_models import EvalCase, build_eval_case
from tests.evaluation.added_vocab import EXTRA, build_added_vocab_case
from tests.service.conftest import client
from tests.service.test_api_events import read_stream
from tests.service.test_cli_client import fapm
from tests.service.test_worker_jobs import Jobs
from worker.evaluation.standalone import NO_REFERENCE_NOTE, evaluate_model
from worker.spec import EvaluationSpec

EVALUATE = {"max_examples": 24, "batch_size": 8}
# Timings differ from run to run; everything else must be the same numbers.
VOLATILE = ("seconds", "tokens_per_second")


@pytest.fixture(scope="module")
def case(local_root) -> EvalCase:
    return build_eval_case(local_root / "eval_case")


@pytest.fixture(scope="module")
def halfway(case: EvalCase) -> Path:
    """A model between the base and the fine-tune (the mean of their weights): it keeps part of
    the skill and part of the forgetting, so skill_kept and forgetting_left are neither 0 nor 1.
    (Built without the engine: what is measured is any model the user has.)"""
    directory = case.base.parent / "halfway"
    if not (directory / "model.safetensors").exists():
        base = load_file(case.base / "model.safetensors")
        finetuned = load_file(case.finetuned / "model.safetensors")
        directory.mkdir(parents=True, exist_ok=True)
        for item in case.finetuned.iterdir():
            if item.name != "model.safetensors":
                shutil.copy(item, directory / item.name)
        mean = {name: ((base[name] + w) / 2).contiguous() for name, w in finetuned.items()}
        save_file(mean, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def body(case: EvalCase, model: Path, **extra) -> dict:
    return {
        "base": str(case.base),
        "model": str(model),
        "evaluate": {"task": str(case.task), "general": str(case.general), **EVALUATE},
        "device": "cpu",
        **extra,
    }


def submit(api, spec: dict, status: int = 202, **headers: str) -> dict:
    response = api.post("/v1/evaluations", json=spec, headers=headers)
    assert response.status_code == status, response.text
    return response.json()


def stable(section: dict) -> dict:
    """The evaluation section without timings."""
    out = json.loads(json.dumps(section))
    out.pop("tokens_per_second", None)
    for point in [*out["references"].values(), *out["points"]]:
        for key in VOLATILE:
            point.pop(key, None)
    return out


def test_evaluation_job_equals_the_evaluation_module(service, case, halfway):
    jobs = Jobs(service)
    with client(service) as api:
        created = submit(api, body(case, halfway, finetuned=str(case.finetuned)))
    # The answer is the record read back after the enqueue: an idle worker may have taken it.
    assert created["kind"] == "evaluation" and created["status"] in ("queued", "running")
    assert created["spec"]["model"] == str(halfway)
    record = jobs.wait(created["id"], timeout=180)
    assert record.status == "succeeded", record.error
    assert record.kind == "evaluation"
    assert record.result is not None and record.result.output is None  # nothing published
    section = record.result.report["evaluation"]

    expected = evaluate_model(
        str(case.base),
        str(halfway),
        EvaluationSpec(task=str(case.task), general=str(case.general), **EVALUATE),
        "cpu",
        str(case.finetuned),
    )
    assert stable(section) == stable(expected)
    # The model lies between its references: some skill kept, some forgetting left.
    (point,) = section["points"]
    assert 0 < point["skill_kept"] < 1
    assert 0 < point["forgetting_left"] < 1
    assert section["relative_to"] == "finetuned" and section["note"] is None
    assert section["references"]["finetuned"]["skill_kept"] == 1.0
    # The full report has the same section and the spec; progress ended done at 1.0.
    report = jobs.report(created["id"])
    assert report is not None and report["kind"] == "evaluation"
    assert stable(report["evaluation"]) == stable(section)
    assert report["spec"]["finetuned"] == str(case.finetuned)
    assert record.progress.stage == "done" and record.progress.fraction == 1.0


def test_evaluation_of_a_finetune_with_added_vocabulary(service, case, local_root):
    """The fine-tune's task set uses a token only it has a row for (it used to end in
    internal_error): the base is measured with the fine-tune's added rows."""
    added = build_added_vocab_case(case, local_root / "eval-api-vocab")
    spec = body(case, added.finetuned, finetuned=str(added.finetuned))
    spec["evaluate"] = {**spec["evaluate"], "task": str(added.task)}
    with client(service) as api:
        job_id = submit(api, spec)["id"]
    record = Jobs(service).wait(job_id, timeout=180)
    assert record.status == "succeeded", record.error
    section = record.result.report["evaluation"]
    assert section["references"]["finetuned"]["skill"] == 1.0
    assert section["references"]["base"]["skill"] == 0.0
    assert f"the {EXTRA} vocabulary rows it lacks" in section["note"]
    expected = evaluate_model(
        str(case.base),
        str(added.finetuned),
        EvaluationSpec(task=str(added.task), general=str(case.general), **EVALUATE),
        "cpu",
        str(added.finetuned),
    )
    assert stable(section) == stable(expected)


def test_evaluation_job_is_listed_and_streamed_like_any_job(service, case, halfway):
    jobs = Jobs(service)
    with client(service) as api:
        job_id = submit(api, body(case, halfway, labels={"suite": "eval-api"}))["id"]
        record = jobs.wait(job_id, timeout=180)
        assert record.status == "succeeded", record.error
        # Without a fine-tuned reference the ratios are relative to the model itself: 1, and
        # the note says so.
        section = record.result.report["evaluation"]
        assert section["relative_to"] == "model"
        assert section["note"].startswith(NO_REFERENCE_NOTE)
        assert section["points"][0]["skill_kept"] == 1.0
        assert "finetuned" not in section["references"]

        listed = api.get("/v1/jobs", params={"label": "suite=eval-api"}).json()["jobs"]
        assert [(j["id"], j["kind"]) for j in listed] == [(job_id, "evaluation")]
        only_evaluations = api.get("/v1/jobs", params={"kind": "evaluation"}).json()["jobs"]
        assert job_id in {j["id"] for j in only_evaluations}
        assert {j["kind"] for j in only_evaluations} == {"evaluation"}
        only_prunes = api.get("/v1/jobs", params={"kind": "prune"}).json()["jobs"]
        assert job_id not in {j["id"] for j in only_prunes}
        assert api.get("/v1/jobs", params={"kind": "other"}).status_code == 422

    stream = read_stream(service.api_url, job_id)
    assert stream.status_code == 200 and stream.closed
    states = [json.loads(e["data"])["status"] for e in stream.events if e["event"] == "state"]
    assert states[0] == "queued" and states[-1] == "succeeded"
    assert stream.events[-1]["event"] == "state"  # the stream ends with the terminal state
    progress = [json.loads(e["data"]) for e in stream.events if e["event"] == "progress"]
    assert "evaluate" in [p["stage"] for p in progress]
    fractions = [p["fraction"] for p in progress]
    assert fractions == sorted(fractions)
    final = json.loads(stream.events[-1]["data"])
    assert final["result"]["report"]["evaluation"]["points"] == section["points"]


def test_other_tenants_do_not_see_an_evaluation(service, case, halfway):
    jobs = Jobs(service)
    with client(service) as api:
        job_id = submit(api, body(case, halfway, labels={"suite": "eval-tenants"}))["id"]
    jobs.wait(job_id, timeout=180)
    with client(service, "bob") as bob:
        for method, path in (
            ("GET", f"/v1/jobs/{job_id}"),
            ("GET", f"/v1/jobs/{job_id}/report"),
            ("POST", f"/v1/jobs/{job_id}/cancel"),
        ):
            response = bob.request(method, path)
            assert response.status_code == 404, (method, path, response.text)
            assert response.json()["code"] == "job_not_found"
        listed = bob.get("/v1/jobs", params={"kind": "evaluation"}).json()["jobs"]
        assert job_id not in {j["id"] for j in listed}
    assert read_stream(service.api_url, job_id, tenant="bob").status_code == 404


def test_malformed_jsonl_fails_the_job_with_bad_eval_data(service, case, halfway, local_root):
    broken = local_root / "eval-api-broken.jsonl"
    broken.write_text(case.task.read_text().splitlines()[0] + '\n{"prompt": "w100 w61 w101"\n')
    jobs = Jobs(service)
    spec = body(case, halfway)
    spec["evaluate"]["task"] = str(broken)
    with client(service) as api:
        job_id = submit(api, spec)["id"]
    record = jobs.wait(job_id, timeout=120)
    assert record.status == "failed"
    assert record.error is not None and record.error.code == "bad_eval_data"
    assert f"{broken} line 2:" in record.error.message  # the file and the line
    assert record.result is None


def test_bad_bodies_and_locations_are_422(service, case, halfway, local_root):
    with client(service) as api:
        outside = body(case, halfway)
        outside["evaluate"]["general"] = "/etc/general.jsonl"
        problem = submit(api, outside, status=422)
        assert problem["code"] == "invalid_location"
        assert [e["field"] for e in problem["errors"]] == ["evaluate.general"]

        problem = submit(api, body(case, Path("/etc"), finetuned="ftp://x/y"), status=422)
        assert sorted(e["field"] for e in problem["errors"]) == ["finetuned", "model"]

        missing = body(case, halfway)
        del missing["model"]
        problem = submit(api, missing, status=422)
        assert [e["field"] for e in problem["errors"]] == ["model"]
        # A prune job's fields are not an evaluation's.
        problem = submit(api, body(case, halfway, output=str(local_root / "x")), status=422)
        assert [e["field"] for e in problem["errors"]] == ["output"]
        response = api.post(
            "/v1/evaluations", content=b"{", headers={"content-type": "application/json"}
        )
        assert response.status_code == 422
        assert response.headers["content-type"].startswith("application/problem+json")


def test_idempotency_key_spans_both_endpoints(service, case, halfway):
    spec = body(case, halfway, labels={"suite": "eval-idem"})
    with client(service) as api:
        first = submit(api, spec, **{"Idempotency-Key": "eval-api-idem-1"})
        again = api.post(
            "/v1/evaluations", json=spec, headers={"Idempotency-Key": "eval-api-idem-1"}
        )
        assert again.status_code == 202 and again.json()["id"] == first["id"]
        assert again.headers["Idempotent-Replayed"] == "true"
        # The same key on the other endpoint is another request.
        prune = {
            "base": str(case.base),
            "finetuned": str(case.finetuned),
            "output": str(case.base.parent / "never"),
        }
        other = api.post("/v1/jobs", json=prune, headers={"Idempotency-Key": "eval-api-idem-1"})
        assert other.status_code == 422 and other.json()["code"] == "idempotency_key_reused"
    Jobs(service).wait(first["id"], timeout=180)


def test_fapm_eval_submit_waits_for_the_evaluation_job(service, case, halfway):
    """`fapm eval --submit --wait`: the same flags as `fapm eval`, measured by the service."""
    args = ["--base", str(case.base), "--model", str(halfway), "--finetuned", str(case.finetuned)]
    args += ["--task", str(case.task), "--general", str(case.general), "--device", "cpu"]
    args += ["--max-examples", str(EVALUATE["max_examples"])]
    result = fapm(
        "eval", *args, "--submit", "--wait", "--label", "suite=eval-cli", url=service.api_url
    )
    assert result.returncode == 0, result.stderr
    job_id, line = result.stdout.strip().splitlines()
    assert line.startswith(f"job {job_id} measured {halfway}: skill ")
    assert "skill kept" in line and "forgetting left" in line
    assert "finetuned" in result.stderr  # the points, as `fapm eval` prints them
    status = fapm("status", job_id, url=service.api_url)
    assert status.returncode == 0, status.stderr
    assert f"evaluation of {halfway} against {case.base}" in status.stdout
    listed = fapm("jobs", "--label", "suite=eval-cli", url=service.api_url)
    assert f"(evaluation of {halfway})" in listed.stdout

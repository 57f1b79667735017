"""Cancelling a running evaluation through the API, with a real redis-server and Celery worker:
an evaluation job and a sparsity "auto" job, each cancelled while it measures a model (progress
in the evaluate stage, one model already measured), end `cancelled` within seconds, without
finishing the model they were measuring, publish nothing, and the worker then runs the next job
normally.

The sets are large and run one sequence per batch so that one model takes several seconds: a
cancellation read only between models (as before) would finish that model and bump its count."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from app.jobs.records import JobRecord
from tests.eval_models import (
    EvalCase,
    build_eval_case,
    general_sentences,
    task_examples,
    write_jsonl,
)
from tests.service.conftest import client
from tests.service.test_worker_jobs import Jobs
from worker.io.staging import STAGING_MARK

EXAMPLES = 1500
# From the cancel request to the terminal record: a batch, the flag read, the record written.
PROMPT_SECONDS = 5.0


@pytest.fixture(scope="module")
def case(local_root) -> EvalCase:
    return build_eval_case(local_root / "eval_case")


@pytest.fixture(scope="module")
def big_sets(local_root) -> tuple[Path, Path]:
    directory = local_root / "eval-cancel-sets"
    directory.mkdir(exist_ok=True)
    task = write_jsonl(directory / "task.jsonl", task_examples(EXAMPLES, seed=500))
    texts = [{"text": s} for s in general_sentences(EXAMPLES, seed=501)]
    return task, write_jsonl(directory / "general.jsonl", texts)


def slow_evaluate(sets: tuple[Path, Path]) -> dict:
    return {"task": str(sets[0]), "general": str(sets[1]), "batch_size": 1}


def measuring(record: JobRecord) -> bool:
    """Running, in the evaluate stage, with a model measured and the next one under way."""
    progress = record.progress
    return (
        record.status == "running" and progress.stage == "evaluate" and progress.tensors_done >= 1
    )


def cancel_while_measuring(jobs: Jobs, job_id: str) -> tuple[JobRecord, JobRecord, float]:
    """(the record when cancelled, the terminal record, seconds from the request to it)."""
    running = jobs.wait(job_id, until=measuring, timeout=180)
    started = time.monotonic()
    assert jobs.cancel(job_id) == "requested"
    final = jobs.wait(job_id, timeout=60, every=0.05)
    return running, final, time.monotonic() - started


def assert_cancelled_promptly(running: JobRecord, final: JobRecord, seconds: float) -> None:
    assert final.status == "cancelled", final.error
    assert final.error is not None and final.error.code == "cancelled"
    assert seconds < PROMPT_SECONDS, seconds
    # The model it was measuring when cancelled was not measured to the end.
    assert final.progress.stage == "evaluate"
    assert final.progress.tensors_done == running.progress.tensors_done
    assert final.progress.tensors_done < final.progress.tensors_total
    assert final.progress.fraction < 1.0


def test_cancelling_a_running_evaluation_job(service, case, big_sets):
    jobs = Jobs(service)
    spec = {
        "base": str(case.base),
        "model": str(case.finetuned),
        "finetuned": str(case.finetuned),
        "evaluate": slow_evaluate(big_sets),
        "device": "cpu",
    }
    with client(service) as api:
        response = api.post("/v1/evaluations", json=spec)
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        assert_cancelled_promptly(*cancel_while_measuring(jobs, job_id))
        final = jobs.get(job_id)
        assert final.result is None and jobs.report(job_id) is None  # nothing was reported

        # The worker is free and whole: the next evaluation runs to the end.
        spec = {**spec, "evaluate": {"task": str(case.task), "general": str(case.general),
                                     "max_examples": 24}}  # fmt: skip
        response = api.post("/v1/evaluations", json=spec)
        assert response.status_code == 202, response.text
        record = jobs.wait(response.json()["id"], timeout=120)
    assert record.status == "succeeded", record.error
    assert record.result.report["evaluation"]["points"][0]["skill_kept"] == 1.0


def test_cancelling_a_running_auto_sparsity_job(service, case, big_sets, local_root):
    jobs = Jobs(service)
    directory = local_root / "eval-cancel-auto"
    directory.mkdir()
    out = directory / "out"
    job_id = jobs.submit(
        {
            "base": str(case.base),
            "finetuned": str(case.finetuned),
            "output": str(out),
            "sparsity": "auto",
            "methods": ["magnitude"],
            "evaluate": slow_evaluate(big_sets),
        }
    )
    assert_cancelled_promptly(*cancel_while_measuring(jobs, job_id))
    assert jobs.get(job_id).result is None
    # Nothing published, nothing staged beside the output.
    assert not out.exists() and not [p for p in directory.iterdir() if STAGING_MARK in p.name]
    assert list(directory.iterdir()) == []

    # The worker then runs the next job normally.
    nxt = directory / "next"
    spec = {"base": str(case.base), "finetuned": str(case.finetuned), "output": str(nxt),
            "method": "magnitude", "sparsity": 0.5}  # fmt: skip
    record = jobs.wait(jobs.submit(spec), timeout=120)
    assert record.status == "succeeded", record.error
    assert (nxt / "model.safetensors").exists()

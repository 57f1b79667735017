"""Cancellation inside the evaluation stage: the flag is read between batches of a model's
evaluation and between tensors while candidates are read (or built per tensor), so a cancelled
job stops within a batch, not at the end of a model's (possibly hour-long) evaluation; nothing is
published."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.models import load_state_dict
from worker.engine.pipeline import Progress
from worker.errors import JobCancelled
from worker.evaluation import metrics
from worker.evaluation.candidates import CandidateBuilder
from worker.evaluation.job import run_job_spec
from worker.evaluation.model import load_causal_lm
from worker.evaluation.standalone import evaluate_model
from worker.spec import EvaluationSpec, JobSpec

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def every_batch(monkeypatch):
    """Read the flag at every batch, so the tests do not depend on timing."""
    monkeypatch.setattr(metrics, "CANCEL_CHECK_SECONDS", 0.0)


class Flag:
    """should_cancel: False until `arm()`, then True from the `after`-th call on."""

    def __init__(self, after: int) -> None:
        self.after = after
        self.armed = False
        self.calls = 0

    def arm(self) -> None:
        self.armed = True

    def __call__(self) -> bool:
        if not self.armed:
            return False
        self.calls += 1
        return self.calls >= self.after


def raised_between_batches(failure: pytest.ExceptionInfo) -> bool:
    return any(entry.name == "_cancel_point" and "metrics" in str(entry.path)
               for entry in failure.traceback)  # fmt: skip


def test_an_evaluated_job_stops_inside_a_candidates_evaluation(eval_case, tmp_path):
    out = tmp_path / "out"
    spec = JobSpec.model_validate(
        {
            "base": str(eval_case.base),
            "finetuned": str(eval_case.finetuned),
            "output": str(out),
            "sparsity": "auto",
            # dare draws its mask per candidate (no ranking pass): the first candidate is built
            # by the engine's pruner, which reads the flag once per tensor, then its batches.
            "methods": ["dare"],
            "evaluate": {"task": str(eval_case.task), "general": str(eval_case.general),
                         "batch_size": 4},
        }
    )  # fmt: skip
    flag = Flag(after=len(load_state_dict(eval_case.finetuned)) + 3)
    events: list[Progress] = []

    def progress(event: Progress) -> None:
        events.append(event)
        if event.stage == "evaluate" and event.tensors_done == 2:  # both references measured
            flag.arm()

    with pytest.raises(JobCancelled) as failure:
        run_job_spec(spec, progress, flag)
    # Cancelled in the first candidate's batches: its evaluation was never completed.
    assert raised_between_batches(failure)
    assert max(e.tensors_done for e in events if e.stage == "evaluate") == 2
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_standalone_evaluation_stops_inside_the_first_model(eval_case):
    flag = Flag(after=3)
    flag.arm()
    events: list[Progress] = []
    settings = EvaluationSpec(task=str(eval_case.task), general=str(eval_case.general),
                              batch_size=4)  # fmt: skip
    with pytest.raises(JobCancelled) as failure:
        evaluate_model(str(eval_case.base), str(eval_case.finetuned), settings, "cpu",
                       progress=events.append, should_cancel=flag)  # fmt: skip
    assert raised_between_batches(failure)
    assert [(e.stage, e.tensors_done) for e in events] == [("evaluate", 0)]


def test_candidates_stop_between_tensors_while_they_are_read(eval_case, tmp_path: Path):
    spec = JobSpec(base=str(eval_case.base), finetuned=str(eval_case.finetuned),
                   output=str(tmp_path / "unused"), method="magnitude", sparsity=0.5)  # fmt: skip
    work = load_causal_lm(eval_case.finetuned, CPU, "ft", with_tokenizer=False)
    flag = Flag(after=3)
    flag.arm()
    with pytest.raises(JobCancelled):
        CandidateBuilder(spec, work.model, CPU, flag)
    assert flag.calls == 3


def test_a_candidate_built_per_tensor_stops_between_tensors(eval_case, tmp_path: Path):
    spec = JobSpec(base=str(eval_case.base), finetuned=str(eval_case.finetuned),
                   output=str(tmp_path / "unused"), method="magnitude", sparsity=0.5)  # fmt: skip
    work = load_causal_lm(eval_case.finetuned, CPU, "ft", with_tokenizer=False)
    flag = Flag(after=3)
    builder = CandidateBuilder(spec, work.model, CPU, flag, rank_budget_bytes=0)
    flag.arm()
    with pytest.raises(JobCancelled):
        builder.write("magnitude", 0.5)
    assert flag.calls == 3

"""The engine's Progress events as a job's progress record: one fraction over all stages, an ETA,
and writes to Redis at a bounded rate.

The engine reports progress per stage (bytes and tensors within it). A client wants one number
that only grows, so each stage owns a span of [0, 1]. Scope `model` reads the pruned tensors
three times (two counting passes, then the prune), so its three passes share the span that the
prune alone has for the other scopes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import redis

from app.jobs.store import JobStore, Lease
from worker.engine.pipeline import Progress

log = logging.getLogger(__name__)

PRUNE_START, PRUNE_END = 0.02, 0.97
# (start, end) of each stage's share of the job, by scope.
_SINGLE_PASS = {
    "plan": (0.0, PRUNE_START),
    "prune": (PRUNE_START, PRUNE_END),
    "materialize": (PRUNE_START, PRUNE_END),  # a materialize job's stream (no prune)
    "finalize": (PRUNE_END, 0.98),
    "publish": (0.98, 0.99),  # remote outputs: the last uploads, the commit
    "done": (1.0, 1.0),
}
_THIRD = (PRUNE_END - PRUNE_START) / 3
_THREE_PASSES = {
    **_SINGLE_PASS,
    "scan1": (PRUNE_START, PRUNE_START + _THIRD),
    "scan2": (PRUNE_START + _THIRD, PRUNE_START + 2 * _THIRD),
    "prune": (PRUNE_START + 2 * _THIRD, PRUNE_END),
}
# NPS in scope model counts in four passes (two for its band cuts, two for its threshold).
_FIFTH = (PRUNE_END - PRUNE_START) / 5
_FIVE_PASSES = {
    **_SINGLE_PASS,
    **{f"scan{i}": (PRUNE_START + (i - 1) * _FIFTH, PRUNE_START + i * _FIFTH) for i in range(1, 5)},
    "prune": (PRUNE_START + 4 * _FIFTH, PRUNE_END),
}
# prune "weights" (worker/compress/): calibration inputs, the layers, then (with evaluate) the
# pruned model measured against the unpruned one before it is published.
_WEIGHTS = {
    "plan": (0.0, 0.01),
    "calibrate": (0.01, 0.05),
    "prune": (0.05, 0.80),
    "finalize": (0.80, 0.81),
    "evaluate": (0.81, 0.98),
    "publish": (0.98, 0.99),
    "done": (1.0, 1.0),
}
# Evaluated jobs (worker/evaluation/job.py) measure models before they prune: the stage
# "evaluate" counts evaluations in tensors_done/tensors_total (base, fine-tune, candidates) and
# takes most of the job; the prune that publishes the choice follows.
EVALUATE_END = 0.85
_AFTER_EVALUATION = {
    "evaluate": (0.0, EVALUATE_END),
    "plan": (EVALUATE_END, EVALUATE_END + 0.01),
    "prune": (EVALUATE_END + 0.01, PRUNE_END),
    "finalize": _SINGLE_PASS["finalize"],
    "publish": _SINGLE_PASS["publish"],
    "done": _SINGLE_PASS["done"],
}
# An NPS search in scope model publishes with its four counting passes after its evaluation.
_PUBLISH_FIFTH = (PRUNE_END - EVALUATE_END - 0.01) / 5
_AFTER_EVALUATION_MODEL = {
    **_AFTER_EVALUATION,
    **{
        f"scan{i}": (
            EVALUATE_END + 0.01 + (i - 1) * _PUBLISH_FIFTH,
            EVALUATE_END + 0.01 + i * _PUBLISH_FIFTH,
        )
        for i in range(1, 5)
    },
    "prune": (EVALUATE_END + 0.01 + 4 * _PUBLISH_FIFTH, PRUNE_END),
}
# Evaluation jobs (kind "evaluation", worker/evaluation/standalone.py) only measure: the stage
# "evaluate" counts measured models and is the whole job.
_EVALUATION_ONLY = {
    "evaluate": (0.0, 0.99),
    "done": (1.0, 1.0),
}
# Below this much progress in this attempt, an ETA would be noise.
MIN_FRACTION_FOR_ETA = 0.02


def stage_spans(
    scope: str, evaluate: bool = False, kind: str = "prune", method: str = "", weights: bool = False
) -> dict[str, tuple[float, float]]:
    if kind == "evaluation":
        return _EVALUATION_ONLY
    if weights:
        return _WEIGHTS
    if evaluate:  # only NPS evaluates in scope model
        return _AFTER_EVALUATION_MODEL if scope == "model" else _AFTER_EVALUATION
    if scope == "model":
        return _FIVE_PASSES if method == "nps" else _THREE_PASSES
    return _SINGLE_PASS


def fraction_of(event: Progress, spans: dict[str, tuple[float, float]]) -> float:
    start, end = spans.get(event.stage, (0.0, 0.0))
    if event.bytes_total:
        within = event.bytes_done / event.bytes_total
    elif event.tensors_total:
        within = event.tensors_done / event.tensors_total
    else:
        within = 0.0
    return start + (end - start) * min(max(within, 0.0), 1.0)


class ProgressReporter:
    """The engine's progress callback for one attempt of a job."""

    def __init__(
        self,
        store: JobStore,
        lease: Lease,
        scope: str,
        interval: float,
        clock: Callable[[], float] = time.monotonic,
        evaluate: bool = False,
        kind: str = "prune",
        method: str = "",
        weights: bool = False,
    ) -> None:
        self.store = store
        self.lease = lease
        self.spans = stage_spans(scope, evaluate, kind, method, weights)
        self.interval = interval
        self.clock = clock
        self.started = clock()
        self.fraction = 0.0
        self.stage: str | None = None
        self.last: Progress = Progress("plan")
        self.bytes_read = 0  # of the prune pass: what the job read once through
        self.bytes_total = 0
        self._last_write = float("-inf")

    def __call__(self, event: Progress) -> None:
        self.last = event
        if event.stage == "prune":
            self.bytes_read = max(self.bytes_read, event.bytes_done)
            self.bytes_total = event.bytes_total
        self.fraction = max(self.fraction, fraction_of(event, self.spans))
        stage_changed = event.stage != self.stage
        self.stage = event.stage
        now = self.clock()
        # Always on a stage change (clients see every stage), else at most once per interval.
        if stage_changed or now - self._last_write >= self.interval:
            self._last_write = now
            try:
                self.store.progress(self.lease, self.snapshot(now))
            except redis.RedisError as exc:  # a missed progress write must not fail the job
                log.warning("job %s: progress not written: %s", self.lease.job_id, exc)

    def snapshot(self, now: float | None = None) -> dict:
        now = self.clock() if now is None else now
        eta = None
        if self.fraction >= 1.0:
            eta = 0.0
        elif self.fraction >= MIN_FRACTION_FOR_ETA:
            elapsed = now - self.started
            eta = round(elapsed * (1.0 - self.fraction) / self.fraction, 1)
        return {
            "stage": self.last.stage,
            "tensors_done": self.last.tensors_done,
            "tensors_total": self.last.tensors_total,
            "bytes_done": self.last.bytes_done,
            "bytes_total": self.last.bytes_total,
            "fraction": round(self.fraction, 6),
            "eta_seconds": eta,
        }

    def final(self) -> dict:
        """The progress of a succeeded job: stage done, everything counted, fraction 1.0."""
        self.fraction = 1.0
        tensors = self.last.tensors_total
        return {
            "stage": "done",
            "tensors_done": tensors,
            "tensors_total": tensors,
            "bytes_done": self.bytes_total,
            "bytes_total": self.bytes_total,
            "fraction": 1.0,
            "eta_seconds": 0.0,
        }

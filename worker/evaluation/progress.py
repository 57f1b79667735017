"""The evaluate stage's progress: how many of the planned models have been measured."""

from __future__ import annotations

from collections.abc import Callable

from worker.engine.pipeline import Progress, ProgressCallback
from worker.errors import JobCancelled

EVALUATE_STAGE = "evaluate"


class EvaluateProgress:
    """Reports stage "evaluate" at 0 of `total` now and one more at each `tick()` (a model or a
    candidate measured), where a cancelled job stops."""

    def __init__(
        self, report_progress: ProgressCallback, cancelled: Callable[[], bool], total: int
    ) -> None:
        self.report_progress = report_progress
        self.cancelled = cancelled
        self.total = total
        self.done = 0
        report_progress(Progress(EVALUATE_STAGE, 0, total))

    def tick(self) -> None:
        self.done += 1
        self.report_progress(Progress(EVALUATE_STAGE, self.done, self.total))
        if self.cancelled():
            raise JobCancelled("the job was cancelled")

"""Evaluation failures, each with a stable code (job records, API, CLI exit messages)."""

from __future__ import annotations

from worker.errors import FapmError


class EvalDataError(FapmError):
    """A task or general set that cannot be used: malformed JSONL (the line is named), a line
    without the required fields, an example longer than the model's context."""

    code = "bad_eval_data"


class EmptyEvalSet(FapmError):
    code = "empty_eval_set"


class NotCausalLM(FapmError):
    """The checkpoint's config names no architecture AutoModelForCausalLM can build."""

    code = "not_causal_lm"


class SkillUndefined(FapmError):
    """The fine-tuned model scores 0 on the task: skill kept (a ratio to it) means nothing."""

    code = "skill_undefined"


class SkillFloorUnreachable(FapmError):
    """No candidate kept the skill floor. `report` holds every measured point, so the job's
    record still shows what was tried."""

    code = "skill_floor_unreachable"

    def __init__(self, message: str, report: dict) -> None:
        super().__init__(message)
        self.report = report


class NoAcceptableCandidate(FapmError):
    """An NPS search rejected every candidate (perplexity not finite, or below the floor).
    `report` holds every evaluation, as for SkillFloorUnreachable."""

    code = "no_acceptable_candidate"

    def __init__(self, message: str, report: dict) -> None:
        super().__init__(message)
        self.report = report

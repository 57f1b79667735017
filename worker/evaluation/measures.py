"""Skill kept and forgetting left: a pruned model's numbers relative to the base and the
fine-tuned model, both evaluated once per job.

    skill_kept      = skill(pruned) / skill(ft)
    forgetting_left = (ppl(pruned) - ppl(base)) / (ppl(ft) - ppl(base))

skill_kept is undefined when the fine-tune scores 0 (there is no skill to keep). forgetting_left
is undefined when the fine-tune did not raise perplexity (ppl(ft) <= ppl(base)): there is no
forgetting to remove, and the ratio would divide by zero or flip sign. Both are then None, and
`forgetting_note` says why; the search still ranks candidates by perplexity, which orders them as
forgetting_left does whenever it is defined (the ratio is increasing in ppl(pruned)).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reference:
    """The base's and the fine-tuned model's measured skill and perplexity."""

    skill_base: float
    skill_ft: float
    ppl_base: float
    ppl_ft: float

    @property
    def forgetting_defined(self) -> bool:
        return self.ppl_ft > self.ppl_base

    @property
    def forgetting_note(self) -> str | None:
        if self.forgetting_defined:
            return None
        return (
            f"forgetting_left is undefined: the fine-tune did not raise perplexity on the general "
            f"set (base {self.ppl_base:.4g}, fine-tuned {self.ppl_ft:.4g}), so there is no "
            "forgetting to remove; candidates are ranked by perplexity instead"
        )

    @property
    def skill_note(self) -> str | None:
        if self.skill_ft > 0:
            return None
        return (
            "skill_kept is undefined: the fine-tuned model scores 0 on the task set, so there "
            "is no skill to keep (check the task set's format against the fine-tune)"
        )


def skill_kept(skill: float, ref: Reference) -> float | None:
    return skill / ref.skill_ft if ref.skill_ft > 0 else None


def forgetting_left(perplexity: float, ref: Reference) -> float | None:
    if not ref.forgetting_defined:
        return None
    return (perplexity - ref.ppl_base) / (ref.ppl_ft - ref.ppl_base)

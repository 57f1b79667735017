"""Combine rules of a merge: each one file, registered by the JobSpec's `merge.rule` name."""

from __future__ import annotations

from worker.engine.merge_methods.base import CombineRule, Updates
from worker.engine.merge_methods.nps_fusion import NpsFusion
from worker.engine.merge_methods.task_arithmetic import TaskArithmetic
from worker.engine.merge_methods.ties import Ties

RULES: dict[str, CombineRule] = {r.name: r for r in (TaskArithmetic(), Ties(), NpsFusion())}


def get_rule(name: str) -> CombineRule:
    return RULES[name]


__all__ = ["RULES", "CombineRule", "Updates", "get_rule"]

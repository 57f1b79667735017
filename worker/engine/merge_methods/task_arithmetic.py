"""Task Arithmetic (arXiv 2212.04089): W + lam * sum_i w_i T_i.

mergekit's `task_arithmetic` (generalized_task_arithmetic.py without consensus): the weighted
updates summed, divided by sum_i w_i when `normalize` (a sum below 1e-8 divides by 1), times
lambda when it is not 1.
"""

from __future__ import annotations

import torch

from worker.engine.merge_methods.base import CombineRule, Updates
from worker.spec.merge import MergeSpec


class TaskArithmetic(CombineRule):
    name = "task_arithmetic"
    title = "Task Arithmetic"
    paper_url = "https://arxiv.org/abs/2212.04089"

    def combine(self, updates: Updates, like: torch.Tensor, merge: MergeSpec) -> torch.Tensor:
        mixed = torch.zeros_like(like, dtype=torch.float32)
        divisor = torch.zeros((), dtype=torch.float32)
        for update, weight in updates():
            w = torch.tensor(weight, dtype=torch.float32)
            mixed += update * w
            divisor += w
        if merge.normalized:
            mixed /= divisor if abs(float(divisor)) >= 1e-8 else torch.ones(())
        if merge.lam != 1:
            mixed *= merge.lam
        return mixed

"""TIES (arXiv 2306.01708): trimmed updates, a sign elected per entry, the agreeing ones averaged.

The trim is each input's own pruning (its method and sparsity: magnitude is TIES's, dare makes
mergekit's `dare_ties`). Then, as mergekit's `ties` (generalized_task_arithmetic.py with consensus
"sum"): d_i = w_i T_i; the elected sign is + where sum_i d_i >= 0, else -; an input agrees where
sign(d_i) equals it (a zero update agrees with neither); the merged update is the sum of the
agreeing d_i, divided by the sum of their weights when `normalize` (a zero sum divides by 1),
times lambda when it is not 1.
"""

from __future__ import annotations

import torch

from worker.engine.merge_methods.base import CombineRule, Updates
from worker.spec.merge import MergeSpec


class Ties(CombineRule):
    name = "ties"
    title = "TIES-Merging"
    paper_url = "https://arxiv.org/abs/2306.01708"

    def combine(self, updates: Updates, like: torch.Tensor, merge: MergeSpec) -> torch.Tensor:
        # First look: the elected sign (only the sum is kept, not the updates).
        sign_weight = torch.zeros_like(like, dtype=torch.float32)
        for update, weight in updates():
            sign_weight += update * torch.tensor(weight, dtype=torch.float32)
        majority = torch.where(sign_weight >= 0, 1.0, -1.0)
        del sign_weight
        # Second look: the disjoint sum and the weights that agree with the elected sign.
        mixed = torch.zeros_like(like, dtype=torch.float32)
        divisor = torch.zeros_like(like, dtype=torch.float32)
        for update, weight in updates():
            w = torch.tensor(weight, dtype=torch.float32)
            delta = update * w
            agrees = (delta.sign() == majority).to(torch.float32)
            mixed += delta * agrees
            divisor += w * agrees
            del delta, agrees
        if merge.normalized:
            divisor[divisor == 0] = 1
            mixed /= divisor
        if merge.lam != 1:
            mixed *= merge.lam
        return mixed

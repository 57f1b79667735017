"""TIES (arXiv 2306.01708): trimmed updates, a sign elected per entry, the agreeing ones averaged.

The trim is each input's own pruning (its method and sparsity: magnitude is TIES's, dare makes
mergekit's `dare_ties`). Then, as mergekit's `ties` (generalized_task_arithmetic.py with consensus
"sum"): d_i = w_i T_i; the elected sign is + where sum_i d_i >= 0, else -; an input agrees where
sign(d_i) equals it (a zero update agrees with neither); the merged update is the sum of the
agreeing d_i, divided by the sum of their weights when `normalize` (a zero sum divides by 1),
times lambda when it is not 1.

One look at the inputs: mergekit elects the sign and then sums the agreeing updates, but the sign
can only be + or -, so both candidate sums (of the positive d_i and of the negative d_i, and
their weights) are kept as they stream by and the elected sign picks one per entry at the end.
Each sum is accumulated input by input as mergekit's masked sum is (a disagreeing input adds 0),
so the bits are the same as looking twice, at five accumulators instead of three and one
pruning of each input instead of two.
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
        sign_weight = torch.zeros_like(like, dtype=torch.float32)  # sum_i d_i: elects the sign
        plus, minus = torch.zeros_like(sign_weight), torch.zeros_like(sign_weight)
        plus_weight, minus_weight = torch.zeros_like(sign_weight), torch.zeros_like(sign_weight)
        for update, weight in updates():
            w = torch.tensor(weight, dtype=torch.float32)
            delta = update * w
            sign_weight += delta
            positive = (delta > 0).to(torch.float32)
            plus += delta * positive
            plus_weight += w * positive
            negative = (delta < 0).to(torch.float32)
            minus += delta * negative
            minus_weight += w * negative
            del delta, positive, negative
        majority_plus = sign_weight >= 0
        del sign_weight
        mixed = torch.where(majority_plus, plus, minus)
        del plus, minus
        if merge.normalized:
            divisor = torch.where(majority_plus, plus_weight, minus_weight)
            divisor[divisor == 0] = 1
            mixed /= divisor
        if merge.lam != 1:
            mixed *= merge.lam
        return mixed

"""NPS's knowledge fusion (arXiv 2505.18713 Eq. 7, as the author's PCB code computes it).

W + sum_i lam_i T_i / max(sum_i m_i, 1), entry-wise, with lam_i = lam * w_i and m_i = 1 where
input i's pruned update is nonzero: a disjoint mean over the inputs that kept an update there,
lam outside the normaliser (RESEARCH-algorithms.md 2.4). A kept entry whose update is exactly 0
adds nothing and, as in TIES (whose sign(0) agrees with neither side), does not dilute the mean.
"""

from __future__ import annotations

import torch

from worker.engine.merge_methods.base import CombineRule, Updates
from worker.spec.merge import MergeSpec


class NpsFusion(CombineRule):
    name = "nps_fusion"
    title = "NPS knowledge fusion"
    paper_url = "https://arxiv.org/abs/2505.18713"

    def combine(self, updates: Updates, like: torch.Tensor, merge: MergeSpec) -> torch.Tensor:
        mixed = torch.zeros_like(like, dtype=torch.float32)
        count = torch.zeros_like(like, dtype=torch.float32)
        for update, weight in updates():
            mixed += update * torch.tensor(merge.lam * weight, dtype=torch.float32)
            count += update != 0
        return mixed / count.clamp_(min=1)

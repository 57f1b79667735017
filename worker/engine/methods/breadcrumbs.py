"""Model Breadcrumbs: drop the largest gamma fraction of |D| as outliers, keep the next k
(Davari & Belilovsky, arXiv 2312.06795)."""

from __future__ import annotations

import torch

from worker.engine.methods.base import MethodParams, PruningMethod
from worker.engine.select import keep_count, order_keys, rank_window_mask


class Breadcrumbs(PruningMethod):
    name = "breadcrumbs"
    title = "Model Breadcrumbs"
    paper_url = "https://arxiv.org/abs/2312.06795"

    def mask(self, w: torch.Tensor, d: torch.Tensor, params: MethodParams) -> torch.Tensor:
        n = d.shape[-1]
        k = keep_count(n, params.density)
        # When k + outliers would exceed n, fewer outliers are dropped (mergekit does the same).
        outliers = min(keep_count(n, params.gamma), n - k)
        return rank_window_mask(order_keys(d.abs()), outliers, k)

"""FAPM: Forgetting-Aware Pruning Metric (Huang, Cheng, Wang, EMNLP 2025, arXiv 2509.08255)."""

from __future__ import annotations

import torch

from worker.engine.methods.base import MethodParams, ScoredMethod

# float32(1e-12): the floor on |W| in the ratio, so W == 0 gives a huge ratio, not inf/NaN.
EPS = torch.tensor(1e-12, dtype=torch.float32)


def coefficient(alpha: float, mean_abs: float) -> torch.Tensor:
    """c = float32(alpha * mean(|W|)): the float64 mean times alpha, rounded once to float32
    (fapm_coefficient's mean is over the whole tensor; chunked.py sums it over chunks)."""
    return torch.tensor(float(alpha * mean_abs), dtype=torch.float32)


def fapm_coefficient(w: torch.Tensor, alpha: float) -> torch.Tensor:
    """c of the whole tensor, the mean accumulated in float64."""
    mean_abs = w.abs().sum(dtype=torch.float64) / max(w.numel(), 1)
    return coefficient(alpha, mean_abs.item())


def fapm_scores(w: torch.Tensor, d: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """S = a - c * a / max(|W|, eps), a = |D|, evaluated left to right in float32 (c on d's
    device). Where D == 0, S = 0 (the paper's code gets NaN there and wastes keep slots)."""
    a = d.abs()
    s = a - c * a / torch.maximum(w.abs(), EPS.to(w.device))
    return s.masked_fill_(d == 0, 0.0)


class Fapm(ScoredMethod):
    name = "fapm"
    title = "FAPM (Forgetting-Aware Pruning Metric)"
    paper_url = "https://arxiv.org/abs/2509.08255"

    def scores(self, w: torch.Tensor, d: torch.Tensor, params: MethodParams) -> torch.Tensor:
        return fapm_scores(w, d, fapm_coefficient(w, params.alpha).to(w.device))

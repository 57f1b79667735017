"""DARE: drop each update with probability s, rescale the kept ones by 1/(1-s) (arXiv 2311.03099)."""

from __future__ import annotations

import torch

from worker.engine.methods.base import MethodParams, PruningMethod, uniform_draws


class Dare(PruningMethod):
    name = "dare"
    title = "DARE (Drop And REscale)"
    paper_url = "https://arxiv.org/abs/2311.03099"
    rescales = True

    def mask(self, w: torch.Tensor, d: torch.Tensor, params: MethodParams) -> torch.Tensor:
        # The kept count is random (Bernoulli per entry), not k.
        draws = torch.from_numpy(uniform_draws(params, d.numel())).reshape(d.shape)
        return (draws < params.density).to(d.device)

    def update_factor(self, params: MethodParams) -> float:
        return 1.0 / params.density if params.density > 0 else 0.0

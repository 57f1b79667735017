"""Random: keep a uniformly random subset of exactly k entries, seeded; no rescale."""

from __future__ import annotations

import torch

from worker.engine.methods.base import MethodParams, ScoredMethod, uniform_draws


class RandomSubset(ScoredMethod):
    name = "random"
    title = "Random subset of the task vector"

    def scores(self, w: torch.Tensor, d: torch.Tensor, params: MethodParams) -> torch.Tensor:
        draws = uniform_draws(params, d.numel())
        return torch.from_numpy(draws).to(torch.float32).reshape(d.shape).to(d.device)

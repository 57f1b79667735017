"""Magnitude: keep the largest updates |D| (the FAPM paper's baseline; mergekit `ties` with one model)."""

from __future__ import annotations

import torch

from worker.engine.methods.base import MethodParams, ScoredMethod


class Magnitude(ScoredMethod):
    name = "magnitude"
    title = "Magnitude pruning of the task vector"
    paper_url = "https://arxiv.org/abs/2306.01708"

    def scores(self, w: torch.Tensor, d: torch.Tensor, params: MethodParams) -> torch.Tensor:
        return d.abs()

"""Pruned candidates built in memory, on the worker's device, never written anywhere.

The engine's plan (worker/engine/plan.py) says what happens to every tensor; W and F of each are
read once through the engine's readers (so LoRA adapters, remote sources and added vocabulary
rows behave exactly as in a prune) and stay on the device. A candidate (method, sparsity) is then
written straight into the parameters of one work model, which the evaluator runs.

Nested prefixes: for a method that keeps the top k of a fixed order (fapm, magnitude, random and
breadcrumbs' window), the kept set at any sparsity is a prefix of one per-tensor ranking. The
ranking (an int32 rank per entry, the order of `select.top_k_mask`: higher key first, ties to the
lower index) is computed once per method, and each candidate is a comparison against it: no
scoring or selection per candidate. DARE keeps a random count, not a prefix, so its mask is drawn
per candidate with the engine's own method. Output bytes come from the engine's `compose_output`,
so a candidate's weights equal what `run_prune` would publish at that sparsity, bit for bit.

Memory on the device: W and F of every planned tensor, one int32 rank per pruned entry, and the
work model: about 3x the model in its stored dtype plus 4 bytes per parameter.

`should_cancel` is asked between tensors while they are read and ranked (minutes on a large
remote pair), so a cancelled job stops there as it does in the engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from worker.engine.compose import compose_output
from worker.engine.methods import MethodParams, get_method
from worker.engine.methods.base import ScoredMethod
from worker.engine.methods.breadcrumbs import Breadcrumbs
from worker.engine.pipeline import _tie_word_embeddings
from worker.engine.plan import TensorTask, build_plan
from worker.engine.readers import CheckpointReader, LoraMergedReader
from worker.engine.select import keep_count, order_keys
from worker.errors import ArchitectureMismatch, JobCancelled
from worker.io.uri import open_source
from worker.spec import JobSpec

RANKED_METHODS = frozenset({"fapm", "magnitude", "random", "breadcrumbs"})


@dataclass
class _Tensor:
    task: TensorTask
    w: torch.Tensor | None  # stored dtype, on the device (None for a copied tensor)
    f: torch.Tensor  # the shared rows only for prune_rows
    extra_rows: torch.Tensor | None  # prune_rows: F's added rows, copied
    rows: int  # 1 for tensor scope, the tensor's rows for row scope
    param: torch.Tensor


def rank_of(keys: torch.Tensor) -> torch.Tensor:
    """int32 rank (0 = kept first) of each entry of (rows, cols) int32 keys, per row."""
    cols = keys.shape[-1]
    # A stable descending sort keeps equal keys in index order: ties go to the lower index.
    order = torch.sort(keys, dim=-1, descending=True, stable=True).indices
    rank = torch.empty(keys.shape, dtype=torch.int32, device=keys.device)
    positions = torch.arange(cols, dtype=torch.int32, device=keys.device).expand_as(keys)
    return rank.scatter_(-1, order, positions)


class CandidateBuilder:
    """Writes (method, sparsity) candidates of one base/fine-tuned pair into a work model."""

    def __init__(
        self,
        spec: JobSpec,
        model: torch.nn.Module,
        device: torch.device,
        should_cancel: Callable[[], bool] | None = None,
    ) -> None:
        self.spec = spec
        self.device = device
        self.should_cancel = should_cancel or (lambda: False)
        self.rank_seconds: dict[str, float] = {}
        self._ranks: tuple[str, list[torch.Tensor | None]] | None = None
        params = dict(model.named_parameters())
        sources = [open_source(spec.base)]
        try:
            base = CheckpointReader(sources[0])
            sources.append(open_source(spec.finetuned or spec.adapter or ""))
            finetuned = (
                LoraMergedReader(base, sources[1]) if spec.adapter else CheckpointReader(sources[1])
            )
            config = finetuned.config()
            tie = _tie_word_embeddings(config)  # the engine's reading (text_config too)
            self.tensors = [
                self._load(task, base, finetuned, params)
                for task in build_plan(base, finetuned, spec, tie)
            ]
        finally:
            for source in sources:
                source.close()

    def _cancel_point(self) -> None:
        if self.should_cancel():
            raise JobCancelled("the job was cancelled")

    def _load(self, task: TensorTask, base, finetuned, params) -> _Tensor:
        self._cancel_point()
        param = params.get(task.name)
        if param is None or tuple(param.shape) != tuple(task.shape):
            raise ArchitectureMismatch(
                f"tensor {task.name!r} of the checkpoint is not a parameter of shape "
                f"{list(task.shape)} in the model transformers builds from its config"
            )
        w = base.read(task.name) if task.action != "copy" else None
        f = finetuned.read(task.name, base=w)
        extra = None
        if task.action == "prune_rows":
            f, extra = f[: task.shared_rows], f[task.shared_rows :].to(self.device)
        rows = f.shape[0] if self.spec.scope == "row" and f.dim() >= 2 else 1
        return _Tensor(
            task,
            None if w is None else w.to(self.device),
            f.to(self.device),
            extra,
            rows,
            param,
        )

    def _params(self, sparsity: float, name: str) -> MethodParams:
        s = self.spec
        return MethodParams(sparsity, s.alpha, s.gamma, s.seed, tensor_name=name)

    def _ranking(self, method: str) -> list[torch.Tensor | None]:
        """Each pruned tensor's rank for `method`, computed on the first candidate only."""
        if self._ranks is not None and self._ranks[0] == method:
            return self._ranks[1]
        self._ranks = None  # free the previous method's ranks first
        started = time.perf_counter()
        impl = get_method(method)
        ranks: list[torch.Tensor | None] = []
        for t in self.tensors:
            if t.w is None:
                ranks.append(None)
                continue
            self._cancel_point()
            w32 = t.w.to(torch.float32).reshape(t.rows, -1)
            d32 = t.f.to(torch.float32).reshape(t.rows, -1) - w32
            if isinstance(impl, ScoredMethod):
                keys = order_keys(impl.scores(w32, d32, self._params(0.0, t.task.name)))
            else:  # breadcrumbs: the |D| order; its window is cut per candidate
                keys = order_keys(d32.abs())
            ranks.append(rank_of(keys))
        self.rank_seconds[method] = time.perf_counter() - started
        self._ranks = (method, ranks)
        return ranks

    def _mask(self, method: str, t: _Tensor, rank: torch.Tensor | None, s: float) -> torch.Tensor:
        cols = t.f.numel() // t.rows
        k = keep_count(cols, 1.0 - s)
        if rank is None:  # dare: a fresh Bernoulli draw per sparsity, as the engine draws it
            assert t.w is not None
            w32 = t.w.to(torch.float32).reshape(t.rows, -1)
            d32 = t.f.to(torch.float32).reshape(t.rows, -1) - w32
            return get_method(method).mask(w32, d32, self._params(s, t.task.name))
        if isinstance(get_method(method), Breadcrumbs):
            skip = min(keep_count(cols, self.spec.gamma), cols - k)
            return (rank >= skip) & (rank < skip + k)
        return rank < k

    def write(self, method: str, sparsity: float) -> float:
        """Put the candidate's weights into the work model; returns the seconds it took
        (the one-time ranking of a method is counted in `rank_seconds`, not here)."""
        ranks = self._ranking(method) if method in RANKED_METHODS else None
        started = time.perf_counter()
        factor = get_method(method).update_factor(self._params(sparsity, "")) * self.spec.scale
        with torch.no_grad():
            for i, t in enumerate(self.tensors):
                out_dtype = t.task.out_torch_dtype
                if t.w is None:
                    out = t.f.to(out_dtype)
                else:
                    keep = self._mask(method, t, None if ranks is None else ranks[i], sparsity)
                    out = compose_output(t.w, t.f, keep.reshape(t.f.shape), factor, out_dtype)
                    if t.extra_rows is not None:
                        out = torch.cat([out, t.extra_rows.to(out_dtype)])
                t.param.copy_(out.to(t.param.dtype))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - started

    def write_finetuned(self) -> None:
        """The fine-tuned weights (sparsity 0 of any selecting method), as the output dtype
        stores them."""
        with torch.no_grad():
            for t in self.tensors:
                f = t.f if t.extra_rows is None else torch.cat([t.f, t.extra_rows])
                t.param.copy_(f.to(t.task.out_torch_dtype).to(t.param.dtype))

"""The torch path for one tensor larger than a chunk (`applies`), chunk by chunk.

A 128k-vocabulary embedding is 1 GB in bf16; the whole-tensor torch path would hold it with
float32 copies of W, D and F, its keys and masks: several GB (about 16 times the bf16 bytes, so
even a Llama-8B MLP matrix of 117 MB costs 1.8 GB whole). Chunks are `tensor_pruner.CHUNK_BYTES`
/ 16 entries (4 Mi at the default), so a tensor above that goes chunk by chunk. Here the (rows, cols) view is walked
in consecutive flat chunks (whole rows for scope row), and the mapped pages of W, F and the output
behind each chunk are handed back (`MappedPages`), so memory holds a few chunks whatever the
vocabulary. The output bytes and the statistics are those of the whole-tensor path:

- every chunk computes the same float32 values entry by entry (fapm's coefficient c comes from a
  first pass over all of W; random and dare draw at their flat indices: `draws`);
- a selection that spans the tensor (tensor scope, and row scope of a 1-D tensor) is the streaming
  exact top-k of `model_scope.py` over this tensor's chunks: keys counted in two passes (four for
  nps's bands), then the kept entries handed out in flat order, ties to the lower index, since
  chunks in order are the flat order;
- scope row keeps each row whole in a chunk; scope model feeds each chunk's keys, in order, to the
  pipeline's global selection (its counting passes stream the same keys: `order_key_chunks`);
- the statistics are accumulated over the windows `delta_stats` takes (`compose.StatsStream`).
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable, Iterator

import numpy as np
import torch

from worker.engine.compose import StatsStream, TensorStats, compose_output
from worker.engine.methods import nps
from worker.engine.methods.base import MethodParams, ScoredMethod, draw_generator
from worker.engine.methods.fapm import coefficient, fapm_scores
from worker.engine.model_scope import GlobalThreshold, find_global_thresholds
from worker.engine.select import keep_count, order_keys, top_k_mask
from worker.io.resident import MappedPages

if typing.TYPE_CHECKING:
    from worker.engine.tensor_pruner import TensorPruner

# The torch path holds about 40 bytes per entry of a chunk (float32 W, F, D and scores, int32 and
# int64 keys, masks), so a chunk gets CHUNK_BYTES / 16 entries: 4 Mi entries (~160 MiB) at the
# default 64 MiB.
_BYTES_PER_CHUNK_ENTRY = 16

# Methods whose keys and masks this module computes chunk by chunk; any other method keeps the
# whole-tensor path.
METHODS = frozenset({"fapm", "magnitude", "random", "dare", "breadcrumbs", "nps"})

Selection = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


def applies(method: str, n: int, chunk_bytes: int) -> bool:
    """Whether the torch path takes a tensor of n entries in chunks: one larger than a chunk,
    of a method this module knows."""
    return method in METHODS and n > _chunk_entries(chunk_bytes)


def draws(params: MethodParams, start: int, stop: int) -> np.ndarray:
    """`methods.base.uniform_draws(params, n)[start:stop]` without drawing the first `start`."""
    return draw_generator(params, start).random(stop - start)


def _bits(t: torch.Tensor) -> np.ndarray:
    """A 1-D numpy view of `t`'s storage (unsigned ints of its element size; bf16 has no numpy
    dtype), at its address, for MappedPages."""
    flat = t.reshape(-1).view(torch.uint8).numpy()
    return flat.view(np.dtype(f"u{t.element_size()}"))


class _Walk:
    """W, F (and the output) as flat tensors walked in spans of whole chunks; the mapped pages
    behind each span are released once the caller has moved on."""

    def __init__(
        self, pruner: TensorPruner, w: torch.Tensor, f: torch.Tensor, out: torch.Tensor | None,
        span: int,
    ) -> None:  # fmt: skip
        self.pruner = pruner
        self.w, self.f = w.reshape(-1), f.reshape(-1)
        self.out = None if out is None else out.reshape(-1)
        self.n, self.span = self.f.numel(), span
        arrays = [_bits(self.w), _bits(self.f)]
        if self.out is not None:
            arrays.append(_bits(self.out))
        self.pages = MappedPages(*arrays)

    def spans(self) -> Iterator[tuple[int, int]]:
        for start in range(0, self.n, self.span):
            stop = min(self.n, start + self.span)
            yield start, stop
            self.pages.release(start, stop)

    def chunks(self) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:  # fmt: skip
        """(start, stop, W, F on the device, float32 W, float32 D) of each chunk in flat order."""
        for start, stop in self.spans():
            yield (
                start,
                stop,
                *self.pruner._float32_on_device(self.w[start:stop], self.f[start:stop]),
            )


class _Keys:
    """The int32 order keys of a tensor's entries, chunk by chunk: the same values as
    `TensorPruner._keys` on the whole tensor (the |D| order for nps and breadcrumbs)."""

    def __init__(self, pruner: TensorPruner, params: MethodParams, walk: _Walk) -> None:
        self.method, self.params = pruner.spec.method, params
        self.c: torch.Tensor | None = None
        if self.method == "fapm":
            # methods/fapm.py fapm_coefficient, the float64 sum of |W| taken chunk by chunk.
            parts = []
            for start, stop in walk.spans():
                w32 = walk.w[start:stop].to(pruner.device).to(torch.float32)
                parts.append(float(w32.abs().sum(dtype=torch.float64)))
            mean_abs = math.fsum(parts) / max(walk.n, 1)
            self.c = coefficient(params.alpha, mean_abs).to(pruner.device)

    def __call__(self, start: int, stop: int, w32: torch.Tensor, d32: torch.Tensor) -> torch.Tensor:
        if self.method == "fapm":
            return order_keys(fapm_scores(w32, d32, self.c))  # with the whole tensor's c
        if self.method == "random":
            scores = torch.from_numpy(draws(self.params, start, stop)).to(torch.float32)
            return order_keys(scores.to(d32.device))
        if self.method in ("magnitude", "breadcrumbs", "nps"):
            return order_keys(d32.abs())
        raise ValueError(f"chunked: no order keys for method {self.method!r}")


def order_key_chunks(
    pruner: TensorPruner, name: str, w: torch.Tensor, f: torch.Tensor, chunk_bytes: int
) -> Iterator[torch.Tensor]:
    """`TensorPruner.order_keys` of a big tensor in consecutive flat chunks (scope model's
    counting passes), its mapped pages released behind."""
    walk = _Walk(pruner, w, f, None, _chunk_entries(chunk_bytes))
    keys = _Keys(pruner, pruner._params(name), walk)
    for start, stop, _, _, w32, d32 in walk.chunks():
        yield keys(start, stop, w32, d32)


def _chunk_entries(chunk_bytes: int) -> int:
    return max(1, chunk_bytes // _BYTES_PER_CHUNK_ENTRY)


def _tensor_selection(
    pruner: TensorPruner, params: MethodParams, walk: _Walk, keys: _Keys
) -> Selection:
    """A tensor-wide selection (the method's select on one row of n entries) from streaming
    counting passes over this tensor's keys; its select takes the chunks' keys in flat order."""

    def passes() -> Iterator[torch.Tensor]:
        for start, stop, _, _, w32, d32 in walk.chunks():
            yield keys(start, stop, w32, d32)

    method = pruner.spec.method
    if method == "nps":
        chosen = nps.count_model_scope(passes, params)
        return chosen.select
    if method == "breadcrumbs":
        # methods/breadcrumbs.py: ranks outliers .. outliers + k - 1 of the |D| order.
        def counts(n: int) -> list[int]:
            k = keep_count(n, params.density)
            return [min(keep_count(n, params.gamma), n - k) + k, min(keep_count(n, params.gamma), n - k)]  # fmt: skip

        upto, skipped = find_global_thresholds(passes, counts)
        return lambda chunk_keys: (upto.mask(chunk_keys) & ~skipped.mask(chunk_keys), None)
    [top] = find_global_thresholds(passes, lambda n: [keep_count(n, params.density)])
    return lambda chunk_keys: (top.mask(chunk_keys), None)


def _model_selection(pruner: TensorPruner) -> Selection:
    selection = pruner.global_threshold
    assert selection is not None, "model scope needs its counting passes"
    if isinstance(selection, nps.NpsModelSelection):
        return selection.select
    assert isinstance(selection, GlobalThreshold)
    return lambda chunk_keys: (selection.mask(chunk_keys), None)


def prune(
    pruner: TensorPruner,
    name: str,
    w: torch.Tensor,
    f: torch.Tensor,
    out_dtype: torch.dtype,
    out: torch.Tensor | None,
    chunk_bytes: int,
) -> tuple[torch.Tensor, TensorStats]:
    """`TensorPruner._prune`'s torch path for one big tensor: the output (written into `out`
    when given, chunk by chunk) and its statistics, equal to the whole-tensor path's."""
    spec, method = pruner.spec, pruner.method
    params = pruner._params(name)
    if out is None:
        out = torch.empty(f.shape, dtype=out_dtype)
    rows = f.shape[0] if spec.scope == "row" and f.dim() >= 2 else 1
    cols = f.numel() // rows
    span = _chunk_entries(chunk_bytes)
    if rows > 1:  # scope row: whole rows per chunk
        span = max(1, span // cols) * cols
    walk = _Walk(pruner, w, f, out, span)
    # Sparsity 0 with a ranking method (a merge's pass-through): every entry kept, nothing to rank.
    keep_all = (
        isinstance(method, ScoredMethod)
        and spec.scope != "model"
        and keep_count(cols, params.density) == cols
    )
    keys = None if spec.method == "dare" or keep_all else _Keys(pruner, params, walk)
    selection: Selection | None = None
    if spec.method == "dare" or keep_all:
        pass  # dare: a draw per entry at its flat index, in any scope
    elif spec.scope == "model":
        selection = _model_selection(pruner)
    elif rows == 1:
        assert keys is not None
        selection = _tensor_selection(pruner, params, walk, keys)

    stats = StatsStream()
    assert walk.out is not None
    for start, stop, w_dev, f_dev, w32, d32 in walk.chunks():
        factors: torch.Tensor | None = None
        if spec.method == "dare":
            # methods/dare.py Dare.mask at these flat indices.
            keep = torch.from_numpy(draws(params, start, stop) < params.density).to(d32.device)
        elif keep_all:
            keep = torch.ones(stop - start, dtype=torch.bool, device=d32.device)
        else:
            assert keys is not None
            chunk_keys = keys(start, stop, w32, d32)
            if selection is not None:
                keep, factors = selection(chunk_keys)
            elif spec.method in ("breadcrumbs", "nps"):  # scope row: the method on whole rows
                shape = (-1, cols)
                keep, factors = method.select(w32.view(shape), d32.view(shape), params)
            else:  # scope row, a ranking method: methods/base.py ScoredMethod.mask per row
                keep = top_k_mask(chunk_keys.view(-1, cols), keep_count(cols, params.density))
        keep = keep.reshape(-1)
        stats.feed(w32, f_dev.to(torch.float32), d32, keep)
        factor = pruner.factor if factors is None else factors.reshape(-1)
        walk.out[start:stop].copy_(compose_output(w_dev, f_dev, keep, factor, out_dtype))
    return out, stats.result()

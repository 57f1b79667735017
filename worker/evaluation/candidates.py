"""Pruned candidates built in memory, on the worker's device, never written anywhere.

The engine's plan (worker/engine/plan.py) says what happens to every tensor; W and F of each are
read once through the engine's readers (so LoRA adapters, remote sources and added vocabulary
rows behave exactly as in a prune) and stay on the host. A candidate (method, sparsity) is then
written into the parameters of one work model, which the evaluator runs: each tensor goes to the
device only while its candidate is computed and copied into its parameter.

Nested prefixes ("ranks" modes): for a method that keeps the top k of a fixed order (fapm,
magnitude, random and breadcrumbs' window), the kept set at any sparsity is a prefix of one
per-tensor ranking. The ranking (an int32 rank per entry, the order of `select.top_k_mask`:
higher key first, ties to the lower index) is computed once per method, and each candidate is a
comparison against it: no scoring or selection per candidate. Output bytes come from the
engine's `compose_output`, so a candidate's weights equal what `run_prune` would publish at that
sparsity, bit for bit.

NPS (`write_nps`): what does not change between the candidates of one sparsity is the band of
each entry (its place in the |D| order, cut at the band edges): it is held as one uint8 per pruned
entry (counted against the rank budget as ranks are), so a candidate is the |T| = w_b |D| top k
and the output, a few passes per tensor (scope model: two streaming passes for the global k-th
|T|, then the write). Over the budget, each candidate runs the engine's `TensorPruner` with the
weights (scope model: its counting passes too). Either way the weights equal what `run_prune`
publishes with `nps.weights`, bit for bit.

Per-tensor mode: when the ranks (4 bytes per pruned entry) do not fit the rank budget
(`FAPM_EVAL_RANK_BUDGET`: a byte size such as `8GB`, or a percentage of the host's available
memory, default 25%), no ranking is held: each candidate runs the engine's own `TensorPruner`
(the fused numba kernel on CPU, Triton on CUDA) tensor by tensor, at the candidate's method and
sparsity. DARE keeps a random count, not a prefix, so it always takes this path.

Memory: W and F of every planned tensor on the host (for local files a private map of the page
cache, which the kernel can drop and re-read, not process memory; remote inputs, which an
evaluated job copies to local directories first, and LoRA-merged tensors are ordinary host
memory); the ranks of one method when they fit the budget (on the device when they also fit a
quarter of its free memory, else on the host); one tensor's working set on the device while a
candidate is written; and the work model, which the job owns. What the builder held is in
`memory()` (the report's evaluation "candidates" section).

`should_cancel` is asked between tensors while they are read and ranked (minutes on a large
remote pair) and while a candidate is built per tensor, so a cancelled job stops there as it
does in the engine.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from worker.engine.compose import compose_output
from worker.engine.methods import MethodParams, get_method
from worker.engine.methods.base import ScoredMethod
from worker.engine.methods.breadcrumbs import Breadcrumbs
from worker.engine.methods.nps import (
    BandCursor,
    BandTables,
    band_cuts,
    band_ids,
    model_band_thresholds,
)
from worker.engine.model_scope import GlobalThreshold, find_global_thresholds
from worker.engine.pipeline import _tie_word_embeddings
from worker.engine.plan import TensorTask, build_plan
from worker.engine.readers import CheckpointReader, LoraMergedReader
from worker.engine.select import keep_count, order_keys, top_k_mask
from worker.engine.tensor_pruner import TensorPruner
from worker.errors import ArchitectureMismatch, JobCancelled
from worker.io.uri import open_source
from worker.spec import JobSpec, parse_byte_size
from worker.spec.nps import band_edges

RANKED_METHODS = frozenset({"fapm", "magnitude", "random", "breadcrumbs"})
RANK_BUDGET_ENV = "FAPM_EVAL_RANK_BUDGET"
DEFAULT_RANK_BUDGET = "25%"  # of the host's available memory
RANK_BYTES = 4  # one int32 rank per pruned entry
# Scratch while one tensor is ranked, per entry: float32 W and D (8), int32 keys (4), the stable
# sort's values and int64 indices (12), the int32 rank (4).
RANKING_SCRATCH_BYTES = 28
BAND_BYTES = 1  # nps: one uint8 band id per pruned entry
# Scratch while one tensor's bands are found, per entry: float32 |D| (4), int32 keys (4), a
# top-k mask's kthvalue copy, tie cumsum and masks (10).
BANDING_SCRATCH_BYTES = 18

MODE_RANKS_HOST = "ranks-host"
MODE_RANKS_DEVICE = "ranks-device"
MODE_PER_TENSOR = "per-tensor"


def available_host_memory() -> int:
    """Bytes the host can still give (MemAvailable); its physical memory where unreadable."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def rank_budget(value: str | None = None) -> int:
    """The rank budget in bytes: `value`, else $FAPM_EVAL_RANK_BUDGET, else 25% of the host's
    available memory. A byte size (`8GB`, `512MiB`, `0` for never) or a percentage (`25%`)."""
    raw = value if value is not None else os.environ.get(RANK_BUDGET_ENV, "")
    raw = raw.strip() or DEFAULT_RANK_BUDGET
    try:
        if raw.endswith("%"):
            fraction = float(raw[:-1]) / 100
            if not 0.0 <= fraction <= 1.0:
                raise ValueError(raw)
            return int(fraction * available_host_memory())
        return 0 if raw == "0" else parse_byte_size(raw)
    except ValueError:
        raise ValueError(
            f"{RANK_BUDGET_ENV}: {raw!r} is neither a byte size (8GB, 512MiB, 0) nor a "
            "percentage of the available memory (25%)"
        ) from None


@dataclass
class _Tensor:
    task: TensorTask
    w: torch.Tensor | None  # stored dtype, on the host (None for a copied tensor)
    f: torch.Tensor  # the whole fine-tuned tensor (prune_rows: with its added rows), host
    rows: int  # 1 for tensor scope, the tensor's rows for row scope
    param: torch.Tensor

    @property
    def shared(self) -> torch.Tensor:
        """F's entries that W has too: all of F but for prune_rows."""
        return self.f[: self.task.shared_rows] if self.task.action == "prune_rows" else self.f

    @property
    def ranked_entries(self) -> int:
        return 0 if self.w is None else self.shared.numel()


def rank_of(keys: torch.Tensor) -> torch.Tensor:
    """int32 rank (0 = kept first) of each entry of (rows, cols) int32 keys, per row."""
    cols = keys.shape[-1]
    # A stable descending sort keeps equal keys in index order: ties go to the lower index.
    order = torch.sort(keys, dim=-1, descending=True, stable=True).indices
    rank = torch.empty(keys.shape, dtype=torch.int32, device=keys.device)
    positions = torch.arange(cols, dtype=torch.int32, device=keys.device).expand_as(keys)
    return rank.scatter_(-1, order, positions)


class CandidateBuilder:
    """Writes (method, sparsity) candidates of one base/fine-tuned pair into a work model.

    `rank_budget_bytes`: the most the ranks of one method may take (None: `rank_budget()`);
    over it, every candidate is built per tensor by the engine's pruner and no rank is held.
    """

    def __init__(
        self,
        spec: JobSpec,
        model: torch.nn.Module,
        device: torch.device,
        should_cancel: Callable[[], bool] | None = None,
        rank_budget_bytes: int | None = None,
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
                for task in build_plan(base, finetuned, spec, tie, self.should_cancel).tasks
            ]
            # Local files are mapped (page cache); remote reads and merged LoRA updates are not.
            self.inputs_mapped = spec.adapter is None and not any(
                getattr(source, "remote", False) for source in sources
            )
        finally:
            for source in sources:
                source.close()
        self.input_bytes = sum(
            t.f.nbytes + (0 if t.w is None else t.w.nbytes) for t in self.tensors
        )
        self.rank_bytes = RANK_BYTES * sum(t.ranked_entries for t in self.tensors)
        # Ranking one tensor also needs scratch for a moment, on top of the ranks already held.
        self.ranking_scratch_bytes = RANKING_SCRATCH_BYTES * max(
            (t.ranked_entries for t in self.tensors), default=0
        )
        self.rank_budget_bytes = (
            rank_budget() if rank_budget_bytes is None else max(0, rank_budget_bytes)
        )
        self.rank_device = self._rank_device()
        self.held_rank_bytes = 0  # the most the ranks (or nps's bands) took at once
        self.band_bytes = BAND_BYTES * sum(t.ranked_entries for t in self.tensors)
        self.band_device = self._band_device()
        # nps: (sparsity, each pruned tensor's uint8 bands, scope model's |D| band thresholds)
        self._bands: tuple[float, list[torch.Tensor | None], list[GlobalThreshold]] | None = None
        self.kept_per_band: list[int] | None = None  # of the last nps candidate (None: unknown)

    @property
    def mode(self) -> str:
        if self.rank_device is None:
            return MODE_PER_TENSOR
        return MODE_RANKS_DEVICE if self.rank_device.type != "cpu" else MODE_RANKS_HOST

    def memory(self) -> dict[str, object]:
        """What the builder holds (the report's evaluation "candidates" section)."""
        return {
            "mode": self.mode,
            "rank_budget_bytes": self.rank_budget_bytes,
            "rank_bytes_per_method": self.rank_bytes,
            "ranking_scratch_bytes": self.ranking_scratch_bytes,
            "held_rank_bytes": self.held_rank_bytes,
            "band_bytes": self.band_bytes,
            "nps_mode": self.nps_mode,
            "input_bytes": self.input_bytes,
            "inputs_mapped": self.inputs_mapped,
        }

    @property
    def nps_mode(self) -> str:
        if self.band_device is None:
            return MODE_PER_TENSOR
        return "bands-device" if self.band_device.type != "cpu" else "bands-host"

    def _rank_device(self) -> torch.device | None:
        """Where the ranks go: None when they do not fit the budget (per-tensor mode); the
        device when they also fit a quarter of its free memory; else the host."""
        return self._held_device(self.rank_bytes, self.ranking_scratch_bytes)

    def _band_device(self) -> torch.device | None:
        """Where nps's bands go, by the same rule as the ranks."""
        largest = max((t.ranked_entries for t in self.tensors), default=0)
        return self._held_device(self.band_bytes, BANDING_SCRATCH_BYTES * largest)

    def _held_device(self, held: int, scratch: int) -> torch.device | None:
        if held + scratch > self.rank_budget_bytes:
            return None
        if self.device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(self.device)
            if held <= free // 4:
                return self.device
        return torch.device("cpu")

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
        w = base.read(task.base_name) if task.base_name is not None else None
        f = finetuned.read(task.name, base=w)
        shared = f[: task.shared_rows] if task.action == "prune_rows" else f
        rows = shared.shape[0] if self.spec.scope == "row" and shared.dim() >= 2 else 1
        return _Tensor(task, w, f, rows, param)

    def _params(self, sparsity: float, name: str) -> MethodParams:
        s = self.spec
        return MethodParams(sparsity, s.alpha, s.gamma, s.seed, tensor_name=name)

    def _ranking(self, method: str) -> list[torch.Tensor | None]:
        """Each pruned tensor's rank for `method`, computed on the first candidate only."""
        if self._ranks is not None and self._ranks[0] == method:
            return self._ranks[1]
        self._ranks = None  # free the previous method's ranks first
        self._bands = None  # and nps's bands: one of them is held at a time
        assert self.rank_device is not None
        started = time.perf_counter()
        impl = get_method(method)
        ranks: list[torch.Tensor | None] = []
        held = 0
        for t in self.tensors:
            if t.w is None:
                ranks.append(None)
                continue
            self._cancel_point()
            w32 = t.w.to(self.device).to(torch.float32).reshape(t.rows, -1)
            d32 = t.shared.to(self.device).to(torch.float32).reshape(t.rows, -1) - w32
            if isinstance(impl, ScoredMethod):
                keys = order_keys(impl.scores(w32, d32, self._params(0.0, t.task.name)))
            else:  # breadcrumbs: the |D| order; its window is cut per candidate
                keys = order_keys(d32.abs())
            del w32, d32
            rank = rank_of(keys).to(self.rank_device)
            held += rank.nbytes
            ranks.append(rank)
        self.held_rank_bytes = max(self.held_rank_bytes, held)
        self.rank_seconds[method] = time.perf_counter() - started
        self._ranks = (method, ranks)
        return ranks

    def write(self, method: str, sparsity: float) -> float:
        """Put the candidate's weights into the work model; returns the seconds it took
        (the one-time ranking of a method is counted in `rank_seconds`, not here)."""
        ranked = self.rank_device is not None and method in RANKED_METHODS
        ranks = self._ranking(method) if ranked else None
        started = time.perf_counter()
        with torch.no_grad():
            if ranks is None:
                self._write_per_tensor(method, sparsity)
            else:
                self._write_ranked(method, sparsity, ranks)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - started

    def _write_ranked(self, method: str, sparsity: float, ranks: list[torch.Tensor | None]) -> None:
        """Each kept set a prefix (or breadcrumbs' window) of the method's ranking."""
        factor = get_method(method).update_factor(self._params(sparsity, "")) * self.spec.scale
        window = isinstance(get_method(method), Breadcrumbs)
        for t, rank in zip(self.tensors, ranks, strict=True):
            out_dtype = t.task.out_torch_dtype
            if t.w is None or rank is None:
                t.param.copy_(t.f.to(self.device).to(out_dtype).to(t.param.dtype))
                continue
            w = t.w.to(self.device)
            f = t.shared.to(self.device)
            rank = rank.to(self.device)
            cols = f.numel() // t.rows
            k = keep_count(cols, 1.0 - sparsity)
            if window:
                skip = min(keep_count(cols, self.spec.gamma), cols - k)
                keep = (rank >= skip) & (rank < skip + k)
            else:
                keep = rank < k
            out = compose_output(w, f, keep.reshape(f.shape), factor, out_dtype)
            if t.task.action == "prune_rows":
                extra = t.f[t.task.shared_rows :].to(self.device).to(out_dtype)
                out = torch.cat([out, extra])
            t.param.copy_(out.to(t.param.dtype))

    def _write_per_tensor(
        self, method: str, sparsity: float, nps_weights: list[float] | None = None, lam: float = 1
    ) -> None:
        """The engine's own per-tensor pruning at (method, sparsity): no ranks held. nps: with
        these weights and lam (scope model: after the pruner's counting passes)."""
        update: dict[str, object] = {
            "method": method,
            "sparsity": sparsity,
            "device": self.device.type,
            "methods": None,
            "target": None,
            "evaluate": None,
        }
        if method == "nps":
            nps = self.spec.nps_settings.model_copy(update={"weights": nps_weights, "lam": lam})
            update["nps"] = nps
        concrete = self.spec.model_copy(update=update)
        pruner = TensorPruner(concrete)
        params = {t.task.name: t.param for t in self.tensors}
        if concrete.scope == "model":
            pruned = [t for t in self.tensors if t.w is not None]

            def key_passes() -> Iterator[torch.Tensor]:
                for t in pruned:
                    self._cancel_point()
                    yield pruner.order_keys(t.task, t.w, t.f)

            pruner.global_threshold = pruner.count_model_scope(key_passes)
        pairs = ((t.task, (t.w, t.f)) for t in self.tensors)
        for task, (w, f) in pruner.overlap_transfers(pairs):
            self._cancel_point()
            out, _stats = pruner.run(task, w, f)
            param = params[task.name]
            param.copy_(out.to(param.dtype))

    def write_finetuned(self) -> None:
        """The fine-tuned weights (sparsity 0 of any selecting method), as the output dtype
        stores them."""
        with torch.no_grad():
            for t in self.tensors:
                t.param.copy_(t.f.to(self.device).to(t.task.out_torch_dtype).to(t.param.dtype))

    # -----------------------------------------------------------------------------------------
    # nps
    # -----------------------------------------------------------------------------------------

    def band_counts(self, sparsity: float) -> list[int]:
        """Pruned entries per band at this sparsity, summed over the tensors (scope model: the
        bands of the one ranking over all of them)."""
        edges = band_edges(sparsity, self.spec.nps_settings)
        sizes = [t.ranked_entries for t in self.tensors if t.w is not None]
        if self.spec.scope == "model":
            sizes = [sum(sizes)]
        counts = [0] * (len(edges) - 1)
        for n in sizes:
            cuts = band_cuts(n, edges)
            for b in range(len(counts)):
                counts[b] += cuts[b + 1] - cuts[b]
        return counts

    def write_nps(self, sparsity: float, weights: Sequence[float], lam: float) -> float:
        """Put the nps candidate (band weights, lam) at this sparsity into the work model: the
        weights `run_prune` publishes with `nps.weights`. Returns the seconds it took (the
        one-time banding of a sparsity is counted in `rank_seconds["nps"]`, not here)."""
        edges = band_edges(sparsity, self.spec.nps_settings)
        if len(weights) != len(edges) - 1:
            raise ValueError(f"nps: {len(weights)} weights for {len(edges) - 1} bands")
        bands = self._band_ids(sparsity) if self.band_device is not None else None
        started = time.perf_counter()
        with torch.no_grad():
            if bands is None:
                self.kept_per_band = None  # the pruner does not say
                self._write_per_tensor("nps", sparsity, list(weights), lam)
            else:
                # As the engine's pruner: scale multiplies the kept update with lam.
                tables = BandTables.of(weights, lam * self.spec.scale).to(self.device)
                self._write_banded(sparsity, tables, *bands)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - started

    def _abs_d(self, t: _Tensor) -> torch.Tensor:
        """|D| of a pruned tensor's shared entries, float32 (1, n), on the device."""
        w32 = t.w.to(self.device).to(torch.float32)
        return (t.shared.to(self.device).to(torch.float32) - w32).reshape(1, -1).abs()

    def _pruned_abs_keys(self) -> Iterator[torch.Tensor]:
        """The |D| order keys of every pruned tensor in plan order (one streaming pass)."""
        for t in self.tensors:
            if t.w is not None:
                self._cancel_point()
                yield order_keys(self._abs_d(t))

    def _band_ids(self, sparsity: float) -> tuple[list[torch.Tensor | None], list[GlobalThreshold]]:
        """Each pruned tensor's uint8 bands at `sparsity`, computed on its first candidate."""
        if self._bands is not None and self._bands[0] == sparsity:
            return self._bands[1], self._bands[2]
        self._bands = None
        self._ranks = None  # one of ranks and bands is held at a time
        assert self.band_device is not None
        started = time.perf_counter()
        edges = band_edges(sparsity, self.spec.nps_settings)
        inner: list[GlobalThreshold] = []
        cursor = None
        if self.spec.scope == "model":
            inner, _cuts = model_band_thresholds(self._pruned_abs_keys, edges)
            cursor = BandCursor(inner)
        bands: list[torch.Tensor | None] = []
        held = 0
        for t in self.tensors:
            if t.w is None:
                bands.append(None)
                continue
            self._cancel_point()
            keys = order_keys(self._abs_d(t))
            if cursor is not None:
                band = cursor.bands(keys)
            else:
                band = band_ids(keys, band_cuts(keys.shape[-1], edges))
            band = band.to(self.band_device)
            held += band.nbytes
            bands.append(band)
        self.held_rank_bytes = max(self.held_rank_bytes, held)
        self.rank_seconds["nps"] = self.rank_seconds.get("nps", 0.0) + (
            time.perf_counter() - started
        )
        self._bands = (sparsity, bands, inner)
        return bands, inner

    def _write_banded(
        self,
        sparsity: float,
        tables: BandTables,
        bands: list[torch.Tensor | None],
        inner: list[GlobalThreshold],
    ) -> None:
        """|T| = w_b |D| from the held bands, its exact top k (per tensor, or over the model
        from two streaming passes), and the output with each entry's c_b."""
        keep_threshold = None
        if self.spec.scope == "model":

            def reweighted_passes() -> Iterator[torch.Tensor]:
                for t, band in zip(self.tensors, bands, strict=True):
                    if band is not None:
                        self._cancel_point()
                        yield tables.reweighted_keys(band.to(self.device), self._abs_d(t))

            [found] = find_global_thresholds(
                reweighted_passes, lambda total: [keep_count(total, 1.0 - sparsity)]
            )
            keep_threshold = found
        kept_per_band = torch.zeros(len(tables.weights), dtype=torch.int64, device=self.device)
        for t, band in zip(self.tensors, bands, strict=True):
            out_dtype = t.task.out_torch_dtype
            if band is None:
                t.param.copy_(t.f.to(self.device).to(out_dtype).to(t.param.dtype))
                continue
            w = t.w.to(self.device)
            f = t.shared.to(self.device)
            band = band.to(self.device)
            abs_d = self._abs_d(t)
            keys = tables.reweighted_keys(band, abs_d)
            if keep_threshold is not None:
                keep = keep_threshold.mask(keys)
            else:
                keep = top_k_mask(keys, keep_count(abs_d.shape[-1], 1.0 - sparsity))
            kept_per_band += torch.bincount(
                band[keep].to(torch.int64), minlength=len(tables.weights)
            )
            factors = tables.entry_factors(band).reshape(f.shape)
            out = compose_output(w, f, keep.reshape(f.shape), factors, out_dtype)
            if t.task.action == "prune_rows":
                extra = t.f[t.task.shared_rows :].to(self.device).to(out_dtype)
                out = torch.cat([out, extra])
            t.param.copy_(out.to(t.param.dtype))
        self.kept_per_band = kept_per_band.tolist()

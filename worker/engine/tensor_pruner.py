"""One tensor through the method: choose the implementation, run it, return output and stats.

The fused kernels cover fapm and magnitude at tensor scope: numba on CPU, Triton on CUDA (or on
CPU tensors through Triton's interpreter with TRITON_INTERPRET=1, for tests). Everything else
takes the torch path (any device), which is also the reference the kernels are tested against.

`kernel`: auto picks triton on CUDA and numba on CPU where they are installed (else torch);
torch, numba and triton force one (an error when the forced one cannot run here).
"""

from __future__ import annotations

import os
import typing
from collections.abc import Callable, Iterable, Iterator
from types import ModuleType

import torch

from worker.engine import chunked
from worker.engine.compose import TensorStats, compose_output, delta_stats
from worker.engine.methods import MethodParams, get_method, nps
from worker.engine.methods.base import ScoredMethod
from worker.engine.model_scope import GlobalThreshold, find_global_threshold
from worker.engine.plan import TensorTask
from worker.engine.select import keep_count, order_keys
from worker.errors import DeviceUnavailable
from worker.spec import JobSpec
from worker.spec.nps import band_edges

FUSED_METHODS = frozenset({"fapm", "magnitude"})

# The fused CPU kernel walks a tensor larger than CHUNK_ABOVE_BYTES (of F) in windows of
# CHUNK_BYTES and hands back the mapped pages behind each pass, so W, F and the output of a huge
# tensor (a 128k-vocabulary embedding is 1 GB each) are never all resident: peak RSS stays a few
# windows whatever the vocabulary. Same bytes either way; the environment variables are for tests.
CHUNK_ABOVE_BYTES = int(os.environ.get("FAPM_CHUNK_ABOVE_BYTES", 256 * 2**20))
CHUNK_BYTES = int(os.environ.get("FAPM_CHUNK_BYTES", 64 * 2**20))


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise DeviceUnavailable("device: cuda was requested but no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu")


def _fused_kernel():
    try:
        from worker.engine.kernels import cpu_fused
    except ImportError:
        return None
    return cpu_fused if cpu_fused.fused_available() else None


def _triton_kernel(device: torch.device) -> ModuleType:
    """The Triton kernel module when it can run on `device`; DeviceUnavailable saying why if
    not."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        _no_triton_here()  # decided before importing triton, which is slow and noisy at exit
    try:
        from worker.engine.kernels import triton_select
    except ImportError as exc:  # pragma: no cover - the module itself imports without triton
        raise DeviceUnavailable(f"kernel: triton is unavailable ({exc})") from exc
    if not triton_select.HAVE_TRITON:
        raise DeviceUnavailable("kernel: triton is not installed (pip install '.[gpu]')")
    if not triton_select.triton_available(device):
        _no_triton_here()
    return triton_select


def _no_triton_here() -> typing.NoReturn:
    raise DeviceUnavailable(
        "kernel: triton needs a CUDA device (device cuda, or auto with one present); on CPU "
        "it runs only in Triton's interpreter: set TRITON_INTERPRET=1 in the environment "
        "before the worker starts and use device cpu (slow; meant for tests)"
    )


class _CudaStager:
    """Host-to-device copies through pinned buffers on a side CUDA stream (GPU only).

    `prefetch` starts the copy of a pair while the current stream still computes an earlier
    tensor; `take` makes the current stream wait for that copy (an event, not a host sync).
    Pinned blocks come from torch's caching host allocator, which records the copy's event and
    does not reuse a block before its copy has finished.

    Only exercised on a machine with a GPU (tests marked `gpu`); the CPU paths never create one.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.pending: dict[str, tuple[torch.Tensor, torch.Tensor, torch.cuda.Event]] = {}

    def prefetch(self, name: str, w: torch.Tensor, f: torch.Tensor) -> None:
        if name in self.pending:
            return
        staged = []
        for x in (w, f):
            pinned = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            pinned.copy_(x)  # host memcpy; the DMA below needs page-locked memory to be async
            staged.append(pinned)
        with torch.cuda.stream(self.stream):
            w_dev = staged[0].to(self.device, non_blocking=True)
            f_dev = staged[1].to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        self.pending[name] = (w_dev, f_dev, done)

    def take(
        self, name: str, w: torch.Tensor, f: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in self.pending:
            self.prefetch(name, w, f)
        w_dev, f_dev, done = self.pending.pop(name)
        current = torch.cuda.current_stream(self.device)
        current.wait_event(done)
        # Allocated on the side stream, used on this one: keep the caching allocator from
        # handing the memory out again before this stream's kernels are done with it.
        w_dev.record_stream(current)
        f_dev.record_stream(current)
        return w_dev, f_dev

    def to_host(self, out: torch.Tensor) -> torch.Tensor:
        host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
        host.copy_(out, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return host


class TensorPruner:
    """Applies a JobSpec's method to (W, F) pairs, tensor by tensor."""

    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec
        self.method = get_method(spec.method)
        self.device = resolve_device(spec.device)
        self.factor = self.method.update_factor(self._params("")) * spec.scale
        fused = _fused_kernel() if spec.kernel in ("auto", "numba") else None
        if spec.kernel == "numba" and fused is None:
            raise DeviceUnavailable(
                "kernel: numba was requested but the fused kernel is unavailable"
            )
        self.fused = fused
        self.triton: ModuleType | None = None
        if spec.kernel == "triton":
            self.triton = _triton_kernel(self.device)
        elif spec.kernel == "auto" and self.device.type == "cuda":
            try:
                self.triton = _triton_kernel(self.device)
            except DeviceUnavailable:  # auto: the torch path on the GPU is the fallback
                self.triton = None
        self.stager = (
            _CudaStager(self.device)
            if self.triton is not None and self.device.type == "cuda"
            else None
        )
        # Scope "model": set by the pipeline after its counting passes (`count_model_scope`),
        # consumed in plan order.
        self.global_threshold: GlobalThreshold | nps.NpsModelSelection | None = None

    @property
    def implementation(self) -> str:
        if self._triton_applies():
            return "triton" if self.device.type == "cuda" else "triton-interpreter"
        return "numba" if self._fused_applies() else f"torch-{self.device.type}"

    def _triton_applies(self) -> bool:
        return (
            self.triton is not None
            and self.spec.method in FUSED_METHODS
            and self.spec.scope == "tensor"
            and self.factor == 1.0
        )

    def _triton_operands(
        self, task: TensorTask, w: torch.Tensor | None, f: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(W, F) as the Triton kernel takes them for this task, or None if it does not."""
        if task.action == "copy" or w is None or not self._triton_applies():
            return None
        assert self.triton is not None
        if task.action == "prune_rows":
            f = f[: task.shared_rows]
        if not (
            w.dtype == f.dtype == task.out_torch_dtype
            and w.dtype in self.triton.DTYPES
            and w.shape == f.shape
            and 0 < f.numel() <= self.triton.MAX_NUMEL
        ):
            return None
        return w.contiguous(), f.contiguous()

    def overlap_transfers(
        self, pairs: Iterator[tuple[TensorTask, tuple[torch.Tensor | None, torch.Tensor]]]
    ) -> Iterator[tuple[TensorTask, tuple[torch.Tensor | None, torch.Tensor]]]:
        """Yield `pairs` unchanged, one behind: on CUDA with the Triton kernel, the copy of
        pair i+1 to the device is started (side stream) before pair i is handed out to be
        computed, so the copy overlaps that compute. Elsewhere a pass-through."""
        if self.stager is None:
            yield from pairs
            return
        held = None
        try:
            for item in pairs:
                task, (w, f) = item
                operands = self._triton_operands(task, w, f)
                if operands is not None:
                    self.stager.prefetch(task.name, *operands)
                if held is not None:
                    yield held
                held = item
            if held is not None:
                yield held
        finally:
            close = getattr(pairs, "close", None)
            if close is not None:
                close()

    def _fused_applies(self) -> bool:
        return (
            self.fused is not None
            and self.spec.method in FUSED_METHODS
            and self.spec.scope == "tensor"
            and self.device.type == "cpu"
            and self.factor == 1.0
        )

    def _params(self, name: str) -> MethodParams:
        s = self.spec
        if s.method != "nps":
            return MethodParams(s.sparsity, s.alpha, s.gamma, s.seed, tensor_name=name)
        settings = s.nps_settings
        weights = None if settings.weights is None else tuple(settings.weights)
        return MethodParams(
            s.sparsity,
            s.alpha,
            s.gamma,
            s.seed,
            tensor_name=name,
            weights=weights,
            edges=tuple(band_edges(s.sparsity, settings)),  # type: ignore[arg-type]
            # `scale` multiplies the kept update like lam does: one float32 factor c_b.
            lam=settings.lam * s.scale,
        )

    def _keys(self, name: str, w32: torch.Tensor, d32: torch.Tensor) -> torch.Tensor:
        if isinstance(self.method, nps.Nps):  # the |D| order its bands cut
            return order_keys(d32.reshape(1, -1).abs())
        assert isinstance(self.method, ScoredMethod)
        scores = self.method.scores(w32.reshape(1, -1), d32.reshape(1, -1), self._params(name))
        return order_keys(scores)

    def count_model_scope(
        self, key_passes: Callable[[], Iterable[torch.Tensor]]
    ) -> GlobalThreshold | nps.NpsModelSelection:
        """Scope model: the counting passes over `key_passes()` (each pruned tensor's
        `order_keys`, in plan order, on every call): two for a ranking method, four for nps (its
        band cuts, then the top k of the re-weighted update). The result goes to
        `global_threshold` before the write pass."""
        if isinstance(self.method, nps.Nps):
            return nps.count_model_scope(key_passes, self._params(""))
        return find_global_threshold(key_passes, self.spec.density)

    def _float32_on_device(
        self, w: torch.Tensor, f: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W, F) moved to the compute device, and W and D = F - W in float32 there."""
        w_dev = w.to(self.device, non_blocking=True)
        f_dev = f.to(self.device, non_blocking=True)
        w32 = w_dev.to(torch.float32)
        return w_dev, f_dev, w32, f_dev.to(torch.float32) - w32

    def order_keys(self, task: TensorTask, w: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """The int32 order keys of a pruned tensor's entries (its shared rows for prune_rows)."""
        if task.action == "prune_rows":
            f = f[: task.shared_rows]
        _, _, w32, d32 = self._float32_on_device(w, f)
        return self._keys(task.name, w32, d32)

    def order_key_chunks(
        self, task: TensorTask, w: torch.Tensor, f: torch.Tensor
    ) -> Iterator[torch.Tensor]:
        """`order_keys` in consecutive flat pieces, in order (scope model's counting passes): one
        piece, or chunks of a tensor the write pass takes chunk by chunk (worker/engine/chunked.py)."""
        shared = f[: task.shared_rows] if task.action == "prune_rows" else f
        if self._chunked_applies(shared):
            return chunked.order_key_chunks(self, task.name, w, shared, CHUNK_BYTES)
        return iter((self.order_keys(task, w, f),))

    def _chunked_applies(self, f: torch.Tensor) -> bool:
        """The torch path takes a tensor larger than one of its chunks chunk by chunk (its float32
        work is ~16x a bf16 tensor's bytes: whole, even a 117 MB MLP matrix costs GBs)."""
        return chunked.applies(self.spec.method, f.numel(), CHUNK_BYTES)

    def run(
        self,
        task: TensorTask,
        w: torch.Tensor | None,
        f: torch.Tensor,
        out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, TensorStats | None]:
        """Output tensor (CPU, task.out_dtype) and stats (None for a copied tensor).

        `out` (CPU, the output's dtype and shape), when given, is where the fused CPU kernel
        computes straight into (the pipeline passes the tensor's place in the output file); the
        other paths return their own tensor, which may or may not be `out`.
        """
        out_dtype = task.out_torch_dtype
        if task.action == "copy":
            return f.to(out_dtype), None
        assert w is not None
        if task.action == "prune_rows":
            rows = task.shared_rows
            assert rows is not None
            if out is None:
                shared, stats = self._prune(task.name, w, f[:rows], out_dtype)
                return torch.cat([shared, f[rows:].to(out_dtype)]), stats
            shared, stats = self._prune(task.name, w, f[:rows], out_dtype, out[:rows])
            if shared.data_ptr() != out.data_ptr():  # a path that did not compute in place
                out[:rows].copy_(shared)
            out[rows:].copy_(f[rows:])
            return out, stats
        return self._prune(task.name, w, f, out_dtype, out)

    def _prune(
        self,
        name: str,
        w: torch.Tensor,
        f: torch.Tensor,
        out_dtype: torch.dtype,
        out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, TensorStats]:
        triton_kernel = self.triton
        if (
            triton_kernel is not None
            and self._triton_applies()
            and w.dtype == f.dtype == out_dtype
            and w.dtype in triton_kernel.DTYPES
            and 0 < f.numel() <= triton_kernel.MAX_NUMEL
        ):
            return self._prune_triton(triton_kernel, name, w.contiguous(), f.contiguous())
        if self._fused_applies() and w.dtype == f.dtype and out_dtype == f.dtype:
            if out is None:
                out = torch.empty_like(f)
            k = keep_count(f.numel(), self.spec.density)
            window = CHUNK_BYTES // f.element_size() if f.nbytes > CHUNK_ABOVE_BYTES else None
            stats = self.fused.fused_prune(self.spec.method, w, f, k, self.spec.alpha, out, window)
            return out, stats

        if self._chunked_applies(f):
            return chunked.prune(self, name, w, f, out_dtype, out, CHUNK_BYTES)
        w_dev, f_dev, w32, d32 = self._float32_on_device(w, f)
        factors: torch.Tensor | None = None
        if self.spec.scope == "model":
            selection = self.global_threshold
            assert selection is not None, "model scope needs its counting passes"
            keys = self._keys(name, w32, d32)
            if isinstance(self.method, nps.Nps):
                # A plain threshold here would be magnitude's: nps needs count_model_scope.
                assert isinstance(selection, nps.NpsModelSelection), "nps: count_model_scope"
                keep, factors = selection.select(keys)
            else:
                assert isinstance(selection, GlobalThreshold)
                keep = selection.mask(keys)
        else:
            rows = f.shape[0] if self.spec.scope == "row" and f.dim() >= 2 else 1
            params = self._params(name)
            keep, factors = self.method.select(w32.reshape(rows, -1), d32.reshape(rows, -1), params)
        keep = keep.reshape(f.shape)
        stats = delta_stats(w32, f_dev.to(torch.float32), d32, keep)
        factor = self.factor if factors is None else factors.reshape(f.shape)
        out = compose_output(w_dev, f_dev, keep, factor, out_dtype)
        return out.cpu(), stats

    def _prune_triton(
        self, kernel: ModuleType, name: str, w: torch.Tensor, f: torch.Tensor
    ) -> tuple[torch.Tensor, TensorStats]:
        k = keep_count(f.numel(), self.spec.density)
        if self.stager is None:  # CPU tensors through the interpreter
            out = torch.empty_like(f)
            return out, kernel.triton_prune(self.spec.method, w, f, k, self.spec.alpha, out)
        w_dev, f_dev = self.stager.take(name, w, f)
        out_dev = torch.empty_like(f_dev)
        stats = kernel.triton_prune(self.spec.method, w_dev, f_dev, k, self.spec.alpha, out_dev)
        return self.stager.to_host(out_dev), stats

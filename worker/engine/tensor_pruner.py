"""One tensor through the method: choose the implementation, run it, return output and stats.

The fused CPU kernel covers fapm and magnitude at tensor scope on CPU; everything else takes the
torch path (any device), which is also the reference the kernel is tested against.
"""

from __future__ import annotations

import torch

from worker.engine.compose import TensorStats, compose_output, delta_stats
from worker.engine.methods import MethodParams, get_method
from worker.engine.methods.base import ScoredMethod
from worker.engine.model_scope import GlobalThreshold
from worker.engine.plan import TensorTask
from worker.engine.select import keep_count, order_keys
from worker.spec import JobSpec

FUSED_METHODS = frozenset({"fapm", "magnitude"})


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device: cuda was requested but no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu")


def _fused_kernel():
    try:
        from worker.engine.kernels import cpu_fused
    except ImportError:
        return None
    return cpu_fused if cpu_fused.fused_available() else None


class TensorPruner:
    """Applies a JobSpec's method to (W, F) pairs, tensor by tensor."""

    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec
        self.method = get_method(spec.method)
        self.device = resolve_device(spec.device)
        self.factor = self.method.update_factor(self._params("")) * spec.scale
        fused = _fused_kernel() if spec.kernel in ("auto", "numba") else None
        if spec.kernel == "numba" and fused is None:
            raise ValueError("kernel: numba was requested but the fused kernel is unavailable")
        self.fused = fused
        # Scope "model": set by the pipeline after its counting passes, consumed in plan order.
        self.global_threshold: GlobalThreshold | None = None

    @property
    def implementation(self) -> str:
        return "numba" if self._fused_applies() else f"torch-{self.device.type}"

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
        return MethodParams(s.sparsity, s.alpha, s.gamma, s.seed, tensor_name=name)

    def _keys(self, name: str, w32: torch.Tensor, d32: torch.Tensor) -> torch.Tensor:
        assert isinstance(self.method, ScoredMethod)
        scores = self.method.scores(w32.reshape(1, -1), d32.reshape(1, -1), self._params(name))
        return order_keys(scores)

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

    def run(
        self, task: TensorTask, w: torch.Tensor | None, f: torch.Tensor
    ) -> tuple[torch.Tensor, TensorStats | None]:
        """Output tensor (CPU, task.out_dtype) and stats (None for a copied tensor)."""
        out_dtype = task.out_torch_dtype
        if task.action == "copy":
            return f.to(out_dtype), None
        assert w is not None
        if task.action == "prune_rows":
            rows = task.shared_rows
            assert rows is not None
            shared, stats = self._prune(task.name, w, f[:rows], out_dtype)
            return torch.cat([shared, f[rows:].to(out_dtype)]), stats
        return self._prune(task.name, w, f, out_dtype)

    def _prune(
        self, name: str, w: torch.Tensor, f: torch.Tensor, out_dtype: torch.dtype
    ) -> tuple[torch.Tensor, TensorStats]:
        if self._fused_applies() and w.dtype == f.dtype and out_dtype == f.dtype:
            out = torch.empty_like(f)
            k = keep_count(f.numel(), self.spec.density)
            stats = self.fused.fused_prune(self.spec.method, w, f, k, self.spec.alpha, out)
            return out, stats

        w_dev, f_dev, w32, d32 = self._float32_on_device(w, f)
        if self.spec.scope == "model":
            assert self.global_threshold is not None, "model scope needs its counting passes"
            keep = self.global_threshold.mask(self._keys(name, w32, d32))
        else:
            rows = f.shape[0] if self.spec.scope == "row" and f.dim() >= 2 else 1
            params = self._params(name)
            keep = self.method.mask(w32.reshape(rows, -1), d32.reshape(rows, -1), params)
        keep = keep.reshape(f.shape)
        stats = delta_stats(w32, f_dev.to(torch.float32), d32, keep)
        out = compose_output(w_dev, f_dev, keep, self.factor, out_dtype)
        return out.cpu(), stats

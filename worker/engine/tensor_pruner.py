"""One tensor through the method: choose the implementation, run it, return output and stats.

The fused CPU kernel covers fapm and magnitude at tensor scope on CPU; everything else takes the
torch path (any device), which is also the reference the kernel is tested against.
"""

from __future__ import annotations

import torch

from worker.engine.compose import TensorStats, compose_output, delta_stats
from worker.engine.methods import MethodParams, get_method
from worker.engine.plan import TensorTask
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
            from worker.engine.select import keep_count

            out = torch.empty_like(f)
            k = keep_count(f.numel(), self.spec.density)
            stats = self.fused.fused_prune(self.spec.method, w, f, k, self.spec.alpha, out)
            return out, stats

        w_dev = w.to(self.device, non_blocking=True)
        f_dev = f.to(self.device, non_blocking=True)
        w32 = w_dev.to(torch.float32)
        d32 = f_dev.to(torch.float32) - w32
        rows = f.shape[0] if self.spec.scope == "row" and f.dim() >= 2 else 1
        keep = self.method.mask(w32.reshape(rows, -1), d32.reshape(rows, -1), self._params(name))
        keep = keep.reshape(f.shape)
        stats = delta_stats(w32, f_dev.to(torch.float32), d32, keep)
        out = compose_output(w_dev, f_dev, keep, self.factor, out_dtype)
        return out.cpu(), stats

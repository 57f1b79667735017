"""SparseGPT (Frantar & Alistarh 2023) for one Linear: the Hessian of its calibration inputs and
the pruning pass with optimal-brain-surgeon (OBS) updates, as in the reference `fasterprune`
(IST-DASLab/sparsegpt `sparsegpt.py`, the same loop as in locuslab/wanda and llm-compressor).
ALGORITHMS.md "Task-aware weight pruning" names it; this file is its one implementation.

Where this differs from the reference, and why:
- Ties. The reference prunes every entry whose metric is <= a threshold, so entries tied at the
  threshold are all pruned and the count varies; here exactly the reference's count is pruned
  and ties go to the lower index (row-major within an unstructured block, lower column within an
  N:M group), the same on every device.
- Count. Unstructured, the reference's threshold is the `int(numel * sparsity)`-th smallest
  metric of the block (0-based) taken with `<=`, i.e. `int(numel * sparsity) + 1` entries of each
  block (of `rows x blocksize`, the last block narrower); that count is kept, capped at the
  block's size. Sparsity 0 prunes nothing (the reference would still prune one entry per block)
  and sparsity 1 prunes everything (the reference indexes past the end).
- N:M reads as ALGORITHMS.md does: `pattern=(2, 4)` keeps 2 of every 4 consecutive inputs of a
  row; the reference's `prunen` is M - N.
- The Hessian factorisation (damping, Cholesky, inverse, Cholesky of the inverse) runs in float64
  whatever the working precision: the inverse of an ill-conditioned float32 Hessian is where
  float32 fails or loses the mask's ordering, and the O(d^3) factorisation runs once per Hessian
  (about twice the float32 time and memory for that step; on GPUs with slow float64 it is
  seconds for a d_in = 11008 Hessian). The OBS loop then runs in `dtype` (float32 as the
  reference, float64 on request).
- A failed factorisation raises SparseGPTNumericalError; llm-compressor falls back to an identity
  inverse with only a warning, which silently degrades the layer to magnitude pruning.
"""

from __future__ import annotations

import math

import torch

__all__ = ["HessianAccumulator", "SparseGPTNumericalError", "sparsegpt_prune"]


class SparseGPTNumericalError(ValueError):
    """The damped Hessian of a layer could not be factorised (not positive definite, or not finite)."""


class HessianAccumulator:
    """H = 2/N * sum over sequences of X^T X (X: tokens x d_in), N the number of sequences.

    Accumulated with the reference's running rescale, so H is at every step the mean over the
    sequences seen so far and never grows with N: `H *= n/(n+b); n += b; H += Y^T Y` with
    `Y = sqrt(2/n) X` (b: sequences in the call). Held in float32, like the reference; inputs of
    any floating dtype are cast to float32 before the product.
    """

    def __init__(self, columns: int, device: torch.device | str = "cpu") -> None:
        if columns <= 0:
            raise ValueError(f"columns must be positive, got {columns}")
        self.columns = int(columns)
        self.hessian = torch.zeros(
            (self.columns, self.columns), dtype=torch.float32, device=torch.device(device)
        )
        self._samples = 0

    @property
    def samples(self) -> int:
        """Sequences accumulated so far (N)."""
        return self._samples

    def add(self, x: torch.Tensor) -> None:
        """Add one sequence (tokens, d_in) or a batch of sequences (batch, tokens, d_in).

        A batch's sequences must be real tokens only (no padding): every row of X counts.
        """
        if x.dim() == 2:
            batch = 1
        elif x.dim() == 3:
            batch = x.shape[0]
        else:
            raise ValueError(
                f"expected (tokens, d_in) or (batch, tokens, d_in), got {tuple(x.shape)}"
            )
        if x.shape[-1] != self.columns:
            raise ValueError(f"inputs have {x.shape[-1]} columns, the Hessian {self.columns}")
        if not x.is_floating_point():
            raise ValueError(f"inputs must be floating point, got {x.dtype}")
        if batch == 0:
            return
        rows = x.reshape(-1, self.columns).to(device=self.hessian.device, dtype=torch.float32)
        self.hessian.mul_(self._samples / (self._samples + batch))
        self._samples += batch
        scaled = rows * math.sqrt(2 / self._samples)
        self.hessian.addmm_(scaled.T, scaled)


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    pattern: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    column_factor: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune `weight` (rows x d_in) with SparseGPT given the Hessian of its inputs (d_in x d_in).

    Returns the pruned weight in float32 (OBS updates applied to the kept entries, pruned entries
    exactly 0) and the keep mask (bool, True = kept), both on `weight`'s device.

    The metric of entry (r, j) is `W[r, j]^2 / U[j, j]^2` with U the upper Cholesky factor of the
    damped inverse Hessian, W the weights as updated by the columns before j's block (N:M: before
    j's group), times `column_factor[j]^2` when given (the task-aware fusion's per-input weight;
    None is plain SparseGPT and equals a factor of ones bit for bit). Unstructured: each block of
    `blocksize` columns prunes the `min(int(numel * sparsity) + 1, numel)` smallest metrics of the
    block (0 when sparsity is 0). N:M (`pattern=(n, m)`): each row keeps n of every m consecutive
    columns; `sparsity` must then be 1 - n/m. Dead inputs (diag(H) == 0) are zeroed in W and get
    H[i, i] = 1, then H gets `percdamp * mean(diag(H))` on its diagonal, as the reference.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (rows, d_in), got {tuple(weight.shape)}")
    rows, columns = weight.shape
    if tuple(hessian.shape) != (columns, columns):
        raise ValueError(f"hessian must be ({columns}, {columns}), got {tuple(hessian.shape)}")
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    if blocksize <= 0:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    if percdamp < 0:
        raise ValueError(f"percdamp must be >= 0, got {percdamp}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    if pattern is not None:
        keep_n, group = pattern
        if not 0 < keep_n < group:
            raise ValueError(f"pattern {keep_n}:{group} must keep 0 < N < M")
        if abs(sparsity - (1 - keep_n / group)) > 1e-9:
            raise ValueError(
                f"pattern {keep_n}:{group} means sparsity {1 - keep_n / group}, got {sparsity}"
            )
        if columns % group or blocksize % group:
            # A group cut by a block edge or the last column would not be M consecutive inputs.
            raise ValueError(
                f"pattern {keep_n}:{group} needs d_in ({columns}) and blocksize ({blocksize}) "
                f"to be multiples of {group}"
            )
    device = weight.device
    if not torch.isfinite(weight).all():
        raise ValueError("weight has non-finite entries")

    w = weight.detach().to(device=device, dtype=dtype, copy=True)
    h = hessian.detach().to(device=device, dtype=torch.float64, copy=True)
    dead = torch.diagonal(h) == 0
    w[:, dead] = 0
    u = _inverse_hessian_cholesky(h, dead, percdamp).to(dtype)
    del h

    factor_sq = None
    if column_factor is not None:
        if tuple(column_factor.shape) != (columns,):
            raise ValueError(
                f"column_factor must be ({columns},), got {tuple(column_factor.shape)}"
            )
        factor_sq = column_factor.detach().to(device=device, dtype=dtype) ** 2
        if not torch.isfinite(factor_sq).all():
            raise ValueError("column_factor has non-finite entries")

    keep = torch.ones((rows, columns), dtype=torch.bool, device=device)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        w1 = w[:, i1:i2].clone()
        u1 = u[i1:i2, i1:i2]
        d1 = torch.diagonal(u1)
        f1 = None if factor_sq is None else factor_sq[i1:i2]
        err1 = torch.zeros_like(w1)
        if pattern is None:
            prune1 = _block_prune_mask(_metric(w1, d1, f1), sparsity)
        else:
            prune1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            if pattern is not None and i % group == 0:
                # The group's metric uses the weights as updated by the columns before it.
                g = slice(i, i + group)
                prune1[:, g] = _group_prune_mask(
                    _metric(w1[:, g], d1[g], _cut(f1, g)), group - keep_n
                )
            col = w1[:, i]
            q = col.masked_fill(prune1[:, i], 0)
            err = (col - q) / d1[i]
            # OBS: spread the column's error over the block's remaining columns.
            w1[:, i + 1 :].addr_(err, u1[i, i + 1 :], alpha=-1)
            w1[:, i] = q
            err1[:, i] = err
        w[:, i1:i2] = w1
        keep[:, i1:i2] = ~prune1
        # ...and the block's errors over every later block at once.
        w[:, i2:].addmm_(err1, u[i1:i2, i2:], alpha=-1)
    return w.to(torch.float32), keep


def _inverse_hessian_cholesky(h: torch.Tensor, dead: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of the inverse of the damped Hessian (float64, in place on `h`)."""
    if not torch.isfinite(h).all():
        raise SparseGPTNumericalError(
            "SparseGPT: the Hessian has non-finite entries (inf/NaN in the calibration activations); "
            "check the calibration data and the model's activations in this layer"
        )
    idx = torch.nonzero(dead).flatten()
    h[idx, idx] = 1
    diag = torch.diagonal(h)
    diag += percdamp * diag.mean()
    advice = (
        f"calibrate with more sequences or tokens, or raise percdamp (now {percdamp}; "
        "the reference uses 0.01)"
    )
    lower, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise SparseGPTNumericalError(
            f"SparseGPT: the damped Hessian is not positive definite (Cholesky failed at column "
            f"{int(info) - 1} of {h.shape[0]}); {advice}"
        )
    upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    if int(info) != 0 or not torch.isfinite(upper).all():
        raise SparseGPTNumericalError(
            f"SparseGPT: the inverse of the damped Hessian could not be factorised (it is too "
            f"ill-conditioned); {advice}"
        )
    return upper


def _metric(w: torch.Tensor, d: torch.Tensor, factor_sq: torch.Tensor | None) -> torch.Tensor:
    """W^2 / d^2 (times the column factor squared), in the reference's order of operations."""
    metric = w**2 / d.reshape(1, -1) ** 2
    return metric if factor_sq is None else metric * factor_sq.reshape(1, -1)


def _cut(t: torch.Tensor | None, s: slice) -> torch.Tensor | None:
    return None if t is None else t[s]


def _block_prune_mask(metric: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The reference's count of smallest metrics of the whole block, ties to the lower row-major index."""
    numel = metric.numel()
    count = 0 if sparsity == 0 else min(int(numel * sparsity) + 1, numel)
    order = torch.argsort(metric.flatten(), stable=True)
    prune = torch.zeros(numel, dtype=torch.bool, device=metric.device)
    prune[order[:count]] = True
    return prune.reshape(metric.shape)


def _group_prune_mask(metric: torch.Tensor, count: int) -> torch.Tensor:
    """Per row, the `count` smallest metrics of the group, ties to the lower column."""
    order = torch.argsort(metric, dim=1, stable=True)
    prune = torch.zeros_like(metric, dtype=torch.bool)
    prune.scatter_(1, order[:, :count], True)
    return prune

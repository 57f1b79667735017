"""An independent float64 reference of every pruning method, written from ALGORITHMS.md.

This module imports nothing from `worker`: tests compare the engine against it. It is written for
clarity, not speed (a full stable sort per row, numpy float64 throughout), so keep the tensors small.

How float32 arithmetic is emulated: each value is held in float64, every operation is done in
float64 and its result is rounded to float32 at once (`_f32`). For + - * / of float32 operands
this gives exactly the float32 result (float64 has more than 2 * 24 + 2 bits, so the double
rounding is innocuous).

The rules (ALGORITHMS.md, plus the choices the brief fixes where that page is silent):
  - D = float32(F) - float32(W), rounded to float32.
  - fapm: S = a - (c * a) / max(|W|, float32(1e-12)), a = |D|, c = float32(alpha * mean(|W|)),
    the mean taken in float64 over the whole tensor (also in row scope); S = 0 where D == 0.
  - magnitude and breadcrumbs rank by |D|; random ranks by float32(u) where u are the float64
    draws of numpy's PCG64 seeded by SeedSequence([seed, crc32(tensor name)]), one draw per entry
    of the whole tensor in flat order (row scope: the same draws, viewed as rows).
  - Order: higher score first, -0.0 == +0.0, NaN below -inf, ties to the lower (row-local) index.
  - k = floor((1 - s) * n + 0.5) per tensor, or per row in row scope (n = row length).
  - breadcrumbs keeps ranks g .. g+k-1, g = min(floor(gamma * n + 0.5), n - k).
  - dare keeps entries with u < 1 - s (no ranking, no scope) and rescales by 1 / (1 - s)
    (0 when s == 1).
  - nps: edges e_0 = 0 < ... < e_M = 1 (default M = 8, e_i = r * 4^(-1 + 2(i-1)/(M-2)) clipped
    to (0, 1), duplicates removed, r = 1 - s); the entry of rank p (|D| order) is in the band b
    with e_b <= p / n < e_{b+1}, p / n a float64 quotient. T = float32(float32(w_b) * D); keep the
    top k of |T|. Kept: F where c_b = float32(float32(lam * scale) * float32(w_b)) == 1, else
    round_to_storage(float32(float32(W) + float32(c_b * D))). Scope model: one ranking of the
    concatenated tensors (ties to the earlier tensor, then the lower index), one k.
  - Output: when factor * scale == 1, O = F where kept and W elsewhere, copied bit for bit. Else
    O = round_to_storage(float32(float32(W) + float32(factor * scale) * D)) where kept, W elsewhere.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import torch

SCORED_METHODS = ("fapm", "magnitude", "random", "breadcrumbs")
ALL_METHODS = ("fapm", "magnitude", "random", "dare", "breadcrumbs", "nps")

# The bit-pattern integer type of each storage dtype (same width).
_BITS_DTYPE = {
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
    torch.float32: torch.int32,
}

_FAPM_EPS = float(np.float32(1e-12))


# ---------------------------------------------------------------------------------------------
# float32 emulation and storage rounding
# ---------------------------------------------------------------------------------------------


def _f32(x) -> np.ndarray:
    """Round float64 values to the nearest float32, returned as float64 (inf on overflow)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(x, dtype=np.float64).astype(np.float32).astype(np.float64)


def _as_f64(t: torch.Tensor) -> np.ndarray:
    """Exact float64 copy of a bf16/fp16/fp32 tensor (every such value is a float64 value)."""
    return t.detach().cpu().double().numpy()


def task_vector(w64: np.ndarray, f64: np.ndarray) -> np.ndarray:
    """D = float32(F) - float32(W), rounded to float32 (inf - inf is NaN, as in float32)."""
    with np.errstate(invalid="ignore"):
        return _f32(f64 - w64)


def _bits(t: torch.Tensor) -> np.ndarray:
    """The stored bit patterns of a tensor, as a numpy int16/int32 array."""
    return t.detach().cpu().contiguous().view(_BITS_DTYPE[t.dtype]).numpy().copy()


def _from_bits(bits: np.ndarray, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    bits = np.ascontiguousarray(bits).astype(np.int32 if dtype == torch.float32 else np.int16)
    return torch.from_numpy(bits).view(dtype).reshape(shape)


def _float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 values (given as float64) to bfloat16, round to nearest even."""
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    lsb = (u >> 16) & 1
    rounded = ((u + 0x7FFF + lsb) >> 16).astype(np.uint16)
    # NaN: any quiet NaN (only "is NaN" is compared; implementations differ in the payload).
    rounded[np.isnan(x)] = 0x7FC0
    return rounded.view(np.int16)


def round_to_storage_bits(x32: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Bit patterns of float32 values (held in float64) rounded once to a storage dtype."""
    with np.errstate(over="ignore", invalid="ignore"):
        if dtype == torch.float32:
            return x32.astype(np.float32).view(np.int32)
        if dtype == torch.float16:
            # numpy converts float32 -> float16 with round to nearest even (subnormals included).
            return x32.astype(np.float32).astype(np.float16).view(np.int16)
        if dtype == torch.bfloat16:
            return _float32_to_bf16_bits(x32)
    raise ValueError(f"unsupported storage dtype {dtype}")


# ---------------------------------------------------------------------------------------------
# counts, order, draws
# ---------------------------------------------------------------------------------------------


def keep_count(n: int, sparsity: float) -> int:
    """k = floor((1 - s) * n + 0.5), clamped to [0, n]."""
    return min(n, max(0, math.floor((1.0 - sparsity) * n + 0.5)))


def outlier_count(n: int, k: int, gamma: float) -> int:
    """breadcrumbs: g = min(floor(gamma * n + 0.5), n - k)."""
    return min(math.floor(gamma * n + 0.5), n - k)


def rank_order(scores: np.ndarray) -> np.ndarray:
    """Indices of a 1-D score vector from first kept to last.

    Higher score first; -0.0 and +0.0 are equal; NaN ranks below -inf; equal scores rank by the
    lower index. np.lexsort sorts by its last key first and is stable.
    """
    scores = np.asarray(scores, dtype=np.float64)
    is_nan = np.isnan(scores)
    # Canonical scores: NaN and -0.0 become 0.0 (NaN is ordered by its own key).
    canonical = np.where(is_nan | (scores == 0), 0.0, scores)
    index = np.arange(scores.size)
    return np.lexsort((index, -canonical, is_nan))


def top_k(scores: np.ndarray, k: int, skip: int = 0) -> np.ndarray:
    """Bool mask of the entries ranked skip .. skip+k-1 in `rank_order` (a 1-D vector)."""
    mask = np.zeros(scores.size, dtype=bool)
    mask[rank_order(scores)[skip : skip + k]] = True
    return mask


def uniform_draws(seed: int, tensor_name: str, n: int) -> np.ndarray:
    """The n float64 draws that define the random and dare methods for one tensor."""
    seed_seq = np.random.SeedSequence([seed, zlib.crc32(tensor_name.encode())])
    return np.random.Generator(np.random.PCG64(seed_seq)).random(n)


# ---------------------------------------------------------------------------------------------
# scores
# ---------------------------------------------------------------------------------------------


def fapm_coefficient(w: np.ndarray, alpha: float) -> float:
    """c = float32(alpha * mean(|W|)), the mean in float64 (an exactly rounded sum / n)."""
    flat = np.abs(w).ravel()
    mean = math.fsum(flat.tolist()) / max(flat.size, 1)
    return float(_f32(alpha * mean))


def fapm_scores(w: np.ndarray, d: np.ndarray, c: float) -> np.ndarray:
    """S = a - (c * a) / max(|W|, eps) in float32, S = 0 where D == 0 (arrays of any shape)."""
    with np.errstate(all="ignore"):
        a = np.abs(d)
        denominator = np.maximum(np.abs(w), _FAPM_EPS)  # NaN in W propagates, as in torch
        ca = _f32(c * a)
        ratio = _f32(ca / denominator)
        s = _f32(a - ratio)
    s[d == 0] = 0.0
    return s


def method_scores(
    method: str, w: np.ndarray, d: np.ndarray, alpha: float, seed: int, tensor_name: str
) -> np.ndarray:
    """Float32 scores (as float64) of a scored method, same shape as d."""
    if method == "fapm":
        return fapm_scores(w, d, fapm_coefficient(w, alpha))
    if method in ("magnitude", "breadcrumbs"):
        return np.abs(d)
    if method == "random":
        return _f32(uniform_draws(seed, tensor_name, d.size)).reshape(d.shape)
    raise ValueError(f"{method!r} is not a scored method")


# ---------------------------------------------------------------------------------------------
# masks and output
# ---------------------------------------------------------------------------------------------


def _rows_view(x: np.ndarray) -> np.ndarray:
    """(shape[0], -1) for 2-D and up; a single row for 0-D and 1-D tensors."""
    if x.ndim >= 2:
        return x.reshape(x.shape[0], -1)
    return x.reshape(1, -1)


def reference_mask(
    method: str,
    w: np.ndarray,
    d: np.ndarray,
    sparsity: float,
    alpha: float = 1.0,
    gamma: float = 0.01,
    seed: int = 0,
    tensor_name: str = "",
    scope: str = "tensor",
) -> np.ndarray:
    """Bool keep-mask (shape of d) from float32 W and D held in float64."""
    if method == "dare":
        u = uniform_draws(seed, tensor_name, d.size).reshape(d.shape)
        return u < (1.0 - sparsity)
    if scope not in ("tensor", "row"):
        raise ValueError(f"unsupported scope {scope!r}")
    scores = method_scores(method, w, d, alpha, seed, tensor_name)
    rows = _rows_view(scores) if scope == "row" else scores.reshape(1, -1)
    mask = np.zeros(rows.shape, dtype=bool)
    for r in range(rows.shape[0]):
        n = rows.shape[1]
        k = keep_count(n, sparsity)
        skip = outlier_count(n, k, gamma) if method == "breadcrumbs" else 0
        mask[r] = top_k(rows[r], k, skip)
    return mask.reshape(d.shape)


def update_factor(method: str, sparsity: float) -> float:
    """The float64 multiplier on kept updates before `scale`."""
    if method == "dare":
        return 0.0 if sparsity == 1 else 1.0 / (1.0 - sparsity)
    return 1.0


def reference_output(
    w: torch.Tensor, f: torch.Tensor, kept: np.ndarray, factor: float
) -> torch.Tensor:
    """The output tensor in F's dtype: a bit-exact select, or the float32 rescale where kept."""
    if factor == 1.0:
        out_bits = np.where(kept, _bits(f), _bits(w))
        return _from_bits(out_bits, f.dtype, tuple(f.shape))
    w64 = _as_f64(w)
    d = task_vector(w64, _as_f64(f))
    with np.errstate(all="ignore"):
        update = _f32(_f32(factor) * d)
        rescaled = _f32(w64 + update)
    out_bits = np.where(kept, round_to_storage_bits(rescaled, f.dtype), _bits(w))
    return _from_bits(out_bits, f.dtype, tuple(f.shape))


def reference_prune(
    method: str,
    w: torch.Tensor,
    f: torch.Tensor,
    sparsity: float,
    alpha: float = 1.0,
    gamma: float = 0.01,
    scale: float = 1.0,
    seed: int = 0,
    tensor_name: str = "",
    scope: str = "tensor",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output tensor in F's dtype, bool keep-mask) for one tensor.

    `w` and `f` are torch tensors of one dtype (bfloat16, float16 or float32) and one shape.
    """
    if method not in ALL_METHODS:
        raise ValueError(f"unknown method {method!r}")
    if w.dtype != f.dtype or w.shape != f.shape:
        raise ValueError("the reference takes W and F of one dtype and shape")
    if method == "nps":
        if scope != "tensor":
            raise ValueError("nps: the reference takes scope tensor (or reference_nps_model)")
        [out], [kept], _bands = reference_nps_model([w], [f], sparsity, lam=scale)
        return out, torch.from_numpy(kept.copy())
    w64 = _as_f64(w)
    d = task_vector(w64, _as_f64(f))
    kept = reference_mask(method, w64, d, sparsity, alpha, gamma, seed, tensor_name, scope)
    factor = update_factor(method, sparsity) * scale
    out = reference_output(w, f, kept, factor)
    return out, torch.from_numpy(kept.copy())


# ---------------------------------------------------------------------------------------------
# nps
# ---------------------------------------------------------------------------------------------


def nps_default_edges(sparsity: float, bands: int = 8) -> list[float]:
    """e_i = r * 4^(-1 + 2(i-1)/(M-2)), i = 1..M-1, clipped to (0, 1), duplicates removed
    (M = 2: the one cut r)."""
    r = 1.0 - sparsity
    if bands == 2:
        inner = [r]
    else:
        inner = [r * 4.0 ** (-1.0 + 2.0 * (i - 1) / (bands - 2)) for i in range(1, bands)]
    return [0.0, *sorted({c for c in inner if 0.0 < c < 1.0}), 1.0]


def nps_band_of_rank(p: int, n: int, edges: list[float]) -> int:
    """The band b with e_b <= p / n < e_{b+1} (a plain scan of the definition)."""
    fraction = p / n
    for b in range(len(edges) - 1):
        if edges[b] <= fraction < edges[b + 1]:
            return b
    raise AssertionError(f"rank {p} of {n} is in no band of {edges}")


def reference_nps_model(
    ws: list[torch.Tensor],
    fs: list[torch.Tensor],
    sparsity: float,
    weights: list[float] | None = None,
    lam: float = 1.0,
    edges: list[float] | None = None,
) -> tuple[list[torch.Tensor], list[np.ndarray], list[np.ndarray]]:
    """nps over the given tensors as one ranking (one tensor: scope tensor; several: scope model,
    in plan order). Returns each tensor's output (F's dtype), keep-mask and band ids."""
    edges = nps_default_edges(sparsity) if edges is None else list(edges)
    weights = [1.0] * (len(edges) - 1) if weights is None else list(weights)
    assert len(weights) == len(edges) - 1
    ds = [task_vector(_as_f64(w), _as_f64(f)).ravel() for w, f in zip(ws, fs, strict=True)]
    d = np.concatenate(ds) if ds else np.zeros(0)
    n = d.size
    order = rank_order(np.abs(d))
    band = np.empty(n, dtype=np.int64)
    for p, i in enumerate(order):
        band[i] = nps_band_of_rank(p, n, edges)
    w32 = [float(_f32(x)) for x in weights]
    t = np.array([abs(float(_f32(w32[band[i]] * d[i]))) for i in range(n)])
    kept = top_k(t, keep_count(n, sparsity))
    lam32 = float(_f32(lam))
    outs, masks, bands = [], [], []
    start = 0
    for w, f, d_part in zip(ws, fs, ds, strict=True):
        stop = start + d_part.size
        part_kept, part_band = kept[start:stop], band[start:stop]
        w64 = _as_f64(w).ravel()
        out_bits = _bits(w).ravel().copy()
        f_bits = _bits(f).ravel()
        for j in range(d_part.size):
            if not part_kept[j]:
                continue
            c = float(_f32(lam32 * w32[part_band[j]]))
            if c == 1.0:
                out_bits[j] = f_bits[j]
            else:
                with np.errstate(all="ignore"):
                    value = _f32(w64[j] + float(_f32(c * d_part[j])))
                out_bits[j] = round_to_storage_bits(np.array([value]), f.dtype)[0]
        outs.append(_from_bits(out_bits, f.dtype, tuple(f.shape)))
        masks.append(part_kept.reshape(tuple(f.shape)))
        bands.append(part_band.reshape(tuple(f.shape)))
        start = stop
    return outs, masks, bands

"""Fused Triton kernel for tensor-scope `fapm` / `magnitude` pruning (bit-exact to the torch path).

`triton_prune` gives the same output bytes as

    keep = top_k_mask(order_keys(scores).view(1, -1), k)      # select.py
    out = compose_output(w, f, keep, 1.0, f.dtype)            # compose.py

and the same `delta_stats` (float sums to rounding), on a CUDA device, or on CPU tensors through
Triton's interpreter (`TRITON_INTERPRET=1` set before this module is imported: `triton.jit`
decides at decoration time whether a kernel is compiled or interpreted).

Passes over the tensor (each reads W and F in their storage dtype, nothing else per entry):

1. fapm only: per-tile float64 sums of |W| -> c = float32(alpha * mean|W|) (reads W only).
2. Radix select of the k-th largest int32 order key (`select.order_keys`: NaN lowest, -0.0 ==
   +0.0) over its unsigned form, digits of 11, 11 and 10 bits: each pass recomputes the score,
   histograms the digit of the keys inside the current range (2048 bins per program, one
   atomic add per non-empty bin) and the host narrows the range to the bin holding the k-th.
   It stops early when the whole bin is kept (then the rule is "key >= bin's lowest key").
   No sort, no per-entry key or index tensor.
3. Only when the tie group at the k-th key t is split: one pass counting key == t per tile;
   the exclusive prefix over tiles (a cumsum over tiles, not entries) is the tie rank offset.
4. The write pass: score, keep = key > t or (key == t and tie rank <= need), O = F's bits where
   kept, W's bits elsewhere (a select on the raw bits: exact, NaN payloads kept), and per-tile
   statistics for the report.

Score arithmetic is float32 in the torch path's order: D = F - W, a = |D|,
S = a - div_rn(c * a, max(|W|, 1e-12)) (NaN |W| propagates), S = 0 where D == 0. `div_rn` is
IEEE round-to-nearest (Triton's `/` is not); launches on CUDA also disable FMA contraction and
libdevice flush-to-zero, so subnormals behave as on the CPU.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from worker.engine.compose import TensorStats

try:  # triton is optional (the `gpu` extra): callers fall back to another path without it.
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised only without triton
    HAVE_TRITON = False

NBINS = 2048
# (shift, digit bits) of the radix passes over the 32-bit unsigned key, most significant first.
DIGITS = ((21, 11), (10, 11), (0, 10))
_EPS32 = float(np.float32(1e-12))
# Offsets are int32 inside the kernels: tensors up to this size (a 128256 x 4096 embedding is
# 525M entries); larger ones take the torch path.
MAX_NUMEL = 2**31 - 2**20

# storage dtype -> (bit-view dtype passed to the kernels, STORAGE constexpr)
_VIEWS = {
    torch.bfloat16: (torch.int16, 0),
    torch.float16: (torch.int16, 1),
    torch.float32: (torch.int32, 2),
}
DTYPES = tuple(_VIEWS)

# Compile options for CUDA launches (the interpreter drops unknown keywords): no FMA contraction,
# no flush-to-zero of subnormals in libdevice, so every score is the CPU's IEEE float32 result.
_EXACT_FP = {"enable_fp_fusion": False, "enable_reflect_ftz": False}


def interpreting() -> bool:
    """True when this module's kernels were built for Triton's CPU interpreter, i.e.
    TRITON_INTERPRET=1 was set when the module was imported (`triton.jit` decides then)."""
    return HAVE_TRITON and type(_write_kernel).__name__ == "InterpretedFunction"


def triton_available(device: torch.device) -> bool:
    """True when the kernels can run on `device` here: CUDA, or CPU under the interpreter."""
    if not HAVE_TRITON:
        return False
    if device.type == "cuda":
        return torch.cuda.is_available() and not interpreting()
    return device.type == "cpu" and interpreting()


if HAVE_TRITON:

    @triton.jit
    def _to_f32(bits, STORAGE: tl.constexpr):
        """Stored bits -> float32 (exact): 0 bfloat16, 1 float16 (int16 bits), 2 float32."""
        if STORAGE == 0:
            # bfloat16 is the top half of a float32: shift the bits (the sign-extended high
            # half falls off). The same instruction count as a cvt on the GPU, and exact in
            # Triton's interpreter too, whose bf16 -> fp32 cast mangles subnormals.
            return (bits.to(tl.int32) << 16).to(tl.float32, bitcast=True)
        elif STORAGE == 1:
            return bits.to(tl.float16, bitcast=True).to(tl.float32)
        else:
            return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _finite(x):
        """isfinite of float32 by its exponent bits (no inf constant needed)."""
        return (x.to(tl.int32, bitcast=True) & 0x7F800000) != 0x7F800000

    @triton.jit
    def _entries(w_ptr, f_ptr, offs, inb, c, eps, IS_FAPM: tl.constexpr, STORAGE: tl.constexpr):
        """One tile: (W bits, F bits, W, F, D, |D|, order key), float32 in the torch order."""
        wbits = tl.load(w_ptr + offs, mask=inb, other=0)
        fbits = tl.load(f_ptr + offs, mask=inb, other=0)
        wf = _to_f32(wbits, STORAGE)
        ff = _to_f32(fbits, STORAGE)
        d = ff - wf
        a = tl.abs(d)
        if IS_FAPM:
            aw = tl.abs(wf)
            # torch.maximum(|W|, eps): a NaN |W| stays NaN (NaN < eps is false).
            m = tl.where(aw < eps, eps, aw)
            # S = a - (c * a) / m, left to right as in methods/fapm.py, IEEE division.
            s = a - tl.math.div_rn(c * a, m)
            s = tl.where(d == 0, 0.0, s)
        else:
            s = a
        # select.order_keys: -0.0 -> +0.0, negative floats flip their 31 low bits, NaN lowest.
        s = tl.where(s == 0, 0.0, s)
        bits = s.to(tl.int32, bitcast=True)
        key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        key = tl.where(s != s, -2147483648, key)
        return wbits, fbits, wf, ff, d, a, key

    @triton.jit
    def _abs_sum_kernel(w_ptr, part_ptr, n, STORAGE: tl.constexpr, BLOCK: tl.constexpr):
        """Per-tile float64 sum of |W| (fapm's c); tiles are fixed, so the result is too."""
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        inb = offs < n
        wf = _to_f32(tl.load(w_ptr + offs, mask=inb, other=0), STORAGE)
        tl.store(part_ptr + pid, tl.sum(tl.abs(wf).to(tl.float64), axis=0))

    @triton.jit
    def _hist_kernel(
        w_ptr,
        f_ptr,
        hist_ptr,
        n,
        tiles,
        c,
        eps,
        lo,
        hi,
        SHIFT: tl.constexpr,
        DBITS: tl.constexpr,
        RESTRICT: tl.constexpr,
        IS_FAPM: tl.constexpr,
        STORAGE: tl.constexpr,
        BLOCK: tl.constexpr,
        NB: tl.constexpr,
    ):
        """Histogram of one radix digit of the keys in [lo, hi] (int32 keys), accumulated per
        program over a strided set of tiles, then added to the global bins once."""
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        acc = tl.zeros([NB], dtype=tl.int32)
        for tile in range(pid, tiles, nprog):
            offs = tile * BLOCK + tl.arange(0, BLOCK)
            inb = offs < n
            _, _, _, _, _, _, key = _entries(w_ptr, f_ptr, offs, inb, c, eps, IS_FAPM, STORAGE)
            sel = inb
            if RESTRICT:
                sel = sel & (key >= lo) & (key <= hi)
            ukey = (key ^ -2147483648).to(tl.uint32, bitcast=True)
            digit = ((ukey >> SHIFT) & ((1 << DBITS) - 1)).to(tl.int32)
            acc += tl.histogram(digit, NB, mask=sel)
        bins = tl.arange(0, NB)
        tl.atomic_add(hist_ptr + bins, acc, mask=acc > 0)

    @triton.jit
    def _tie_count_kernel(
        w_ptr,
        f_ptr,
        eq_ptr,
        n,
        c,
        eps,
        t,
        IS_FAPM: tl.constexpr,
        STORAGE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Entries whose key equals the k-th key t, per tile (the same tiles as the write)."""
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        inb = offs < n
        _, _, _, _, _, _, key = _entries(w_ptr, f_ptr, offs, inb, c, eps, IS_FAPM, STORAGE)
        tl.store(eq_ptr + pid, tl.sum((inb & (key == t)).to(tl.int32), axis=0))

    @triton.jit
    def _write_kernel(
        w_ptr,
        f_ptr,
        o_ptr,
        tie_base_ptr,
        st_i_ptr,
        st_f_ptr,
        n,
        c,
        eps,
        t,
        need,
        KEEP: tl.constexpr,
        IS_FAPM: tl.constexpr,
        STORAGE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """O = F's bits where kept, W's elsewhere, and the tile's statistics.

        KEEP: 0 nothing, 1 everything, 2 key >= t, 3 key > t or the first `need` ties at t in
        flat order (tie rank = ties in earlier tiles + inclusive cumsum inside the tile).
        """
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        inb = offs < n
        wbits, fbits, wf, ff, d, a, key = _entries(
            w_ptr, f_ptr, offs, inb, c, eps, IS_FAPM, STORAGE
        )
        if KEEP == 0:
            keep = offs < 0
        elif KEEP == 1:
            keep = inb
        elif KEEP == 2:
            keep = inb & (key >= t)
        else:
            tie = inb & (key == t)
            rank = tl.load(tie_base_ptr + pid) + tl.cumsum(tie.to(tl.int32), axis=0)
            keep = inb & ((key > t) | (tie & (rank <= need)))
        tl.store(o_ptr + offs, tl.where(keep, fbits, wbits), mask=inb)

        # delta_stats: |D| in float64 with non-finite |D| counted as 0; counts of the tile.
        a64 = tl.where(_finite(a), a, 0.0).to(tl.float64)
        ak = tl.where(keep, a64, 0.0)
        nz = inb & (d != 0)
        tl.store(st_f_ptr + pid * 4 + 0, tl.sum(a64, axis=0))
        tl.store(st_f_ptr + pid * 4 + 1, tl.sum(a64 * a64, axis=0))
        tl.store(st_f_ptr + pid * 4 + 2, tl.sum(ak, axis=0))
        tl.store(st_f_ptr + pid * 4 + 3, tl.sum(ak * ak, axis=0))
        nonfinite = (inb & ~_finite(wf)).to(tl.int32) + (inb & ~_finite(ff)).to(tl.int32)
        tl.store(st_i_ptr + pid * 5 + 0, tl.sum(keep.to(tl.int32), axis=0))
        tl.store(st_i_ptr + pid * 5 + 1, tl.sum(nz.to(tl.int32), axis=0))
        tl.store(st_i_ptr + pid * 5 + 2, tl.sum((keep & nz).to(tl.int32), axis=0))
        tl.store(st_i_ptr + pid * 5 + 3, tl.sum((inb & (wf == 0)).to(tl.int32), axis=0))
        tl.store(st_i_ptr + pid * 5 + 4, tl.sum(nonfinite, axis=0))


def _cuda_options() -> dict[str, bool]:
    """The exact-float options this Triton's CUDA backend knows (a launch with an unknown
    option is an error, and `enable_reflect_ftz` is not in every 3.x)."""
    from triton.backends.nvidia.compiler import CUDAOptions

    return {k: v for k, v in _EXACT_FP.items() if k in CUDAOptions.__dataclass_fields__}


def _check(w: torch.Tensor, f: torch.Tensor, out: torch.Tensor) -> None:
    if w.dtype not in _VIEWS:
        raise ValueError(f"triton_prune: unsupported dtype {w.dtype}")
    for name, x in (("f", f), ("out", out)):
        if x.dtype != w.dtype or x.shape != w.shape:
            raise ValueError(
                f"triton_prune: {name} is {x.dtype}{tuple(x.shape)}, w is {w.dtype}{tuple(w.shape)}"
            )
    for name, x in (("w", w), ("f", f), ("out", out)):
        if x.device != w.device or not x.is_contiguous():
            raise ValueError(f"triton_prune: {name} must be contiguous and on {w.device}")
    if w.numel() > MAX_NUMEL:
        raise ValueError(f"triton_prune: {w.numel()} entries is over the kernel's {MAX_NUMEL}")
    if not triton_available(w.device):
        raise RuntimeError(
            f"triton_prune: cannot run on {w.device} here (triton missing, no CUDA, or a CPU "
            "tensor without TRITON_INTERPRET=1 set before import)"
        )


def _to_signed(ukey: int) -> int:
    """Unsigned key (the int32 key ^ 0x80000000) back to the int32 order key."""
    return ukey - 2**31


def _choose_bin(hist: np.ndarray, need: int) -> tuple[int, int]:
    """The bin holding the need-th largest entry (counting from the top bin) and the number
    of entries in higher bins."""
    from_top = np.cumsum(hist[::-1])
    idx = int(np.searchsorted(from_top, need))  # first prefix (from the top) reaching need
    b = len(hist) - 1 - idx
    return b, int(from_top[idx] - hist[b])


def default_block(device: torch.device) -> int:
    return 4096 if device.type == "cuda" else 1024


def triton_prune(
    method: str,
    w: torch.Tensor,
    f: torch.Tensor,
    k: int,
    alpha: float,
    out: torch.Tensor,
    block: int | None = None,
    programs: int | None = None,
) -> TensorStats:
    """Tensor-scope top-k pruning of F - W into `out` (F where kept, W elsewhere), bit-exact.

    `w`, `f`, `out`: contiguous, same dtype (bf16, fp16, fp32) and shape, on one device (CUDA,
    or CPU under the interpreter). `block` (a power of two) is the tile size; `programs` caps
    the histogram passes' grid (each program loops over tiles). Both change speed, never the
    result. Returns the tensor's statistics (the same as the torch path's `delta_stats`).
    """
    if method not in ("fapm", "magnitude"):
        raise ValueError(f"triton_prune: unsupported method {method!r} (fapm, magnitude)")
    if not HAVE_TRITON:
        raise RuntimeError("triton_prune: triton is not installed")
    _check(w, f, out)
    n = w.numel()
    if n == 0:
        return TensorStats()
    k = min(max(int(k), 0), n)
    dev = w.device
    block = block or default_block(dev)
    if block & (block - 1):
        raise ValueError(f"triton_prune: block {block} is not a power of two")
    view, storage = _VIEWS[w.dtype]
    wb, fb, ob = (x.reshape(-1).view(view) for x in (w, f, out))
    tiles = -(-n // block)
    if programs is None:
        programs = (
            torch.cuda.get_device_properties(dev).multi_processor_count * 4
            if dev.type == "cuda"
            else 4
        )
    programs = max(1, min(programs, tiles))
    opts = _cuda_options() if dev.type == "cuda" else {}

    is_fapm = method == "fapm" and 0 < k < n  # k = 0 or n: no scores needed
    c = 0.0
    if is_fapm:
        parts = torch.empty(tiles, dtype=torch.float64, device=dev)
        _abs_sum_kernel[(tiles,)](wb, parts, n, STORAGE=storage, BLOCK=block, **opts)
        # As methods/fapm.py: float64 mean, times alpha in float64, rounded once to float32.
        mean_abs = float(parts.sum()) / n
        c = float(np.float32(alpha * mean_abs))

    keep_mode, t, need = (0 if k == 0 else 1), 0, 0
    if 0 < k < n:
        need = k  # how many of the entries inside the current key range are kept
        lo_u, span_bits = 0, 32  # current range of unsigned keys: [lo_u, lo_u + 2^span_bits)
        hist = torch.empty(NBINS, dtype=torch.int32, device=dev)
        keep_mode = 3
        for pass_no, (shift, dbits) in enumerate(DIGITS):
            hist.zero_()
            hi_u = lo_u + (1 << span_bits) - 1
            _hist_kernel[(programs,)](
                wb,
                fb,
                hist,
                n,
                tiles,
                c,
                _EPS32,
                _to_signed(lo_u),
                _to_signed(hi_u),
                SHIFT=shift,
                DBITS=dbits,
                RESTRICT=pass_no > 0,
                IS_FAPM=is_fapm,
                STORAGE=storage,
                BLOCK=block,
                NB=NBINS,
                **opts,
            )
            counts = hist.cpu().numpy().astype(np.int64)[: 1 << dbits]
            b, above = _choose_bin(counts, need)
            need -= above
            lo_u, span_bits = lo_u + (b << shift), shift
            if counts[b] == need:  # the whole bin is kept: no deeper pass, no tie split
                keep_mode = 2
                break
        t = _to_signed(lo_u)  # after the last pass the range is the single key t

    tie_base = torch.zeros(1, dtype=torch.int32, device=dev)
    if keep_mode == 3:  # t's tie group is split: rank its members by flat index
        eq = torch.empty(tiles, dtype=torch.int32, device=dev)
        _tie_count_kernel[(tiles,)](
            wb, fb, eq, n, c, _EPS32, t, IS_FAPM=is_fapm, STORAGE=storage, BLOCK=block, **opts
        )
        tie_base = (torch.cumsum(eq, 0, dtype=torch.int32) - eq).contiguous()

    st_i = torch.empty((tiles, 5), dtype=torch.int32, device=dev)
    st_f = torch.empty((tiles, 4), dtype=torch.float64, device=dev)
    _write_kernel[(tiles,)](
        wb,
        fb,
        ob,
        tie_base,
        st_i,
        st_f,
        n,
        c,
        _EPS32,
        t,
        need,
        KEEP=keep_mode,
        IS_FAPM=is_fapm,
        STORAGE=storage,
        BLOCK=block,
        **opts,
    )
    ints = st_i.sum(0, dtype=torch.int64).tolist()
    floats = st_f.cpu().numpy()
    return TensorStats(
        n=n,
        kept=ints[0],
        nonzero_delta=ints[1],
        kept_nonzero=ints[2],
        l1_total=math.fsum(floats[:, 0]),
        l2sq_total=math.fsum(floats[:, 1]),
        l1_kept=math.fsum(floats[:, 2]),
        l2sq_kept=math.fsum(floats[:, 3]),
        w_zero=ints[3],
        nonfinite=ints[4],
    )

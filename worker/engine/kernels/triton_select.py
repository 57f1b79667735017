"""Fused Triton kernel for tensor-scope `fapm` / `magnitude` pruning (bit-exact to the torch path).

`triton_prune` gives the same output bytes as

    keep = top_k_mask(order_keys(scores).view(1, -1), k)      # select.py
    out = compose_output(w, f, keep, 1.0, f.dtype)            # compose.py

and the same `delta_stats` (float sums to rounding), on a CUDA device, or on CPU tensors through
Triton's interpreter (`TRITON_INTERPRET=1` set before this module is imported: `triton.jit`
decides at decoration time whether a kernel is compiled or interpreted).

Selection of the k-th largest int32 order key t (`select.order_keys`: NaN lowest, -0.0 ==
+0.0) and of the ties at t to keep (the lowest flat indices), by default with a sampled bracket
(the design of `cpu_fused.py`), so that W and F are read twice, not about five times:

1. fapm only: per-tile float64 sums of |W| -> c = float32(alpha * mean|W|) (reads W only).
2. Sample: the keys of runs of RUN consecutive entries, one run per window of the tensor at a
   hashed offset (deterministic; every entry when the tensor is tiny), sorted on the device.
   The bracket [lo, hi] holds the k-th key with high probability (+-4.5 sigma of its sample
   rank). Only two sample keys come back to the host.
3. Scan (one fused pass over W and F): per tile, the counts of key > hi, key == hi and key ==
   lo; the keys strictly inside (lo, hi) are appended with their flat index, as one int64
   (key << 32 | 2^32 - 1 - index: larger means kept first), to a capacity-bounded buffer at
   an atomic counter (append order does not matter).
4. From the totals: t is hi, lo (the tie rank then comes from the per-tile counts, as in the
   radix path's tie pass, without its pass) or inside (lo, hi): then the candidates are sorted
   on the device and the r-th largest gives t and `cut`, the flat index of the last kept tie
   (ties at t are all candidates, and rank by lower index). If the bracket missed t, it is
   widened from the same sample on the side that missed and the scan runs again; if that
   misses too, or the candidates needed overflowed the buffer, the radix select decides.
5. The write pass (below).

Fallback, the radix select (the previous default): the k-th key over its unsigned form with
digits of 11, 11 and 10 bits, each pass recomputing the score and histogramming the digit of
the keys inside the current range (2048 bins per program, one atomic add per non-empty bin)
while the host narrows the range to the bin holding the k-th; it stops early when the whole bin
is kept. Then, only when the tie group at t is split, one pass counting key == t per tile.

The write pass: score, keep = key > t or (key == t and [tie rank <= need | index <= cut]),
O = F's bits where kept, W's bits elsewhere (a select on the raw bits: exact, NaN payloads
kept), and per-tile statistics for the report.

Per entry of a bf16 tensor (2 bytes) the sampled path moves 2 (fapm's |W| sum) + 4 (scan) + 6
(write: W, F in, O out) bytes, plus the sample and the candidates (at 10% density about 0.4
byte per entry at 4096 x 4096, 0.1 at 128256 x 4096): ~12.4-12.1 bytes (magnitude 2 fewer),
against 2 + 3 x 4 (+ 4 for a split tie group) + 6 = 20-24 for the radix path, and 6 at the
least. `triton_prune(..., info={})` reports the path taken and the bytes moved.

Score arithmetic is float32 in the torch path's order: D = F - W, a = |D|,
S = a - div_rn(c * a, max(|W|, 1e-12)) (NaN |W| propagates), S = 0 where D == 0. `div_rn` is
IEEE round-to-nearest (Triton's `/` is not); launches on CUDA also disable FMA contraction and
libdevice flush-to-zero, so subnormals behave as on the CPU. Whatever the sample, the result is
the same: the sample only decides how much work the exact selection does.
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
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1

# Sampled bracket (see the module docstring). The sample is RUN consecutive entries per window;
# its size grows with the tensor between SAMPLE_MIN and SAMPLE_MAX (n / SAMPLE_DIV), at most a
# quarter of the tensor; a tensor of at most FULL_SAMPLE entries is sampled whole. Candidates
# are ~9 sigma of the sample rank wide, a fraction ~3.8 sqrt(q (1 - q) / m) of the tensor
# (q = k / n), and cost about 24 bytes each (written, sorted); a sampled entry costs about 16
# (W and F read, its key written and sorted): m ~ (3 n)^(2/3) balances the two, which these
# bounds follow (16Ki at 1M entries, 128Ki at 16M, 1Mi from 128M on): ~0.5 byte per entry or
# less for the tensors that matter (4096 x 4096 and up).
RUN = 8
_RUNS_PER_PROGRAM = 128
SAMPLE_MIN = 1 << 14
SAMPLE_MAX = 1 << 20
SAMPLE_DIV = 128
FULL_SAMPLE = 8 * RUN
_Z = 4.5  # bracket half-width in sample-rank standard deviations
_WIDEN = 4.0  # the second bracket's half-width, in first-bracket half-widths
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
    def _sample_kernel(
        w_ptr,
        f_ptr,
        key_ptr,
        n,
        runs,
        stride,
        span,
        c,
        eps,
        IS_FAPM: tl.constexpr,
        STORAGE: tl.constexpr,
        RUN_LEN: tl.constexpr,
        RUNS: tl.constexpr,
    ):
        """Keys of the sample: run r is the RUN_LEN entries from r * stride + hash(r) % span
        (stride == RUN_LEN and span == 1: every entry), stored at r * RUN_LEN + j."""
        pid = tl.program_id(0)
        j = tl.arange(0, RUNS * RUN_LEN)
        run = pid * RUNS + j // RUN_LEN
        r64 = run.to(tl.int64)
        # An integer hash of the run number (multipliers < 2^31: no int64 overflow).
        h = (r64 * 1540483477 + 12345) & 0xFFFFFFFF
        h = h ^ (h >> 15)
        h = (h * 668265261) & 0xFFFFFFFF
        h = h ^ (h >> 13)
        offs = (r64 * stride + h % span).to(tl.int32) + j % RUN_LEN
        ok = (run < runs) & (offs < n)
        _, _, _, _, _, _, key = _entries(w_ptr, f_ptr, offs, ok, c, eps, IS_FAPM, STORAGE)
        tl.store(key_ptr + run * RUN_LEN + j % RUN_LEN, key, mask=ok)

    @triton.jit
    def _scan_kernel(
        w_ptr,
        f_ptr,
        cnt_ptr,
        cand_ptr,
        ncand_ptr,
        n,
        c,
        eps,
        lo,
        hi,
        cap,
        IS_FAPM: tl.constexpr,
        STORAGE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """One tile: counts of key > hi, key == hi and key == lo (cnt_ptr, 3 per tile), and
        the entries with lo < key < hi appended to cand_ptr as key << 32 | (2^32 - 1 - index)
        at the slots the atomic counter ncand_ptr hands out (stored while below cap; the
        counter counts them all)."""
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        inb = offs < n
        _, _, _, _, _, _, key = _entries(w_ptr, f_ptr, offs, inb, c, eps, IS_FAPM, STORAGE)
        tl.store(cnt_ptr + pid * 3 + 0, tl.sum((inb & (key > hi)).to(tl.int32), axis=0))
        tl.store(cnt_ptr + pid * 3 + 1, tl.sum((inb & (key == hi)).to(tl.int32), axis=0))
        tl.store(cnt_ptr + pid * 3 + 2, tl.sum((inb & (key == lo)).to(tl.int32), axis=0))
        inside = (inb & (key > lo) & (key < hi)).to(tl.int32)
        count = tl.sum(inside, axis=0)
        if count > 0:
            base = tl.atomic_add(ncand_ptr, count)
            slot = base + tl.cumsum(inside, axis=0) - 1
            packed = (key.to(tl.int64) << 32) | (4294967295 - offs.to(tl.int64))
            tl.store(cand_ptr + slot, packed, mask=(inside != 0) & (slot < cap))

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
        cut,
        KEEP: tl.constexpr,
        IS_FAPM: tl.constexpr,
        STORAGE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """O = F's bits where kept, W's elsewhere, and the tile's statistics.

        KEEP: 0 nothing, 1 everything, 2 key >= t, 3 key > t or the first `need` ties at t in
        flat order (tie rank = ties in earlier tiles + inclusive cumsum inside the tile),
        4 key > t or (key == t and flat index <= cut).
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
        elif KEEP == 4:
            keep = inb & ((key > t) | ((key == t) & (offs <= cut)))
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


def _sample_plan(n: int) -> tuple[int, int, int, int]:
    """(runs, stride, span, m) of the sample of an n-entry tensor: run r is the RUN entries from
    r * stride + hash(r) % span; m = runs * RUN keys (all n when the tensor is tiny)."""
    if n <= FULL_SAMPLE:
        return -(-n // RUN), RUN, 1, n
    m = min(SAMPLE_MAX, max(SAMPLE_MIN, n // SAMPLE_DIV), n // 4)
    runs = max(1, m // RUN)
    stride = n // runs
    return runs, stride, stride - RUN + 1, runs * RUN


def _sample_rank(n: int, k: int, m: int) -> tuple[float, float]:
    """Where the k-th largest key is expected in the ascending sample of m keys, and the
    bracket's half-width there (sqrt(2): runs of neighbours are not independent draws)."""
    q = k / n
    return (n - k) * m / n, _Z * math.sqrt(2.0 * m * q * (1.0 - q)) + 4.0


def _keys_at(sorted_keys: torch.Tensor, ranks: list[int]) -> list[int]:
    """The sample keys at these ascending ranks (one transfer); below 0 the lowest int32, at m
    or above the highest (no entry has either bound's key strictly beyond it)."""
    m = sorted_keys.numel()
    idx = torch.tensor([min(max(r, 0), m - 1) for r in ranks], device=sorted_keys.device)
    got = sorted_keys[idx].tolist()
    return [
        _INT32_MIN if r < 0 else _INT32_MAX if r >= m else v
        for r, v in zip(ranks, got, strict=True)
    ]


def _bracket(sorted_keys: torch.Tensor, n: int, k: int) -> tuple[int, int, float]:
    """(lo, hi, expected entries strictly inside): lo <= t <= hi with high probability."""
    m = sorted_keys.numel()
    if m == n:  # the sample is the tensor: t exactly
        (t,) = _keys_at(sorted_keys, [n - k])
        return t, t, 0.0
    pos, delta = _sample_rank(n, k, m)
    li, hi_i = math.floor(pos - delta), math.ceil(pos + delta)
    lo, hi = _keys_at(sorted_keys, [li, hi_i])
    return lo, hi, (min(hi_i, m) - max(li, -1) - 1) * n / m


def _rebracket(sorted_keys: torch.Tensor, n: int, k: int, lo: int, hi: int, high: bool):
    """The second bracket after the first missed: t is above hi (`high`) or below lo. The old
    bound becomes the new near bound; the far one is _WIDEN times as far in the sample."""
    m = sorted_keys.numel()
    pos, delta = _sample_rank(n, k, m)
    if high:
        (v,) = _keys_at(sorted_keys, [math.ceil(pos + _WIDEN * delta)])
        return hi, (v if v > hi else _INT32_MAX)
    (v,) = _keys_at(sorted_keys, [math.floor(pos - _WIDEN * delta)])
    return (v if v < lo else _INT32_MIN), lo


def _max_capacity(n: int) -> int:
    """At most max(64Ki, n / 16) candidates (an int64 each: n / 2 bytes, a quarter of a bf16
    tensor; sorting more would cost about as much as the radix select's passes)."""
    return max(1 << 16, n // 16)


def _capacity(expected: float, n: int) -> int:
    """Candidate slots for an expected count: 1.5x plus six sigma plus a constant."""
    cap = int(1.5 * expected + 6.0 * math.sqrt(max(expected, 0.0)) + 1024)
    return max(1, min(cap, n, _max_capacity(n)))


def _exclusive_cumsum(counts: torch.Tensor) -> torch.Tensor:
    return (torch.cumsum(counts, 0, dtype=torch.int32) - counts).contiguous()


class _Run:
    """What one `triton_prune` call does on the device (shared by its helpers)."""

    def __init__(self, wb, fb, n, tiles, c, is_fapm, storage, block, programs, opts, record):
        self.wb, self.fb, self.n, self.tiles, self.c = wb, fb, n, tiles, c
        self.is_fapm, self.storage, self.block, self.programs = is_fapm, storage, block, programs
        self.opts = opts
        self.dev = wb.device
        self.es = wb.element_size()
        self.record = record  # the `info` dict: path, passes, bytes moved

    def moved(self, name: str, nbytes: int) -> None:
        self.record["passes"].append(name)
        self.record["bytes"] += int(nbytes)

    def sample(self) -> torch.Tensor:
        """The sorted keys of the sample."""
        runs, stride, span, m = _sample_plan(self.n)
        keys = torch.empty(m, dtype=torch.int32, device=self.dev)
        _sample_kernel[(-(-runs // _RUNS_PER_PROGRAM),)](
            self.wb,
            self.fb,
            keys,
            self.n,
            runs,
            stride,
            span,
            self.c,
            _EPS32,
            IS_FAPM=self.is_fapm,
            STORAGE=self.storage,
            RUN_LEN=RUN,
            RUNS=_RUNS_PER_PROGRAM,
            **self.opts,
        )
        # W and F of m entries, the keys out; the sort counted as one read and one write.
        self.moved("sample", m * (2 * self.es + 4) + 2 * 4 * m)
        return torch.sort(keys).values

    def scan(self, lo: int, hi: int, cap: int):
        """The fused pass: per-tile counts (key > hi, == hi, == lo), totals, and candidates."""
        cnt = torch.empty((self.tiles, 3), dtype=torch.int32, device=self.dev)
        cand = torch.empty(cap, dtype=torch.int64, device=self.dev)
        ncand = torch.zeros(1, dtype=torch.int32, device=self.dev)
        _scan_kernel[(self.tiles,)](
            self.wb,
            self.fb,
            cnt,
            cand,
            ncand,
            self.n,
            self.c,
            _EPS32,
            lo,
            hi,
            cap,
            IS_FAPM=self.is_fapm,
            STORAGE=self.storage,
            BLOCK=self.block,
            **self.opts,
        )
        above, at_hi, at_lo, inside = torch.cat(
            [cnt.sum(0, dtype=torch.int64), ncand.to(torch.int64)]
        ).tolist()
        self.moved("scan", 2 * self.es * self.n + 8 * min(inside, cap) + 12 * self.tiles)
        return cnt, cand, above, at_hi, at_lo, inside

    def sampled_select(self, k: int, cap_override: int | None):
        """(KEEP, t, need, cut, tie_base) of the write pass from the sampled bracket, or None
        when the radix select must decide (the bracket missed twice, or the candidates
        needed did not fit)."""
        n = self.n
        sorted_keys = self.sample()
        lo, hi, expected = _bracket(sorted_keys, n, k)
        cap = _capacity(expected, n)
        for attempt in (1, 2):
            if cap_override is not None:
                cap = max(1, cap_override)
            self.record["brackets"].append((lo, hi))
            cnt, cand, above, at_hi, at_lo, inside = self.scan(lo, hi, cap)
            if lo == hi:  # one key: "inside" is empty and "== lo" is "== hi"
                at_lo = inside = 0
            self.record["candidates"] = inside
            if k <= above:  # t above hi
                outside, high = above, True
            elif k <= above + at_hi:
                return self._tie_split(hi, k - above, at_hi, cnt[:, 1])
            elif k <= above + at_hi + inside:
                if inside > cap:
                    self.record["fallback"] = "candidates overflowed"
                    return None
                return self._from_candidates(cand[:inside], k - above - at_hi)
            elif k <= above + at_hi + inside + at_lo:
                return self._tie_split(lo, k - above - at_hi - inside, at_lo, cnt[:, 2])
            else:  # t below lo
                outside, high = n - (above + at_hi + inside + at_lo), False
            if attempt == 2:
                break
            lo, hi = _rebracket(sorted_keys, n, k, lo, hi, high)
            # Only the `outside` entries beyond the old bound can be inside the new bracket.
            cap = max(1, min(outside, _max_capacity(n)))
        self.record["fallback"] = "bracket missed twice"
        return None

    def _tie_split(self, t: int, need: int, ties: int, eq: torch.Tensor):
        if need == ties:  # the whole tie group is kept
            return 2, t, need, -1, None
        return 3, t, need, -1, _exclusive_cumsum(eq)

    def _from_candidates(self, cand: torch.Tensor, r: int):
        """The r-th largest candidate: its key is t, its index the last kept tie at t."""
        size = cand.numel()
        v = int(torch.sort(cand).values[size - r])
        self.moved("sort candidates", 2 * 8 * size)
        t, cut = v >> 32, 0xFFFFFFFF - (v & 0xFFFFFFFF)
        return 4, t, 0, cut, None

    def radix_select(self, k: int):
        """(KEEP, t, need, cut, tie_base) from the radix-histogram select (the fallback)."""
        need = k  # how many of the entries inside the current key range are kept
        lo_u, span_bits = 0, 32  # current range of unsigned keys: [lo_u, lo_u + 2^span_bits)
        hist = torch.empty(NBINS, dtype=torch.int32, device=self.dev)
        keep_mode = 3
        for pass_no, (shift, dbits) in enumerate(DIGITS):
            hist.zero_()
            hi_u = lo_u + (1 << span_bits) - 1
            _hist_kernel[(self.programs,)](
                self.wb,
                self.fb,
                hist,
                self.n,
                self.tiles,
                self.c,
                _EPS32,
                _to_signed(lo_u),
                _to_signed(hi_u),
                SHIFT=shift,
                DBITS=dbits,
                RESTRICT=pass_no > 0,
                IS_FAPM=self.is_fapm,
                STORAGE=self.storage,
                BLOCK=self.block,
                NB=NBINS,
                **self.opts,
            )
            self.moved(f"histogram {pass_no + 1}", 2 * self.es * self.n)
            counts = hist.cpu().numpy().astype(np.int64)[: 1 << dbits]
            b, above = _choose_bin(counts, need)
            need -= above
            lo_u, span_bits = lo_u + (b << shift), shift
            if counts[b] == need:  # the whole bin is kept: no deeper pass, no tie split
                keep_mode = 2
                break
        t = _to_signed(lo_u)  # after the last pass the range is the single key t
        tie_base = None
        if keep_mode == 3:  # t's tie group is split: rank its members by flat index
            eq = torch.empty(self.tiles, dtype=torch.int32, device=self.dev)
            _tie_count_kernel[(self.tiles,)](
                self.wb,
                self.fb,
                eq,
                self.n,
                self.c,
                _EPS32,
                t,
                IS_FAPM=self.is_fapm,
                STORAGE=self.storage,
                BLOCK=self.block,
                **self.opts,
            )
            self.moved("tie count", 2 * self.es * self.n)
            tie_base = _exclusive_cumsum(eq)
        return keep_mode, t, need, -1, tie_base


def triton_prune(
    method: str,
    w: torch.Tensor,
    f: torch.Tensor,
    k: int,
    alpha: float,
    out: torch.Tensor,
    block: int | None = None,
    programs: int | None = None,
    *,
    select: str = "sampled",
    info: dict | None = None,
    _cap: int | None = None,
) -> TensorStats:
    """Tensor-scope top-k pruning of F - W into `out` (F where kept, W elsewhere), bit-exact.

    `w`, `f`, `out`: contiguous, same dtype (bf16, fp16, fp32) and shape, on one device (CUDA,
    or CPU under the interpreter). `block` (a power of two) is the tile size; `programs` caps
    the radix histogram passes' grid (each program loops over tiles); `select` is "sampled"
    (the sampled bracket, with the radix select as its fallback) or "radix" (the radix select
    alone). None of them changes the result, only the work. `info`, a dict, is filled with
    what was done: `path` ("none", "all", "sampled", "rebracketed", "radix"), `passes`, `bytes`
    (device-memory bytes the passes read and wrote), `brackets`, `candidates`, and `fallback`
    (why the radix select ran, when it did). `_cap` forces the candidate capacity (tests).
    Returns the tensor's statistics (the same as the torch path's `delta_stats`).
    """
    if method not in ("fapm", "magnitude"):
        raise ValueError(f"triton_prune: unsupported method {method!r} (fapm, magnitude)")
    if select not in ("sampled", "radix"):
        raise ValueError(f"triton_prune: unknown select {select!r} (sampled, radix)")
    if not HAVE_TRITON:
        raise RuntimeError("triton_prune: triton is not installed")
    _check(w, f, out)
    record = info if info is not None else {}
    record.update(path="none", passes=[], bytes=0, brackets=[], candidates=0, fallback=None)
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
    run = _Run(wb, fb, n, tiles, 0.0, is_fapm, storage, block, programs, opts, record)
    if is_fapm:
        parts = torch.empty(tiles, dtype=torch.float64, device=dev)
        _abs_sum_kernel[(tiles,)](wb, parts, n, STORAGE=storage, BLOCK=block, **opts)
        run.moved("abs sum", run.es * n)
        # As methods/fapm.py: float64 mean, times alpha in float64, rounded once to float32.
        mean_abs = float(parts.sum()) / n
        run.c = float(np.float32(alpha * mean_abs))

    keep_mode, t, need, cut, tie_base = (0 if k == 0 else 1), 0, 0, -1, None
    record["path"] = "none" if k == 0 else "all"
    if 0 < k < n:
        chosen = run.sampled_select(k, _cap) if select == "sampled" else None
        if chosen is not None:
            record["path"] = "sampled" if len(record["brackets"]) == 1 else "rebracketed"
        else:
            record["path"] = "radix"
            chosen = run.radix_select(k)
        keep_mode, t, need, cut, tie_base = chosen
    if tie_base is None:
        tie_base = torch.zeros(1, dtype=torch.int32, device=dev)

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
        run.c,
        _EPS32,
        t,
        need,
        cut,
        KEEP=keep_mode,
        IS_FAPM=is_fapm,
        STORAGE=storage,
        BLOCK=block,
        **opts,
    )
    run.moved("write", 3 * run.es * n + (5 * 4 + 4 * 8) * tiles)
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

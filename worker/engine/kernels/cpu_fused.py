"""Fused CPU kernel for tensor-scope `fapm` / `magnitude` pruning (numba, bit-exact to the torch path).

`fused_prune` gives the same output bytes as

    keep = top_k_mask(order_keys(scores).view(1, -1), k)      # select.py
    out = compose_output(w, f, keep, 1.0, f.dtype)            # compose.py

and the same `delta_stats`, without any per-entry temporary. How (PERFORMANCE.md):

1. fapm only: sum |W| in float64 (fixed chunks, partial sums combined exactly) -> c.
2. Score a sample (runs of 8 neighbours in 16Ki hashed windows; every entry when the tensor is
   small), sort its order keys and bracket the k-th key: lo <= t <= hi w.h.p. (+-4.5 sigma of
   the sample rank). When lo == hi the sample also says on which side of the tie split most of
   that tie group falls.
3. One fused pass over blocks of 1024 (vectorised float32, L1-resident block buffers): score,
   the full-update statistics, and the provisional output: F where key >= hi (or > hi), W
   elsewhere. Entries strictly inside (lo, hi) are collected (key, offset, |D|, F bits) into
   per-chunk buffers; entries equal to lo and to hi are only counted per chunk.
4. From the counts: t is hi, lo, or inside (then a histogram select over the candidates finds
   it); the index `cut` of the last kept tie at t comes from the per-chunk tie counts and one
   chunk rescan. The final rule is keep = key > t or (key == t and index <= cut).
5. Patch: kept candidates get F (only `out` is touched); chunks where the provisional output can
   be wrong beyond the candidates (the tie group at lo or hi on the wrong side of the cut, or a
   candidate buffer that overflowed) are recomputed whole with the final rule. If the bracket
   missed t altogether, everything is decided again by histogram passes (slower, same result).

Keys are the unsigned form of `select.order_keys` (int32 key ^ 0x80000000): NaN -> 0, -0.0 and
+0.0 -> 0x80000000. Floating point is IEEE (no fastmath) wherever a score is computed; only the
statistics' sums are reassociated (float64 sums of exact terms, float32 counts of 0/1 terms).
Work is split into fixed 64Ki-entry chunks, so results do not depend on the thread count.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from worker.engine.compose import TensorStats, delta_stats
from worker.io.resident import MappedPages

try:  # numba is optional: callers fall back to the torch path when it is missing.
    from llvmlite import ir as _llvm_ir
    from numba import njit, prange, types
    from numba.extending import intrinsic, overload

    _HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only without numba
    _HAVE_NUMBA = False

_CHUNK = 1 << 16  # entries per chunk (fixed: results are independent of the thread count)
_BLOCK = 1024  # entries per inner block (small buffers stay in L1)
_SAMPLE = 1 << 17  # sampled entries used to bracket the k-th key
_RUN = 8  # consecutive entries per sampled window
_GROUPS = 8  # histogram copies in the resolution sweeps
_MAX_KEY = 0xFFFFFFFF
_Z = 4.5  # bracket half-width in sample-rank standard deviations

# storage dtype -> (torch view dtype, numpy dtype that selects the decoder inside the kernels)
_VIEWS = {
    torch.bfloat16: (torch.int16, np.uint16),
    torch.float16: (torch.int16, np.int16),
    torch.float32: (torch.int32, np.uint32),
}


def fused_available() -> bool:
    """True when the numba kernel can run here."""
    return _HAVE_NUMBA


if _HAVE_NUMBA:
    _EPS32 = np.float32(1e-12)
    _INF32 = np.float32(np.inf)
    _ZERO32 = np.float32(0.0)
    _TWO_M24 = np.float32(2.0**-24)

    # ---------------------------------------------------------------------------------------
    # scalar helpers (inlined by LLVM)
    # ---------------------------------------------------------------------------------------

    @intrinsic
    def _u2f(typingctx, x):
        """Bit-cast uint32 -> float32."""
        if x != types.uint32:
            return None
        sig = types.float32(types.uint32)

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], _llvm_ir.FloatType())

        return sig, codegen

    @intrinsic
    def _f2u(typingctx, x):
        """Bit-cast float32 -> uint32."""
        if x != types.float32:
            return None
        sig = types.uint32(types.float32)

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], _llvm_ir.IntType(32))

        return sig, codegen

    def _to_f32(x):  # pragma: no cover - replaced by the overload inside numba
        raise NotImplementedError

    @overload(_to_f32, jit_options={"fastmath": False})
    def _to_f32_impl(x):
        """Stored bits -> float32: uint16 is bfloat16, int16 is float16, uint32 is float32."""
        if x == types.uint16:

            def bf16(x):
                return _u2f(np.uint32(np.uint32(x) << np.uint32(16)))

            return bf16
        if x == types.int16:

            def fp16(x):
                h = np.int64(x) & 0xFFFF
                sign = (h & 0x8000) << 16
                e = (h >> 10) & 0x1F
                mant = h & 0x3FF
                if e == 0:  # zero / subnormal: mant * 2^-24 exactly
                    bits = np.int64(_f2u(np.float32(mant) * _TWO_M24))
                elif e == 31:  # inf / nan (payload kept)
                    bits = 0x7F800000 | (mant << 13)
                else:
                    bits = ((e + 112) << 23) | (mant << 13)
                return _u2f(np.uint32(bits | sign))

            return fp16
        if x == types.uint32:

            def fp32(x):
                return _u2f(x)

            return fp32
        return None

    def _is_zero(x):  # pragma: no cover - replaced by the overload inside numba
        raise NotImplementedError

    def _is_nonfinite(x):  # pragma: no cover - replaced by the overload inside numba
        raise NotImplementedError

    def _masks(x):
        """(magnitude mask, exponent mask) of the stored bits, by storage type."""
        if x == types.uint16:
            return 0x7FFF, 0x7F80
        if x == types.int16:
            return 0x7FFF, 0x7C00
        if x == types.uint32:
            return 0x7FFFFFFF, 0x7F800000
        return None

    @overload(_is_zero)
    def _is_zero_impl(x):
        masks = _masks(x)
        if masks is None:
            return None
        mag = masks[0]

        def impl(x):
            return (np.int64(x) & mag) == 0

        return impl

    @overload(_is_nonfinite)
    def _is_nonfinite_impl(x):
        masks = _masks(x)
        if masks is None:
            return None
        ex = masks[1]

        def impl(x):
            return (np.int64(x) & ex) == ex

        return impl

    def _score(a, wf, d, c):  # pragma: no cover - replaced by the overload inside numba
        raise NotImplementedError

    @overload(_score, jit_options={"fastmath": False})
    def _score_impl(a, wf, d, c):
        """magnitude (c is None): S = a.  fapm: S = a - (c * a) / max(|W|, 1e-12), 0 where D == 0."""
        if isinstance(c, types.NoneType):

            def magnitude(a, wf, d, c):
                return a

            return magnitude

        def fapm(a, wf, d, c):
            aw = abs(wf)
            m = _EPS32 if aw < _EPS32 else aw  # torch.maximum: NaN propagates
            s = a - (c * a) / m
            return _ZERO32 if d == 0 else s

        return fapm

    @njit(nogil=True, cache=True)
    def _key(s):
        """Order key of a float32 score as int64 in [0, 2^32): NaN 0, -0.0 == +0.0."""
        bits = np.int64(_f2u(s))
        if s == 0:
            bits = 0
        neg = bits >> 31
        key = bits ^ (0x80000000 | (neg * 0x7FFFFFFF))
        if s != s:
            key = 0
        return key

    @njit(nogil=True, cache=True)
    def _key_at(wb, fb, i, c):
        wf = _to_f32(wb[i])
        d = _to_f32(fb[i]) - wf
        return _key(_score(abs(d), wf, d, c))

    @njit(nogil=True, cache=True)
    def _delta_abs(wb, fb, i):
        return abs(_to_f32(fb[i]) - _to_f32(wb[i]))

    # ---------------------------------------------------------------------------------------
    # statistics: the only reassociated code (sums of exact terms, whose order is free)
    # ---------------------------------------------------------------------------------------

    @njit(nogil=True, cache=True, fastmath={"reassoc"})
    def _abs_sum_range(wb, s, e):
        x = wb[s:e]  # 0-based loop: no negative-index wraparound, so LLVM vectorises
        acc = 0.0
        for j in range(x.shape[0]):
            acc += np.float64(abs(_to_f32(x[j])))
        return acc

    @njit(nogil=True, cache=True, fastmath={"reassoc"})
    def _block_counts(wblk, sbuf, abuf, length, th):
        """Counts of one block: (provisionally kept, strictly inside (lo, hi), key == hi,
        key == lo, D != 0, provisionally kept and D != 0, W == 0).

        float32 sums of 0/1 terms: exact in any order (< 2^24 terms), so they may be
        reassociated, and they vectorise 8 wide. (`np.float32(flag)`, not `1.0 if flag else
        0.0`, and a constant trip count: both matter 2-3x to LLVM here.)
        """
        p_f, lo_f, hi_f = th
        kp = np.float32(0.0)
        inr = np.float32(0.0)
        ehi = np.float32(0.0)
        elo = np.float32(0.0)
        nz = np.float32(0.0)
        knz = np.float32(0.0)
        wz = np.float32(0.0)
        if length == _BLOCK:
            for j in range(_BLOCK):
                sc = sbuf[j]
                keep = sc > p_f
                nzj = abuf[j] != 0
                kp += np.float32(keep)
                inr += np.float32((sc > lo_f) & (sc < hi_f))
                ehi += np.float32(sc == hi_f)
                elo += np.float32(sc == lo_f)
                nz += np.float32(nzj)
                knz += np.float32(keep & nzj)
                wz += np.float32(_is_zero(wblk[j]))
        else:
            for j in range(length):
                sc = sbuf[j]
                keep = sc > p_f
                nzj = abuf[j] != 0
                kp += np.float32(keep)
                inr += np.float32((sc > lo_f) & (sc < hi_f))
                ehi += np.float32(sc == hi_f)
                elo += np.float32(sc == lo_f)
                nz += np.float32(nzj)
                knz += np.float32(keep & nzj)
                wz += np.float32(_is_zero(wblk[j]))
        return (
            np.int64(kp),
            np.int64(inr),
            np.int64(ehi),
            np.int64(elo),
            np.int64(nz),
            np.int64(knz),
            np.int64(wz),
        )

    @njit(nogil=True, cache=True, fastmath={"reassoc"})
    def _block_sums(sbuf, abuf, length, p_f):
        """float64 sums of |D| and |D|^2 over one block, all and provisionally kept, with NaN /
        inf |D| left out, and the count of those. The terms are exact; only the order of the
        sums is free."""
        inf = np.float32(np.inf)
        zero = np.float32(0.0)
        l1 = 0.0
        l2 = 0.0
        l1k = 0.0
        l2k = 0.0
        bad = np.float32(0.0)
        if length == _BLOCK:
            for j in range(_BLOCK):
                a32 = abuf[j]
                finite = a32 < inf
                bad += np.float32(not finite)
                a32 = a32 if finite else zero
                a = np.float64(a32)
                ak = np.float64(a32 if sbuf[j] > p_f else zero)
                l1 += a
                l2 += a * a
                l1k += ak
                l2k += ak * ak
        else:
            for j in range(length):
                a32 = abuf[j]
                finite = a32 < inf
                bad += np.float32(not finite)
                a32 = a32 if finite else zero
                a = np.float64(a32)
                ak = np.float64(a32 if sbuf[j] > p_f else zero)
                l1 += a
                l2 += a * a
                l1k += ak
                l2k += ak * ak
        return l1, l2, l1k, l2k, np.int64(bad)

    @njit(nogil=True, cache=True)
    def _count_nonfinite(wblk, fblk, length):
        """Non-finite W and F entries of a block (only run where some |D| is not finite: a
        non-finite W or F always gives a non-finite D)."""
        nf = 0
        for j in range(length):
            nf += _is_nonfinite(wblk[j]) + _is_nonfinite(fblk[j])
        return nf

    # ---------------------------------------------------------------------------------------
    # passes
    # ---------------------------------------------------------------------------------------

    @njit(parallel=True, nogil=True, cache=True)
    def _abs_sum_parts(wb, nchunks):
        n = wb.shape[0]
        parts = np.empty(nchunks, np.float64)
        for ch in prange(nchunks):
            s = ch * _CHUNK
            parts[ch] = _abs_sum_range(wb, s, min(n, s + _CHUNK))
        return parts

    @njit(nogil=True, cache=True)
    def _sample_keys(wb, fb, c, stride, w0, w1, keys):
        """Sampled keys into `keys`: every entry's when stride is 1, else runs of _RUN
        consecutive entries, one run per window of `stride` entries at a hashed offset (a run
        shares cache lines: m / _RUN memory accesses, not m), for windows w0 .. w1 - 1 (window
        `win` reads entries [win * stride, (win + 1) * stride) only)."""
        if stride == 1:
            for i in range(keys.shape[0]):
                keys[i] = np.uint32(_key_at(wb, fb, i, c))
            return
        for win in range(w0, w1):
            h = (win * np.int64(2654435761) + np.int64(12345)) & np.int64(0xFFFFFFFF)
            h ^= h >> 15
            h = (h * np.int64(2246822519)) & np.int64(0xFFFFFFFF)
            h ^= h >> 13
            i0 = win * stride + h % (stride - _RUN + 1)
            for r in range(_RUN):
                keys[win * _RUN + r] = np.uint32(_key_at(wb, fb, i0 + r, c))

    @njit(nogil=True, cache=True)
    def _radix_sort(a):
        m = a.shape[0]
        src = a.copy()
        dst = np.empty_like(a)
        for shift in (0, 11, 22):
            cnt = np.zeros(2049, np.int64)
            for i in range(m):
                cnt[((np.int64(src[i]) >> shift) & 2047) + 1] += 1
            for b in range(2048):
                cnt[b + 1] += cnt[b]
            for i in range(m):
                b = (np.int64(src[i]) >> shift) & 2047
                dst[cnt[b]] = src[i]
                cnt[b] += 1
            src, dst = dst, src
        return src

    @njit(nogil=True, cache=True, inline="always")
    def _score_terms(wv, fv, c):
        """One entry: (score, |D|) (numba-inlined into the loops below)."""
        wf = _to_f32(wv)
        d = _to_f32(fv) - wf
        a = abs(d)
        return _score(a, wf, d, c), a

    @njit(nogil=True, cache=True)
    def _block_scores(wblk, fblk, oblk, sbuf, abuf, ibuf, length, c, th):
        """Scores and |D| of one block into sbuf / abuf, "strictly inside (lo, hi)" flags into
        ibuf, and the provisional output: F where the score is above p_f."""
        p_f, lo_f, hi_f = th
        # (No constant-trip-count copy of this loop: with its stores LLVM leaves that one
        # scalar, while this one is vectorised behind runtime alias checks.)
        for j in range(length):
            sc, a = _score_terms(wblk[j], fblk[j], c)
            oblk[j] = fblk[j] if sc > p_f else wblk[j]
            sbuf[j] = sc
            abuf[j] = a
            ibuf[j] = np.uint8((sc > lo_f) & (sc < hi_f))

    @njit(parallel=True, nogil=True, cache=True)
    def _scan(wb, fb, out, c, th, cap, cand, cnts, st_i, st_f):
        """The fused pass (see the module docstring, step 3).

        Per chunk: cnts = (provisionally kept, inside (lo, hi), key == hi, key == lo); st_i =
        (provisionally kept, D != 0, provisionally kept and D != 0, W == 0, non-finite W and
        F); st_f = (l1, l2sq, l1 kept, l2sq kept) with "kept" provisional. The comparisons
        with the key bounds are float32 score comparisons (`_thresholds`), so the hot loops stay
        float32 and vectorise 8 wide; keys are formed for the collected candidates only.
        """
        n = wb.shape[0]
        nchunks = cnts.shape[0]
        cand_key, cand_off, cand_a, cand_f = cand
        for ch in prange(nchunks):
            s = ch * _CHUNK
            e = min(n, s + _CHUNK)
            sbuf = np.empty(_BLOCK, np.float32)
            abuf = np.empty(_BLOCK, np.float32)
            ibuf = np.zeros(_BLOCK, np.uint8)
            iwords = ibuf.view(np.uint64)
            kp = 0
            inr = 0
            ehi = 0
            elo = 0
            nz = 0
            knz = 0
            wz = 0
            nf = 0
            l1 = 0.0
            l2 = 0.0
            l1k = 0.0
            l2k = 0.0
            base = ch * cap
            nc = 0
            for b0 in range(s, e, _BLOCK):
                length = min(_BLOCK, e - b0)
                wblk = wb[b0 : b0 + length]
                fblk = fb[b0 : b0 + length]
                oblk = out[b0 : b0 + length]
                _block_scores(wblk, fblk, oblk, sbuf, abuf, ibuf, length, c, th)
                r = _block_counts(wblk, sbuf, abuf, length, th)
                kp += r[0]
                binr = r[1]
                inr += binr
                ehi += r[2]
                elo += r[3]
                nz += r[4]
                knz += r[5]
                wz += r[6]
                q = _block_sums(sbuf, abuf, length, th[0])
                l1 += q[0]
                l2 += q[1]
                l1k += q[2]
                l2k += q[3]
                if q[4] > 0:
                    nf += _count_nonfinite(wblk, fblk, length)
                if binr > 0 and nc < cap:  # collect: skip 8 flags at a time
                    for w8 in range((length + 7) // 8):
                        if iwords[w8] != 0:
                            for j in range(8 * w8, min(8 * w8 + 8, length)):
                                if ibuf[j] != 0 and nc < cap:
                                    cand_key[base + nc] = np.uint32(_key(sbuf[j]))
                                    cand_off[base + nc] = b0 + j - s
                                    cand_a[base + nc] = abuf[j]
                                    cand_f[base + nc] = fblk[j]
                                    nc += 1
            cnts[ch, 0] = kp
            cnts[ch, 1] = inr
            cnts[ch, 2] = ehi
            cnts[ch, 3] = elo
            st_i[ch, 0] = kp
            st_i[ch, 1] = nz
            st_i[ch, 2] = knz
            st_i[ch, 3] = wz
            st_i[ch, 4] = nf
            st_f[ch, 0] = l1
            st_f[ch, 1] = l2
            st_f[ch, 2] = l1k
            st_f[ch, 3] = l2k

    @njit(parallel=True, nogil=True, cache=True)
    def _sweep(wb, fb, c, lo, hi, shift, nbins, cap, cand_key, cnt_in, recomp):
        """Histogram of (key - lo) >> shift over the keys in [lo, hi]: from the candidate
        buffers, or recomputed for the chunks marked in `recomp` (their buffer overflowed, or
        there are no candidates). With nbins == 0: per-chunk counts of key == lo instead."""
        n = wb.shape[0]
        nchunks = cnt_in.shape[0]
        per_chunk = nbins == 0
        groups = nchunks if per_chunk else min(_GROUPS, nchunks)
        hist = np.zeros((groups, max(nbins, 1)), np.int64)
        for g in prange(groups):
            for ch in range(g * nchunks // groups, (g + 1) * nchunks // groups):
                if recomp[ch]:
                    for i in range(ch * _CHUNK, min(n, (ch + 1) * _CHUNK)):
                        key = _key_at(wb, fb, i, c)
                        if key >= lo and key <= hi:
                            hist[g, (key - lo) >> shift] += 1
                else:
                    base = ch * cap
                    for j in range(cnt_in[ch]):
                        key = np.int64(cand_key[base + j])
                        if key >= lo and key <= hi:
                            hist[g, (key - lo) >> shift] += 1
        if per_chunk:
            return hist[:, 0].copy()
        total = np.zeros(nbins, np.int64)
        for g in range(groups):
            total += hist[g]
        return total

    @njit(nogil=True, cache=True)
    def _find_cut(wb, fb, c, ch, t, r):
        """Flat index of the r-th (1-based) entry with key == t in chunk ch."""
        n = wb.shape[0]
        for i in range(ch * _CHUNK, min(n, (ch + 1) * _CHUNK)):
            if _key_at(wb, fb, i, c) == t:
                r -= 1
                if r == 0:
                    return i
        return -1

    @njit(parallel=True, nogil=True, cache=True)
    def _patch(wb, fb, out, c, t, cut, cap, cand, cnt_in, recomp, pk):
        """The final rule, keep key > t or (key == t and index <= cut), where the provisional
        output can differ from it.

        Chunks marked in `recomp` are recomputed whole: their output and their kept
        statistics, which replace the scan's. Elsewhere only the collected candidates can
        change: kept ones get F (they carry their F bits and |D|, so only `out` is touched),
        and their statistics add to the scan's. pk: per chunk (kept, kept_nonzero, l1_kept,
        l2sq_kept).
        """
        n = wb.shape[0]
        nchunks = cnt_in.shape[0]
        cand_key, cand_off, cand_a, cand_f = cand
        for ch in prange(nchunks):
            s = ch * _CHUNK
            kept = 0
            knz = 0
            l1k = 0.0
            l2k = 0.0
            if recomp[ch]:
                for i in range(s, min(n, s + _CHUNK)):
                    key = _key_at(wb, fb, i, c)
                    if key > t or (key == t and i <= cut):
                        out[i] = fb[i]
                        a = _delta_abs(wb, fb, i)
                        kept += 1
                        knz += a != 0
                        if a < _INF32:
                            a64 = np.float64(a)
                            l1k += a64
                            l2k += a64 * a64
                    else:
                        out[i] = wb[i]
            else:
                base = ch * cap
                for j in range(cnt_in[ch]):
                    key = np.int64(cand_key[base + j])
                    i = s + np.int64(cand_off[base + j])
                    if key > t or (key == t and i <= cut):
                        out[i] = cand_f[base + j]
                        a = cand_a[base + j]
                        kept += 1
                        knz += a != 0
                        if a < _INF32:
                            a64 = np.float64(a)
                            l1k += a64
                            l2k += a64 * a64
            pk[ch, 0] = kept
            pk[ch, 1] = knz
            pk[ch, 2] = l1k
            pk[ch, 3] = l2k


def _bits_view(t: torch.Tensor) -> np.ndarray:
    view_dtype, np_dtype = _VIEWS[t.dtype]
    return t.view(view_dtype).numpy().reshape(-1).view(np_dtype)


def _no_candidates(dtype: np.dtype) -> tuple[np.ndarray, ...]:
    return (
        np.zeros(1, np.uint32),
        np.zeros(1, np.int32),
        np.zeros(1, np.float32),
        np.zeros(1, dtype),
    )


def _check(w: torch.Tensor, f: torch.Tensor, out: torch.Tensor) -> None:
    if w.dtype not in _VIEWS:
        raise ValueError(f"fused_prune: unsupported dtype {w.dtype}")
    for name, t in (("f", f), ("out", out)):
        if t.dtype != w.dtype or t.shape != w.shape:
            raise ValueError(
                f"fused_prune: {name} is {t.dtype}{tuple(t.shape)}, w is {w.dtype}{tuple(w.shape)}"
            )
    for name, t in (("w", w), ("f", f), ("out", out)):
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"fused_prune: {name} must be a contiguous CPU tensor")


_KEY_NEG_INF = 0x007FFFFF  # keys of the non-NaN float32 scores: [key(-inf), key(+inf)]
_KEY_POS_INF = 0xFF800000


def _key_value(key: int, upper: bool) -> np.float32:
    """The float32 score whose order key is `key` (a non-NaN key).

    0x7FFFFFFF would be -0.0, which never is a key (zeros are +0.0); as an upper bound it means
    "below +0.0", i.e. the largest negative float32.
    """
    if upper and key == 0x7FFFFFFF:
        key = 0x7FFFFFFE
    bits = key ^ 0x80000000 if key >= 0x80000000 else ~key & 0xFFFFFFFF
    return np.array([bits], np.uint32).view(np.float32)[0]


def _thresholds(lo: int, hi: int, ge: bool) -> tuple[np.float32, np.float32, np.float32]:
    """(p_f, lo_f, hi_f) for the scan, lo and hi keys of non-NaN scores.

    Provisionally kept: `s > p_f`, i.e. key > hi, or key >= hi with `ge`. Inside: lo_f < s <
    hi_f is lo < key < hi; s == hi_f is key == hi (-0.0 == +0.0 as in the keys; NaN, key 0, is
    never equal nor inside).
    """
    if not _KEY_NEG_INF <= lo <= hi <= _KEY_POS_INF:
        raise AssertionError(f"bad key bracket {lo}, {hi}")
    p_f = _key_value(hi - 1 if ge else hi, upper=True)
    return p_f, _key_value(lo, upper=False), _key_value(hi, upper=True)


def _bracket(keys: np.ndarray, n: int, k: int, stride: int) -> tuple[int, int, bool, float]:
    """From the sorted sample keys: (lo, hi) holding the k-th largest key with high
    probability, whether ties at hi are provisionally kept (`ge`), and the expected number of
    entries strictly inside (lo, hi)."""
    m = keys.shape[0]
    if stride == 1:  # the sample is the tensor: the k-th key exactly
        lo = hi = int(keys[n - k])
    else:
        q = k / n
        pos = (n - k) * m / n
        # sqrt(2): runs of neighbouring entries are not independent draws
        delta = _Z * math.sqrt(2.0 * m * q * (1.0 - q)) + 4.0
        li, hi_i = math.floor(pos - delta), math.ceil(pos + delta)
        lo = int(keys[li]) if li >= 0 else 0
        hi = int(keys[hi_i]) if hi_i < m else _KEY_POS_INF
    # The NaN key cannot be a float bound: clamp (the bracket check catches a NaN k-th key).
    lo = min(max(lo, _KEY_NEG_INF), _KEY_POS_INF)
    hi = min(max(hi, _KEY_NEG_INF), _KEY_POS_INF)
    below_hi = int(np.searchsorted(keys, hi, "left"))
    above_hi = m - int(np.searchsorted(keys, hi, "right"))
    inside = below_hi - int(np.searchsorted(keys, lo, "right"))
    ge = True
    if lo == hi:  # one tie group: keep it provisionally if most of it is likely kept
        ties = m - above_hi - below_hi
        ge = ties > 0 and (k * m / n - above_hi) / ties >= 0.5
    if hi == _KEY_NEG_INF:  # "key >= key(-inf)" is not a float comparison
        ge = False
    return lo, hi, ge, max(inside, 0) * n / m


def _candidate_cap(per_chunk: float, n: int, nchunks: int) -> int:
    """Candidate buffer entries per chunk: the expected count plus a margin, and at most
    max(2M, n / 8) in all (a chunk that overflows is recomputed instead)."""
    cap = int(min(_CHUNK, 1.5 * per_chunk + 6.0 * math.sqrt(per_chunk) + 32.0))
    return max(1, min(cap, max(1 << 21, n // 8) // nchunks))


class _Windows:
    """W, F and the output's bit views, walked in windows of whole chunks, each window's mapped
    pages handed back once a pass is past it (`worker/io/resident.py`). Every pass calls the
    kernels on the windows' slices: chunk boundaries, and so every result, are those of one
    whole-tensor call, while at most one window of each array stays mapped."""

    def __init__(self, wb: np.ndarray, fb: np.ndarray, ob: np.ndarray, window: int | None):
        self.wb, self.fb, self.ob = wb, fb, ob
        self.n = wb.shape[0]
        self.nchunks = -(-self.n // _CHUNK)
        self.chunks = self.nchunks if window is None else max(1, window // _CHUNK)
        self.pages = MappedPages(wb, fb, ob) if self.chunks < self.nchunks else None

    def __iter__(self) -> Iterator[tuple[slice, slice]]:
        """(chunk slice, entry slice) of each window; its pages go once the caller moves on."""
        for ch0 in range(0, self.nchunks, self.chunks):
            ch1 = min(self.nchunks, ch0 + self.chunks)
            entries = slice(ch0 * _CHUNK, min(self.n, ch1 * _CHUNK))
            yield slice(ch0, ch1), entries
            self.release(entries.start, entries.stop)

    def release(self, start: int, stop: int) -> None:
        if self.pages is not None:
            self.pages.release(start, stop)

    def sample_keys(self, c, m: int, stride: int) -> np.ndarray:
        keys = np.empty(m, np.uint32)
        if stride == 1:  # a small tensor: every entry
            _sample_keys(self.wb, self.fb, c, 1, 0, 0, keys)
            return keys
        runs = m // _RUN
        group = max(1, self.chunks * _CHUNK // stride)  # sample windows per window of chunks
        for w0 in range(0, runs, group):
            w1 = min(runs, w0 + group)
            _sample_keys(self.wb, self.fb, c, stride, w0, w1, keys)
            self.release(w0 * stride, min(self.n, w1 * stride))
        return keys

    def sweep(self, c, lo, hi, shift, nbins, cap, cand_key, cnt_in, recomp) -> np.ndarray:
        """`_sweep` over the whole tensor: histograms add up, per-chunk counts line up."""
        parts = []
        for ch, e in self:
            keys = cand_key[ch.start * cap : ch.stop * cap]
            wb, fb = self.wb[e], self.fb[e]
            parts.append(_sweep(wb, fb, c, lo, hi, shift, nbins, cap, keys, cnt_in[ch], recomp[ch]))
        return np.concatenate(parts) if nbins == 0 else np.sum(parts, axis=0)


def _cand_slice(cand: tuple[np.ndarray, ...], ch: slice, cap: int) -> tuple[np.ndarray, ...]:
    return tuple(a[ch.start * cap : ch.stop * cap] for a in cand)


def fused_prune(
    method: str,
    w: torch.Tensor,
    f: torch.Tensor,
    k: int,
    alpha: float,
    out: torch.Tensor,
    window: int | None = None,
) -> TensorStats:
    """Tensor-scope top-k pruning of F - W into `out` (F where kept, W elsewhere), bit-exact.

    Same result as `top_k_mask(order_keys(scores).view(1, -1), k)` + `compose_output(..., 1.0)`
    and `delta_stats` of the torch path (float sums to rounding). `window` (entries, rounded
    down to whole 64Ki chunks): walk each pass in windows of that size and hand back the mapped
    pages behind it, so a huge tensor never has all of W, F and the output resident; the bytes
    and statistics are the same as without.
    """
    if method not in ("fapm", "magnitude"):
        raise ValueError(f"fused_prune: unsupported method {method!r} (fapm, magnitude)")
    if not _HAVE_NUMBA:
        raise RuntimeError("fused_prune: numba is not available")
    _check(w, f, out)
    n = w.numel()
    if n == 0:
        return TensorStats()
    k = min(max(int(k), 0), n)
    wb, fb, ob = _bits_view(w), _bits_view(f), _bits_view(out)
    tensor = _Windows(wb, fb, ob, window)
    nchunks = tensor.nchunks
    cnts = np.zeros((nchunks, 4), np.int64)
    st_i = np.zeros((nchunks, 5), np.int64)
    st_f = np.zeros((nchunks, 4), np.float64)

    if k == 0 or k == n:  # no selection: the statistics (and W copied) in one pass
        nan = np.float32(np.nan)
        th = (np.float32(np.inf), nan, nan)  # nothing kept, nothing inside or equal
        for ch, e in tensor:
            _scan(wb[e], fb[e], ob[e], None, th, 0, _no_candidates(wb.dtype),
                  cnts[ch], st_i[ch], st_f[ch])  # fmt: skip
            if k == n:  # everything kept: F
                np.copyto(ob[e], fb[e])
        stats = _stats(n, st_i, st_f, None, None)
        if k == n:  # the kept statistics are the totals
            stats.kept, stats.kept_nonzero = n, stats.nonzero_delta
            stats.l1_kept, stats.l2sq_kept = stats.l1_total, stats.l2sq_total
        return stats

    c = None
    if method == "fapm":
        parts = np.concatenate([_abs_sum_parts(wb[e], ch.stop - ch.start) for ch, e in tensor])
        c = np.float32(alpha * (math.fsum(parts) / n))

    stride = 1 if n <= 2 * _SAMPLE else n // (_SAMPLE // _RUN)  # window length
    m = n if stride == 1 else _SAMPLE
    lo, hi, ge, expected = _bracket(_radix_sort(tensor.sample_keys(c, m, stride)), n, k, stride)
    cap = _candidate_cap(expected / nchunks, n, nchunks)
    size = nchunks * cap
    cand_key = np.empty(size, np.uint32)
    cand = (
        cand_key,
        np.empty(size, np.int32),
        np.empty(size, np.float32),
        np.empty(size, wb.dtype),
    )
    th = _thresholds(lo, hi, ge)
    for ch, e in tensor:
        _scan(wb[e], fb[e], ob[e], c, th, cap, _cand_slice(cand, ch, cap),
              cnts[ch], st_i[ch], st_f[ch])  # fmt: skip

    # Where is the k-th key t: above hi, at hi, inside, at lo, or below lo?
    kept_prov, inside, at_hi, at_lo = (int(x) for x in cnts.sum(axis=0))
    cnt_in = np.ascontiguousarray(cnts[:, 1])  # (a strided view makes the sweeps 50x slower)
    above = kept_prov - at_hi if ge else kept_prov
    if lo == hi:
        at_lo = 0  # the same entries as at_hi
    recomp = cnt_in > cap  # chunks whose candidates overflowed are recomputed
    fix_prefix = fix_suffix = False
    if above < k <= above + at_hi:
        t, r, eq = hi, k - above, cnts[:, 2]
        fix_suffix, fix_prefix = ge, not ge  # the ties at hi past / up to the cut flip
    elif above + at_hi < k <= above + at_hi + inside:
        t, r = _narrow(tensor, c, lo + 1, hi - 1, above + at_hi, k, cap, cand_key, cnt_in, recomp)
        eq = tensor.sweep(c, t, t, 0, 0, cap, cand_key, cnt_in, recomp)
    elif above + at_hi + inside < k <= above + at_hi + inside + at_lo:
        t, r, eq = lo, k - above - at_hi - inside, cnts[:, 3]
        fix_prefix = True  # the ties at lo up to the cut flip to kept
    else:  # the bracket missed (sampling bad luck or a NaN k-th key): decide everything again
        recomp[:] = True
        t, r = _narrow(tensor, c, 0, _MAX_KEY, 0, k, cap, cand_key, cnt_in, recomp)
        eq = tensor.sweep(c, t, t, 0, 0, cap, cand_key, cnt_in, recomp)

    # The r-th tie at t (in index order) is the last kept one.
    cum = np.cumsum(eq)
    cut_chunk = int(np.searchsorted(cum, r))
    cut = _find_cut(wb, fb, c, cut_chunk, t, r - (int(cum[cut_chunk - 1]) if cut_chunk else 0))
    if fix_prefix:
        recomp[: cut_chunk + 1] = True
    if fix_suffix:
        recomp[cut_chunk:] = True
    pk = np.zeros((nchunks, 4), np.float64)
    for ch, e in tensor:
        _patch(wb[e], fb[e], ob[e], c, t, cut - e.start, cap, _cand_slice(cand, ch, cap),
               cnt_in[ch], recomp[ch], pk[ch])  # fmt: skip
    return _stats(n, st_i, st_f, pk, recomp)


def _narrow(tensor: _Windows, c, lo, hi, gt, k, cap, cand_key, cnt_in, recomp) -> tuple[int, int]:
    """The k-th key t, given that it is in [lo, hi] and gt keys are above hi, and r: how many
    of its ties are kept. Histogram passes over [lo, hi] (65536 bins each)."""
    while lo < hi:
        shift = max(0, (hi - lo).bit_length() - 16)
        nbins = ((hi - lo) >> shift) + 1
        hist = tensor.sweep(c, lo, hi, shift, nbins, cap, cand_key, cnt_in, recomp)
        from_top = np.cumsum(hist[::-1])
        idx = int(np.searchsorted(from_top, k - gt))  # first bin reaching the k-th
        b = nbins - 1 - idx
        gt += int(from_top[idx] - hist[b])
        lo, hi = lo + (b << shift), min(hi, lo + ((b + 1) << shift) - 1)
    return lo, k - gt


def _stats(
    n: int, st_i: np.ndarray, st_f: np.ndarray, pk: np.ndarray | None, recomp: np.ndarray | None
) -> TensorStats:
    """Totals of the per-chunk statistics (fixed order). Kept statistics: the scan's
    provisional ones plus the patch's, or the patch's alone where it recomputed a chunk."""
    kept_i, kept_f = st_i[:, [0, 2]].copy(), st_f[:, 2:].copy()
    if pk is not None:
        kept_i[recomp] = 0
        kept_f[recomp] = 0.0
        kept_i += pk[:, :2].astype(np.int64)
        kept_f = np.concatenate([kept_f, pk[:, 2:]], axis=0)
    tot_i = st_i.sum(axis=0)
    return TensorStats(
        n=n,
        kept=int(kept_i[:, 0].sum()),
        nonzero_delta=int(tot_i[1]),
        kept_nonzero=int(kept_i[:, 1].sum()),
        l1_total=math.fsum(st_f[:, 0]),
        l1_kept=math.fsum(kept_f[:, 0]),
        l2sq_total=math.fsum(st_f[:, 1]),
        l2sq_kept=math.fsum(kept_f[:, 1]),
        w_zero=int(tot_i[3]),
        nonfinite=int(tot_i[4]),
    )


def warmup() -> None:
    """Compile (or load from numba's on-disk cache) every kernel for every dtype and method."""
    if not _HAVE_NUMBA:
        return
    for dtype in _VIEWS:
        w = torch.zeros(8, dtype=dtype)
        f = torch.ones(8, dtype=dtype)
        wb, fb = _bits_view(w), _bits_view(f)
        ovf = np.ones(1, np.bool_)
        cnt = np.zeros(1, np.int64)
        for method in ("fapm", "magnitude"):
            fused_prune(method, w, f, 3, 1.0, torch.empty_like(f))
            c = np.float32(1.0) if method == "fapm" else None
            _sweep(wb, fb, c, 0, 1, 0, 2, 1, np.zeros(1, np.uint32), cnt, ovf)
    # The torch path's statistics kernel (kernels/cpu_stats.py), float32 only.
    ones = torch.ones(8)
    delta_stats(ones, ones, ones, ones > 0)

"""`delta_stats`'s sums and counts of one window in one pass over float32 W, F, D and the mask
(numba, CPU): the torch path's statistics without its twenty whole-window temporaries.

The torch version (compose.py) makes a float64 copy of |D|, masks it twice, squares both and
reduces each, and compares W and F again for zeros and non-finite values: about twenty passes over
memory per window, 27 of the 74 s of a 3-model TIES merge on this machine (each input's trim and
the stream loop's pass-through are torch-path prunes). One loop reads each entry once.

Counts are exact. The float64 sums are of the same exact terms (|D| of a float32 D is exact in
float64, and so is its square) with `reassoc`, so they equal the torch version's to rounding, and
for a given window length they are the same whatever the window's address (LLVM's vectoriser does
not peel for alignment), which keeps a chunked tensor's statistics equal to the whole tensor's.
"""

from __future__ import annotations

import numpy as np

try:  # numba is optional: compose.delta_stats stays on torch without it
    from numba import njit

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only without numba
    HAVE_NUMBA = False


if HAVE_NUMBA:

    @njit(nogil=True, cache=True, fastmath={"reassoc"})
    def window_stats(w, f, d, keep):  # pragma: no cover - compiled
        """(kept, nonzero_delta, kept_nonzero, w_zero, nonfinite), (l1, l1 kept, l2sq, l2sq
        kept) of one window; |D| that is not finite counts as 0 in the sums."""
        inf = np.float32(np.inf)
        kept = 0
        nonzero = 0
        kept_nonzero = 0
        w_zero = 0
        bad = 0
        l1 = 0.0
        l1k = 0.0
        l2 = 0.0
        l2k = 0.0
        for j in range(d.shape[0]):
            dj = d[j]
            a32 = abs(dj)
            finite = a32 < inf  # False for NaN too
            a = np.float64(a32) if finite else 0.0
            k = keep[j]
            ka = a if k else 0.0
            nz = dj != 0
            kept += k
            nonzero += nz
            kept_nonzero += k & nz
            w_zero += w[j] == 0
            bad += not finite
            l1 += a
            l1k += ka
            l2 += a * a
            l2k += ka * ka
        nonfinite = 0
        if bad:  # a non-finite W or F always makes D non-finite: count them only then
            for j in range(d.shape[0]):
                nonfinite += (not np.isfinite(w[j])) + (not np.isfinite(f[j]))
        return (kept, nonzero, kept_nonzero, w_zero, nonfinite), (l1, l1k, l2, l2k)

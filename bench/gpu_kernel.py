"""The Triton kernel against the torch path on the GPU and a device-to-device copy (issue 5).

    .venv/bin/python bench/gpu_kernel.py [--method fapm] [--density 0.1] [--repeat 5]

For the Llama-8B shapes 4096x4096 (q/o), 14336x4096 (gate/up/down) and 128256x4096 (embeddings,
lm_head) in bf16, on one CUDA device, with W and F already on it:

  - torch: the engine's torch path on the GPU (scores, order keys, kthvalue, tie cumsum, where),
  - triton: `triton_prune` as the engine runs it (sampled bracket: fapm's |W| sum, the sample,
    one fused scan collecting the candidates, their sort, the write; the radix select only
    when the bracket fails),
  - radix: `triton_prune(select="radix")` (|W| sum, up to three histogram passes, a tie pass
    when the tie group at the k-th score is split, the write), the previous default,
  - copy: a device-to-device copy of W and F (`torch.Tensor.copy_`), the bandwidth reference.

Bytes each must move at the least: read W and F, write the output (3 x 2 bytes per entry in
bf16). "GB/s" is those bytes over the time taken, for every row; the copy's GB/s is its own
bytes read plus written (4 x 2 bytes per entry) over its time. "of copy" is a row's GB/s over
the copy's: the issue's target, >= 70% for the kernel, with >= 3x the torch path's speed ("vs
torch"), on an H100. For the kernel rows, "B/entry" is what the path it took actually moved per
entry (`info["bytes"]`: every pass's loads and stores of W, F, O, sample keys, candidates and
per-tile counts, sorts counted as one read and one write), and "moved" is that over the time,
as a fraction of the copy's GB/s: how close the passes run to the copy's bandwidth. The path
taken is printed after the kernel rows' names ("triton/sampled", "triton/rebracketed",
"triton/radix").

Each result is checked against the torch path's bytes before it is timed. Times are the median
of --repeat runs after a warm-up, taken with CUDA events. Exits with a message without CUDA.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

SHAPES = ((4096, 4096), (14336, 4096), (128256, 4096))


def _time(fn: Callable[[], object], repeat: int) -> float:
    """Median seconds of fn() on the current stream (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", choices=("fapm", "magnitude"), default="fapm")
    parser.add_argument("--density", type=float, default=0.1, help="fraction kept (k / n)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench/gpu_kernel.py: no CUDA device here; it needs one (nothing measured).")
        return 2
    try:
        from worker.engine.kernels import triton_select
    except ImportError as exc:
        print(f"bench/gpu_kernel.py: cannot import the kernel ({exc})")
        return 2
    if not triton_select.triton_available(torch.device("cuda")):
        print(
            "bench/gpu_kernel.py: triton is not usable on CUDA here (not installed, or "
            "TRITON_INTERPRET is set)"
        )
        return 2

    from worker.engine.methods.base import MethodParams
    from worker.engine.methods.fapm import Fapm
    from worker.engine.methods.magnitude import Magnitude
    from worker.engine.select import keep_count, order_keys, top_k_mask

    scorer = Fapm() if args.method == "fapm" else Magnitude()
    params = MethodParams(sparsity=1.0 - args.density, alpha=1.0)

    def torch_path(w: torch.Tensor, f: torch.Tensor, k: int) -> torch.Tensor:
        w32 = w.float().reshape(1, -1)
        d32 = f.float().reshape(1, -1) - w32
        keep = top_k_mask(order_keys(scorer.scores(w32, d32, params)).view(1, -1), k)
        return torch.where(keep.reshape(w.shape), f, w)

    device = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(device)}; torch {torch.__version__}")
    print(f"method {args.method}, density {args.density}, bf16, median of {args.repeat}")
    header = (
        f"{'shape':>14} {'path':>18} {'ms':>9} {'GB/s':>8} {'of copy':>8} {'vs torch':>9} "
        f"{'B/entry':>8} {'moved':>6}"
    )
    print(header)
    print("-" * len(header))
    gen = torch.Generator(device=device).manual_seed(args.seed)
    for rows, cols in SHAPES:
        n = rows * cols
        w = (torch.randn((rows, cols), generator=gen, device=device) * 0.02).to(torch.bfloat16)
        noise = torch.randn((rows, cols), generator=gen, device=device) * 2e-3
        touched = torch.rand((rows, cols), generator=gen, device=device) < 0.5
        f = torch.where(touched, (w.float() + noise).to(torch.bfloat16), w)
        del noise, touched
        k = keep_count(n, args.density)
        out = torch.empty_like(f)

        want = torch_path(w, f, k)
        infos = {}
        for select in ("sampled", "radix"):
            infos[select] = {}
            out.fill_(0)
            triton_select.triton_prune(
                args.method, w, f, k, 1.0, out, select=select, info=infos[select]
            )
            if not torch.equal(out.view(torch.int16), want.view(torch.int16)):
                print(
                    f"{rows}x{cols}: the kernel ({select}) differs from the torch path: not timed"
                )
                return 1
        del want

        w_copy, f_copy = torch.empty_like(w), torch.empty_like(f)

        def copy(w_copy=w_copy, f_copy=f_copy, w=w, f=f) -> None:
            w_copy.copy_(w)
            f_copy.copy_(f)

        t_copy = _time(copy, args.repeat)
        del w_copy, f_copy
        times = {}
        for select in ("sampled", "radix"):
            times[select] = _time(
                lambda w=w, f=f, k=k, out=out, select=select: triton_select.triton_prune(
                    args.method, w, f, k, 1.0, out, select=select
                ),
                args.repeat,
            )
        t_torch = _time(lambda w=w, f=f, k=k: torch_path(w, f, k), args.repeat)

        need = 3 * 2 * n  # read W and F, write the output
        copy_gbs = 4 * 2 * n / t_copy / 1e9
        rows_out = [("torch", t_torch, None)]
        rows_out += [
            (f"{'triton' if s == 'sampled' else 'radix'}/{infos[s]['path']}", times[s], infos[s])
            for s in ("sampled", "radix")
        ]
        rows_out.append(("copy", t_copy, None))
        for name, t, info in rows_out:
            gbs = (4 * 2 * n if name == "copy" else need) / t / 1e9
            line = (
                f"{f'{rows}x{cols}':>14} {name:>18} {t * 1e3:9.2f} {gbs:8.1f} "
                f"{gbs / copy_gbs:8.0%} {t_torch / t:8.2f}x"
            )
            if info is not None:
                moved_gbs = info["bytes"] / t / 1e9
                line += f" {info['bytes'] / n:8.2f} {moved_gbs / copy_gbs:6.0%}"
            print(line)
        print(f"{'':>14} passes (triton): {', '.join(infos['sampled']['passes'])}")
        del w, f, out
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())

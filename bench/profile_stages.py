"""Where `fapm prune`'s time goes, stage by stage, measured inside one real run.

    .venv/bin/python bench/profile_stages.py -- prune --base B --finetuned F --out O --sparsity 0.9 \
        --shard-size 1GB --overwrite

Runs `worker.cli.main` with the given arguments after wrapping the engine's stages with timers:
for each stage, the wall seconds spent in it on the thread that runs it (the read-ahead thread
reads and hashes the inputs; the main thread computes, hashes and writes the output) and that
thread's CPU seconds (time.thread_time: the numba kernel's worker threads are not in it, so the
kernel's CPU is reported for the whole process as `process CPU - the rest`). py-spy shows the same
split without names for numba's JIT code (see bench/RESULTS.md); this names the stages.

It patches private names in worker/ (pipeline, checkpoint, writer, source): if one is renamed,
that stage is reported as missing rather than failing the run.
"""

from __future__ import annotations

import functools
import os
import resource
import sys
import threading
import time
from collections import defaultdict

WALL: dict[str, float] = defaultdict(float)
CPU: dict[str, float] = defaultdict(float)
CALLS: dict[str, int] = defaultdict(int)
BYTES: dict[str, int] = defaultdict(int)
_LOCK = threading.Lock()
MISSING: list[str] = []


def _record(stage: str, wall: float, cpu: float, nbytes: int = 0) -> None:
    with _LOCK:
        WALL[stage] += wall
        CPU[stage] += cpu
        CALLS[stage] += 1
        BYTES[stage] += nbytes


def timed(stage: str, nbytes=None):
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            w, c = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                n = nbytes(*args, **kwargs) if nbytes else 0
                _record(stage, time.perf_counter() - w, time.thread_time() - c, n)

        return inner

    return wrap


def patch(owner, name: str, stage: str, nbytes=None) -> None:
    target = getattr(owner, name, None)
    if target is None:
        MISSING.append(f"{owner.__name__}.{name}")
        return
    setattr(owner, name, timed(stage, nbytes)(target))


class _TimedFile:
    """Wraps the writer's file and hasher objects: write()/update() are timed."""

    def __init__(self, inner, stage: str) -> None:
        self._inner, self._stage = inner, stage

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def write(self, data):
        w, c = time.perf_counter(), time.thread_time()
        try:
            return self._inner.write(data)
        finally:
            _record(
                self._stage,
                time.perf_counter() - w,
                time.thread_time() - c,
                len(memoryview(data).cast("B")),
            )

    def update(self, data):
        w, c = time.perf_counter(), time.thread_time()
        try:
            return self._inner.update(data)
        finally:
            _record(
                self._stage,
                time.perf_counter() - w,
                time.thread_time() - c,
                len(memoryview(data).cast("B")),
            )


def install() -> None:
    from worker.engine import pipeline, tensor_pruner
    from worker.io import checkpoint, source, writer

    nbytes_buffer = lambda self, name, offset, buffer: len(buffer)  # noqa: E731
    patch(source.LocalDirSource, "read_into", "read: preadv into buffers", nbytes_buffer)
    nbytes_range = lambda self, name, offset, length: length  # noqa: E731
    patch(source.LocalDirSource, "map_range", "read: map the page cache", nbytes_range)
    feed_bytes = lambda self, offset, data: len(data)  # noqa: E731
    patch(checkpoint._FileDigest, "feed", "read: sha256 of inputs", feed_bytes)
    patch(checkpoint._BackgroundDigests, "_run", "digest thread: sha256 of inputs")
    patch(tensor_pruner.TensorPruner, "run", "compute: TensorPruner.run (kernel)")
    patch(os, "fsync", "write: fsync")
    patch(writer, "preallocate", "write: fallocate")
    patch(writer, "start_writeback", "write: start writeback")

    patch(writer, "pwrite_all", "write: pwrite (copied tensors)", lambda fd, view, off: len(view))
    patch(writer._ShardFile, "map", "write: map output place", lambda self, b, n: n)
    original_shard = writer._ShardFile.__init__

    def shard_init(self, *args, **kwargs):
        original_shard(self, *args, **kwargs)
        self.hasher = _TimedFile(self.hasher, "write: sha256 of output")

    writer._ShardFile.__init__ = shard_init

    original_read_ahead = pipeline.read_ahead

    def read_ahead(*args, **kwargs):
        inner = original_read_ahead(*args, **kwargs)

        def gen():
            try:
                while True:
                    w, c = time.perf_counter(), time.thread_time()
                    try:
                        item = next(inner)
                    except StopIteration:
                        return
                    finally:
                        _record(
                            "main: waiting for read-ahead",
                            time.perf_counter() - w,
                            time.thread_time() - c,
                        )
                    yield item
            finally:
                inner.close()

        return gen()

    pipeline.read_ahead = read_ahead


def main() -> int:
    argv = sys.argv[1:]
    if argv and argv[0] == "--":
        argv = argv[1:]
    started = time.perf_counter()
    import torch  # noqa: F401  (counted as startup, as in a CLI run)

    from worker import cli
    from worker.engine import pipeline  # noqa: F401

    try:
        from worker.engine.kernels import cpu_fused  # noqa: F401
    except ImportError:
        pass
    imports = time.perf_counter() - started
    install()
    run_started = time.perf_counter()
    code = cli.main(argv)
    run_wall = time.perf_counter() - run_started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_total = usage.ru_utime + usage.ru_stime
    print(
        f"\nimports {imports:.2f}s; run {run_wall:.2f}s wall; process CPU {cpu_total:.2f}s "
        f"(user {usage.ru_utime:.2f}, sys {usage.ru_stime:.2f}); peak RSS {usage.ru_maxrss / 1e6:.2f} GB"
    )
    print("| stage | calls | wall s (on its thread) | thread CPU s | GB | GB/s (wall) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for stage in sorted(WALL):
        gb = BYTES[stage] / 1e9
        rate = f"{gb / WALL[stage]:.2f}" if gb and WALL[stage] else "-"
        print(
            f"| {stage} | {CALLS[stage]} | {WALL[stage]:.2f} | {CPU[stage]:.2f} | {gb:.2f} | {rate} |"
        )
    if MISSING:
        print(f"not measured (renamed in worker/?): {', '.join(MISSING)}")
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())

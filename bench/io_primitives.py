"""The file-I/O primitives the engine is built on, timed one by one on this machine.

    .venv/bin/python bench/io_primitives.py [--file F] [--mib 900]

Why the engine maps its inputs, preallocates and maps its output shards, and starts writeback
early (worker/io/source.py, worker/io/writer.py): each line times one way of moving the same
bytes. Reads use a file already in the page cache (by default the first shard of
bench/out/pair-2gb/finetuned, made by bench/make_pair.py); writes go to a new file beside it,
removed afterwards, with `sync` before each so no earlier dirty data is flushed on its time.
"""

from __future__ import annotations

import argparse
import hashlib
import mmap
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from worker.io.writer import preallocate, start_writeback

DEFAULT = Path(__file__).parent / "out/pair-2gb/finetuned/model-00001-of-00003.safetensors"
CHUNK = 117 * 2**20  # a 14336 x 4096 bf16 tensor


def timed(label: str, nbytes: int, fn: Callable[[], None]) -> None:
    wall, cpu = time.perf_counter(), os.times()
    fn()
    cpu_end, wall = os.times(), time.perf_counter() - wall
    user, sys_ = cpu_end.user - cpu.user, cpu_end.system - cpu.system
    print(
        f"| {label} | {wall:.2f} | {user:.2f} | {sys_:.2f} | {nbytes / wall / 1e9:.2f} |",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--file", type=Path, default=DEFAULT)
    parser.add_argument("--mib", type=int, default=850)
    args = parser.parse_args(argv)
    n = min(args.mib * 2**20, args.file.stat().st_size)
    with open(args.file, "rb") as warm:  # into the page cache
        while warm.read(64 * 2**20):
            pass
    fd = os.open(args.file, os.O_RDONLY)
    spans = [(off, min(CHUNK, n - off)) for off in range(0, n, CHUNK)]

    print(f"{n / 1e6:.0f} MB of {args.file}, in {CHUNK // 2**20} MiB pieces\n")
    print("| operation | wall s | user s | sys s | GB/s |")
    print("| --- | ---: | ---: | ---: | ---: |")

    def pread_fresh() -> None:
        for off, length in spans:
            os.preadv(fd, [np.empty(length, np.uint8)], off)

    reused = np.empty(CHUNK, np.uint8)

    def pread_reused() -> None:
        for off, length in spans:
            os.preadv(fd, [reused[:length]], off)

    def map_and_touch() -> None:
        mapped = mmap.mmap(fd, n, access=mmap.ACCESS_COPY)
        pages = np.frombuffer(mapped, np.uint8)[:: mmap.PAGESIZE]
        int(pages.sum())  # one read per page
        del pages
        mapped.close()

    def sha256_mapped() -> None:
        mapped = mmap.mmap(fd, n, access=mmap.ACCESS_COPY)
        view, hasher = memoryview(mapped), hashlib.sha256()
        for off, length in spans:
            hasher.update(view[off : off + length])
        view.release()
        mapped.close()

    timed("preadv into a fresh buffer per piece", n, pread_fresh)
    timed("preadv into one reused buffer", n, pread_reused)
    timed("mmap (private) and read one byte per page", n, map_and_touch)
    timed("sha256 through a mapping", n, sha256_mapped)

    data = np.random.default_rng(0).integers(0, 255, CHUNK, dtype=np.uint8)
    out = args.file.parent.parent / "io-primitives.tmp"

    def writer(
        reserve: bool, writeback: bool, mapped: bool, fsync: bool = True, populate: bool = False
    ) -> Callable[[], None]:
        def run() -> None:
            out_fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            if reserve:
                assert preallocate(out_fd, n)
            flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)
            target = mmap.mmap(out_fd, n, flags=flags) if mapped else None
            dest = np.frombuffer(target, np.uint8) if target is not None else None
            for off, length in spans:
                if dest is not None:
                    dest[off : off + length] = data[:length]
                else:
                    os.pwrite(out_fd, memoryview(data)[:length], off)
                if writeback:
                    start_writeback(out_fd, off, length)
            del dest
            if target is not None:
                target.close()
            if fsync:
                os.fsync(out_fd)
            os.close(out_fd)

        return run

    for label, reserve, writeback, mapped, *rest in (
        ("write + fsync (a plain writer)", False, False, False),
        ("fallocate, write + fsync", True, False, False),
        ("fallocate, write, start writeback per piece + fsync", True, True, False),
        ("fallocate, mmap + memcpy, start writeback per piece + fsync (fapm)", True, True, True),
        # The CPU price of each way into the page cache, with the disk left out (no fsync):
        ("write, no fsync", False, False, False, False),
        ("fallocate, write, no fsync", True, False, False, False),
        ("fallocate, mmap + memcpy, no fsync", True, False, True, False),
        ("fallocate, mmap (MAP_POPULATE) + memcpy, no fsync", True, False, True, False, True),
    ):
        out.unlink(missing_ok=True)
        os.sync()
        timed(label, n, writer(reserve, writeback, mapped, *rest))
    out.unlink(missing_ok=True)
    os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())

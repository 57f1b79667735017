"""A process's anonymous memory, read and sampled, for the memory-bound tests and benches.

RssAnon of /proc/self/status is what a job holds: mapped checkpoint pages are file-backed
(RssFile), and the kernel can drop them. `PeakAnon` samples it from a thread while a block runs,
so a peak shorter than the interval can be missed.

Standard library only: the tests' measuring subprocesses import it before their baseline, and
bench/weights_prune.py imports it into interpreters other than this project's (llm-compressor's).
"""

from __future__ import annotations

import threading
import time


def status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (RssAnon, VmHWM...) in bytes (the file gives kB)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise LookupError(f"no {field} in /proc/self/status")


def rss_anon() -> int:
    """The process's anonymous resident bytes now."""
    return status_bytes("RssAnon")


class PeakAnon:
    """`with PeakAnon() as memory: work()`: `memory.peak` is the highest RssAnon sampled while
    the block ran, `memory.growth` that peak above what the process held when it began."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.base = 0
        self.peak = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @property
    def growth(self) -> int:
        return self.peak - self.base

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, rss_anon())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakAnon:
        self.base = self.peak = rss_anon()  # a block shorter than a sample still has a peak
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon())  # what the block left, sampled or not

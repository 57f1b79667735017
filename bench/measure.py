"""Run one command and print its wall time, peak RSS and CPU time as one JSON line (stdlib only).

    python -S bench/measure.py RESULT.json -- COMMAND [ARGS...]

Peak RSS is ru_maxrss of the child from os.wait4; the peaks of its anonymous and file-backed
resident memory (RssAnon, RssFile) are sampled from /proc/PID/status every 10 ms. The command is started from this small process on
purpose: Linux carries the RSS high-water mark of the image a child was forked from across exec, so
a child started straight from a big process (one that imported torch and generated a model) would
report that process's peak instead of its own. This one stays around 10 MB.
"""

import json
import os
import subprocess
import sys
import time

SAMPLE_S = 0.01


def _sample_status(pid: int, peaks: dict[str, int]) -> None:
    """Raise peaks[kind] to the child's current RssAnon / RssFile (/proc/PID/status, kB)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                kind, _, value = line.partition(":")
                if kind in peaks:
                    peaks[kind] = max(peaks[kind], int(value.split()[0]) * 1024)
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        pass  # exiting between the wait and the read


def main() -> int:
    result_path, sep, *command = sys.argv[1:]
    assert sep == "--" and command, __doc__
    started = time.perf_counter()
    child = subprocess.Popen(command)
    peaks = {"RssAnon": 0, "RssFile": 0}
    while True:  # sample the child's resident memory by kind until it exits
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        _sample_status(child.pid, peaks)
        time.sleep(SAMPLE_S)
    wall = time.perf_counter() - started
    result = {
        "exit": os.waitstatus_to_exitcode(status),
        "wall_s": wall,
        "peak_rss_bytes": usage.ru_maxrss * 1024,  # KiB on Linux
        "peak_rss_anon_bytes": peaks["RssAnon"],  # sampled: may miss a peak shorter than SAMPLE_S
        "peak_rss_file_bytes": peaks["RssFile"],
        "user_s": usage.ru_utime,
        "sys_s": usage.ru_stime,
    }
    with open(result_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())

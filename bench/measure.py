"""Run one command and print its wall time, peak RSS and CPU time as one JSON line (stdlib only).

    python -S bench/measure.py RESULT.json -- COMMAND [ARGS...]

Peak RSS is ru_maxrss of the child from os.wait4. The command is started from this small process on
purpose: Linux carries the RSS high-water mark of the image a child was forked from across exec, so
a child started straight from a big process (one that imported torch and generated a model) would
report that process's peak instead of its own. This one stays around 10 MB.
"""

import json
import os
import subprocess
import sys
import time


def main() -> int:
    result_path, sep, *command = sys.argv[1:]
    assert sep == "--" and command, __doc__
    started = time.perf_counter()
    child = subprocess.Popen(command)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    result = {
        "exit": os.waitstatus_to_exitcode(status),
        "wall_s": wall,
        "peak_rss_bytes": usage.ru_maxrss * 1024,  # KiB on Linux
        "user_s": usage.ru_utime,
        "sys_s": usage.ru_stime,
    }
    with open(result_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())

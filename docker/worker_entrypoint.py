"""PID 1 of the worker images: run the Celery worker, pass signals on, hand a job back on a deadline.

    python /opt/fapm/worker_entrypoint.py celery -A worker.celery_app worker ...

- SIGTERM (what `docker stop` and Kubernetes send) is passed to Celery as SIGTERM: a warm
  shutdown. Celery stops taking jobs and lets the running one finish.
- If WORKER_DRAIN_SECONDS is set and the job is still running that long after the SIGTERM, Celery
  gets SIGQUIT: a cold shutdown. The job's process is stopped, and the worker, on its way out,
  puts the unacknowledged job back on its Redis queue, where another worker takes it (the new
  run takes over once the old lease lapses; the output is the same). Without this the
  orchestrator's SIGKILL at the end of the grace period would kill the job mid-write and leave
  its message unacknowledged, for the workers' sweeper (a lease period later) or the visibility
  timeout (FAPM_VISIBILITY_TIMEOUT_SECONDS) to recover.
  Set it some minutes below the grace period (terminationGracePeriodSeconds, stop_grace_period).
- A cold shutdown that has not ended WORKER_COLD_SHUTDOWN_SECONDS (60) after the SIGQUIT (a pool
  process that does not exit, a broker that does not answer) gets SIGKILL, to the worker's whole
  process group (the worker runs in its own group, so its pool processes and anything a job
  started go too). Its job's message is then left unacknowledged; the other workers' sweeper
  puts the job back at the head of its queue about a lease period later.
- SIGINT and SIGQUIT are passed on as they are; orphaned processes are reaped (as PID 1 must).

The exit status is the worker's. Standard library only: the image's Python runs it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

DEFAULT_COLD_SHUTDOWN_SECONDS = 60.0


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: worker_entrypoint.py COMMAND [ARG...]", file=sys.stderr)
        return 2
    drain = os.environ.get("WORKER_DRAIN_SECONDS", "").strip()
    drain_seconds = float(drain) if drain else None
    cold = os.environ.get("WORKER_COLD_SHUTDOWN_SECONDS", "").strip()
    cold_seconds = float(cold) if cold else DEFAULT_COLD_SHUTDOWN_SECONDS
    # Its own process group: a kill at the cold-shutdown bound reaches every process of the
    # worker, and never this one.
    child = subprocess.Popen(argv, process_group=0)
    state = {"terminating": False, "cold": False}

    def forward(signum: int, _frame: object) -> None:
        if child.poll() is not None:
            return
        if signum == signal.SIGTERM and not state["terminating"]:
            state["terminating"] = True
            if drain_seconds is not None:
                signal.setitimer(signal.ITIMER_REAL, max(drain_seconds, 0.001))
                log(f"SIGTERM: warm shutdown; the job is handed back in {drain_seconds:g} s")
            else:
                log("SIGTERM: warm shutdown; the running job is let finish")
        child.send_signal(signum)
        if signum == signal.SIGQUIT:
            bound_cold_shutdown()

    def bound_cold_shutdown() -> None:
        if not state["cold"]:
            state["cold"] = True
            signal.setitimer(signal.ITIMER_REAL, max(cold_seconds, 0.001))

    def deadline(_signum: int, _frame: object) -> None:
        if child.poll() is not None:
            return
        if not state["cold"]:
            log("drain deadline: cold shutdown, the running job goes back to its queue")
            child.send_signal(signal.SIGQUIT)
            bound_cold_shutdown()
        else:
            log(
                f"the cold shutdown did not end in {cold_seconds:g} s: killing the worker; "
                "its job comes back through the other workers' sweeper"
            )
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        signal.signal(signum, forward)
    signal.signal(signal.SIGALRM, deadline)

    # Reap every child (orphans are re-parented to PID 1) until the worker itself has exited.
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        if pid == child.pid:
            child.returncode = os.waitstatus_to_exitcode(status)
            break
    code = child.returncode if child.returncode is not None else 1
    return code if code >= 0 else 128 - code


def log(message: str) -> None:
    print(f"[worker_entrypoint] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

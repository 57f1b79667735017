"""Worker start-up: which queues to consume, the heartbeat thread, and pool processes that drain.

`celery -A worker.celery_app worker` with no `-Q` consumes `cpu` and `webhooks`, plus `gpu` where
CUDA is present, so a CPU-only install runs every job. A worker told to consume `gpu` (`-Q gpu`)
on a machine without CUDA refuses to start: it would take GPU jobs it cannot run.

CUDA is probed in the worker's main process only (the API never imports torch), with the NVML
check, which does not initialise CUDA: the prefork pool's children are forked from this process
and could not use CUDA if the parent had initialised it.

A SIGTERM to the whole process group or cgroup (systemd's default KillMode=control-group, some
orchestrators, `kill -TERM -PGID`) reaches the pool children too. A child that died of it would
take its running job down while the main process waits to drain: so a pool child obeys SIGTERM
only from its parent (the main process sends it in a cold shutdown, e.g. at the entrypoint's
WORKER_DRAIN_SECONDS deadline) and lets the main process's warm shutdown decide otherwise.
SIGQUIT (cold) and SIGKILL act as before. The parent's SIGTERM ends the process within
PARENT_SIGTERM_GRACE_SECONDS even if the job is blocked (the cold shutdown waits for it).
"""

from __future__ import annotations

import _thread
import logging
import os
import signal
import threading
import time
from functools import partial

from celery import signals

from app.core.config import get_settings
from worker.broker import Broker
from worker.celery_app import QUEUES, WEBHOOK_QUEUE, celery_app, enqueue_job
from worker.heartbeat import Heartbeat
from worker.io.scratch import sweep_orphans
from worker.tasks.run_job import dispatch_webhook
from worker.tasks.store import job_store

log = logging.getLogger(__name__)

_state: dict[str, object] = {"gpu": False, "heartbeat": None}
# How long a pool process told to stop by its parent may take to unwind its job.
PARENT_SIGTERM_GRACE_SECONDS = 5.0


def cuda_available() -> bool:
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    import torch

    return bool(torch.cuda.is_available())


def default_queues(gpu: bool) -> list[str]:
    return ["cpu", *(["gpu"] if gpu else []), WEBHOOK_QUEUE]


def _named_queues(option: object) -> list[str]:
    if not option:
        return []
    if isinstance(option, str):
        return [q.strip() for q in option.split(",") if q.strip()]
    return [str(q) for q in option]


@signals.celeryd_init.connect
def choose_queues(sender: str, instance, options: dict, **_: object) -> None:
    gpu = cuda_available()
    _state["gpu"] = gpu
    named = _named_queues(options.get("queues"))
    if "gpu" in named and not gpu:
        raise SystemExit(
            f"fapm worker {sender}: asked to consume the 'gpu' queue, but CUDA is not available "
            "here (torch.cuda.is_available() is False). Run it on a GPU machine, or drop 'gpu' "
            "from -Q."
        )
    unknown = [q for q in named if q not in (*QUEUES, WEBHOOK_QUEUE)]
    if unknown:
        log.warning("consuming queues fapm never routes to: %s", ", ".join(unknown))
    if not named:
        # No -Q: Celery would consume every declared queue; pick by hardware instead.
        instance.app.amqp.queues.select(default_queues(gpu))


@signals.worker_process_init.connect
def obey_sigterm_only_from_parent(**_: object) -> None:
    """In each pool process, first (before any thread starts, as threads inherit the signal
    mask): block SIGTERM and take it from a thread that reads who sent it. The parent's (a cold
    shutdown, a time limit) ends the process as SIGTERM would have; anyone else's is dropped."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_sigterm_from_parent_only, name="fapm-sigterm", daemon=True).start()


def _sigterm_from_parent_only() -> None:
    parent = os.getppid()
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == parent:
            break
        log.info(
            "pool process %d: SIGTERM from pid %d ignored; the main process drains",
            os.getpid(),
            info.si_pid,
        )
    # Act on it as SIGTERM would have: billiard's handler (installed in every pool process)
    # raises SystemExit in the main thread, the job unwinds and the process exits. A Python
    # handler only runs in the main thread at its next bytecode, so a main thread blocked in a
    # sleep or a long C call (a network read) would never get there, and the parent, in a cold
    # shutdown, would wait for this process forever: past a grace, end it.
    _thread.interrupt_main(signal.SIGTERM)
    time.sleep(PARENT_SIGTERM_GRACE_SECONDS)
    log.warning(
        "pool process %d: still running %.0f s after the main process's SIGTERM; killing it",
        os.getpid(),
        PARENT_SIGTERM_GRACE_SECONDS,
    )
    os.kill(os.getpid(), signal.SIGKILL)


@signals.worker_process_init.connect
def sweep_scratch_of_dead_processes(**_: object) -> None:
    """In each pool process: remove the scratch directories (staged outputs, model copies,
    hidden states) of processes that died without cleaning up, such as the pool process this
    one replaces after the OOM killer took it (worker/io/scratch.py)."""
    sweep_orphans()


@signals.worker_process_init.connect
def warm_up_kernels(**_: object) -> None:
    """In each pool process: build the numba kernels off the task path (a job that arrives
    meanwhile waits on numba's compile lock instead of compiling a second time)."""
    if get_settings().warmup_kernels:
        threading.Thread(target=_warm_up, name="fapm-kernel-warmup", daemon=True).start()


def _warm_up() -> None:
    started = time.monotonic()
    try:
        from worker.engine.kernels import cpu_fused

        cpu_fused.warmup()
    except Exception:  # a job then compiles on first use, or takes the torch path
        log.exception("kernel warm-up failed")
        return
    log.info("fused CPU kernels ready in %.1f s", time.monotonic() - started)


@signals.worker_ready.connect
def start_heartbeat(sender, **_: object) -> None:
    queues = sorted(sender.app.amqp.queues.consume_from)
    heartbeat = Heartbeat(
        job_store(),
        get_settings(),
        hostname=sender.hostname,
        queues=queues,
        gpu=bool(_state["gpu"]),
        broker=Broker(celery_app),
        enqueue=enqueue_job,
        dispatch_webhook=partial(dispatch_webhook, job_store(), again=True),
    )
    heartbeat.start()
    _state["heartbeat"] = heartbeat
    log.info("fapm worker %s consumes %s (gpu: %s)", sender.hostname, queues, _state["gpu"])


@signals.worker_shutting_down.connect
def stop_heartbeat(**_: object) -> None:
    # At the start of a shutdown, warm or cold: a draining worker takes no new jobs, so the API
    # should stop routing to it (GPU routing reads the heartbeats) while its last job finishes.
    heartbeat = _state.get("heartbeat")
    if isinstance(heartbeat, Heartbeat):
        heartbeat.stop()

"""The stream loop: the one place a pruning job runs, for the CLI, the worker and the tests.

Flow: open sources -> read headers -> plan every tensor and the output's shard layout -> stream
(W, F) pairs through a bounded read-ahead into the method -> write each output tensor into its
planned shard -> side files, report, card -> publish the staging directory in one rename.
Memory holds a few tensors at a time, whatever the model size: inputs are read tensor by tensor
and outputs go straight to their place in the shard file.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TypeVar

import torch

from worker.engine.compose import TensorStats
from worker.engine.merge import open_update
from worker.engine.plan import TensorTask, build_plan, tie_word_embeddings
from worker.engine.readahead import read_ahead
from worker.engine.readers import CheckpointReader, LoraMergedReader
from worker.engine.tensor_pruner import TensorPruner
from worker.errors import JobCancelled
from worker.io import strict_json
from worker.io.carry_over import CarryOver, carry_over
from worker.io.publish import REPORT_FILE, OutputTarget, open_target, published_report
from worker.io.sparse_delta import SparseDeltaWriter, weight_bytes
from worker.io.torch_tensors import tensor_over
from worker.io.uri import open_source
from worker.io.writer import ShardedWriter, WriterThread, plan_shards
from worker.spec import JobSpec

# Loaded tensors waiting behind the one being computed; one item always fits, however large.
READ_AHEAD_BYTES = 128 * 2**20


@dataclass
class Progress:
    stage: str  # "plan", ["scan1", "scan2" for scope model,] "prune", "finalize", "done"
    tensors_done: int = 0
    tensors_total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0


ProgressCallback = Callable[[Progress], None]
# The evaluation's candidate builder reads the tie the engine's way through this name.
_tie_word_embeddings = tie_word_embeddings


@dataclass
class PruneResult:
    output: str  # where the model was published: a local path or the output URI
    report: dict  # what pruning_report.json holds (timings under "seconds")


def published_result(
    spec: JobSpec, job_id: str | None, report_progress: ProgressCallback
) -> PruneResult | None:
    """The result of a job that published before its worker died (its report at the output
    names this job id), or None: every operation's re-run starts here."""
    if job_id is None:
        return None
    published = published_report(spec.output, job_id, REPORT_FILE)
    if published is None:
        return None
    report_progress(Progress("done"))
    return PruneResult(spec.output, published)


def run_prune(
    spec: JobSpec,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    job_id: str | None = None,
    extra_files: Callable[[Path], dict] | None = None,
) -> PruneResult:
    """Run a pruning job to completion and publish its output directory.

    Raises FapmError (with a stable code) on bad input; on any failure or cancellation the output
    path is left untouched and the staging directory is removed.

    `job_id` (service jobs) makes a re-run of the same job safe after its worker was killed: the
    report records the id, the dead attempt's staging directory is removed first, and an output
    that this job already published (killed after the rename, before the job was marked done) is
    returned as the result instead of failing with output_exists.

    `extra_files(staging_dir)` (evaluated jobs) writes files beside the model before it is
    published (the trade-off plot, the card's evaluation section) and returns keys for the report.
    """
    report_progress = progress or (lambda _p: None)
    cancelled = should_cancel or (lambda: False)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    published = published_result(spec, job_id, report_progress)
    if published is not None:  # a re-run of a job that published before its worker died
        return published
    target = open_target(spec.output, spec.overwrite, job_id)
    with Staged(target) as staged:
        report_progress(Progress("plan"))
        base_source = staged.source(open_source(spec.base))
        base = staged.reader(CheckpointReader(base_source, identify=True))
        _stop_if_cancelled(cancelled)
        # One fine-tune, an adapter, or a merge of several read as one (worker/engine/merge.py).
        update = open_update(spec, base, base_source, staged.sources, cancelled)
        finetuned = staged.reader(update.reader)
        _stop_if_cancelled(cancelled)
        pruner = TensorPruner(update.pruner_spec)
        config = finetuned.config()
        plan = build_plan(base, finetuned, spec, tie_word_embeddings(config), cancelled)
        tasks = plan.tasks
        shards = plan_shards([t.planned for t in tasks], spec.shard_size)
        _stop_if_cancelled(cancelled)
        # output_format "sparse-delta": the same outputs, stored as what differs from the base.
        sink = (
            SparseDeltaWriter(target.local_dir, tasks, base, plan.name_map, spec, target.shard_done)
            if spec.output_format == "sparse-delta"
            else ShardedWriter(target.local_dir, shards, on_shard_complete=target.shard_done)
        )
        writer = staged.writer(WriterThread(sink))  # type: ignore[arg-type]
        timings["plan"] = time.perf_counter() - started
        if spec.scope == "model":
            pruner.global_threshold = _count_model_scope(
                tasks, base, finetuned, pruner, report_progress, cancelled
            )
            timings["scan"] = time.perf_counter() - started - timings["plan"]

        tensor_records, totals = _stream(
            tasks, base, finetuned, pruner, writer, report_progress, cancelled
        )
        timings["prune"] = time.perf_counter() - started - sum(timings.values())

        report_progress(Progress("finalize", len(tasks), len(tasks)))
        written = writer.finish()
        carried = _copy_side_files(update.side_source, target.local_dir, spec, cancelled)
        summary = totals.summary()
        report = {
            "format": "fapm-pruning-report/1",
            **({"job_id": job_id} if job_id is not None else {}),
            "spec": spec.model_dump(mode="json"),
            "implementation": pruner.implementation,
            "inputs": {"base": base.identity(), **update.identities()},
            **update.report_sections(),
            "totals": summary,
            "output": {
                "shards": [vars(s) for s in written],
                "carried": carried.carried,
                "not_carried": carried.not_carried,
            },
            "name_map": plan.name_map.as_report(),
            "left_out": [t.as_report() for t in plan.left_out],
            "notes": plan.notes,
            "tensors": tensor_records,
        }
        if isinstance(sink, SparseDeltaWriter):  # its bytes on disk against the dense models
            report["sparse_delta"] = sink.summary(None if spec.adapter else weight_bytes(finetuned))
        (target.local_dir / "README.md").write_text(
            update.card(summary, report["inputs"], plan.name_map, plan.notes)
        )
        if extra_files is not None:
            report.update(extra_files(target.local_dir))
        location, report = publish_with_report(
            target, report, timings, started, _commit_message(spec, job_id), report_progress,
            cancelled, len(tasks),
        )  # fmt: skip
    report_progress(Progress("done", len(tasks), len(tasks)))
    return PruneResult(location, report)


class _Closeable(Protocol):
    def close(self) -> None: ...


Opened = TypeVar("Opened", bound=_Closeable)


class Staged:
    """What an operation holds while it builds its output in the staging directory, released
    however the `with` block ends: the sources and readers it opened are closed, and on any
    failure or cancellation the writer and the staging directory are aborted, so nothing is
    published."""

    def __init__(self, target: OutputTarget) -> None:
        self.target = target
        self.sources: list[Any] = []  # open_update appends the inputs' sources here
        self.readers: list[_Closeable] = []
        self._writer: WriterThread | None = None

    def source(self, source: Opened) -> Opened:
        self.sources.append(source)
        return source

    def reader(self, reader: Opened) -> Opened:
        self.readers.append(reader)
        return reader

    def writer(self, writer: WriterThread) -> WriterThread:
        self._writer = writer
        return writer

    def __enter__(self) -> Staged:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            if exc_type is not None:  # any exception: a failure, a cancel, an interrupt
                try:
                    if self._writer is not None:
                        self._writer.abort()
                finally:  # the staging goes even if the writer's abort fails
                    self.target.abort()
        finally:
            for reader in self.readers:
                reader.close()
            for source in self.sources:
                source.close()


def _stop_if_cancelled(cancelled: Callable[[], bool]) -> None:
    """Planning reads headers of every shard (remote ones too): a cancel is read between steps."""
    if cancelled():
        raise JobCancelled("the job was cancelled")


def publish_with_report(
    target: OutputTarget,
    report: dict,
    timings: dict[str, float],
    started: float,
    message: str,
    report_progress: ProgressCallback,
    cancelled: Callable[[], bool],
    count: int,
) -> tuple[str, dict]:
    """How every operation ends (prune, weights, materialize): its timings into the report, the
    report written beside the model as strict JSON, a last look at a cancel, then the commit
    that publishes the staged model. Returns where it now is, and the report as written plus
    the publish time."""
    timings["finalize"] = time.perf_counter() - started - sum(timings.values())
    # Uploads overlap the prune; "upload" is their own duration, "publish" what was left.
    report = {**report, "seconds": {**timings, "upload": target.upload_seconds}}
    report["seconds"]["total"] = time.perf_counter() - started
    report = strict_json.with_finite_note(report)  # strict JSON: no NaN in the report
    (target.local_dir / REPORT_FILE).write_text(strict_json.dumps(report, indent=2) + "\n")
    if cancelled():
        raise JobCancelled("the job was cancelled")
    report_progress(Progress("publish", count, count))
    publish_started = time.perf_counter()
    location = target.commit(message)
    report["seconds"]["publish"] = time.perf_counter() - publish_started
    return location, report


def commit_message(job_id: str | None, command: str, what: str) -> str:
    """`job <id>: <what> by fapm-service`, or `<command>: ...` for a CLI run."""
    return f"{f'job {job_id}' if job_id else command}: {what} by fapm-service"


def _commit_message(spec: JobSpec, job_id: str | None) -> str:
    what = f"{spec.method} at sparsity {spec.sparsity:g} (scope {spec.scope})"
    return commit_message(job_id, "fapm prune", what)


def _load_pair(base, finetuned):
    """The read-ahead's loader: W (None for a copied tensor) and F of one task."""

    def load(task: TensorTask) -> tuple[torch.Tensor | None, torch.Tensor]:
        w = base.read(task.base_name) if task.base_name is not None else None
        return w, finetuned.read(task.name, base=w)

    return load


def _load_cost(task: TensorTask) -> int:
    return task.read_bytes + task.planned.nbytes


def _count_model_scope(tasks, base, finetuned, pruner, report_progress, cancelled):
    """Scope model: the two counting passes that fix the global threshold."""
    pruned = [t for t in tasks if t.action != "copy"]
    total = sum(t.read_bytes for t in pruned)
    passes_done = 0

    def key_pass():
        nonlocal passes_done
        done = 0
        pairs = read_ahead(pruned, _load_pair(base, finetuned), _load_cost, READ_AHEAD_BYTES)
        try:
            for i, (task, (w, f)) in enumerate(pairs, start=1):
                if cancelled():
                    raise JobCancelled("the job was cancelled")
                yield from pruner.order_key_chunks(task, w, f)
                done += task.read_bytes
                report_progress(Progress(f"scan{passes_done + 1}", i, len(pruned), done, total))
        finally:
            pairs.close()
        passes_done += 1

    # The method decides how many counting passes it needs (nps: four).
    return pruner.count_model_scope(key_pass)


def _stream(
    tasks: list[TensorTask],
    base: CheckpointReader,
    finetuned: CheckpointReader | LoraMergedReader,
    pruner: TensorPruner,
    writer: WriterThread,
    report_progress: ProgressCallback,
    cancelled: Callable[[], bool],
) -> tuple[list[dict], TensorStats]:
    bytes_total = sum(t.read_bytes for t in tasks)
    bytes_done = 0
    totals = TensorStats()
    records = []
    report_progress(Progress("prune", 0, len(tasks), 0, bytes_total))
    # On CUDA with the Triton kernel, the host-to-device copy of tensor i+1 overlaps the compute
    # of tensor i (a pass-through elsewhere).
    pairs = pruner.overlap_transfers(
        read_ahead(tasks, _load_pair(base, finetuned), _load_cost, READ_AHEAD_BYTES)
    )
    try:
        for done, (task, (w, f)) in enumerate(pairs, start=1):
            if cancelled():
                raise JobCancelled("the job was cancelled")
            tick = time.perf_counter()
            # A pruned tensor is computed straight into its place in the (mapped) shard file
            # where the kernel can; a copied one is written from the input by the writer thread.
            place = writer.destination(task.name) if task.action != "copy" else None
            target = None if place is None else tensor_over(place, task.planned.dtype, task.shape)
            out, stats = pruner.run(task, w, f, out=target)
            del place, target
            # The writer thread keeps `out` alive (through the numpy view) until it is written.
            writer.write(task.name, out.contiguous().reshape(-1).view(torch.uint8).numpy())
            record: dict[str, object] = {
                "name": task.name,
                "action": task.action,
                "shape": list(task.shape),
                "dtype": task.out_dtype,
            }
            if task.reason:
                record["reason"] = task.reason
            if task.shared_rows is not None:
                record["shared_rows"] = task.shared_rows
            if stats is not None:
                totals.add(stats)
                record.update(stats.summary())
            record["seconds"] = round(time.perf_counter() - tick, 6)
            records.append(record)
            bytes_done += task.read_bytes
            report_progress(Progress("prune", done, len(tasks), bytes_done, bytes_total))
    finally:
        pairs.close()
    return records, totals


def _copy_side_files(
    source, directory: Path, spec: JobSpec, cancelled: Callable[[], bool]
) -> CarryOver:
    """Every file of the fine-tuned repo (the base's for an adapter) but its weights and card,
    beside the pruned weights (worker/io/carry_over.py); config.json names the output's dtype."""

    def set_dtype(data: bytes) -> bytes:
        config = json.loads(data)  # already parsed within limits by the checkpoint reader
        config["torch_dtype"] = spec.dtype
        if "dtype" in config:
            config["dtype"] = spec.dtype
        return (strict_json.dumps(config, indent=2) + "\n").encode()

    transforms = {"config.json": set_dtype} if spec.dtype != "keep" else {}
    return carry_over(source, directory, transforms, cancelled)

"""Materialize: the dense model a sparse delta stands for, rebuilt on its base and published.

`materialize: {delta}` jobs (and `fapm materialize`) read the delta's manifest
(worker/io/sparse_delta.py), check that the given base has the weight files the delta names
(names and sizes at once; sha256 before anything is published: `base_mismatch`), then stream
tensor by tensor: W and the tensor's stored parts are read ahead while the previous tensor is
decoded, O = cast(W) with the changed entries' bits put back (plus added rows, or the dense
tensor), written in the delta's job's shard layout through ShardedWriter. The files are the
ones the same job with `output_format: "dense"` publishes, byte for byte; the delta's side files
and card come along, and a report (`kind: materialize`) names both inputs. Memory holds a few
tensors at a time, as a prune does.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable

import torch

from worker.engine.card import without_delta_note
from worker.engine.pipeline import (
    Progress,
    PruneResult,
    Staged,
    commit_message,
    publish_with_report,
    published_result,
)
from worker.engine.readahead import read_ahead
from worker.engine.readers import CheckpointReader
from worker.errors import CorruptCheckpoint, JobCancelled
from worker.io.carry_over import carry_over
from worker.io.publish import open_target
from worker.io.sparse_delta import (
    INDICES_SUFFIX,
    MANIFEST_FILE,
    MASK_SUFFIX,
    ROWS_SUFFIX,
    VALUES_SUFFIX,
    BaseMismatch,
    decode,
    read_manifest,
    shard_size_of,
    tensor_entries,
)
from worker.io.uri import open_source
from worker.io.writer import PlannedTensor, ShardedWriter, WriterThread, plan_shards
from worker.spec import JobSpec

READ_AHEAD_BYTES = 128 * 2**20
CARD_FILE = "README.md"
_CARD_MAX_BYTES = 16 * 2**20
_HEX = re.compile(r"[0-9a-f]{64}")
_HASH_CHUNK = 8 * 2**20
_PARTS = {
    "dense": ("",),
    "mask": (MASK_SUFFIX, VALUES_SUFFIX),
    "indices": (INDICES_SUFFIX, VALUES_SUFFIX),
}


def run_materialize(
    spec: JobSpec,
    progress: Callable | None = None,
    should_cancel: Callable[[], bool] | None = None,
    job_id: str | None = None,
) -> PruneResult:
    """Rebuild and publish the dense model of `spec.materialize.delta` on `spec.base`.

    Raises BaseMismatch (`base_mismatch`) for a base the delta was not made against,
    CorruptCheckpoint for a delta whose parts do not fit its manifest; on any failure or
    cancellation nothing is published (the staging is removed), as for a prune.
    """
    assert spec.materialize is not None and spec.base is not None
    report_progress = progress or (lambda _p: None)
    cancelled = should_cancel or (lambda: False)
    started = time.perf_counter()
    published = published_result(spec, job_id, report_progress)
    if published is not None:  # a re-run of a job that published before its worker died
        return published
    target = open_target(spec.output, spec.overwrite, job_id)
    with Staged(target) as staged:
        report_progress(Progress("plan"))
        delta_source = staged.source(open_source(spec.materialize.delta))
        where = f"{delta_source.uri.rstrip('/')}/{MANIFEST_FILE}"
        manifest = read_manifest(delta_source)
        delta = staged.reader(CheckpointReader(delta_source, identify=True))
        base_source = staged.source(open_source(spec.base))
        base = staged.reader(CheckpointReader(base_source, identify=True))
        _check_base_files(base, manifest["base"])
        entries = tensor_entries(manifest, where)
        _check_parts(entries, delta, base, where)
        planned = [PlannedTensor(e["name"], e["dtype"], tuple(e["shape"])) for e in entries]
        shards = plan_shards(planned, shard_size_of(manifest, spec.shard_size))
        sink = ShardedWriter(target.local_dir, shards, on_shard_complete=target.shard_done)
        writer = staged.writer(WriterThread(sink))
        if cancelled():
            raise JobCancelled("the job was cancelled")
        timings = {"plan": time.perf_counter() - started}

        _stream(entries, delta, base, writer, where, report_progress, cancelled)
        timings["materialize"] = time.perf_counter() - started - timings["plan"]
        report_progress(Progress("finalize", len(entries), len(entries)))
        written = writer.finish()
        carried = carry_over(delta_source, target.local_dir, {}, cancelled)
        # The delta's manifest describes the delta, not this model: carry_over takes it along.
        if MANIFEST_FILE in carried.carried:
            (target.local_dir / MANIFEST_FILE).unlink()
            carried.carried.remove(MANIFEST_FILE)
        card = _copy_card(delta_source, target.local_dir)
        base_identity = base.identity()
        _check_base_digests(base, manifest["base"], base_identity)
        report = {
            "format": "fapm-pruning-report/1",
            "kind": "materialize",
            **({"job_id": job_id} if job_id is not None else {}),
            "spec": spec.model_dump(mode="json"),
            "inputs": {"base": base_identity, "delta": delta.identity()},
            "delta": {
                "format": manifest["format"],
                "method": manifest.get("method"),
                "sparsity": manifest.get("sparsity"),
                "spec": manifest.get("spec"),
            },
            "totals": {
                "tensors": len(entries),
                "changed": sum(int(e.get("changed", 0)) for e in entries),
                "bytes": sum(s.nbytes for s in shards),
            },
            "output": {
                "shards": [vars(s) for s in written],
                "carried": carried.carried + ([CARD_FILE] if card else []),
                "not_carried": carried.not_carried,
            },
        }
        what = f"materialized {spec.materialize.delta}"
        location, report = publish_with_report(
            target, report, timings, started, commit_message(job_id, "fapm materialize", what),
            report_progress, cancelled, len(entries),
        )  # fmt: skip
    report_progress(Progress("done", len(entries), len(entries)))
    return PruneResult(location, report)


def _check_base_files(base: CheckpointReader, recorded: dict) -> None:
    """The base's weight files are the ones the delta names, with their sizes (cheap, before
    any tensor is read; their sha256 are compared before publishing)."""
    sizes = {f: base.source.size(f) for f in base.checkpoint.files}
    if sizes != recorded["sizes"]:
        raise BaseMismatch(
            f"{base.source.uri}: weight files {_describe(sizes)}, the delta was made against "
            f"{_describe(recorded['sizes'])} ({recorded.get('uri')}): not the same base"
        )


def _describe(sizes: dict) -> str:
    shown = ", ".join(f"{name} ({size:,} bytes)" for name, size in list(sizes.items())[:4])
    return shown + (f" and {len(sizes) - 4} more" if len(sizes) > 4 else "")


def _check_parts(entries: list[dict], delta: CheckpointReader, base: CheckpointReader, where):
    """Every part the manifest names is stored in the delta, every base tensor is in the base."""
    stored, in_base = set(delta.names()), set(base.names())
    for entry in entries:
        name = entry["name"]
        suffixes = list(_PARTS[entry["encoding"]])
        if entry["encoding"] != "dense":
            if entry["base"] not in in_base:
                raise BaseMismatch(
                    f"{base.source.uri}: has no tensor {entry['base']!r}, which the delta's "
                    f"{name!r} is coded against: not the base this delta was made against"
                )
            if entry["shape"] and entry["shape"][0] > base.info(entry["base"]).shape[0]:
                suffixes.append(ROWS_SUFFIX)
        missing = [name + s for s in suffixes if name + s not in stored]
        if missing:
            raise CorruptCheckpoint(f"{where}: {missing[0]!r} is not stored in the delta")


def _stream(entries, delta, base, writer, where, report_progress, cancelled) -> None:
    def parts_of(entry: dict) -> list[str]:
        name = entry["name"]
        return [name + s for s in (*_PARTS[entry["encoding"]], ROWS_SUFFIX)]

    def load(entry: dict) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        w = base.read(entry["base"]) if entry["encoding"] != "dense" else None
        stored = {n: delta.read(n) for n in parts_of(entry) if n in delta_names}
        return w, stored

    def cost(entry: dict) -> int:
        w = base.read_nbytes(entry["base"]) if entry["encoding"] != "dense" else 0
        return w + sum(delta.read_nbytes(n) for n in parts_of(entry) if n in delta_names)

    delta_names = set(delta.names())
    total = sum(cost(e) for e in entries)
    done_bytes = 0
    report_progress(Progress("materialize", 0, len(entries), 0, total))
    loaded = read_ahead(entries, load, cost, READ_AHEAD_BYTES)
    try:
        for done, (entry, (w, stored)) in enumerate(loaded, start=1):
            if cancelled():
                raise JobCancelled("the job was cancelled")
            name = entry["name"]

            def part(suffix: str, name: str = name, stored: dict = stored) -> torch.Tensor:
                if name + suffix not in stored:
                    raise CorruptCheckpoint(f"{where}: {name + suffix!r} is not stored")
                return stored[name + suffix]

            out = decode(entry, part, w, where)
            del w, stored
            writer.write(name, out.contiguous().reshape(-1).view(torch.uint8).numpy())
            done_bytes += cost(entry)
            report_progress(Progress("materialize", done, len(entries), done_bytes, total))
    finally:
        loaded.close()


def _copy_card(source, directory) -> bool:
    """The delta's card (the pruned model's) beside the model; carry_over leaves cards out."""
    if CARD_FILE not in source.files() or source.size(CARD_FILE) > _CARD_MAX_BYTES:
        return False
    card = source.read_file(CARD_FILE).decode("utf-8", "replace")
    (directory / CARD_FILE).write_text(without_delta_note(card))  # it is a model again
    return True


def _plain(digest: str) -> str:
    """A digest as hex sha256 where it is one (`sha256:<hex>` from the Hub), else as given."""
    return digest.removeprefix("sha256:")


def _check_base_digests(base: CheckpointReader, recorded: dict, identity: dict) -> None:
    """BaseMismatch unless every base weight file has the digest the delta recorded. Where
    the two were taken differently (a remote base read out of file order identifies a file by
    its store's ETag), the file's sha256 is computed from its bytes."""
    have = identity["shards"]
    for file, want in recorded["shards"].items():
        want, got = _plain(str(want)), _plain(str(have.get(file, "")))
        if want == got:
            continue
        if _HEX.fullmatch(want) and not _HEX.fullmatch(got):
            got = _sha256(base.source, file)
            if want == got:
                continue
        raise BaseMismatch(
            f"{base.source.uri}: {file} has digest {got}, the delta was made against "
            f"{want} ({recorded.get('uri')}): not the same base; nothing was published"
        )


def _sha256(source, file: str) -> str:
    digest = hashlib.sha256()
    size = source.size(file)
    for offset in range(0, size, _HASH_CHUNK):
        digest.update(source.read_range(file, offset, min(_HASH_CHUNK, size - offset)))
    return digest.hexdigest()

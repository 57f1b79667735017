"""prune "weights": Wanda, SparseGPT or magnitude on one model's decoder layers, layer by layer.

Flow: open the model -> plan the output (every tensor of the input, same names, dtypes, shapes)
-> copy what is not in a decoder layer (embedding, final norm, head) -> tokenize the calibration
sets and run the stem once per sequence to get layer 0's inputs -> for each layer: build it from
its tensors, forward every sequence with hooks on its nn.Linear inputs (statistics for Wanda, the
Hessian for SparseGPT), prune each Linear, forward again for the next layer's inputs (through the
pruned layer, as Wanda and SparseGPT do), write its tensors, drop it -> side files, report, card
-> [evaluate the staged model against the unpruned one] -> publish the staging directory.

Peak memory: one layer in float32 (plus, for SparseGPT, one Hessian d_in x d_in at a time), the
calibration hidden states twice (a layer's inputs and outputs; on disk beyond
FAPM_CALIBRATION_BUDGET), the stem while layer 0's inputs are made, and the writer's buffers.
The model is never loaded whole. A re-run (a killed worker) recomputes the same bytes: every step
is deterministic on the CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import torch
from torch import nn

from worker.compress.calibration import CalibrationSequence, calibration_sequences, model_tokenizer
from worker.compress.card import weights_card
from worker.compress.decoder import (
    DecoderLayout,
    Stem,
    UnsupportedArchitecture,
    decoder_layout,
    linear_modules,
    load_layer,
    run_layer,
)
from worker.compress.hidden import HiddenStates, hidden_budget, hidden_stores
from worker.compress.scores import ChannelStats, column_weights, keep_mask, wanda_scores
from worker.compress.sparsegpt import (
    HessianAccumulator,
    SparseGPTNumericalError,
    sparsegpt_prune,
)
from worker.engine.pipeline import (
    Progress,
    ProgressCallback,
    PruneResult,
    Staged,
    commit_message,
    publish_with_report,
    published_result,
)
from worker.engine.readers import CheckpointReader
from worker.engine.tensor_pruner import resolve_device
from worker.errors import FapmError, JobCancelled
from worker.evaluation.model import context_length
from worker.io.carry_over import carry_over
from worker.io.publish import open_target
from worker.io.scratch import ScratchDir
from worker.io.torch_tensors import TORCH_DTYPES
from worker.io.uri import open_source
from worker.io.writer import PlannedTensor, ShardedWriter, WriterThread, plan_shards
from worker.spec import JobSpec
from worker.spec.weights import parse_pattern

CALIBRATE_STAGE = "calibrate"


class CalibrationTooSmall(FapmError):
    """SparseGPT could not factorise a layer's Hessian: too little (or degenerate) data."""

    code = "calibration_too_small"


def run_compress(
    spec: JobSpec,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    job_id: str | None = None,
) -> PruneResult:
    """Prune the weights of `spec.model` and publish the dense result (pruned entries zero)."""
    report_progress = progress or (lambda _p: None)
    cancelled = should_cancel or (lambda: False)
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    published = published_result(spec, job_id, report_progress)
    if published is not None:  # a re-run of a job that published before its worker died
        return published
    assert spec.model is not None
    target = open_target(spec.output, spec.overwrite, job_id)
    # Staged: sources and readers closed, and on any failure the writer and staging aborted;
    # `cleanup` then frees the hidden states and their scratch.
    with ExitStack() as cleanup, Staged(target) as staged:
        report_progress(Progress("plan"))
        source = staged.source(open_source(spec.model))
        reader = staged.reader(CheckpointReader(source, identify=True))
        config = reader.config()
        layout = decoder_layout(config, spec.model)
        layer_names = _layer_names(reader, layout)
        order = [n for n in reader.names() if layout.layer_of(n) is None]
        order += [name for names in layer_names for name in names]
        planned = [PlannedTensor(n, reader.info(n).dtype, reader.info(n).shape) for n in order]
        writer = staged.writer(
            WriterThread(
                ShardedWriter(
                    target.local_dir,
                    plan_shards(planned, spec.shard_size),
                    on_shard_complete=target.shard_done,
                )
            )
        )
        outside = [n for n in order if layout.layer_of(n) is None]
        for name in outside:  # embedding, final norm, head: unchanged, in their bytes
            writer.write(name, _raw(reader.read(name)))
        seconds["plan"] = time.perf_counter() - started

        sequences: list[CalibrationSequence] = []
        if spec.calibration is not None:
            report_progress(Progress(CALIBRATE_STAGE))
            with model_tokenizer(source, spec.model, cancelled) as tokenizer:
                sequences = calibration_sequences(
                    spec.calibration, tokenizer, context_length(config)
                )
        # Hidden states that do not fit the budget go to a scratch directory of their own
        # (TMPDIR), never into the staging directory that is published.
        scratch = cleanup.enter_context(ScratchDir("calib"))  # swept if this process is killed
        walk = _LayerWalk(spec, layout, reader, sequences, scratch, cancelled)
        cleanup.callback(walk.close)
        walk.capture_inputs()
        seconds["calibrate"] = time.perf_counter() - started - seconds["plan"]
        records = []
        report_progress(Progress("prune", 0, layout.count))
        for index in range(layout.count):
            if cancelled():
                raise JobCancelled("the job was cancelled")
            record, tensors = walk.layer(index)
            for full in layer_names[index]:  # in the planned (input) order
                dtype = TORCH_DTYPES[reader.info(full).dtype]
                writer.write(full, _raw(tensors.pop(full).to(dtype)))
            records.append(record)
            report_progress(Progress("prune", index + 1, layout.count))
        seconds["prune"] = time.perf_counter() - started - sum(seconds.values())
        calibration_summary = walk.calibration_summary()
        walk.close()  # the hidden states are not needed any more

        report_progress(Progress("finalize", layout.count, layout.count))
        written = writer.finish()
        carried = carry_over(source, target.local_dir, {}, cancelled)
        totals = _totals(records)
        report: dict = {
            "format": "fapm-pruning-report/1",
            **({"job_id": job_id} if job_id is not None else {}),
            "spec": spec.model_dump(mode="json"),
            "operation": "weights",
            "implementation": f"torch-{walk.device.type}",
            "device": walk.device.type,
            "inputs": {"model": reader.identity()},
            "calibration": calibration_summary,
            "totals": totals,
            "layers": records,
            "output": {
                "shards": [vars(s) for s in written],
                "carried": carried.carried,
                "not_carried": carried.not_carried,
            },
            "notes": [],
        }
        evaluation = None
        if spec.evaluate is not None:
            evaluation = _evaluate(spec, target.local_dir, report_progress, cancelled)
            report["evaluation"] = evaluation
        (target.local_dir / "README.md").write_text(
            weights_card(spec, totals, report["inputs"], report["calibration"], evaluation)
        )
        what = f"{spec.method} weights at sparsity {spec.sparsity:g}"
        location, report = publish_with_report(
            target, report, seconds, started, commit_message(job_id, "fapm prune", what),
            report_progress, cancelled, layout.count,
        )  # fmt: skip
    report_progress(Progress("done", layout.count, layout.count))
    return PruneResult(location, report)


class _LayerWalk:
    """The layer-by-layer state: the calibration hidden states and the per-layer kwargs."""

    def __init__(
        self,
        spec: JobSpec,
        layout: DecoderLayout,
        reader: CheckpointReader,
        sequences: list[CalibrationSequence],
        scratch: Path,
        cancelled: Callable[[], bool],
    ) -> None:
        self.spec = spec
        self.layout = layout
        self.reader = reader
        self.sequences = sequences
        self.scratch = scratch
        self.cancelled = cancelled
        # Layers compute on the job's device (a GPU worker's CUDA); the hidden states stay on the
        # host between layers, one sequence at a time on the device.
        self.device = resolve_device(spec.device)
        self.pattern = parse_pattern(spec.pattern) if spec.pattern else None
        self.kwargs: list[dict] = []
        self.inputs: HiddenStates | None = None
        self.outputs: HiddenStates | None = None
        self.fused_channels: dict[str, int] = {}

    def capture_inputs(self) -> None:
        """Layer 0's inputs for every sequence, from the stem (dropped afterwards)."""
        if not self.sequences:
            return
        stem = Stem(self.layout, self.reader)
        lengths = [len(s.ids) for s in self.sequences]
        hidden = self.layout.config.hidden_size  # type: ignore[attr-defined]
        self.inputs, self.outputs = hidden_stores(lengths, hidden, hidden_budget(), self.scratch)
        for index, sequence in enumerate(self.sequences):
            if self.cancelled():
                raise JobCancelled("the job was cancelled")
            states, kwargs = stem.layer_inputs(sequence.ids)
            self.inputs.put(index, states)
            self.kwargs.append(kwargs)
        del stem

    def layer(self, index: int) -> tuple[dict, dict[str, torch.Tensor]]:
        """Prune layer `index`; its report record and its tensors (checkpoint name, float32)."""
        started = time.perf_counter()
        layer, names = load_layer(self.layout, self.reader, index)
        layer = layer.to(self.device)
        linears = linear_modules(layer)
        collectors = self._collect(layer, linears) if self.sequences else {}
        record: dict = {"index": index, "linears": []}
        with torch.no_grad():
            for name, module in linears:
                weight = module.weight.data
                pruned, keep = self._prune(f"{self.layout.layer_prefix(index)}{name}", module,
                                           collectors.get(name))  # fmt: skip
                module.weight.data = pruned
                n = keep.numel()
                record["linears"].append(
                    {"name": name, "shape": list(weight.shape), "n": n, "kept": int(keep.sum()),
                     "sparsity": 1.0 - int(keep.sum()) / n}
                )  # fmt: skip
        collectors.clear()
        if self.sequences:  # the next layer's inputs, through this pruned layer
            assert self.inputs is not None and self.outputs is not None
            for i, kwargs in enumerate(self.kwargs):
                if self.cancelled():
                    raise JobCancelled("the job was cancelled")
                hidden = self.inputs.get(i).to(self.device)
                self.outputs.put(i, run_layer(layer, hidden, _on(kwargs, self.device)).cpu())
            self.inputs, self.outputs = self.outputs, self.inputs
        state = {k: v.cpu() for k, v in layer.state_dict().items()}
        tensors = {full: state[local] for local, full in names.items()}
        record["seconds"] = round(time.perf_counter() - started, 6)
        return record, tensors

    def _collect(self, layer: nn.Module, linears: list[tuple[str, nn.Linear]]) -> dict:
        """Forward every sequence once with hooks on the Linear inputs."""
        sparsegpt = self.spec.method == "sparsegpt"
        collectors: dict[str, tuple[ChannelStats, HessianAccumulator | None]] = {}
        current = {"source": ""}
        hooks = []
        for name, module in linears:
            columns = module.in_features
            hessian = HessianAccumulator(columns, self.device) if sparsegpt else None
            collectors[name] = (ChannelStats(columns), hessian)

            def hook(_module, args, name=name) -> None:
                x = args[0].detach()  # (1, tokens, d_in): one sequence
                stats, hessian = collectors[name]
                stats.add(current["source"], x)
                if hessian is not None:
                    hessian.add(x.reshape(1, -1, x.shape[-1]))

            hooks.append(module.register_forward_pre_hook(hook))
        try:
            assert self.inputs is not None
            for i, (sequence, kwargs) in enumerate(zip(self.sequences, self.kwargs, strict=True)):
                if self.cancelled():
                    raise JobCancelled("the job was cancelled")
                current["source"] = sequence.source
                run_layer(layer, self.inputs.get(i).to(self.device), _on(kwargs, self.device))
        finally:
            for handle in hooks:
                handle.remove()
        return collectors

    def _prune(self, where: str, module: nn.Linear, collected) -> tuple[torch.Tensor, torch.Tensor]:
        weight = module.weight.data.to(torch.float32)
        spec = self.spec
        sparsity = float(spec.sparsity)  # type: ignore[arg-type]
        if spec.method == "magnitude":
            keep = keep_mask(weight.abs(), sparsity, self.pattern, spec.scope == "row", where)
            return weight * keep, keep
        stats, hessian = collected
        calibration = spec.calibration
        assert calibration is not None
        columns, counts = column_weights(
            stats, calibration.mode, calibration.exclusive_frac, calibration.beta
        )
        for key, value in counts.items():
            self.fused_channels[key] = self.fused_channels.get(key, 0) + value
        if spec.method == "wanda":
            keep = keep_mask(wanda_scores(weight, columns), sparsity, self.pattern, True, where)
            return weight * keep, keep
        factor = None
        if calibration.mode == "taskaware":  # the Hessian is the mixed one; weigh the columns
            mixed = stats.mean("general", "task").sqrt()
            factor = (columns / mixed.clamp_min(1e-30)).to(torch.float32)
        if self.pattern is not None and weight.shape[1] % self.pattern[1]:
            keep_mask(weight, sparsity, self.pattern, True, where)  # raises PatternMismatch
        try:
            pruned, keep = sparsegpt_prune(
                weight, hessian.hessian, sparsity, self.pattern, column_factor=factor
            )
        except SparseGPTNumericalError as exc:
            raise CalibrationTooSmall(f"{where}: {exc}") from None
        return pruned * keep, keep

    def calibration_summary(self) -> dict:
        by_source: dict[str, dict[str, int]] = {}
        for sequence in self.sequences:
            entry = by_source.setdefault(sequence.source, {"sequences": 0, "tokens": 0})
            entry["sequences"] += 1
            entry["tokens"] += len(sequence.ids)
        stores = self.inputs
        return {
            "mode": None if self.spec.calibration is None else self.spec.calibration.mode,
            "sets": by_source,
            "hidden_bytes": 0 if stores is None else 2 * stores.nbytes,
            "hidden_on_disk": bool(stores is not None and stores.on_disk),
            "channels": self.fused_channels,
        }

    def close(self) -> None:
        for store in (self.inputs, self.outputs):
            if store is not None:
                store.close()


def _layer_names(reader: CheckpointReader, layout: DecoderLayout) -> list[list[str]]:
    """Each decoder layer's tensor names, in input order. The output lists the tensors outside
    the layers first, then layer by layer: the order they are written in."""
    by_layer: list[list[str]] = [[] for _ in range(layout.count)]
    for name in reader.names():
        index = layout.layer_of(name)
        if index is not None:
            if index >= layout.count:
                raise UnsupportedArchitecture(
                    f"tensor {name!r} is in layer {index}, past the config's {layout.count} layers"
                )
            by_layer[index].append(name)
    return by_layer


def _on(value, device: torch.device):
    """A layer's keyword arguments (tensors, tuples of them) on the compute device."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_on(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _on(v, device) for k, v in value.items()}
    return value


def _raw(tensor: torch.Tensor):
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy()


def _totals(records: list[dict]) -> dict:
    n = sum(linear["n"] for r in records for linear in r["linears"])
    kept = sum(linear["kept"] for r in records for linear in r["linears"])
    return {
        "n": n,
        "kept": kept,
        "sparsity": 1.0 - kept / n if n else 0.0,
        "density": kept / n if n else 1.0,
    }


def _evaluate(spec: JobSpec, staged: Path, report_progress, cancelled) -> dict:
    """The pruned (staged) model measured against the unpruned one, as the evaluation does."""
    from worker.evaluation.standalone import evaluate_model
    from worker.io.source import also_readable

    assert spec.evaluate is not None and spec.model is not None
    with also_readable(staged):
        return evaluate_model(
            spec.model,
            str(staged),
            spec.evaluate,
            spec.device,
            finetuned=spec.model,
            progress=report_progress,
            should_cancel=cancelled,
        )

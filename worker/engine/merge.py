"""What the stream loop reads the update from: one fine-tune, a LoRA adapter, or a merge of several.

A merge (`finetuned` as a list) is presented to the stream loop as one fine-tuned checkpoint,
`MergedReader`: reading a tensor reads W once and each input's F_i one at a time, prunes each
task vector by that input's own method and sparsity with the engine's TensorPruner (one per
input; its float32 output minus W is the pruned update T_i), and combines the T_i by the job's
rule (worker/engine/merge_methods/) into W + merged update, float32. The stream loop then takes
that tensor whole (a pass-through prune: sparsity 0) and rounds it once to the storage dtype, so
the writer, side files, report, card and publishing are the single-pair job's.

Memory: W, one F_i, its T_i and the rule's accumulators (two to five tensors), for any number
of inputs (a rule that looked twice would read and prune each F_i again rather than hold them;
TIES keeps both signs' sums and looks once). Each input pairs with the base by the engine's plan
(name prefixes, added vocabulary rows, LoRA adapters as for one pair); the inputs must have the
same tensors and shapes. Added vocabulary rows have no base to merge against: they are the first
input's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from worker.engine.card import model_card
from worker.engine.compose import TensorStats
from worker.engine.merge_card import merge_card
from worker.engine.merge_methods import get_rule
from worker.engine.name_pairing import NameMap
from worker.engine.plan import TensorTask, build_plan, tie_word_embeddings
from worker.engine.readers import CheckpointReader, LoraMergedReader, TensorInfo
from worker.engine.tensor_pruner import TensorPruner
from worker.errors import ArchitectureMismatch, JobCancelled
from worker.io.source import ModelSource
from worker.io.uri import open_source
from worker.spec import JobSpec
from worker.spec.merge import MergeInput

UpdateReader = CheckpointReader | LoraMergedReader


def _open_reader(
    base: CheckpointReader, uri: str, adapter: bool, sources: list[ModelSource]
) -> UpdateReader:
    source = open_source(uri)
    sources.append(source)  # the caller closes it, whatever happens next
    return LoraMergedReader(base, source) if adapter else CheckpointReader(source, identify=True)


@dataclass
class UpdateInputs:
    """The update side of a job, as the stream loop uses it."""

    reader: UpdateReader | MergedReader
    side_source: ModelSource  # where config, tokenizer and other side files are carried from
    pruner_spec: JobSpec  # what the stream loop's TensorPruner applies to (W, reader's F)
    spec: JobSpec

    def identities(self) -> dict[str, object]:
        """The report's `inputs` besides the base."""
        if isinstance(self.reader, MergedReader):
            return {"models": self.reader.identities()}
        return {"adapter" if self.spec.adapter else "finetuned": self.reader.identity()}

    def report_sections(self) -> dict[str, object]:
        """Report keys only a merge has: its rule and each input's pruning totals."""
        if isinstance(self.reader, MergedReader):
            return {"merge": self.reader.report()}
        return {}

    def card(self, totals: dict, inputs: dict, name_map: NameMap, notes: list[str]) -> str:
        if isinstance(self.reader, MergedReader):
            return self.reader.card(totals, inputs, notes)
        return model_card(self.spec, totals, inputs, name_map, notes)


def open_update(
    spec: JobSpec,
    base: CheckpointReader,
    base_source: ModelSource,
    sources: list[ModelSource],
    should_cancel: Callable[[], bool] | None = None,
) -> UpdateInputs:
    """Open the job's fine-tune, adapter or merge inputs (their sources go to `sources`)."""
    inputs = spec.merge_inputs
    if inputs is None:
        uri = spec.finetuned if isinstance(spec.finetuned, str) else spec.adapter
        reader = _open_reader(base, uri or "", bool(spec.adapter), sources)
        side = base_source if spec.adapter else sources[-1]
        return UpdateInputs(reader, side, spec, spec)
    merged = MergedReader(base, spec, sources, should_cancel)
    side = base_source if inputs[0].adapter else merged.first_source
    return UpdateInputs(merged, side, pass_through_spec(spec), spec)


def pass_through_spec(spec: JobSpec) -> JobSpec:
    """The stream loop's spec for a merge: every entry of the merged update kept, unscaled, so
    its one job is rounding W + merged update to the storage dtype (exact select of it)."""
    return spec.model_copy(
        update={"method": "magnitude", "sparsity": 0.0, "scale": 1.0, "scope": "tensor"}
    )


def input_spec(spec: JobSpec, item: MergeInput) -> JobSpec:
    """One input's pruning: the job's settings with its own method, sparsity, model and (nps)
    band weights."""
    update: dict[str, object] = {
        "finetuned": None if item.adapter else item.model,
        "adapter": item.model if item.adapter else None,
        "method": item.method or spec.method,
        "sparsity": spec.sparsity if item.sparsity is None else item.sparsity,
        "merge": None,
    }
    if item.nps_weights is not None:
        update["nps"] = spec.nps_settings.model_copy(update={"weights": list(item.nps_weights)})
    return spec.model_copy(update=update)


@dataclass
class _Input:
    item: MergeInput
    spec: JobSpec
    reader: UpdateReader
    pruner: TensorPruner
    tasks: dict[str, TensorTask]  # by the base tensor's name
    totals: TensorStats = field(default_factory=TensorStats)


@dataclass(frozen=True)
class _Merged:
    """How one output tensor is made: merged from every input, or copied from the first."""

    base_name: str | None  # None: copied from the first input
    shared_rows: int | None = None  # rows the base has (added vocabulary beyond them)


class MergedReader:
    """Several fine-tunes of one base, read as the one merged fine-tuned checkpoint."""

    def __init__(
        self,
        base: CheckpointReader,
        spec: JobSpec,
        sources: list[ModelSource],
        should_cancel: Callable[[], bool] | None = None,
    ) -> None:
        self.base = base
        self.spec = spec
        self.merge = spec.merge_settings
        self.rule = get_rule(self.merge.rule)
        self.inputs: list[_Input] = []
        items = spec.merge_inputs or []
        try:
            for item in items:
                reader = _open_reader(base, item.model, item.adapter, sources)
                one_spec = input_spec(spec, item)
                self.inputs.append(_Input(item, one_spec, reader, TensorPruner(one_spec), {}))
        except BaseException:
            self.close()
            raise
        self.first_source = self.inputs[0].reader.source
        tie = tie_word_embeddings(self.inputs[0].reader.config())
        self.how: dict[str, _Merged] = {}
        self.notes: list[str] = []
        for i, one in enumerate(self.inputs):
            plan = build_plan(base, one.reader, one.spec, tie, should_cancel)
            for task in plan.tasks:
                key = plan.name_map.base_name(task.name)
                if task.base_name is not None or task.reason == "excluded":
                    one.tasks[key or task.name] = task
            if i == 0:
                self._plan_outputs(plan.tasks, plan.name_map)
            elif set(one.tasks) != set(self.inputs[0].tasks):
                differ = sorted(set(one.tasks) ^ set(self.inputs[0].tasks))
                raise ArchitectureMismatch(
                    f"merge: {item_uri(one)} pairs other tensors with the base than "
                    f"{item_uri(self.inputs[0])} (such as {differ[0]!r}): the inputs of a "
                    "merge must be fine-tunes of one architecture"
                )
            for key, task in one.tasks.items():
                first = self.inputs[0].tasks[key]
                if task.shape != first.shape:
                    raise ArchitectureMismatch(
                        f"merge: tensor {key!r} has shape {list(task.shape)} in "
                        f"{item_uri(one)} but {list(first.shape)} in {item_uri(self.inputs[0])}"
                    )
        if any(how.shared_rows is not None for how in self.how.values()):
            self.notes.append(
                "added vocabulary rows (beyond the base's) have no base to merge against: "
                f"they are the first input's ({item_uri(self.inputs[0])})"
            )

    def _plan_outputs(self, tasks: list[TensorTask], name_map: NameMap) -> None:
        base_names = set(self.base.names())
        for task in tasks:
            key = name_map.base_name(task.name)
            if task.base_name is None and task.reason != "excluded":
                self.how[task.name] = _Merged(None)
                continue
            base_name = task.base_name or key
            assert base_name is not None and base_name in base_names
            rows = self.base.info(base_name).shape[0]
            grown = task.shape[0] != rows if task.shape else False
            self.how[task.name] = _Merged(base_name, rows if grown else None)

    # The reader interface of the stream loop (worker/engine/plan.py TensorSource).
    def names(self) -> list[str]:
        return self.inputs[0].reader.names()

    def info(self, name: str) -> TensorInfo:
        return self.inputs[0].reader.info(name)

    def read_nbytes(self, name: str) -> int:
        how = self.how.get(name)
        if how is None or how.base_name is None:
            return self.inputs[0].reader.read_nbytes(name)
        return sum(one.reader.read_nbytes(one.tasks[how.base_name].name) for one in self.inputs)

    def config(self) -> dict:
        return self.inputs[0].reader.config()

    def read(self, name: str, base: torch.Tensor | None = None) -> torch.Tensor:
        """The merged tensor: W + merged update in float32 (the first input's F if copied)."""
        how = self.how.get(name)
        if how is None or how.base_name is None:
            return self.inputs[0].reader.read(name, base=base)
        w = base if base is not None else self.base.read(how.base_name)
        w32 = w.to(torch.float32)
        extra_rows: list[torch.Tensor] = []
        passes = 0

        def updates() -> Iterator[tuple[torch.Tensor, float]]:
            nonlocal passes
            passes += 1
            for i, one in enumerate(self.inputs):
                update, f = self._pruned_update(one, how.base_name, w, w32, passes == 1)
                if i == 0 and how.shared_rows is not None and passes == 1:
                    extra_rows.append(f[how.shared_rows :].to(torch.float32))
                del f
                yield update, one.item.weight
                del update

        merged = w32 + self.rule.combine(updates, w32, self.merge)
        if how.shared_rows is not None:
            merged = torch.cat([merged, extra_rows[0]])
        return merged

    def _pruned_update(
        self, one: _Input, base_name: str, w: torch.Tensor, w32: torch.Tensor, count: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(T_i in float32 over the base's rows, F_i as read): the input's own pruning by the
        engine's TensorPruner, composed in float32, minus W."""
        task = one.tasks[base_name]
        f = one.reader.read(task.name, base=w)
        rows = w.shape[0] if w.dim() else None
        if task.action == "copy":  # excluded: the whole update is kept
            return f[:rows].to(torch.float32) - w32, f
        out, stats = one.pruner.run(dataclasses.replace(task, out_dtype="F32"), w, f)
        if count and stats is not None:
            one.totals.add(stats)
        return out[:rows] - w32, f

    def identities(self) -> list[dict[str, object]]:
        return [
            {**one.reader.identity(), **one.item.model_dump(mode="json")} for one in self.inputs
        ]

    def report(self) -> dict[str, object]:
        return {
            "rule": self.merge.rule,
            "lam": self.merge.lam,
            "normalize": self.merge.normalized,
            "inputs": [
                {
                    "model": one.item.model,
                    "adapter": one.item.adapter,
                    "weight": one.item.weight,
                    "method": one.spec.method,
                    "sparsity": one.spec.sparsity,
                    "implementation": one.pruner.implementation,
                    "totals": one.totals.summary(),
                }
                | ({} if one.item.nps_weights is None else {"nps_weights": one.item.nps_weights})
                for one in self.inputs
            ],
            "notes": self.notes,
        }

    def card(self, totals: dict, inputs: dict, notes: list[str]) -> str:
        return merge_card(self.spec, self.rule, self.report(), totals, inputs, notes + self.notes)

    def close(self) -> None:
        for one in self.inputs:
            one.reader.close()


def item_uri(one: _Input) -> str:
    return one.item.model


def merged_outputs(
    spec: JobSpec, should_cancel: Callable[[], bool] | None = None
) -> Iterator[tuple[TensorTask, torch.Tensor]]:
    """Every output tensor of the merge `spec` as `run_prune` writes it, in plan order, written
    nowhere: the same plan, `MergedReader.read` and pass-through TensorPruner as the stream loop
    (worker/engine/pipeline.py), so a tensor here is the published one bit for bit. An evaluated
    merge writes its candidates into a model from this (worker/evaluation/merge_job.py); each
    call reads and prunes every input once."""
    cancelled = should_cancel or (lambda: False)
    sources: list[ModelSource] = []
    readers: list[CheckpointReader | UpdateReader | MergedReader] = []
    try:
        base_source = open_source(spec.base or "")
        sources.append(base_source)
        base = CheckpointReader(base_source)
        readers.append(base)
        update = open_update(spec, base, base_source, sources, should_cancel)
        readers.append(update.reader)
        pruner = TensorPruner(update.pruner_spec)
        tie = tie_word_embeddings(update.reader.config())
        for task in build_plan(base, update.reader, spec, tie, should_cancel).tasks:
            if cancelled():
                raise JobCancelled("the job was cancelled")
            w = base.read(task.base_name) if task.base_name is not None else None
            out, _stats = pruner.run(task, w, update.reader.read(task.name, base=w))
            yield task, out
    finally:
        for reader in readers:
            reader.close()
        for source in sources:
            source.close()

"""The calibration sequences: the general set's texts and the task set's prompt + completion,
tokenized by the model's own tokenizer, up to `max_examples` per set and `max_tokens` per sequence
(never above the model's positions). Sets are read and parsed by worker/evaluation/data.py, as
the evaluation reads them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from worker.compress.scores import GENERAL, TASK
from worker.evaluation.data import load_general, load_task
from worker.evaluation.errors import EmptyEvalSet
from worker.evaluation.model import load_tokenizer
from worker.io.carry_over import carry_over
from worker.io.scratch import ScratchDir
from worker.io.source import LocalDirSource, ModelSource, also_readable
from worker.spec import CalibrationSpec


@dataclass(frozen=True)
class CalibrationSequence:
    source: str  # GENERAL or TASK
    ids: torch.Tensor  # int64 (tokens,)


@contextmanager
def model_tokenizer(
    source: ModelSource, where: str, cancelled: Callable[[], bool]
) -> Iterator[object]:
    """The model's tokenizer: from its directory, or from its side files (not its weights)
    copied to a temporary one."""
    if isinstance(source, LocalDirSource):
        source.verify_files()  # transformers opens them by path: none may lead out
        yield load_tokenizer(source.path, where)
        return
    with ScratchDir("tokenizer") as tmp, also_readable(tmp):
        carry_over(source, tmp, {}, cancelled)
        yield load_tokenizer(tmp, where)


def calibration_sequences(
    settings: CalibrationSpec, tokenizer, positions: int | None
) -> list[CalibrationSequence]:
    """The sets' sequences, general ones first; EmptyEvalSet if a needed set gives none."""
    limit = min(settings.max_tokens, positions or settings.max_tokens)
    sequences: list[CalibrationSequence] = []

    def add(source: str, texts: list[str], uri: str) -> None:
        kept = 0
        for text in texts:
            ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])[:limit]
            if len(ids) >= 2:
                sequences.append(CalibrationSequence(source, torch.tensor(ids, dtype=torch.long)))
                kept += 1
        if not kept:
            raise EmptyEvalSet(f"{uri}: no line gives two tokens or more to calibrate with")

    if settings.needs_general:
        assert settings.general is not None
        general = load_general(settings.general, settings.max_examples)
        add(GENERAL, [t.text for t in general], settings.general)
    if settings.needs_task:
        assert settings.task is not None
        task = load_task(settings.task, settings.max_examples)
        add(TASK, [e.prompt + e.completion for e in task], settings.task)
    return sequences

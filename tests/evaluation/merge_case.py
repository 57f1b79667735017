"""Two fine-tunes of one tiny base that learned two different skills, for evaluated merges.

Fine-tune A is tests/eval_models.py's (the word map f after "w100 a w101"). Fine-tune B learns
another map g of w60..w99 after another marker pair ("w102 a w103"), trained on from A with A's
task replayed: two fine-tunes trained from the base on their own skill alone interfere so much
in this 2-layer model that no merge of them keeps either (measured: mean skill kept under 0.1), so
B shares A's circuit and adds its own. Merging them (the mean of the task vectors) keeps all of
A's skill and little of B's at low sparsity, and less of both as sparsity grows: a trade-off the
search can work on. Seeded and single-threaded: the same bytes every session. Task sets are held
out from the training data.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from tests.eval_models import (
    TASK_WORDS,
    EvalCase,
    _ids,
    _save,
    _train,
    task_examples,
    write_jsonl,
)

MARK_B, ANSWER_B = "w102", "w103"


@dataclass(frozen=True)
class MergeCase:
    base: Path
    finetuned: tuple[Path, Path]
    tasks: tuple[Path, Path]  # each fine-tune's own task set
    general: Path


def task_b_examples(count: int, seed: int) -> list[dict[str, str]]:
    """{"prompt": "w102 a w103", "completion": " g(a) g(g(a))"}: another fixed permutation."""
    words = list(TASK_WORDS)
    shuffled = words[:]
    random.Random(7).shuffle(shuffled)
    g = dict(zip(words, shuffled, strict=True))
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a = rng.choice(TASK_WORDS)
        rows.append({"prompt": f"{MARK_B} w{a} {ANSWER_B}", "completion": f" w{g[a]} w{g[g[a]]}"})
    return rows


def build_merge_case(case: EvalCase, directory: Path) -> MergeCase:
    """`case`'s base and fine-tune (task A), and fine-tune B trained on from it (about 5 s)."""
    from transformers import LlamaForCausalLM

    directory = Path(directory)
    merge = MergeCase(
        case.base,
        (case.finetuned, directory / "finetuned_b"),
        (case.task, directory / "task_b.jsonl"),
        case.general,
    )
    if not (merge.finetuned[1] / "config.json").exists():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the same reduction order every run: the same weights
        try:
            model = LlamaForCausalLM.from_pretrained(str(case.finetuned), dtype=torch.float32)
            rows = [_ids(e["prompt"] + e["completion"]) for e in task_b_examples(512, 11)]
            rows += [_ids(e["prompt"] + e["completion"]) for e in task_examples(512, 12)]
            _train(model, rows, steps=300, lr=3e-3, seed=13)
            _save(model, merge.finetuned[1])
        finally:
            torch.set_num_threads(threads)
    write_jsonl(merge.tasks[1], task_b_examples(48, 111))
    return merge

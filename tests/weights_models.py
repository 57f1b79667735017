"""A tiny causal LM with two skills, trained in the test session, for weight pruning.

The base learns the general text of tests/eval_models.py (a bigram grammar over w0..w59); the
fine-tune learns the toy task (a word mapping over w60..w99) while it keeps practising the
general text, so it holds both skills. Pruning its weights with activations of one set alone
then costs the other skill, which is what task-aware calibration is about. Seeded and
single-threaded: a session builds the same bytes each time.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from tests.eval_models import (
    CONTEXT,
    VOCAB,
    EvalCase,
    _ids,
    _save,
    general_sentences,
    task_examples,
    write_jsonl,
)


def _train_mixed(model, sets: list[list[list[int]]], steps: int, lr: float, seed: int) -> None:
    """Alternate batches of each set (a batch holds sequences of one length)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        sequences = sets[step % len(sets)]
        batch = torch.tensor([rng.choice(sequences) for _ in range(32)])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def build_dual_skill_case(directory: Path, seed: int = 0) -> EvalCase:
    """Train the base and a two-skill fine-tune (about 15 s on 2 cores); write the sets."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    case = EvalCase(
        directory / "base",
        directory / "finetuned",
        directory / "task.jsonl",
        directory / "general.jsonl",
    )
    if (case.finetuned / "config.json").exists() and case.general.exists():
        return case
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=192,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=CONTEXT,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            dtype=torch.float32,
        )
        model = LlamaForCausalLM(config)
        general = [_ids(s) for s in general_sentences(512, seed + 1)]
        _train_mixed(model, [general], steps=250, lr=1e-2, seed=seed)
        _save(model, case.base)
        tasks = [_ids(e["prompt"] + e["completion"]) for e in task_examples(512, seed + 2)]
        _train_mixed(model, [tasks, general], steps=500, lr=3e-3, seed=seed + 3)
        _save(model, case.finetuned)
    finally:
        torch.set_num_threads(threads)
    write_jsonl(case.task, task_examples(48, seed + 100))
    write_jsonl(case.general, [{"text": s} for s in general_sentences(48, seed + 101)])
    return case

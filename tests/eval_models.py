"""Tiny causal LMs that really forget, trained in the test session (seconds on 2 cores).

The base learns "general text": sentences from a fixed random bigram grammar over the words
w0..w59 (each word has three likely successors). The fine-tune learns a toy skill, a fixed word
mapping over w60..w99 after a marker (`task_examples`), from the base, and nothing else: its update
moves every weight, so general-text perplexity rises (forgetting). Pruning the update then trades
skill against forgetting, which is what the evaluation measures.

Everything is seeded and single-threaded inside the builder, so a session builds the same bytes
each time. Weights are float32 safetensors (as `save_pretrained` writes them) with the word-level
tokenizer of tests/models.py.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from tests.models import write_tokenizer

VOCAB = 128
GENERAL_WORDS = 60  # w0..w59
TASK_WORDS = range(60, 100)  # w60..w99
TASK_MARK, ANSWER_MARK = "w100", "w101"
CONTEXT = 32  # max_position_embeddings: short, so "too long" inputs are easy to build


@dataclass(frozen=True)
class EvalCase:
    """A trained base/fine-tuned pair and the evaluation sets, all under one directory."""

    base: Path
    finetuned: Path
    task: Path  # JSONL of {"prompt", "completion"}
    general: Path  # JSONL of {"text"}


def _grammar(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [rng.sample(range(GENERAL_WORDS), 3) for _ in range(GENERAL_WORDS)]


def general_sentences(count: int, seed: int, length: int = 12) -> list[str]:
    """Sentences of the bigram grammar (the grammar is fixed; `seed` picks the sentences)."""
    grammar = _grammar(1234)
    rng = random.Random(seed)
    sentences = []
    for _ in range(count):
        word = rng.randrange(GENERAL_WORDS)
        words = [word]
        for _ in range(length - 1):
            # 80% the first successor: the base gets a perplexity well below the vocabulary's.
            successors = grammar[word]
            word = successors[0] if rng.random() < 0.8 else rng.choice(successors[1:])
            words.append(word)
        sentences.append(" ".join(f"w{w}" for w in words))
    return sentences


def _task_map(seed: int = 99) -> dict[int, int]:
    words = list(TASK_WORDS)
    shuffled = words[:]
    random.Random(seed).shuffle(shuffled)
    return dict(zip(words, shuffled, strict=True))


def task_examples(count: int, seed: int) -> list[dict[str, str]]:
    """{"prompt": "w100 a w101", "completion": " f(a) f(f(a))"}: a fixed permutation f of
    w60..w99 applied twice (a lookup a 2-layer model learns in a few hundred steps). The
    completion starts with the space that separates it from the prompt in running text."""
    f = _task_map()
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        a = rng.choice(TASK_WORDS)
        examples.append(
            {"prompt": f"{TASK_MARK} w{a} {ANSWER_MARK}", "completion": f" w{f[a]} w{f[f[a]]}"}
        )
    return examples


def _ids(text: str) -> list[int]:
    # The word-level tokenizer maps wN to N + 4 (four special tokens first).
    return [int(w[1:]) + 4 for w in text.split()]


def _train_alternating(
    model, sets: list[list[list[int]]], steps: int, lr: float, seed: int
) -> None:
    """Train on batches of each set in turn (a batch holds sequences of one length)."""
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


def _train(model, sequences: list[list[int]], steps: int, lr: float, seed: int) -> None:
    _train_alternating(model, [sequences], steps, lr, seed)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def build_eval_case(
    directory: Path,
    seed: int = 0,
    *,
    hidden_size: int = 32,
    intermediate_size: int = 64,
    finetune_steps: int = 300,
    keep_general: bool = False,
) -> EvalCase:
    """Train the base and the fine-tune (about 5 s on 2 cores) and write the evaluation sets.

    `keep_general`: the fine-tune practises the general text between its task batches, so that
    it holds both skills (tests/weights_models.py).
    """
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
    torch.set_num_threads(1)  # the same reduction order every run: the same weights every run
    try:
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
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
        _train(model, general, steps=250, lr=1e-2, seed=seed)
        _save(model, case.base)
        tasks = [_ids(e["prompt"] + e["completion"]) for e in task_examples(512, seed + 2)]
        sets = [tasks, general] if keep_general else [tasks]
        _train_alternating(model, sets, steps=finetune_steps, lr=3e-3, seed=seed + 3)
        _save(model, case.finetuned)
    finally:
        torch.set_num_threads(threads)
    # Held-out sets (other seeds than the training data).
    write_jsonl(case.task, task_examples(48, seed + 100))
    write_jsonl(case.general, [{"text": s} for s in general_sentences(48, seed + 101)])
    return case


def _save(model, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    write_tokenizer(directory, VOCAB)

"""A fine-tune with added vocabulary, made from the trained tiny pair (tests/eval_models.py).

The fine-tune's embeddings and lm_head get EXTRA rows, as `resize_token_embeddings` gives them
when tokens are added in fine-tuning, and its tokenizer knows EXTRA more words (w124..w131, ids
128..135). The task set asks the skill with a new answer marker, NEW_MARK (id 128, a token the
base has no row for), whose embedding row is the old marker's: the fine-tune has the same skill
with it. The added lm_head rows are copies of <pad>'s, which is never the argmax, so greedy
answers are unchanged (ties go to the lower id). The base is untouched.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.eval_models import ANSWER_MARK, VOCAB, EvalCase, write_jsonl
from tests.models import write_tokenizer

EXTRA = 8
NEW_MARK = f"w{VOCAB - 4}"  # the first added word: id VOCAB (the tokenizer maps wN to N + 4)


def token_id(word: str) -> int:
    return int(word[1:]) + 4


def build_added_vocab_case(case: EvalCase, directory: Path) -> EvalCase:
    """The base of `case`, its fine-tune with EXTRA added rows, and a task set that uses one."""
    from transformers import LlamaForCausalLM

    directory = Path(directory)
    added = EvalCase(case.base, directory / "finetuned", directory / "task.jsonl", case.general)
    if not (added.finetuned / "config.json").exists():
        model = LlamaForCausalLM.from_pretrained(str(case.finetuned), dtype=torch.float32)
        model.resize_token_embeddings(VOCAB + EXTRA, mean_resizing=False)
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            embeddings = model.get_input_embeddings().weight
            noise = 0.02 * torch.randn((EXTRA, embeddings.shape[1]), generator=generator)
            embeddings[VOCAB:] = noise
            embeddings[token_id(NEW_MARK)] = embeddings[token_id(ANSWER_MARK)]
            head = model.get_output_embeddings().weight
            head[VOCAB:] = head[0]
        model.save_pretrained(str(added.finetuned))
        write_tokenizer(added.finetuned, VOCAB + EXTRA)
    if not added.task.exists():
        rows = [json.loads(line) for line in case.task.read_text().splitlines()]
        new = [{**r, "prompt": r["prompt"].replace(ANSWER_MARK, NEW_MARK)} for r in rows]
        assert all(NEW_MARK in r["prompt"] for r in new)
        write_jsonl(added.task, new)
    return added

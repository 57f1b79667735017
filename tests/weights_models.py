"""A tiny causal LM with two skills, trained in the test session, for weight pruning.

The base learns the general text of tests/eval_models.py (a bigram grammar over w0..w59); the
fine-tune learns the toy task (a word mapping over w60..w99) while it keeps practising the
general text, so it holds both skills. Pruning its weights with activations of one set alone
then costs the other skill, which is what task-aware calibration is about. Seeded and
single-threaded: a session builds the same bytes each time.
"""

from __future__ import annotations

from pathlib import Path

from tests.eval_models import EvalCase, build_eval_case


def build_dual_skill_case(directory: Path, seed: int = 0) -> EvalCase:
    """Train the base and a two-skill fine-tune (about 15 s on 2 cores); write the sets."""
    return build_eval_case(
        directory,
        seed,
        hidden_size=64,
        intermediate_size=192,
        finetune_steps=500,
        keep_general=True,
    )

"""The trained tiny pair (tests/eval_models.py), built once per session (about 10 s)."""

from __future__ import annotations

import pytest

from tests.eval_models import EvalCase, build_eval_case
from tests.evaluation.added_vocab import build_added_vocab_case


@pytest.fixture(scope="session")
def eval_case(tmp_path_factory) -> EvalCase:
    return build_eval_case(tmp_path_factory.mktemp("eval_case"))


@pytest.fixture(scope="session")
def vocab_case(eval_case, tmp_path_factory) -> EvalCase:
    """The same base; a fine-tune with added vocabulary rows and a task set that uses them."""
    return build_added_vocab_case(eval_case, tmp_path_factory.mktemp("vocab_case"))

"""The two-skill tiny pair (tests/weights_models.py), built once per session (about 15 s)."""

from __future__ import annotations

import pytest

from tests.eval_models import EvalCase
from tests.weights_models import build_dual_skill_case


@pytest.fixture(scope="session")
def dual_case(tmp_path_factory) -> EvalCase:
    return build_dual_skill_case(tmp_path_factory.mktemp("dual_case"))

"""`exclude` runs on RE2: linear time on any pattern, `re.search` semantics on ordinary ones, a
clear refusal (at validation, so a 422 or a CLI usage error) of what RE2 cannot run; and planning
reads the cancel flag between tensors."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from worker.engine.plan import build_plan
from worker.engine.readers import TensorInfo
from worker.errors import JobCancelled
from worker.exclude_pattern import MAX_EXCLUDE_CHARS, ExcludePattern
from worker.spec import JobSpec

REPO = Path(__file__).resolve().parents[2]

NAMES = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.q_proj.bias",
    "model.layers.0.input_layernorm.weight",
    "model.layers.11.mlp.down_proj.weight",
    "model.layers.3.post_attention_layernorm.weight",
    "model.norm.weight",
    "lm_head.weight",
    "transformer.wte.weight",
    "transformer.h.0.attn.c_attn.weight",
    "encoder.block.0.layer.0.SelfAttention.q.weight",
    "model.layers.0.mlp.experts.7.w1.weight",
]
# Patterns users write for a name filter: all of them mean the same in RE2 as in Python's re.
ORDINARY_PATTERNS = [
    "embed|norm|lm_head|bias",
    r"layers\.(0|11)\.",
    r"^model\.layers\.\d+\.mlp\.",
    r"\.weight$",
    "(?i)selfattention",
    r"experts\.[0-9]+\.w[13]",
    r"(?:q|k|v)_proj",
    r"\bwte\b",
    "[^.]+_proj",
    "^lm_head",
    "attn.c_",
    r"layers\.(?P<n>[0-9]{1,2})\.",
    "norm.weight$|^transformer",
]


@pytest.mark.parametrize("pattern", ORDINARY_PATTERNS)
def test_re2_matches_what_python_re_matches(pattern):
    python = [n for n in NAMES if re.search(pattern, n)]
    re2 = [n for n in NAMES if ExcludePattern(pattern).matches(n)]
    assert re2 == python
    assert 0 < len(python) < len(NAMES)  # each pattern tells names apart


def test_the_readme_example_keeps_the_usual_suspects():
    pattern = ExcludePattern("embed|norm|lm_head|bias")
    kept = [n for n in NAMES if pattern.matches(n)]
    assert kept == [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.bias",
        "model.layers.0.input_layernorm.weight",
        "model.layers.3.post_attention_layernorm.weight",
        "model.norm.weight",
        "lm_head.weight",
    ]


def test_a_catastrophic_pattern_runs_in_linear_time():
    # Python's re takes exponential time on this (2^n paths for n characters); RE2 does not.
    pattern = ExcludePattern("(.|.)*x$")
    name = "a" * 100_000
    started = time.perf_counter()
    assert not pattern.matches(name)
    assert pattern.matches(name + "x")
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize(
    ("pattern", "needle"),
    [
        (r"(a)\1", "backreferences"),  # backreference
        ("(?=norm)", "lookaround"),  # lookahead
        ("(?<!x)norm", "RE2"),  # lookbehind
        ("(unclosed", "missing )"),
        ("a{1001}", "repetition"),  # RE2's own bound on counted repetition
        ("x" * (MAX_EXCLUDE_CHARS + 1), f"at most {MAX_EXCLUDE_CHARS} characters"),
        ("\ud800", "unicode"),
    ],
)
def test_patterns_re2_cannot_run_are_refused_naming_exclude(pattern, needle):
    with pytest.raises(ValidationError) as info:
        JobSpec(base="/b", finetuned="/f", output="/o", exclude=pattern)
    (error,) = info.value.errors()
    assert error["loc"] == ("exclude",)
    assert needle.lower() in error["msg"].lower(), error["msg"]


def test_a_pattern_at_the_cap_is_accepted():
    spec = JobSpec(base="/b", finetuned="/f", output="/o", exclude="a" * MAX_EXCLUDE_CHARS)
    assert spec.exclude is not None and len(spec.exclude) == MAX_EXCLUDE_CHARS


def test_a_tensor_name_with_a_lone_surrogate_is_matched_not_a_crash():
    # json.loads of a header turns "\ud800" into a lone surrogate; RE2 reads UTF-8.
    assert ExcludePattern("norm").matches("model.\ud800norm.weight")
    assert not ExcludePattern("bias").matches("model.\ud800norm.weight")


def test_cli_refuses_a_lookahead_exclude_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", "prune", "--base", str(tmp_path / "b"),
         "--finetuned", str(tmp_path / "f"), "--out", str(tmp_path / "o"),
         "--exclude", "(?=norm)x"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "exclude" in lines[0] and "lookaround" in lines[0], lines[0]
    assert not (tmp_path / "o").exists()


class _ManyTensors:
    """A TensorSource of `count` small float tensors, counting the headers it was asked for."""

    def __init__(self, count: int) -> None:
        self._names = [f"model.layers.{i}.weight" for i in range(count)]
        self.infos_read = 0

    def names(self) -> list[str]:
        return self._names

    def info(self, name: str) -> TensorInfo:
        self.infos_read += 1
        return TensorInfo("F32", (4, 4))

    def read_nbytes(self, name: str) -> int:
        return 64


def test_planning_reads_the_cancel_flag_between_tensors():
    count = 200_000
    base, finetuned = _ManyTensors(count), _ManyTensors(count)
    spec = JobSpec(base="/b", finetuned="/f", output="/o", exclude="(.|.)*x$")
    asked = []
    started = time.monotonic()

    def should_cancel() -> bool:
        asked.append(time.monotonic())
        return time.monotonic() - started > 0.2

    with pytest.raises(JobCancelled):
        build_plan(base, finetuned, spec, tie_word_embeddings=False, should_cancel=should_cancel)
    assert finetuned.infos_read < count  # stopped part way, not after planning everything
    assert len(asked) < 50  # throttled: not a Redis round trip per tensor
    assert time.monotonic() - started < 2.0


def test_planning_without_cancel_plans_every_tensor():
    base, finetuned = _ManyTensors(1000), _ManyTensors(1000)
    spec = JobSpec(base="/b", finetuned="/f", output="/o", exclude=r"layers\.1\d\d\.")
    tasks = build_plan(base, finetuned, spec, False, should_cancel=lambda: False).tasks
    assert len(tasks) == 1000
    assert sum(t.reason == "excluded" for t in tasks) == 100


def test_a_job_cancelled_while_planning_stops_before_pruning(tmp_path):
    import torch
    from safetensors.torch import save_file

    from worker.engine.pipeline import Progress, run_prune

    tensors = {f"model.layers.{i}.weight": torch.zeros(2) for i in range(20_000)}
    for side in ("base", "ft"):
        (tmp_path / side).mkdir()
        save_file(tensors, tmp_path / side / "model.safetensors")
    out = tmp_path / "out"
    spec = JobSpec(
        base=str(tmp_path / "base"),
        finetuned=str(tmp_path / "ft"),
        output=str(out),
        exclude="(.|.)*x$",  # pinned a worker under Python's re
    )
    stages: list[str] = []

    def progress(event: Progress) -> None:
        stages.append(event.stage)

    started = time.monotonic()
    with pytest.raises(JobCancelled):
        run_prune(spec, progress=progress, should_cancel=lambda: "plan" in stages)
    assert time.monotonic() - started < 10
    assert stages == ["plan"]  # never reached the prune loop's own check
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ft"]

"""An evaluated job on remote (S3) inputs: the worker copies them to local directories once and
the candidate builder maps W and F from those copies (page cache, not process memory); the
copies are gone when the job ends, and the measured point equals the same job's on local files."""

from __future__ import annotations

import tempfile
from pathlib import Path

from tests.remote.conftest import bucket, s3, s3_endpoint, upload_dir  # noqa: F401 (fixtures)
from worker.evaluation.job import run_job_spec
from worker.spec import JobSpec


def fixed_job(base: str, finetuned: str, case, output: Path) -> JobSpec:
    return JobSpec.model_validate(
        {
            "base": base,
            "finetuned": finetuned,
            "output": str(output),
            "method": "magnitude",
            "sparsity": 0.5,
            "evaluate": {"task": str(case.task), "general": str(case.general),
                         "max_examples": 24},
        }
    )  # fmt: skip


def test_remote_inputs_are_mapped_from_local_copies(eval_case, s3, bucket, tmp_path, monkeypatch):  # noqa: F811
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    base = upload_dir(s3, eval_case.base, bucket, "base")
    finetuned = upload_dir(s3, eval_case.finetuned, bucket, "finetuned")
    remote = run_job_spec(fixed_job(base, finetuned, eval_case, tmp_path / "remote"))
    evaluation = remote.report["evaluation"]
    assert evaluation["candidates"]["inputs_mapped"] is True
    assert evaluation["candidates"]["mode"] == "ranks-host"
    assert list(scratch.iterdir()) == []  # the local copies were removed
    local = run_job_spec(
        fixed_job(str(eval_case.base), str(eval_case.finetuned), eval_case, tmp_path / "local")
    )
    for key in ("skill", "completion_loss", "perplexity"):
        assert evaluation["points"][0][key] == local.report["evaluation"]["points"][0][key]

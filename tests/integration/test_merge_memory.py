"""The merge's memory bound does not grow with the number of models: a TIES merge (two looks at
every input per tensor) of 6 fine-tunes peaks at about the anonymous memory of a merge of 2.

Measured in a fresh process as the peak of its anonymous memory (RssAnon, sampled; mapped
checkpoint pages are file-backed) above what it held before the job.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]
ROWS, COLS, TENSORS = 1024, 1024, 24  # bf16: 2 MiB a tensor, 48 MiB a model (96 in float32)
TENSOR_F32 = ROWS * COLS * 4

MEASURE = textwrap.dedent(
    """
    import json, sys
    import torch
    from tests.memory_sampler import PeakAnon
    from worker.spec import JobSpec
    from worker.engine.pipeline import run_prune

    spec = JobSpec.model_validate_json(sys.argv[1])
    with PeakAnon() as memory:
        run_prune(spec)
    print(json.dumps({"growth": memory.growth}))
    """
)


def _write(directory: Path, seed: int, base: dict | None = None) -> dict:
    directory.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(TENSORS):
        noise = 0.02 * torch.randn((ROWS, COLS), generator=generator)
        w = base[f"layers.{i}.weight"].float() + 0.1 * noise if base else noise
        tensors[f"layers.{i}.weight"] = w.to(torch.bfloat16)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return tensors


def _peak_growth(tmp_path: Path, base: Path, models: list[Path], name: str) -> int:
    spec = {
        "base": str(base),
        "finetuned": [{"model": str(m), "method": "magnitude", "sparsity": 0.8} for m in models],
        "merge": {"rule": "ties"},
        "output": str(tmp_path / name),
        "device": "cpu",
    }
    run = subprocess.run(
        [sys.executable, "-c", MEASURE, json.dumps(spec)],
        capture_output=True, text=True, timeout=300,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin"},
        cwd=REPO,  # where `tests` imports from
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])["growth"]


def test_peak_memory_does_not_grow_with_the_number_of_models(tmp_path):
    base = _write(tmp_path / "base", 0)
    models = [tmp_path / f"ft{i}" for i in range(6)]
    for i, model in enumerate(models):
        _write(model, 1 + i, base)
    # The least of two runs each: the noise (below) only ever adds.
    two = min(_peak_growth(tmp_path, tmp_path / "base", models[:2], f"two{i}") for i in range(2))
    six = min(_peak_growth(tmp_path, tmp_path / "base", models, f"six{i}") for i in range(2))
    model_f32 = TENSORS * TENSOR_F32
    print(f"peak anon growth: 2 models {two / 2**20:.1f} MiB, 6 models {six / 2**20:.1f} MiB; "
          f"one tensor in float32 {TENSOR_F32 / 2**20:.0f} MiB, one model {model_f32 / 2**20:.0f} MiB")  # fmt: skip
    # Holding the four extra models would add 192 MiB as stored (bf16), 384 in float32. The
    # level itself is the stream loop's read-ahead (merged float32 tensors queued) and the
    # allocator, which varied from run to run under load: the 2-model peak alone ranged 185-237
    # MiB under two test processes, and a 48 MiB margin between 2 and 4 models failed once in
    # CI. So 6 models against 2, each the least of two runs, and a margin of one float32 model
    # (96 MiB): half of what holding the extra models as stored would add.
    assert six <= two + model_f32
    assert six < len(models) * model_f32

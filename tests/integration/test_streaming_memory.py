"""The streaming bound, measured: a pair far larger than a memory budget is pruned within it.

The CLI runs as a subprocess and its peak RSS is read from the kernel (`os.wait4`'s rusage of that
process only, launched from a small process so it does not inherit pytest's own peak). The budget is the process's own footprint on a tiny pair plus a few tensors' worth,
and the pair is made larger than the whole budget, so holding either model in memory would fail.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]
TENSOR_ROWS, TENSOR_COLS, TENSORS_PER_SHARD, SHARDS = 4096, 4096, 5, 4  # 32 MiB bf16 tensors


# A fork inherits its parent's peak RSS (and exec keeps it), so a child of this large pytest
# process would report at least pytest's own RSS. A small launcher (python -S, nothing imported)
# forks the CLI instead and reports that grandchild's peak from wait4.
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable, "-m", "worker.cli", *sys.argv[1:]])
_, status, usage = os.wait4(pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024)
"""


def _peak_rss_bytes(*args: str, env: dict[str, str] | None = None) -> int:
    result = subprocess.run(
        [sys.executable, "-S", "-c", _LAUNCHER, *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )
    code, peak = result.stdout.split()[-2:]
    assert code == "0", result.stderr
    return int(peak)


def _write_model(directory: Path, seed: int, shift: float) -> int:
    """A sharded bf16 checkpoint of SHARDS x TENSORS_PER_SHARD tensors; returns its bytes."""
    import json

    directory.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for shard in range(SHARDS):
        name = f"model-{shard + 1:05d}-of-{SHARDS:05d}.safetensors"
        tensors = {}
        for i in range(TENSORS_PER_SHARD):
            key = f"layers.{shard}.proj{i}.weight"
            base = torch.randn(
                TENSOR_ROWS, TENSOR_COLS, generator=torch.Generator().manual_seed(shard * 100 + i)
            )
            noise = torch.randn(TENSOR_ROWS, TENSOR_COLS, generator=generator) * shift
            tensors[key] = (base * 0.02 + noise).to(torch.bfloat16)
            weight_map[key] = name
            total += tensors[key].numel() * 2
        save_file(tensors, directory / name, metadata={"format": "pt"})
        del tensors
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    return total


def _footprint(tmp_path: Path) -> int:
    """Peak RSS of the CLI pruning an 8x8 pair: the process's own footprint."""
    tiny_base, tiny_ft = tmp_path / "tiny_base", tmp_path / "tiny_ft"
    for directory, value in ((tiny_base, 1.0), (tiny_ft, 1.5)):
        directory.mkdir()
        save_file({"w": torch.full((8, 8), value)}, directory / "model.safetensors")
    # Twice, keeping the smaller: a first run on a fresh checkout may also JIT-compile the numba
    # kernels into their cache, which takes far more memory than pruning does.
    return min(
        _peak_rss_bytes(
            "prune",
            "--base",
            str(tiny_base),
            "--finetuned",
            str(tiny_ft),
            "--out",
            str(tmp_path / f"tiny_out_{attempt}"),
        )
        for attempt in (1, 2)
    )


def test_peak_memory_stays_within_a_budget_smaller_than_the_pair(tmp_path):
    footprint = _footprint(tmp_path)

    pair_bytes = _write_model(tmp_path / "base", 1, 0.0) + _write_model(tmp_path / "ft", 2, 0.002)
    tensor_bytes = TENSOR_ROWS * TENSOR_COLS * 2
    # The item computed (W, F, output) and the read-ahead (256 MiB) plus slack: a few tensors.
    budget = footprint + 16 * tensor_bytes
    assert pair_bytes > budget, "the test must process more than its memory budget"

    peak = _peak_rss_bytes(
        "prune", "--base", str(tmp_path / "base"), "--finetuned", str(tmp_path / "ft"),
        "--out", str(tmp_path / "out"), "--sparsity", "0.9", "--shard-size", "200MB",
    )  # fmt: skip
    print(f"footprint {footprint / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB, "
          f"budget {budget / 2**20:.0f} MiB, pair {pair_bytes / 2**20:.0f} MiB")  # fmt: skip
    assert peak < budget
    assert len(list((tmp_path / "out").glob("*.safetensors"))) == 4


VOCAB, HIDDEN = 2**20, 64  # 128 MiB bf16 embedding and lm_head, a tiny hidden size
CHUNKING = {"FAPM_CHUNK_ABOVE_BYTES": str(64 * 2**20), "FAPM_CHUNK_BYTES": str(16 * 2**20)}


def _write_large_vocabulary_model(directory: Path, seed: int, shift: float) -> None:
    directory.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        base = torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(len(name)))
        noise = torch.randn(VOCAB, HIDDEN, generator=generator) * shift
        tensors[name] = (base * 0.02 + noise).to(torch.bfloat16)
    tensors["model.norm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def test_a_large_vocabulary_is_pruned_in_windows_within_one_tensor_of_memory(tmp_path):
    """Embedding and lm_head far larger than the rest: the fused kernel walks the embedding in
    windows (thresholds lowered through the environment to fit a test) and the writer copies the
    excluded lm_head in windows, both handing their pages back, so the peak grows by less than
    one tensor; without windows W, F and the output of the embedding are resident together,
    three tensors' worth."""
    footprint = _footprint(tmp_path)
    _write_large_vocabulary_model(tmp_path / "base", 1, 0.0)
    _write_large_vocabulary_model(tmp_path / "ft", 2, 0.002)
    tensor_bytes = VOCAB * HIDDEN * 2
    budget = footprint + tensor_bytes

    def peak(out: str, env: dict[str, str]) -> int:
        return _peak_rss_bytes(
            "prune", "--base", str(tmp_path / "base"), "--finetuned", str(tmp_path / "ft"),
            "--out", str(tmp_path / out), "--sparsity", "0.9", "--exclude", "lm_head", env=env,
        )  # fmt: skip

    windowed = peak("windowed", CHUNKING)
    whole = peak("whole", {"FAPM_CHUNK_ABOVE_BYTES": str(2**40)})
    print(f"footprint {footprint / 2**20:.0f} MiB, windowed peak {windowed / 2**20:.0f} MiB, "
          f"whole-tensor peak {whole / 2**20:.0f} MiB, tensor {tensor_bytes / 2**20:.0f} MiB")  # fmt: skip
    assert windowed < budget
    assert whole > budget + tensor_bytes  # the bound is one the unchunked path cannot meet
    outputs = [(tmp_path / d / "model.safetensors").read_bytes() for d in ("windowed", "whole")]
    assert outputs[0] == outputs[1]

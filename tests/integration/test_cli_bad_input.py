"""Every bad input gets a one-line error naming the problem, a non-zero exit, and nothing at --out.

The CLI runs as a real subprocess (`python -m worker.cli`), as a user would run `fapm`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]


def fapm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _model(directory: Path, tensors: dict[str, torch.Tensor]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


@pytest.fixture
def pair(tmp_path):
    torch.manual_seed(0)
    w = {"layer.weight": torch.randn(8, 4), "norm.weight": torch.ones(4)}
    f = {k: v + 0.01 * torch.randn_like(v) for k, v in w.items()}
    return _model(tmp_path / "base", w), _model(tmp_path / "ft", f), tmp_path / "out"


def _assert_failed(result, code: int, *needles: str, out: Path | None = None) -> None:
    assert result.returncode == code, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr  # one line, no traceback
    for needle in needles:
        assert needle in lines[0], lines[0]
    if out is not None:
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if ".fapm-staging-" in p.name]


def test_missing_base_path(pair):
    base, ft, out = pair
    result = fapm("prune", "--base", str(base) + "-nope", "--finetuned", str(ft), "--out", str(out))
    _assert_failed(result, 1, "source_not_found", "base-nope", out=out)


def test_missing_finetuned_weights(pair, tmp_path):
    base, _, out = pair
    empty = tmp_path / "empty"
    empty.mkdir()
    result = fapm("prune", "--base", str(base), "--finetuned", str(empty), "--out", str(out))
    _assert_failed(result, 1, "no safetensors weights", out=out)


def test_pickle_checkpoint_is_refused_and_never_unpickled(pair, tmp_path):
    base, _, out = pair
    evil = tmp_path / "evil"
    evil.mkdir()
    marker = tmp_path / "pwned"
    # A pickle that would create `marker` if anything unpickled it.
    payload = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    (evil / "pytorch_model.bin").write_bytes(payload)
    result = fapm("prune", "--base", str(base), "--finetuned", str(evil), "--out", str(out))
    _assert_failed(
        result, 1, "unsupported_format", "pytorch_model.bin", "safetensors only", out=out
    )
    assert not marker.exists()


def test_different_architectures_name_the_tensor_and_both_shapes(pair, tmp_path):
    base, _, out = pair
    other = _model(
        tmp_path / "other", {"layer.weight": torch.randn(8, 6), "norm.weight": torch.ones(4)}
    )
    result = fapm("prune", "--base", str(base), "--finetuned", str(other), "--out", str(out))
    _assert_failed(result, 1, "architecture_mismatch", "layer.weight", "[8, 4]", "[8, 6]", out=out)


def test_base_tensor_missing_from_finetuned(pair, tmp_path):
    base, _, out = pair
    partial = _model(tmp_path / "partial", {"layer.weight": torch.randn(8, 4)})
    result = fapm("prune", "--base", str(base), "--finetuned", str(partial), "--out", str(out))
    _assert_failed(result, 1, "architecture_mismatch", "norm.weight", out=out)


@pytest.mark.parametrize(
    ("corrupt", "needle"),
    [
        (lambda b: b[:-3], "truncated"),
        (lambda b: (10**6).to_bytes(8, "little") + b[8:], "runs past the end"),
        (lambda b: (2 * 10**8).to_bytes(8, "little") + b[8:], "exceeds the"),
        (lambda b: b[:8] + b"!" + b[9:], "not valid JSON"),
        (lambda b: b.replace(b'"F32"', b'"X32"', 1), "unknown dtype"),
    ],
)
def test_corrupt_safetensors(pair, corrupt, needle):
    base, ft, out = pair
    path = ft / "model.safetensors"
    path.write_bytes(corrupt(path.read_bytes()))
    result = fapm("prune", "--base", str(base), "--finetuned", str(ft), "--out", str(out))
    _assert_failed(result, 1, "corrupt_checkpoint", needle, out=out)


def test_overlapping_offsets(pair):
    base, ft, out = pair
    path = ft / "model.safetensors"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header["norm.weight"]["data_offsets"] = [0, 16]
    header["layer.weight"]["data_offsets"] = [0, 128]
    body = json.dumps(header).encode()
    body += b" " * (n - len(body)) if len(body) <= n else b""
    path.write_bytes(len(body).to_bytes(8, "little") + body + raw[8 + n :])
    result = fapm("prune", "--base", str(base), "--finetuned", str(ft), "--out", str(out))
    _assert_failed(result, 1, "corrupt_checkpoint", out=out)


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--sparsity", "1.5"], "sparsity"),
        (["--sparsity", "-0.5"], "sparsity"),
        (["--method", "ties"], "--method"),
        (["--exclude", "(bad"], "exclude"),
        (["--shard-size", "12 furlongs"], "shard_size"),
    ],
)
def test_usage_errors_exit_2(pair, flags, needle):
    base, ft, out = pair
    result = fapm("prune", "--base", str(base), "--finetuned", str(ft), "--out", str(out), *flags)
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr
    assert not out.exists()


def test_existing_output_refused_unless_overwrite(pair):
    base, ft, out = pair
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = fapm("prune", "--base", str(base), "--finetuned", str(ft), "--out", str(out))
    _assert_failed(result, 1, "output_exists", "--overwrite")
    assert (out / "keep.txt").read_text() == "precious"
    # overwrite replaces only a model fapm published, never someone's directory
    args = ("prune", "--base", str(base), "--finetuned", str(ft), "--out", str(out))
    _assert_failed(fapm(*args, "--overwrite"), 1, "output_not_replaceable", "fapm published")
    assert (out / "keep.txt").read_text() == "precious"
    (out / "keep.txt").unlink()
    out.rmdir()
    assert fapm(*args).returncode == 0
    (out / "extra.txt").write_text("beside a published model")
    result = fapm(*args, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert not (out / "extra.txt").exists() and (out / "model.safetensors").exists()


def test_output_names_long_and_too_long(pair):
    """A 255-byte name publishes (staging names stay short); a 300-character one cannot exist."""
    base, ft, out = pair
    args = ("prune", "--base", str(base), "--finetuned", str(ft), "--out")
    fits = out.parent / ("n" * 255)
    assert fapm(*args, str(fits)).returncode == 0
    assert (fits / "model.safetensors").exists()
    too_long = out.parent / ("n" * 300)
    _assert_failed(fapm(*args, str(too_long)), 1, "invalid_output", "at most 255")
    assert not [p for p in out.parent.iterdir() if ".fapm-staging-" in p.name]


def test_nan_and_inf_are_counted_not_a_crash(tmp_path):
    w = {"t": torch.tensor([1.0, 2.0, 3.0, float("nan")])}
    f = {"t": torch.tensor([1.5, float("inf"), 3.0, 4.0])}
    base, ft = _model(tmp_path / "b", w), _model(tmp_path / "f", f)
    out = tmp_path / "out"
    result = fapm(
        "prune", "--base", str(base), "--finetuned", str(ft), "--out", str(out), "--sparsity", "0.5"
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["totals"]["nonfinite"] == 2
    assert report["totals"]["kept"] == 2


def test_interrupted_run_leaves_nothing(pair, tmp_path):
    """A run killed mid-way (SIGKILL: no cleanup at all) leaves nothing at --out."""
    base, ft, out = pair
    big = {f"t{i}": torch.randn(256, 256) for i in range(40)}
    base = _model(tmp_path / "bigbase", big)
    ft = _model(tmp_path / "bigft", {k: v + 1 for k, v in big.items()})
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "worker.cli",
            "prune",
            "--base",
            str(base),
            "--finetuned",
            str(ft),
            "--out",
            str(out),
            "--kernel",
            "torch",
            "--method",
            "random",
        ],
        cwd=REPO,
        env={**os.environ},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    # Wait until the staging directory exists, then kill.
    import time

    deadline = time.time() + 60
    while time.time() < deadline and not [
        p for p in out.parent.iterdir() if ".fapm-staging-" in p.name
    ]:
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert not out.exists()


def _header_of(path: Path) -> tuple[bytes, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return raw[8 : 8 + n], raw[8 + n :]


def _rewrite_header(path: Path, edit) -> None:
    header, data = _header_of(path)
    body = edit(header)
    path.write_bytes(len(body).to_bytes(8, "little") + body + data)


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda h: b'{"x": ' + b"[" * 50_000 + b"]" * 50_000 + b", " + h[1:], "nested deeper"),
        (lambda h: h.replace(b'"F32"', b'["F32"]', 1), "unknown dtype"),
        (lambda h: h.replace(b'"shape":[8,4]', b'"shape":[' + b"9" * 5000 + b"]", 1), "digits"),
        (lambda h: h.replace(b'"shape":[8,4]', b'"shape":[9223372036854775808,0]', 1), "shape"),
        (lambda h: h.replace(b'"layer.weight"', b'"\\ud800"', 1), "surrogate"),
    ],
    ids=["nested", "dtype-list", "5000-digits", "dim-2**63", "lone-surrogate"],
)
def test_malformed_headers_are_corrupt_checkpoint_not_a_traceback(pair, edit, needle):
    """The reliability campaign's crashes, each now one line, [corrupt_checkpoint], exit 1."""
    base, ft, out = pair
    _rewrite_header(ft / "model.safetensors", edit)
    result = fapm("prune", "--base", str(base), "--finetuned", str(ft), "--out", str(out))
    assert "Traceback" not in result.stderr
    _assert_failed(result, 1, "corrupt_checkpoint", needle, out=out)


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("config.json", b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested deeper"),
        ("config.json", b'{"a": ' + b"1" * 5000 + b"}", "digits"),
        ("config.json", b'{"text_config": 5}', "text_config"),
        ("config.json", b"[]", "not a JSON object"),
        ("model.safetensors.index.json", b'{"weight_map": ' + b"[" * 100_000 + b"}", "deeper"),
        ("model.safetensors.index.json", b'{"weight_map": {"a": 1}}', "weight_map"),
    ],
    ids=[
        "config-nested",
        "config-digits",
        "config-text_config",
        "config-list",
        "index-nested",
        "index-values",
    ],
)
def test_malformed_side_files_are_corrupt_checkpoint(pair, name, content, needle):
    base, ft, out = pair
    (ft / name).write_bytes(content)
    result = fapm("prune", "--base", str(base), "--finetuned", str(ft), "--out", str(out))
    assert "Traceback" not in result.stderr
    _assert_failed(result, 1, "corrupt_checkpoint", needle, out=out)


def test_triton_on_cpu_is_a_typed_usage_error(pair):
    base, ft, out = pair
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", "prune", "--base", str(base), "--finetuned",
         str(ft), "--out", str(out), "--kernel", "triton", "--device", "cpu"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    _assert_failed(result, 2, "device_unavailable", "TRITON_INTERPRET", out=out)


def test_argparse_errors_are_one_line_exit_2(pair):
    base, _, _ = pair
    result = fapm("prune", "--base", str(base))
    _assert_failed(result, 2, "required", "--help")

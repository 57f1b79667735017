"""The safetensors reader against files written by the reference library, and every way a file can
be corrupt (each must be a clear CorruptCheckpoint naming the problem, never a crash)."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from worker.errors import CorruptCheckpoint
from worker.io.checkpoint import SafetensorsCheckpoint
from worker.io.safetensors_format import build_header, parse_header, read_header_length
from worker.io.source import LocalDirSource
from worker.io.torch_tensors import read_tensor


def _tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "a": torch.randn(3, 5, dtype=torch.bfloat16),
        "b": torch.randn(7, dtype=torch.float16),
        "c": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "d": torch.randn(2, 2, 2, dtype=torch.float32),
        "scalar": torch.tensor(3.5, dtype=torch.float32),
        "empty": torch.zeros(0, 4, dtype=torch.float32),
    }


def test_reads_what_the_reference_library_writes(tmp_path):
    tensors = _tensors()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    checkpoint = SafetensorsCheckpoint(LocalDirSource(tmp_path))
    assert set(checkpoint.names()) == set(tensors)
    for name, tensor in tensors.items():
        got = read_tensor(checkpoint, name)
        assert got.dtype == tensor.dtype and got.shape == tensor.shape
        assert torch.equal(
            got.reshape(-1).view(torch.uint8), tensor.contiguous().reshape(-1).view(torch.uint8)
        )


def test_build_header_round_trips_through_the_reference_reader(tmp_path):
    from safetensors import safe_open

    tensors = _tensors()
    order = [(n, t) for n, t in tensors.items()]
    tags = {torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64", torch.float32: "F32"}
    header, offsets = build_header([(n, tags[t.dtype], tuple(t.shape)) for n, t in order])
    assert len(header) % 8 == 0
    path = tmp_path / "x.safetensors"
    with open(path, "wb") as f:
        f.write(header)
        for (_, t), (begin, end) in zip(order, offsets, strict=True):
            assert f.tell() == begin
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            assert f.tell() == end
    with safe_open(path, "pt") as f:
        for name, tensor in tensors.items():
            assert torch.equal(f.get_tensor(name), tensor)


def _write_raw(path, header: dict | bytes, data: bytes, length: int | None = None) -> None:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    prefix = struct.pack("<Q", len(body) if length is None else length)
    path.write_bytes(prefix + body + data)


GOOD = {"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}


@pytest.mark.parametrize(
    ("header", "data", "length", "message"),
    [
        (GOOD, b"\0" * 8, 10**6, "runs past the end"),
        (GOOD, b"\0" * 8, 200_000_000, "exceeds the"),
        (b"{not json", b"", None, "not valid JSON"),
        (b"[1, 2]", b"", None, "not a JSON object"),
        (
            {"t": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}},
            b"\0" * 8,
            None,
            "unknown dtype",
        ),
        (
            {"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}},
            b"\0" * 8,
            None,
            "out of range",
        ),
        (
            {"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
            b"\0" * 8,
            None,
            "needs 12 bytes",
        ),
        (
            {
                "t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "u": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
            },
            b"\0" * 8,
            None,
            "overlaps",
        ),
        ({"t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, None, "hole"),
        (GOOD, b"\0" * 12, None, "trailing"),
        (
            {"t": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}},
            b"\0" * 8,
            None,
            "invalid shape",
        ),
        (
            {"t": {"dtype": "F32", "shape": [2], "data_offsets": [0]}},
            b"\0" * 8,
            None,
            "invalid data_offsets",
        ),
        ({"__metadata__": {"a": 1}, **GOOD}, b"\0" * 8, None, "__metadata__"),
    ],
)
def test_corrupt_files_are_named_errors(tmp_path, header, data, length, message):
    _write_raw(tmp_path / "model.safetensors", header, data, length)
    with pytest.raises(CorruptCheckpoint, match=message) as info:
        SafetensorsCheckpoint(LocalDirSource(tmp_path))
    assert "model.safetensors" in str(info.value)


def test_truncated_file_is_a_named_error(tmp_path):
    save_file({"t": torch.ones(100)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-10])
    with pytest.raises(CorruptCheckpoint, match="truncated"):
        SafetensorsCheckpoint(LocalDirSource(tmp_path))


def test_too_short_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\1\2")
    with pytest.raises(CorruptCheckpoint, match="too short"):
        SafetensorsCheckpoint(LocalDirSource(tmp_path))


def test_header_length_and_parse_are_exact():
    body = json.dumps(GOOD).encode()
    assert read_header_length(struct.pack("<Q", len(body)), 8 + len(body) + 8, "f") == len(body)
    header = parse_header(body, 8 + len(body) + 8, "f")
    (entry,) = header.tensors
    assert (entry.begin, entry.end) == (8 + len(body), 8 + len(body) + 8)
    assert entry.numel == 2 and entry.is_float


def test_index_that_names_a_missing_tensor_is_corrupt(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "model-00001-of-00001.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "weight_map": {
                    "a": "model-00001-of-00001.safetensors",
                    "b": "model-00001-of-00001.safetensors",
                }
            }
        )
    )
    with pytest.raises(CorruptCheckpoint, match="'b'"):
        SafetensorsCheckpoint(LocalDirSource(tmp_path))


@pytest.mark.parametrize("background", [False, True], ids=["from-reads", "in-background"])
def test_shard_digests_equal_sha256_of_the_files(tmp_path, background):
    import hashlib

    save_file(_tensors(), tmp_path / "model.safetensors")
    checkpoint = SafetensorsCheckpoint(LocalDirSource(tmp_path), hash_in_background=background)
    for name in checkpoint.names()[:3]:  # partial, in-order reads; the rest is read at the end
        read_tensor(checkpoint, name)
    expected = hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()
    assert checkpoint.shard_digests() == {"model.safetensors": expected}


@pytest.mark.parametrize("pad", [0, 1, 3], ids=["aligned", "odd-by-1", "odd-by-3"])
def test_mapped_reads_equal_buffered_reads_at_any_alignment(tmp_path, pad):
    """Local files are mapped, not copied; a header whose length leaves the data misaligned for
    the dtype (legal in the format, though writers pad) must still give exact values."""
    import hashlib

    tensors = {
        "x": torch.randn(9, 5, dtype=torch.float32),
        "y": torch.randn(11, dtype=torch.bfloat16),
        "z": torch.randn(4, 3, dtype=torch.float16),
    }
    entries, data, offset = {}, b"", 0
    for name, tensor in tensors.items():
        raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        tag = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}[tensor.dtype]
        entries[name] = {
            "dtype": tag,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        data, offset = data + raw, offset + len(raw)
    body = json.dumps(entries).encode()
    body += b" " * ((-(8 + len(body)) % 8 + pad) % 8)  # data starts at 8 + len(body)
    _write_raw(tmp_path / "model.safetensors", body, data)
    assert (8 + len(body)) % 8 == pad

    mapped = SafetensorsCheckpoint(LocalDirSource(tmp_path), hash_in_background=pad == 1)
    for name, tensor in tensors.items():
        got = read_tensor(mapped, name)
        assert got.dtype == tensor.dtype and torch.equal(
            got.view(torch.uint8), tensor.view(torch.uint8)
        )
    expected = hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()
    assert mapped.shard_digests() == {"model.safetensors": expected}


def test_background_digests_cover_many_chunks_and_stop_on_close(tmp_path, monkeypatch):
    """Hashing in background maps the file chunk by chunk: a file of several chunks gives the
    file's sha256; a checkpoint closed early stops the thread between chunks."""
    import hashlib

    from worker.io import checkpoint as checkpoint_module

    monkeypatch.setattr(checkpoint_module, "_MAP_CHUNK", 4096 + 8)  # many small, odd chunks
    save_file({"big": torch.randn(64, 1000)}, tmp_path / "model.safetensors")
    source = LocalDirSource(tmp_path)
    checkpoint = SafetensorsCheckpoint(source, hash_in_background=True)
    expected = hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()
    assert checkpoint.shard_digests() == {"model.safetensors": expected}

    # Stopping: the thread is held inside its first chunk until the checkpoint has been told to
    # stop; it must then leave without mapping another chunk, and give no digests.
    import threading

    (tmp_path / "other").mkdir()
    save_file({"big": torch.randn(64, 1000)}, tmp_path / "other" / "model.safetensors")
    other = LocalDirSource(tmp_path / "other")
    entered, gate, mapped = threading.Event(), threading.Event(), []
    real_map = other.map_range

    def gated_map(name, offset, length):
        mapped.append(offset)
        entered.set()
        gate.wait(timeout=10)
        return real_map(name, offset, length)

    monkeypatch.setattr(other, "map_range", gated_map)
    stopped = SafetensorsCheckpoint(other, hash_in_background=True)
    assert entered.wait(timeout=10)
    stopped._background.stop()
    gate.set()
    stopped.close()  # joins the thread, before the source closes its files
    other.close()
    assert mapped == [0]
    with pytest.raises(RuntimeError, match="stopped"):
        stopped.shard_digests()


def test_digest_cache_remembers_a_file_until_it_changes(tmp_path, monkeypatch):
    """A second job on the same, unchanged file takes its sha256 from the machine's cache; a
    write to the file (new mtime/ctime) or a cache turned off means hashing it again."""
    import hashlib
    import os

    from worker.io import digest_cache

    monkeypatch.setenv("FAPM_DIGEST_CACHE", str(tmp_path / "cache"))
    (tmp_path / "m").mkdir()
    path = tmp_path / "m" / "model.safetensors"
    save_file({"w": torch.randn(50, 20)}, path)
    real = hashlib.sha256(path.read_bytes()).hexdigest()

    def digest() -> str:
        source = LocalDirSource(tmp_path / "m")
        try:
            checkpoint = SafetensorsCheckpoint(source, hash_in_background=True)
            return checkpoint.shard_digests()["model.safetensors"]
        finally:
            source.close()

    assert digest() == real  # hashed, then remembered
    key = digest_cache.file_key(os.stat(path))
    assert digest_cache.lookup(key) == real
    # Proof that the next job reads the cache: plant a different digest under the file's key.
    digest_cache.remember(key, "0" * 64)
    assert digest() == "0" * 64
    monkeypatch.setenv("FAPM_DIGEST_CACHE", "off")
    assert digest() == real
    monkeypatch.setenv("FAPM_DIGEST_CACHE", str(tmp_path / "cache"))
    os.utime(path, ns=(1, 1))  # any change of the file's stat makes a new key
    assert digest() == real
    # A corrupt entry is ignored, not trusted.
    digest_cache._entry(digest_cache.cache_dir(), digest_cache.file_key(os.stat(path))).write_text(
        "{"
    )
    assert digest() == real


def _entry(dtype: object = "F32", shape: object = (2,), offsets: object = (0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ({"t": _entry(dtype=["F32"])}, "unknown dtype"),
        ({"t": _entry(dtype={"F32": 1})}, "unknown dtype"),
        ({"t": _entry(shape=[2**63])}, "invalid shape"),
        ({"t": _entry(shape=[0, 2**61, 2**61], offsets=[0, 0])}, "invalid shape"),
        ({"t": _entry(shape=[1] * 33)}, "invalid shape"),
        ({"t": _entry(shape=[True, 2])}, "invalid shape"),
        ({"t": _entry(shape=[2.0])}, "invalid shape"),
        ({"t": _entry(offsets=[0.0, 8])}, "invalid data_offsets"),
        ({"t": _entry(offsets=[8, 0])}, "out of range"),
        ({"t": _entry(offsets=[-8, 0])}, "out of range"),
        ({"t": _entry(offsets=[0, 2**64])}, "out of range"),
        ({"t": 5}, "is not an object"),
        ({"__metadata__": [], **GOOD}, "__metadata__"),
        (
            b'{"t": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 8]}}',
            "more than 20 digits",
        ),
        (b'{"t": {"dtype": "F32", "shape": [[[[[2]]]]], "data_offsets": [0, 8]}}', "deeper"),
        (b'{"t": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "deeper"),
        (b'{"\\ud800": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', "surrogate"),
    ],
)
def test_malformed_entries_are_named_errors(tmp_path, header, message):
    """The campaign's crashes (a list as dtype, a dimension of 2**63, deep nesting, a 5000-digit
    number, a lone surrogate) and their neighbours: each a CorruptCheckpoint, never a TypeError,
    RecursionError or ValueError."""
    _write_raw(tmp_path / "model.safetensors", header, b"\0" * 8)
    with pytest.raises(CorruptCheckpoint, match=message) as info:
        SafetensorsCheckpoint(LocalDirSource(tmp_path))
    assert "model.safetensors" in str(info.value)


def test_zero_size_tensors_may_share_an_offset():
    body = json.dumps(
        {"a": _entry(shape=[0, 4], offsets=[0, 0]), "b": _entry(shape=[0], offsets=[0, 0]), **GOOD}
    ).encode()
    header = parse_header(body, 8 + len(body) + 8, "f")
    assert sorted(t.name for t in header.tensors) == ["a", "b", "t"]


def test_a_header_listing_more_tensors_than_the_cap_is_refused_before_it_is_built():
    """The campaign's worst header: 1.5M zero-size tensors just under the 100 MB cap cost 1.4 GB
    and 14-20 s to parse. Now it is counted first and refused in well under a second."""
    import resource
    import time

    from worker.io.safetensors_format import MAX_TENSORS

    entry = '{"dtype":"F32","shape":[0],"data_offsets":[0,0]}'
    body = ("{" + ",".join(f'"t{i:07d}":{entry}' for i in range(1_500_000)) + "}").encode()
    assert len(body) < 100_000_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    with pytest.raises(CorruptCheckpoint, match=f"at most {MAX_TENSORS:,} tensors"):
        parse_header(body, 8 + len(body), "f")
    assert time.perf_counter() - started < 3
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024  # KiB


def test_a_header_at_the_tensor_cap_still_parses():
    from worker.io.safetensors_format import MAX_TENSORS

    entry = '{"dtype":"F32","shape":[0],"data_offsets":[0,0]}'
    body = ("{" + ",".join(f'"t{i}":{entry}' for i in range(MAX_TENSORS)) + "}").encode()
    assert len(parse_header(body, 8 + len(body), "f").tensors) == MAX_TENSORS

"""JobSpec validation (ValueErrors naming the field) and the output shard plan."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from worker.io.writer import PlannedTensor, ShardedWriter, plan_shards
from worker.spec import JobSpec, parse_byte_size


def _spec(**kw):
    return JobSpec(**{"base": "b", "finetuned": "f", "output": "o", **kw})


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"sparsity": 1.5}, "sparsity"),
        ({"sparsity": -0.1}, "sparsity"),
        ({"method": "ties"}, "method"),
        ({"exclude": "(unclosed"}, "exclude"),
        ({"shard_size": "5 parsecs"}, "shard_size"),
        ({"shard_size": 0}, "shard_size"),
        ({"adapter": "a"}, "finetuned"),
        ({"finetuned": None}, "finetuned"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_invalid_specs_are_value_errors_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        _spec(**kwargs)


def test_byte_sizes():
    assert parse_byte_size("5GB") == 5 * 10**9
    assert parse_byte_size("500MB") == 5 * 10**8
    assert parse_byte_size("1GiB") == 2**30
    assert parse_byte_size("1.5KB") == 1500
    assert parse_byte_size(123) == 123
    assert _spec(shard_size="2MiB").shard_size == 2 * 2**20


def test_plan_shards_follows_the_hub_rule():
    tensors = [PlannedTensor(f"t{i}", "F32", (n,)) for i, n in enumerate([10, 10, 30, 5, 1])]
    shards = plan_shards(tensors, max_shard_bytes=80)  # bytes: 40, 40, 120, 20, 4
    assert [[t.name for t in s.tensors] for s in shards] == [["t0", "t1"], ["t2"], ["t3", "t4"]]
    assert [s.file for s in shards] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert plan_shards(tensors, 10**9)[0].file == "model.safetensors"


def test_writer_produces_loadable_shards_and_index(tmp_path):
    tensors = {f"t{i}": torch.randn(i + 3, 4) for i in range(5)}
    planned = [PlannedTensor(n, "F32", tuple(t.shape)) for n, t in tensors.items()]
    shards = plan_shards(planned, max_shard_bytes=150)
    completed = []
    writer = ShardedWriter(tmp_path, shards, on_shard_complete=completed.append)
    for name, tensor in tensors.items():
        writer.write(name, tensor.numpy().tobytes())
    written = writer.finish()
    assert [w.file for w in written] == [s.file for s in shards] == [c.file for c in completed]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    loaded = {}
    for shard in shards:
        loaded.update(load_file(tmp_path / shard.file))
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in planned)
    assert set(index["weight_map"]) == set(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor)


def test_writer_refuses_out_of_order_or_wrong_sized_tensors(tmp_path):
    shards = plan_shards([PlannedTensor("a", "F32", (2,)), PlannedTensor("b", "F32", (2,))], 100)
    writer = ShardedWriter(tmp_path, shards)
    with pytest.raises(ValueError, match="expected tensor 'a'"):
        writer.write("b", b"\0" * 8)
    with pytest.raises(ValueError, match="4 bytes written, 8 planned"):
        writer.write("a", b"\0" * 4)
    writer.write("a", b"\0" * 8)
    with pytest.raises(ValueError, match="never written"):
        writer.finish()


def test_writer_thread_writes_in_order_and_reports_errors(tmp_path):
    from worker.io.writer import WriterThread

    tensors = {f"t{i}": torch.randn(64, 64) for i in range(6)}
    planned = [PlannedTensor(n, "F32", tuple(t.shape)) for n, t in tensors.items()]
    background = WriterThread(ShardedWriter(tmp_path, plan_shards(planned, 40_000)))
    for name, tensor in tensors.items():
        background.write(name, tensor.numpy())
    written = background.finish()
    loaded = {}
    for shard in written:
        loaded.update(load_file(tmp_path / shard.file))
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())

    failing = WriterThread(ShardedWriter(tmp_path / "x", plan_shards(planned, 40_000)))
    (tmp_path / "x").mkdir()
    failing.write("t1", tensors["t1"].numpy())  # out of order: fails on the writer thread
    with pytest.raises(ValueError, match="expected tensor 't0'"):
        for name, tensor in tensors.items():
            failing.write(name, tensor.numpy())
        failing.finish()
    failing.abort()  # idempotent after a failure


@pytest.mark.parametrize("mappable", [True, False], ids=["mapped", "no-fallocate"])
def test_computing_into_destinations_gives_the_same_files_and_digests(
    tmp_path, monkeypatch, mappable
):
    """Tensors filled in place (through `destination`) and tensors handed over as bytes give
    byte-identical shards, and each shard's recorded sha256 is that of the file on disk."""
    import hashlib

    from worker.io import writer as writer_module
    from worker.io.torch_tensors import tensor_over

    if not mappable:  # a filesystem without fallocate: no destination, plain writes
        monkeypatch.setattr(writer_module, "preallocate", lambda fd, size: False)
    tensors = {f"t{i}": torch.randn(i + 50, 33).to(torch.bfloat16) for i in range(7)}
    planned = [PlannedTensor(n, "BF16", tuple(t.shape)) for n, t in tensors.items()]
    shards = plan_shards(planned, max_shard_bytes=12_000)
    assert len(shards) > 2

    (tmp_path / "copied").mkdir()
    copied = ShardedWriter(tmp_path / "copied", shards)
    for name, tensor in tensors.items():
        copied.write(name, tensor.view(torch.uint8).numpy())
    expected = copied.finish()

    (tmp_path / "inplace").mkdir()
    inplace = writer_module.WriterThread(ShardedWriter(tmp_path / "inplace", shards))
    used_destinations = 0
    for i, (name, tensor) in enumerate(tensors.items()):
        place = inplace.destination(name)
        if place is None or i == 3:  # one tensor handed over from its own buffer anyway
            inplace.write(name, tensor.view(torch.uint8).numpy())
            continue
        used_destinations += 1
        target = tensor_over(place, "BF16", tuple(tensor.shape))
        target.copy_(tensor)
        inplace.write(name, target.reshape(-1).view(torch.uint8).numpy())
    written = inplace.finish()
    assert used_destinations == (len(tensors) - 1 if mappable else 0)

    assert written == expected
    for shard in written:
        data = (tmp_path / "inplace" / shard.file).read_bytes()
        assert data == (tmp_path / "copied" / shard.file).read_bytes()
        assert shard.size == len(data) and shard.sha256 == hashlib.sha256(data).hexdigest()
        for name, tensor in load_file(tmp_path / "inplace" / shard.file).items():
            assert torch.equal(tensor, tensors[name])


def test_a_merge_takes_a_bounded_number_of_models():
    def spec(n: int) -> JobSpec:
        return JobSpec(base="/b", output="/o", finetuned=[{"model": f"/m{i}"} for i in range(n)],
                       merge={"rule": "ties"}, method="magnitude", sparsity=0.5)  # fmt: skip

    assert len(spec(32).finetuned) == 32
    with pytest.raises(ValueError, match="at most 32"):
        spec(33)

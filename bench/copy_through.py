"""Copy-through: the I/O floor that `fapm prune` is measured against (leg (a) of bench_prune.py).

    .venv/bin/python bench/copy_through.py --base DIR --finetuned DIR --out DIR [--shard-size 1e9]

Reads every tensor of both checkpoints with safetensors (`safe_open(...).get_tensor`) and writes
the fine-tuned tensors, unchanged, as a new sharded checkpoint (`model-0000i-of-0000N.safetensors`
of at most --shard-size bytes of tensor data, plus `model.safetensors.index.json` and config.json).
It does no arithmetic: what is left is reading, copying into tensors and writing.

To be a fair floor for fapm it writes the way fapm's writer does: the output's shard layout is
planned from the headers, each tensor is written straight to its place in its shard as it is read
(memory holds one pair of tensors), and each shard is fsynced when it is complete (--no-fsync
leaves the data in the page cache, to show what the disk costs).

--engine-io writes the way fapm's writer does since it learnt two tricks of its own: each shard's
blocks are reserved up front (fallocate) and the writeback of each tensor is started as soon as it
is written (sync_file_range), so the final fsync has little left. Leg (a') of bench_prune.py runs
it, to show how much of fapm's edge over the plain copy-through is the I/O rather than the compute.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

INDEX = "model.safetensors.index.json"
DTYPE_SIZES = {
    "BF16": 2,
    "F16": 2,
    "F32": 4,
    "F64": 8,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


def weight_files(directory: Path) -> list[str]:
    index = directory / INDEX
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted(set(weight_map.values()))
    return ["model.safetensors"]


def read_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header


def header_bytes(tensors: list[tuple[str, str, list[int]]]) -> bytes:
    doc: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in tensors:
        n = DTYPE_SIZES[dtype]
        for dim in shape:
            n *= dim
        doc[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(doc, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def copy_through(
    base: Path, finetuned: Path, out: Path, shard_size: int, fsync: bool, engine_io: bool = False
) -> dict:
    started = time.perf_counter()
    # The fine-tuned model's tensors in storage order (file, then offset): the order that reads fastest.
    order: list[tuple[str, str, str, list[int], int]] = []
    for file in weight_files(finetuned):
        header = read_header(finetuned / file)
        for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            size = entry["data_offsets"][1] - entry["data_offsets"][0]
            order.append((file, name, entry["dtype"], entry["shape"], size))
    base_file = {}
    for file in weight_files(base):
        for name in read_header(base / file):
            base_file[name] = file

    shards: list[list[tuple[str, str, str, list[int], int]]] = [[]]
    filled = 0
    for item in order:
        if shards[-1] and filled + item[4] > shard_size:
            shards.append([])
            filled = 0
        shards[-1].append(item)
        filled += item[4]
    names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    def read(path: Path, name: str) -> torch.Tensor:
        # safe_open mmaps the file; a handle kept open would leave every page it touched in this
        # process's RSS (page cache, but counted), so each read opens and closes it (~1 ms).
        with safe_open(str(path), framework="pt") as handle:
            return handle.get_tensor(name)

    if engine_io:
        from worker.io.writer import preallocate, start_writeback
    read_bytes = 0
    for shard_name, shard in zip(names, shards, strict=True):
        with open(out / shard_name, "wb") as sink:
            header = header_bytes([(name, dtype, shape) for _, name, dtype, shape, _ in shard])
            if engine_io:
                preallocate(sink.fileno(), len(header) + sum(item[4] for item in shard))
            sink.write(header)
            for file, name, _dtype, _shape, size in shard:
                w = read(base / base_file[name], name)
                f = read(finetuned / file, name)
                read_bytes += w.numel() * w.element_size() + size
                offset = sink.tell()
                sink.write(f.contiguous().view(-1).view(torch.uint8).numpy().data)
                if engine_io:
                    sink.flush()
                    start_writeback(sink.fileno(), offset, size)
                del w, f
            sink.flush()
            if fsync:
                os.fsync(sink.fileno())
    weight_map = {
        name: shard_name
        for shard_name, shard in zip(names, shards, strict=True)
        for _, name, *_ in shard
    }
    total = sum(item[4] for item in order)
    (out / INDEX).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    if (finetuned / "config.json").exists():
        shutil.copyfile(finetuned / "config.json", out / "config.json")
    seconds = time.perf_counter() - started
    return {
        "read_bytes": read_bytes,
        "written_bytes": total,
        "shards": len(shards),
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--finetuned", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--shard-size", type=float, default=1e9, help="bytes of tensor data per shard"
    )
    parser.add_argument("--no-fsync", action="store_true", help="do not fsync the shards")
    parser.add_argument(
        "--engine-io",
        action="store_true",
        help="preallocate each shard and start each tensor's writeback at once, as fapm does",
    )
    args = parser.parse_args(argv)
    result = copy_through(
        args.base,
        args.finetuned,
        args.out,
        int(args.shard_size),
        not args.no_fsync,
        args.engine_io,
    )
    print(
        f"copied {result['written_bytes'] / 1e9:.2f} GB into {result['shards']} shards "
        f"(read {result['read_bytes'] / 1e9:.2f} GB) in {result['seconds']:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Write a synthetic base / fine-tuned pair with Llama-3-8B tensor shapes, in bf16, for benchmarks.

    .venv/bin/python bench/make_pair.py --gb 2 --out bench/out/pair-2gb

writes OUT/base and OUT/finetuned, each a Hugging Face model directory: `config.json` (a
transformers LlamaConfig), `model-0000i-of-0000N.safetensors` shards of at most --shard-size bytes
of tensor data and `model.safetensors.index.json`. Tensors are those of Llama-3-8B (q_proj
4096x4096, k/v_proj 1024x4096, o_proj 4096x4096, gate/up_proj 14336x4096, down_proj 4096x14336,
input/post-attention RMSNorm 4096, a 32000x4096 embed_tokens and lm_head, the final norm), with as
many decoder layers as it takes to reach --gb (decimal GB) per model: 4 layers for 2 GB (2.27 GB),
8 for 4 GB (4.01 GB).

Values: base = N(0, 0.02) for matrices (1 + N(0, 0.05) for norms); the fine-tune is the base plus
N(0, 0.002) (0.01 for norms) on about half the entries, rounded to bf16, as in PERFORMANCE.md.

Speed and memory: torch.randn runs at ~30 M values/s on this 2-core machine (a 4 GB pair would take
minutes), so a small numba kernel draws both models in one parallel pass: one splitmix64 draw per
entry gives the base value (16 bits into a 65536-entry inverse-normal-CDF table), the touched bit
and the noise (16 more bits). Base and fine-tune are drawn together one shard's worth at a time and
written with safetensors.torch.save_file, so memory stays at about two shards plus save_file's
copy, whatever --gb is. The output is deterministic in --seed (independent of the thread count).

A finished pair records its parameters in OUT/pair.json; a second run with the same parameters
does nothing (--force regenerates).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numba
import numpy as np
import torch
from safetensors.torch import save_file

VOCAB = 32000
HIDDEN = 4096
INTERMEDIATE = 14336
HEADS = 32
KV_HEADS = 8
HEAD_DIM = HIDDEN // HEADS
BF16_BYTES = 2
STAMP = "pair.json"
FORMAT = "fapm-bench-pair/1"

_BLOCK = 1 << 14  # entries per RNG stream (the unit of parallel work)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def layer_shapes(i: int) -> list[tuple[str, tuple[int, ...]]]:
    p = f"model.layers.{i}"
    kv = KV_HEADS * HEAD_DIM
    return [
        (f"{p}.input_layernorm.weight", (HIDDEN,)),
        (f"{p}.self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
        (f"{p}.self_attn.k_proj.weight", (kv, HIDDEN)),
        (f"{p}.self_attn.v_proj.weight", (kv, HIDDEN)),
        (f"{p}.self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
        (f"{p}.post_attention_layernorm.weight", (HIDDEN,)),
        (f"{p}.mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN)),
        (f"{p}.mlp.up_proj.weight", (INTERMEDIATE, HIDDEN)),
        (f"{p}.mlp.down_proj.weight", (HIDDEN, INTERMEDIATE)),
    ]


def _nbytes(shape: tuple[int, ...]) -> int:
    return math.prod(shape) * BF16_BYTES


def layers_for(gb: float, vocab: int = VOCAB) -> int:
    """The fewest decoder layers for a model of at least `gb` decimal GB."""
    fixed = 2 * _nbytes((vocab, HIDDEN)) + _nbytes((HIDDEN,))
    per_layer = sum(_nbytes(s) for _, s in layer_shapes(0))
    return max(1, math.ceil((gb * 1e9 - fixed) / per_layer))


def model_tensors(layers: int, vocab: int = VOCAB) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor in HF storage order: embeddings, layers, final norm, lm_head."""
    tensors = [("model.embed_tokens.weight", (vocab, HIDDEN))]
    for i in range(layers):
        tensors += layer_shapes(i)
    tensors += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (vocab, HIDDEN))]
    return tensors


def plan_shards(
    tensors: list[tuple[str, tuple[int, ...]]], max_bytes: int
) -> list[list[tuple[str, tuple[int, ...]]]]:
    """The save_pretrained rule: a tensor that would overflow the current shard starts a new one."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        n = _nbytes(shape)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    return shards


# -- the generator -----------------------------------------------------------------------------


@numba.njit(inline="always")
def _mix(z):
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@numba.njit(parallel=True, cache=True)
def _draw_pair(seed, w_bits, w_vals, noise_vals, out_w, out_f):
    """out_w[i] = bf16 base value; out_f[i] = bf16(base + noise) on about half the entries.

    `w_bits`/`w_vals` are a 65536-entry table of bf16 base values (bits and exact float32),
    `noise_vals` one of float32 noise values; both are quantiles of the wanted normal.
    """
    n = out_w.size
    blocks = (n + _BLOCK - 1) // _BLOCK
    for b in numba.prange(blocks):
        start = b * _BLOCK
        stop = min(start + _BLOCK, n)
        scratch = np.empty(stop - start, dtype=np.float32)
        scratch_bits = scratch.view(np.uint32)
        state = _mix(seed + np.uint64(b) * _GOLDEN)
        for i in range(start, stop):
            state += _GOLDEN
            z = _mix(state)
            r = np.int64(z & np.uint64(0xFFFF))
            out_w[i] = w_bits[r]
            touched = np.float32((z >> np.uint64(16)) & np.uint64(1))  # branchless: ~2x faster
            noise = noise_vals[np.int64((z >> np.uint64(32)) & np.uint64(0xFFFF))]
            scratch[i - start] = w_vals[r] + touched * noise
        for i in range(start, stop):  # float32 -> bf16, round to nearest even
            u = scratch_bits[i - start]
            u = u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
            out_f[i] = np.uint16(u >> np.uint32(16))


def _normal_quantiles() -> torch.Tensor:
    p = (torch.arange(65536, dtype=torch.float64) + 0.5) / 65536
    return torch.special.ndtri(p)


class PairGenerator:
    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.q = _normal_quantiles()
        self._tables: dict[tuple[float, float, float], tuple[np.ndarray, ...]] = {}

    def _table(self, mean: float, std: float, noise: float) -> tuple[np.ndarray, ...]:
        key = (mean, std, noise)
        if key not in self._tables:
            w = (mean + std * self.q).to(torch.bfloat16)
            self._tables[key] = (
                w.view(torch.int16).numpy().view(np.uint16).copy(),
                w.to(torch.float32).numpy().copy(),
                (noise * self.q).to(torch.float32).numpy().copy(),
            )
        return self._tables[key]

    def pair(self, index: int, name: str, shape: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
        """(base, fine-tuned) bf16 tensors for the `index`-th tensor of the model."""
        norm = len(shape) == 1
        w_bits, w_vals, noise_vals = self._table(
            1.0 if norm else 0.0, 0.05 if norm else 0.02, 0.01 if norm else 0.002
        )
        n = math.prod(shape)
        out_w = np.empty(n, dtype=np.uint16)
        out_f = np.empty(n, dtype=np.uint16)
        stream = (self.seed * 1_000_003 + index) * 0x100000001B3 % 2**64
        _draw_pair(np.uint64(stream), w_bits, w_vals, noise_vals, out_w, out_f)
        as_bf16 = lambda a: torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).reshape(shape)  # noqa: E731
        return as_bf16(out_w), as_bf16(out_f)


def llama_config(layers: int, vocab: int = VOCAB) -> dict:
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    data = config.to_dict()
    data["architectures"] = ["LlamaForCausalLM"]
    return data


def make_pair(
    out: Path,
    gb: float,
    shard_size: int = 10**9,
    seed: int = 0,
    force: bool = False,
    layers: int | None = None,
    vocab: int = VOCAB,
) -> dict:
    """Write OUT/base and OUT/finetuned (unless already there); returns what OUT/pair.json says."""
    layers = layers or layers_for(gb, vocab)
    params = {
        "format": FORMAT,
        "gb": gb,
        "layers": layers,
        "vocab": vocab,
        "shard_size": shard_size,
        "seed": seed,
    }
    stamp = out / STAMP
    if not force and stamp.exists():
        existing = json.loads(stamp.read_text())
        if {k: existing.get(k) for k in params} == params:
            print(f"{out}: pair already there ({existing['bytes_per_model'] / 1e9:.2f} GB/model)")
            return existing
    if out.exists():
        shutil.rmtree(out)
    base_dir, ft_dir = out / "base", out / "finetuned"
    base_dir.mkdir(parents=True)
    ft_dir.mkdir(parents=True)

    started = time.perf_counter()
    tensors = model_tensors(layers, vocab)
    shards = plan_shards(tensors, shard_size)
    files = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    total = sum(_nbytes(s) for _, s in tensors)
    generator = PairGenerator(seed)
    index = 0
    for file, shard in zip(files, shards, strict=True):
        base: dict[str, torch.Tensor] = {}
        finetuned: dict[str, torch.Tensor] = {}
        for name, shape in shard:
            base[name], finetuned[name] = generator.pair(index, name, shape)
            index += 1
        save_file(base, str(base_dir / file), metadata={"format": "pt"})
        save_file(finetuned, str(ft_dir / file), metadata={"format": "pt"})
        del base, finetuned
        print(f"  {file}: {len(shard)} tensors", file=sys.stderr)

    weight_map = {
        name: file for file, shard in zip(files, shards, strict=True) for name, _ in shard
    }
    index_doc = {"metadata": {"total_size": total}, "weight_map": weight_map}
    config = llama_config(layers, vocab)
    for directory in (base_dir, ft_dir):
        (directory / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=2))
        (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    seconds = time.perf_counter() - started
    result = {
        **params,
        "bytes_per_model": total,
        "tensors": len(tensors),
        "shards": len(shards),
        "seconds": round(seconds, 2),
    }
    stamp.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{out}: {layers} layers, {len(tensors)} tensors, {total / 1e9:.2f} GB/model in "
        f"{len(shards)} shards, written in {seconds:.1f}s"
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=2.0, help="size per model, decimal GB")
    parser.add_argument("--out", type=Path, help="output directory (default bench/out/pair-<gb>gb)")
    parser.add_argument("--shard-size", type=float, default=1e9, help="bytes per shard (1e9)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="regenerate even if present")
    parser.add_argument("--layers", type=int, help="decoder layers (overrides --gb)")
    parser.add_argument("--vocab", type=int, default=VOCAB, help="vocabulary size (32000)")
    args = parser.parse_args(argv)
    out = args.out or Path(__file__).resolve().parent / "out" / f"pair-{args.gb:g}gb"
    make_pair(out, args.gb, int(args.shard_size), args.seed, args.force, args.layers, args.vocab)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`fapm demo`: build a tiny Llama-style base and fine-tune, prune the pair with `fapm prune`, and
load the result with transformers. Shows the whole engine working on a machine with no network."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from worker.cli import main as cli_main


def build_tiny_pair(workdir: Path, seed: int = 0) -> tuple[Path, Path]:
    """A random 2-layer Llama base and a fine-tune touching half its entries (bf16, sharded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    base_dir, ft_dir = workdir / "base", workdir / "finetuned"
    model.save_pretrained(base_dir, max_shard_size="100KB")
    with torch.no_grad():
        for param in model.parameters():
            touched = torch.rand(param.shape) < 0.5
            noise = torch.randn(param.shape) * param.float().abs().mean() * 0.1
            param.copy_(torch.where(touched, param.float() + noise, param.float()))
    model.save_pretrained(ft_dir, max_shard_size="100KB")
    return base_dir, ft_dir


def run_demo(workdir: str) -> int:
    root = Path(workdir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    base_dir, ft_dir = build_tiny_pair(root)
    out_dir = root / "pruned"
    print(f"built a tiny base ({base_dir}) and fine-tune ({ft_dir})")
    code = cli_main(
        [
            "prune",
            "--base",
            str(base_dir),
            "--finetuned",
            str(ft_dir),
            "--out",
            str(out_dir),
            "--sparsity",
            "0.9",
            "--shard-size",
            "200KB",
        ]
    )
    if code != 0:
        return code
    check_output(out_dir)
    return 0


def check_output(out_dir: Path) -> None:
    """Load a pruned directory with transformers, run one forward pass and say what is there."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out_dir)
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    report = json.loads((out_dir / "pruning_report.json").read_text())
    print(
        f"loaded {out_dir} with transformers: forward pass gives logits {tuple(logits.shape)}; "
        f"density {report['totals']['density']:.4f}, files: "
        + ", ".join(sorted(p.name for p in out_dir.iterdir()))
    )


def _main(argv: list[str]) -> int:
    """`python -m worker.demo make-pair DIR` | `check DIR`: the steps scripts/demo runs around
    its curl calls."""
    if len(argv) == 2 and argv[0] == "make-pair":
        base_dir, ft_dir = build_tiny_pair(Path(argv[1]))
        print(f"built a tiny base ({base_dir}) and fine-tune ({ft_dir})")
        return 0
    if len(argv) == 2 and argv[0] == "check":
        check_output(Path(argv[1]))
        return 0
    print("usage: python -m worker.demo make-pair DIR | check DIR", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

"""Benchmark a 3-model TIES merge: fapm's streaming merge against mergekit's on the same inputs.

    .venv/bin/python bench/merge.py                        # 3 fine-tunes of a 0.23 GB bf16 Llama
    .venv/bin/python bench/merge.py --layers 8 --hidden 2048 --repeat 3

Makes a Llama-shaped bf16 base and three fine-tunes of it (noise on 70% of the entries) under
bench/out/merge-llama-<layers>x<hidden>/, then times, each as its own subprocess through
bench/measure.py (wall, peak RSS from wait4, sampled peak RssAnon):

  (a) fapm: finetuned = the three models, method magnitude, sparsity 1 - DENSITY each,
      merge {rule: ties} (normalize true), device cpu
  (b) mergekit 0.1.5 (this .venv) `ties`, density DENSITY, weight 1, dtype float32, out_dtype
      bfloat16, --lazy-unpickle --no-copy-tokenizer: the same merge (identical bits but at
      mergekit's threshold ties, tests/integration/test_merge_rules.py)

Inputs are read once beforehand so both start from the page cache; legs alternate --repeat times
and the median wall and the largest peaks are reported as a markdown table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DENSITY = 0.2
MODELS = 3

OURS = """
import sys
from worker.allocator import tune_allocator
tune_allocator()  # as fapm prune and the worker do (worker/cli/app.py tune_runtime)
from worker.engine.pipeline import run_prune
from worker.spec import JobSpec
run_prune(JobSpec.model_validate_json(open(sys.argv[1]).read()))
"""


def make_inputs(root: Path, layers: int, hidden: int) -> tuple[Path, list[Path]]:
    """A Llama-shaped bf16 base (mergekit reads its architecture's tensor names) and three
    fine-tunes of it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    base_dir, fts = root / "base", [root / f"ft{i}" for i in range(MODELS)]
    if all((d / "model.safetensors").exists() for d in (base_dir, *fts)):
        return base_dir, fts
    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=hidden // 128,
                         num_key_value_heads=hidden // 128, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(base_dir)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(1)
    for directory in fts:
        with torch.no_grad():
            for name, param in model.named_parameters():
                w = base[name].float()
                touched = torch.rand(w.shape, generator=generator) < 0.7
                noise = 0.002 * torch.randn(w.shape, generator=generator)
                param.copy_((w + noise * touched).to(torch.bfloat16))
        model.save_pretrained(directory)
    return base_dir, fts


def measure(command: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        subprocess.run(
            [sys.executable, "-S", str(HERE / "measure.py"), result.name, "--", *command],
            check=True,
            cwd=REPO,
        )
        measured = json.loads(Path(result.name).read_text())
    assert measured["exit"] == 0, measured
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    root = HERE / "out" / f"merge-llama-{args.layers}x{args.hidden}"
    base, fts = make_inputs(root, args.layers, args.hidden)
    model_bytes = (base / "model.safetensors").stat().st_size
    for directory in (base, *fts):  # into the page cache
        (directory / "model.safetensors").read_bytes()

    spec = {
        "base": str(base),
        "finetuned": [
            {"model": str(m), "method": "magnitude", "sparsity": 1 - DENSITY} for m in fts
        ],
        "merge": {"rule": "ties"},
        "output": str(root / "out-fapm"),
        "device": "cpu",
    }
    spec_file = root / "spec.json"
    spec_file.write_text(json.dumps(spec))
    mergekit_config = root / "mergekit.yml"
    mergekit_config.write_text(
        json.dumps(
            {
                "merge_method": "ties",
                "base_model": str(base),
                "models": [
                    {"model": str(m), "parameters": {"weight": 1.0, "density": DENSITY}}
                    for m in fts
                ],
                "dtype": "float32",
                "out_dtype": "bfloat16",
            }
        )
    )
    legs = {
        "fapm merge (ties, magnitude trim)": [sys.executable, "-c", OURS, str(spec_file)],
        "mergekit ties": [
            str(REPO / ".venv" / "bin" / "mergekit-yaml"),
            str(mergekit_config),
            str(root / "out-mergekit"),
            "--lazy-unpickle",
            "--no-copy-tokenizer",
            "--quiet",
        ],
    }
    results: dict[str, list[dict]] = {name: [] for name in legs}
    for _ in range(args.repeat):
        for name, command in legs.items():
            for out in ("out-fapm", "out-mergekit"):
                shutil.rmtree(root / out, ignore_errors=True)
            results[name].append(measure(command))
    print(
        f"\n{MODELS} fine-tunes + base, Llama {args.layers} layers x {args.hidden} hidden, "
        f"vocab 32000, bf16 ({model_bytes / 1e9:.2f} GB a model), density {DENSITY}, "
        f"median of {args.repeat}\n"
    )
    print("| leg | wall s | peak RSS MB | peak RssAnon MB | CPU s |")
    print("| --- | --- | --- | --- | --- |")
    for name, runs in results.items():
        wall = statistics.median(r["wall_s"] for r in runs)
        rss = max(r["peak_rss_bytes"] for r in runs) / 1e6
        anon = max(r["peak_rss_anon_bytes"] for r in runs) / 1e6
        cpu = statistics.median(r["user_s"] + r["sys_s"] for r in runs)
        print(f"| {name} | {wall:.1f} | {rss:.0f} | {anon:.0f} | {cpu:.1f} |")


if __name__ == "__main__":
    main()

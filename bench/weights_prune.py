"""prune "weights": what task-aware calibration buys, and what the layer streaming costs.

1. `modes`: Wanda and SparseGPT with general, task, mixed and taskaware calibration on the
   two-skill tiny Llama of the tests (tests/weights_models.py) at several sparsities: the task
   skill and the general perplexity of each pruned model (and of the unpruned one).
2. `speed`: a 24-layer random Llama (hidden 512, bf16, 0.2 GB) pruned by Wanda (general, 16
   sequences of 40 tokens) by our engine (`fapm compress`, layer by layer from the safetensors)
   and by the reference Wanda loop (tests/wanda_reference.py: the paper's code, the whole model
   loaded by transformers), each in a fresh process: wall time, seconds per layer, peak RSS and
   peak anonymous memory. (llm-compressor's `oneshot`, when `--llmcompressor PYTHON` names an
   interpreter that has it, runs the same model and calibration as a third row.)

    .venv/bin/python bench/weights_prune.py [modes|speed|all] [--llmcompressor /path/python]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LAYERS, HIDDEN, INTERMEDIATE, VOCAB, SEQUENCES, TOKENS = 24, 512, 1536, 256, 16, 40


def modes(workdir: Path, sparsities: list[float]) -> list[dict]:
    from tests.weights_models import build_dual_skill_case
    from worker.evaluation.job import run_job_spec
    from worker.spec import JobSpec

    case = build_dual_skill_case(workdir / "dual")
    rows = []
    for sparsity in sparsities:
        for method in ("wanda", "sparsegpt"):
            for mode in ("general", "task", "mixed", "taskaware"):
                spec = JobSpec(
                    prune="weights",
                    model=str(case.finetuned),
                    output=str(workdir / f"out-{method}-{mode}-{sparsity}"),
                    method=method,
                    sparsity=sparsity,
                    calibration={
                        "mode": mode,
                        "general": str(case.general),
                        "task": str(case.task),
                        "max_examples": 32,
                    },
                    evaluate={"task": str(case.task), "general": str(case.general)},
                )
                evaluation = run_job_spec(spec).report["evaluation"]
                point, unpruned = evaluation["points"][0], evaluation["references"]["base"]
                rows.append(
                    {
                        "sparsity": sparsity,
                        "method": method,
                        "mode": mode,
                        "skill": point["skill"],
                        "perplexity": point["perplexity"],
                        "unpruned_skill": unpruned["skill"],
                        "unpruned_perplexity": unpruned["perplexity"],
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    return rows


MEASURE = textwrap.dedent(
    """
    import json, sys, time
    from tests.memory_sampler import PeakAnon, status_bytes
    with PeakAnon(interval_s=0.005) as memory:
        started = time.perf_counter()
        exec(sys.argv[1])
        seconds = time.perf_counter() - started
    # VmHWM, not ru_maxrss: Linux carries a forking parent's peak over exec into ru_maxrss.
    print(json.dumps({"seconds": seconds, "peak_anon": memory.peak, "peak_rss": status_bytes("VmHWM")}))
    """
)

ENGINE = """
from worker.evaluation.job import run_job_spec
from worker.spec import JobSpec
run_job_spec(JobSpec.model_validate_json(sys.argv[2]))
"""

REFERENCE = """
import json
from pathlib import Path
from transformers import AutoTokenizer
from tests.wanda_reference import wanda_masks
model = Path(sys.argv[2])
tokenizer = AutoTokenizer.from_pretrained(str(model))
texts = [json.loads(line)["text"] for line in open(sys.argv[3])]
wanda_masks(model, [tokenizer(t)["input_ids"] for t in texts], 0.5)
"""

LLMCOMPRESSOR = """
import json
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.pruning import WandaPruningModifier
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype="auto")
tokenizer = AutoTokenizer.from_pretrained(sys.argv[2])
texts = [json.loads(line)["text"] for line in open(sys.argv[3])]
data = Dataset.from_dict({"text": texts})
oneshot(model=model, dataset=data, recipe=WandaPruningModifier(sparsity=0.5, targets="Linear",
        ignore=["lm_head"]), max_seq_length=64, num_calibration_samples=len(texts),
        tokenizer=tokenizer, output_dir=sys.argv[4])
"""


def deep_model(workdir: Path) -> tuple[Path, Path]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.eval_models import write_jsonl
    from tests.models import write_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                         num_hidden_layers=LAYERS, num_attention_heads=8, num_key_value_heads=8,
                         max_position_embeddings=64, tie_word_embeddings=False)  # fmt: skip
    model_dir = workdir / "deep"
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(model_dir)
    write_tokenizer(model_dir, VOCAB)
    general = write_jsonl(
        workdir / "general.jsonl",
        [{"text": " ".join(f"w{(7 * i + j) % 200}" for j in range(TOKENS - 1))}
         for i in range(SEQUENCES)],
    )  # fmt: skip
    return model_dir, general


def measure(python: str, code: str, *args: str) -> dict:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    run = subprocess.run([python, "-c", MEASURE, code, *args], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=1800)  # fmt: skip
    if run.returncode != 0:
        return {"error": run.stderr[-2000:]}
    return json.loads(run.stdout.strip().splitlines()[-1])


def speed(workdir: Path, llmcompressor: str | None) -> dict:
    model_dir, general = deep_model(workdir)
    spec = {"prune": "weights", "model": str(model_dir), "output": str(workdir / "engine-out"),
            "method": "wanda", "sparsity": 0.5,
            "calibration": {"mode": "general", "general": str(general)}}  # fmt: skip
    rows = {
        "engine": measure(sys.executable, ENGINE, json.dumps(spec)),
        "wanda_reference": measure(sys.executable, REFERENCE, str(model_dir), str(general)),
    }
    if llmcompressor:
        rows["llmcompressor_oneshot"] = measure(
            llmcompressor, LLMCOMPRESSOR, str(model_dir), str(general), str(workdir / "llmc-out")
        )
    for row in rows.values():
        if "seconds" in row:
            row["seconds_per_layer"] = row["seconds"] / LAYERS
    return {"layers": LAYERS, "model_bytes_bf16": sum(
        p.stat().st_size for p in model_dir.glob("*.safetensors")), "rows": rows}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", nargs="?", default="all", choices=["modes", "speed", "all"])
    parser.add_argument("--sparsities", default="0.5,0.6,0.7")
    parser.add_argument("--llmcompressor", help="a Python that has llmcompressor installed")
    args = parser.parse_args()
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="fapm-bench-weights-") as tmp:
        workdir = Path(tmp)
        if args.what in ("modes", "all"):
            results["modes"] = modes(workdir, [float(s) for s in args.sparsities.split(",")])
        if args.what in ("speed", "all"):
            results["speed"] = speed(workdir, args.llmcompressor)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

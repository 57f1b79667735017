"""Where an auto-sparsity job spends its time: building a candidate vs evaluating it, the
evaluations the search needs vs a full grid, and evaluation throughput (tokens/s).

Two models:
  - "tiny": the trained pair of the tests (tests/eval_models.py), a full auto search with
    fapm and magnitude, as a job runs it (the choice is published too);
  - "medium": a random Llama (hidden 512, 4 layers, vocab 8192, about 21M parameters) with a
    perturbed fine-tune, synthetic task/general sets; candidates at 5 sparsities per method,
    each built then evaluated, to measure the build/evaluate ratio at a less toy size; then
    candidates built per tensor with no ranks held (the mode over FAPM_EVAL_RANK_BUDGET).

    .venv/bin/python bench/eval_auto.py [--device cpu|cuda] [--examples 64]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.eval_models import build_eval_case, write_jsonl  # noqa: E402
from tests.models import write_tokenizer  # noqa: E402
from worker.evaluation.candidates import CandidateBuilder  # noqa: E402
from worker.evaluation.data import load_general, load_task  # noqa: E402
from worker.evaluation.job import run_evaluated  # noqa: E402
from worker.evaluation.metrics import Evaluator, encode_general, encode_task  # noqa: E402
from worker.evaluation.model import load_causal_lm  # noqa: E402
from worker.evaluation.search import COARSE, evaluations_per_method  # noqa: E402
from worker.spec import JobSpec  # noqa: E402

GRID_STEP = 0.025  # the bisection's resolution: a grid at it has 39 points in (0, 1)


def tiny(workdir: Path, device: str) -> dict:
    case = build_eval_case(workdir / "tiny")
    spec = JobSpec(
        base=str(case.base),
        finetuned=str(case.finetuned),
        output=str(workdir / "tiny-out"),
        sparsity="auto",
        methods=["fapm", "magnitude"],
        device=device,
        evaluate={"task": str(case.task), "general": str(case.general)},
    )
    started = time.perf_counter()
    result = run_evaluated(spec)
    total = time.perf_counter() - started
    ev = result.report["evaluation"]
    points = ev["points"]
    return {
        "job_seconds": round(total, 3),
        "evaluations": ev["evaluations"],
        "full_grid_evaluations": 2 + 2 * (round(1 / GRID_STEP) - 1),
        "build_seconds_mean": statistics.mean(p["build_seconds"] for p in points),
        "eval_seconds_mean": statistics.mean(p["seconds"] for p in points),
        "rank_seconds": ev["seconds"]["rank"],
        "candidates": ev["candidates"],
        "tokens_per_second": ev["tokens_per_second"],
        "chosen": {k: ev["chosen"][k] for k in ("method", "sparsity", "skill_kept")},
        "forgetting_left": ev["chosen"]["forgetting_left"],
    }


def medium_pair(directory: Path, examples: int) -> tuple[Path, Path, Path, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    base_dir, ft_dir = directory / "base", directory / "finetuned"
    vocab = 8192
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256,
        tie_word_embeddings=False, dtype=torch.bfloat16,
    )  # fmt: skip
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    for path in (base_dir, ft_dir):
        path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(base_dir))
    write_tokenizer(base_dir, vocab)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01 * torch.randn_like(param, dtype=torch.float32).to(param.dtype))
    model.save_pretrained(str(ft_dir))
    write_tokenizer(ft_dir, vocab)
    rng = random.Random(0)

    def words(n: int) -> str:
        return " ".join(f"w{rng.randrange(vocab - 4)}" for _ in range(n))

    task = write_jsonl(
        directory / "task.jsonl",
        [{"prompt": words(32), "completion": " " + words(8)} for _ in range(examples)],
    )
    general = write_jsonl(
        directory / "general.jsonl", [{"text": words(128)} for _ in range(examples)]
    )
    return base_dir, ft_dir, task, general


def medium(workdir: Path, device_name: str, examples: int) -> dict:
    base, ft, task_path, general_path = medium_pair(workdir / "medium", examples)
    device = torch.device(device_name)
    spec = JobSpec(base=str(base), finetuned=str(ft), output=str(workdir / "unused"))
    work = load_causal_lm(ft, device, "ft")
    evaluator = Evaluator(
        encode_task(work.tokenizer, load_task(str(task_path)), work.context, "task"),
        encode_general(work.tokenizer, load_general(str(general_path)), work.context, "general"),
        16,
        0,
        device,
    )
    started = time.perf_counter()
    builder = CandidateBuilder(spec, work.model, device)
    load_seconds = time.perf_counter() - started
    rows = []
    for method in ("fapm", "magnitude"):
        for sparsity in COARSE:
            build = builder.write(method, sparsity)
            tick = time.perf_counter()
            evaluator.skill(work.model)
            evaluator.general(work.model)
            rows.append((method, sparsity, build, time.perf_counter() - tick))
    builds = [r[2] for r in rows]
    evals = [r[3] for r in rows]
    memory = builder.memory()
    rank_seconds = {k: round(v, 3) for k, v in builder.rank_seconds.items()}
    del builder
    # The same candidates with no ranks held (a rank budget of 0): the engine's pruner per tensor.
    per_tensor = CandidateBuilder(spec, work.model, device, rank_budget_bytes=0)
    per_tensor.write("magnitude", 0.5)  # untimed: loads the kernels (a worker warms them up)
    per_tensor_builds = [
        per_tensor.write(method, sparsity)
        for method in ("fapm", "magnitude")
        for sparsity in COARSE[:2]
    ]
    return {
        "parameters": sum(p.numel() for p in work.model.parameters()),
        "load_w_f_seconds": round(load_seconds, 3),
        "rank_seconds": rank_seconds,
        "build_seconds_mean": statistics.mean(builds),
        "eval_seconds_mean": statistics.mean(evals),
        "build_over_eval": statistics.mean(builds) / statistics.mean(evals),
        "candidates": memory,
        "per_tensor_build_seconds_mean": statistics.mean(per_tensor_builds),
        "per_tensor_build_over_eval": statistics.mean(per_tensor_builds) / statistics.mean(evals),
        "tokens_per_evaluation": evaluator.throughput.tokens // len(rows),
        "tokens_per_second": evaluator.throughput.tokens_per_second,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--examples", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fapm-bench-eval-") as tmp:
        workdir = Path(tmp)
        results = {
            "device": args.device,
            "threads": torch.get_num_threads(),
            "evaluations_per_method": evaluations_per_method(),
            "tiny": tiny(workdir, args.device),
            "medium": medium(workdir, args.device, args.examples),
        }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

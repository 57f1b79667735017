"""Where an NPS search spends its time: evaluations per second, and the share of a generation
spent building candidates (writing the band-reweighted update into the work model) against
evaluating them.

Two models, as bench/eval_auto.py:
  - "tiny": the trained pair of the tests (tests/eval_models.py), a whole NPS job (search and
    publish) at sparsity 0.8, where magnitude keeps little of the skill;
  - "medium": a random Llama (hidden 512, 4 layers, vocab 8192, about 21M parameters) with a
    perturbed fine-tune and synthetic sets; NPS candidates with random weights, each built then
    evaluated, at sparsity 0.9.

    .venv/bin/python bench/nps_search.py [--device cpu|cuda] [--examples 64] [--generations 5]
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

from bench.eval_auto import medium_pair  # noqa: E402
from tests.eval_models import build_eval_case  # noqa: E402
from worker.evaluation.candidates import CandidateBuilder  # noqa: E402
from worker.evaluation.data import load_general, load_task  # noqa: E402
from worker.evaluation.job import run_evaluated  # noqa: E402
from worker.evaluation.metrics import Evaluator, encode_general, encode_task  # noqa: E402
from worker.evaluation.model import load_causal_lm  # noqa: E402
from worker.spec import JobSpec, NpsSpec  # noqa: E402
from worker.spec.nps import band_edges  # noqa: E402


def tiny(workdir: Path, device: str, generations: int) -> dict:
    case = build_eval_case(workdir / "tiny")
    spec = JobSpec(
        base=str(case.base),
        finetuned=str(case.finetuned),
        output=str(workdir / "tiny-out"),
        method="nps",
        sparsity=0.8,
        device=device,
        nps={"generations": generations, "objective": "balanced"},
        evaluate={"task": str(case.task), "general": str(case.general)},
    )
    started = time.perf_counter()
    result = run_evaluated(spec)
    total = time.perf_counter() - started
    nps = result.report["evaluation"]["nps"]
    gens = nps["generations"]
    build = sum(g["build_seconds"] for g in gens)
    evaluate = sum(g["evaluate_seconds"] for g in gens)
    return {
        "job_seconds": round(total, 3),
        "search_seconds": round(nps["seconds"], 3),
        "evaluations": nps["evaluations"],
        "evaluations_per_second": nps["evaluations"] / nps["seconds"],
        "build_share_of_generation": build / (build + evaluate),
        "build_seconds_mean": build / nps["evaluations"],
        "evaluate_seconds_mean": evaluate / nps["evaluations"],
        "fitness": nps["fitness"],
        "magnitude_fitness": nps["magnitude_fitness"],
        "stopped": nps["stopped"],
    }


def medium(workdir: Path, device_name: str, examples: int, candidates: int) -> dict:
    base, ft, task_path, general_path = medium_pair(workdir / "medium", examples)
    device = torch.device(device_name)
    sparsity = 0.9
    spec = JobSpec(base=str(base), finetuned=str(ft), output=str(workdir / "unused"))
    work = load_causal_lm(ft, device, "ft")
    evaluator = Evaluator(
        encode_task(work.tokenizer, load_task(str(task_path)), work.context, "task"),
        encode_general(work.tokenizer, load_general(str(general_path)), work.context, "general"),
        16,
        0,
        device,
    )
    builder = CandidateBuilder(spec, work.model, device)
    bands = len(band_edges(sparsity, NpsSpec())) - 1
    rng = random.Random(0)
    builder.write_nps(sparsity, [1.0] * bands, 1.0)  # untimed: what is cached per sparsity
    builds, evals = [], []
    for _ in range(candidates):
        weights = [rng.uniform(0.0, 2.5) for _ in range(bands)]
        builds.append(builder.write_nps(sparsity, weights, 1.0))
        tick = time.perf_counter()
        evaluator.skill(work.model)
        evaluator.general(work.model)
        evals.append(time.perf_counter() - tick)
    return {
        "parameters": sum(p.numel() for p in work.model.parameters()),
        "candidates": candidates,
        "build_seconds_mean": statistics.mean(builds),
        "evaluate_seconds_mean": statistics.mean(evals),
        "build_share_of_generation": sum(builds) / (sum(builds) + sum(evals)),
        "evaluations_per_second": candidates / (sum(builds) + sum(evals)),
        "builder": builder.memory(),
        "tokens_per_second": evaluator.throughput.tokens_per_second,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--generations", type=int, default=5)
    parser.add_argument("--candidates", type=int, default=6)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fapm-bench-nps-") as tmp:
        workdir = Path(tmp)
        results = {
            "device": args.device,
            "threads": torch.get_num_threads(),
            "tiny": tiny(workdir, args.device, args.generations),
            "medium": medium(workdir, args.device, args.examples, args.candidates),
        }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

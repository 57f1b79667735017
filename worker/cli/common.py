"""What every `fapm` command shares: exit codes, the parser class, error and point printing."""

from __future__ import annotations

import argparse
import sys
import typing
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.errors import FapmError


EXIT_USAGE = 2
EXIT_FAILED = 1
EXIT_UNEXPECTED = 3


class Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (its usage block is what --help is for)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def job_error(exc: FapmError) -> int:
    """Print a job's typed error (a FapmError); its exit status: 2 for a setting this machine
    cannot run (the error is also a ValueError), else 1."""
    print(f"fapm: error [{exc.code}]: {exc.message}", file=sys.stderr)
    return EXIT_USAGE if isinstance(exc, ValueError) else EXIT_FAILED


def merge_title(rule: object, inputs: int) -> str:
    """How a merge is named in one line: "ties merge of 3 inputs"."""
    return f"{rule or 'task_arithmetic'} merge of {inputs} input{'s' if inputs != 1 else ''}"


def print_points(evaluation: dict) -> None:
    """Every evaluated point, one line each, on stderr (stdout keeps the one result line)."""

    def fmt(value: object) -> str:
        return f"{value:.4g}" if isinstance(value, int | float) else "-"

    print("method       sparsity  skill   kept    ppl      forgetting_left", file=sys.stderr)
    chosen = evaluation.get("chosen") or {}
    rows = [*(evaluation.get("references") or {}).values(), *(evaluation.get("points") or [])]
    for p in rows:
        mark = "  <- chosen" if p == chosen else ""
        print(
            f"{p['method']:<12} {fmt(p.get('sparsity')):<9} {fmt(p['skill']):<7} "
            f"{fmt(p['skill_kept']):<7} {fmt(p['perplexity']):<8} {fmt(p['forgetting_left'])}"
            f"{mark}",
            file=sys.stderr,
        )
    nps = evaluation.get("nps")
    if nps and nps.get("weights"):
        weights = ",".join(f"{w:.6g}" for w in nps["weights"])
        print(
            f"nps: {nps['evaluations']} evaluations ({nps['stopped']}); fitness "
            f"{fmt(nps['fitness'])} vs magnitude {fmt(nps['magnitude_fitness'])}; weights "
            f"{weights}",
            file=sys.stderr,
        )
    if evaluation.get("note"):
        print(f"note: {evaluation['note']}", file=sys.stderr)


def progress_bar():
    """A tqdm bar over bytes (with tensors and ETA) on a TTY; None (quiet) otherwise."""
    if not sys.stderr.isatty():
        return None
    import shutil

    from tqdm import tqdm

    # A TTY that reports a 0x0 size (some ptys, CI) makes tqdm hide the bar; fall back to 100x20.
    size = shutil.get_terminal_size((100, 20))
    bar = None

    def update(progress) -> None:
        nonlocal bar
        if progress.stage == "prune":
            if bar is None:
                bar = tqdm(total=progress.bytes_total, unit="B", unit_scale=True,
                           unit_divisor=1024, ncols=size.columns, nrows=size.lines, file=sys.stderr)  # fmt: skip
            bar.set_description(f"{progress.tensors_done}/{progress.tensors_total} tensors")
            bar.update(progress.bytes_done - bar.n)
        elif progress.stage == "done" and bar is not None:
            bar.close()

    return update


def evaluation_spec(namespace: argparse.Namespace):
    """`fapm eval`'s flags as an EvaluationJobSpec (the body of POST /v1/evaluations)."""
    from worker.spec import EvaluationJobSpec

    evaluate: dict = {"task": namespace.task, "general": namespace.general}
    if namespace.max_examples:
        evaluate["max_examples"] = namespace.max_examples
    if namespace.batch_size:
        evaluate["batch_size"] = namespace.batch_size
    return EvaluationJobSpec(
        base=namespace.base,
        model=namespace.model,
        finetuned=namespace.finetuned,
        evaluate=evaluate,
        device=namespace.device,
    )

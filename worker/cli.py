"""`fapm`: the command line. Its flags are generated from JobSpec, so the CLI and the API cannot drift.

Exit codes: 0 success; 2 usage error (bad flags or values); 1 a failed job, with a one-line message.
"""

from __future__ import annotations

import argparse
import os
import sys
import typing
from collections.abc import Sequence

from pydantic import ValidationError

from worker.spec import JobSpec

EXIT_USAGE = 2
EXIT_FAILED = 1


def _flag(name: str, field) -> str:
    extra = field.json_schema_extra or {}
    return extra.get("cli") or "--" + name.replace("_", "-")


def add_spec_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per JobSpec field; values are validated by JobSpec, not argparse."""
    for name, field in JobSpec.model_fields.items():
        flag = _flag(name, field)
        annotation = field.annotation
        choices = None
        args = typing.get_args(annotation)
        if typing.get_origin(annotation) is typing.Literal:
            choices = list(args)
        if annotation is bool:
            parser.add_argument(flag, dest=name, action="store_true", help=field.description)
            continue
        required = field.is_required()
        default_text = "" if required else f" (default: {field.default})"
        parser.add_argument(
            flag,
            dest=name,
            required=required,
            default=None,
            choices=choices,
            metavar=None if choices else name.upper(),
            help=(field.description or "") + default_text,
        )


def spec_from_args(namespace: argparse.Namespace) -> JobSpec:
    values = {
        name: getattr(namespace, name)
        for name in JobSpec.model_fields
        if getattr(namespace, name, None) is not None
    }
    return JobSpec.model_validate(values)


def _one_line_validation_error(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        loc = ".".join(str(p) for p in error["loc"]) or "spec"
        parts.append(f"{loc}: {error['msg']}")
    return "invalid job: " + "; ".join(parts)


def _progress_bar():
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


def _prune(namespace: argparse.Namespace) -> int:
    try:
        spec = spec_from_args(namespace)
    except ValidationError as exc:
        print(f"fapm: error: {_one_line_validation_error(exc)}", file=sys.stderr)
        return EXIT_USAGE

    from worker.engine.pipeline import run_prune
    from worker.errors import FapmError

    try:
        result = run_prune(spec, progress=_progress_bar())
    except FapmError as exc:
        print(f"fapm: error [{exc.code}]: {exc.message}", file=sys.stderr)
        return EXIT_FAILED
    except ValueError as exc:  # a spec value only the engine can check (e.g. device)
        print(f"fapm: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fapm: interrupted; nothing was written to the output", file=sys.stderr)
        return 130
    totals = result.report["totals"]
    print(
        f"wrote {result.output} ({spec.method}, sparsity {spec.sparsity:g}: kept "
        f"{totals['kept']} of {totals['n']} update entries, "
        f"{result.report['seconds']['total']:.1f}s)"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fapm", description="Prune a fine-tuned model's task vector (FAPM and baselines)."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    prune = commands.add_parser(
        "prune",
        help="prune a base/fine-tuned pair into a new model directory",
        description="Write base + mask * (finetuned - base) as a Hugging Face model directory.",
    )
    add_spec_arguments(prune)
    prune.set_defaults(handler=_prune)
    demo = commands.add_parser(
        "demo", help="build a tiny base/fine-tuned pair and prune it end to end (a smoke test)"
    )
    demo.add_argument("--workdir", default="fapm-demo", help="directory for the demo models")
    demo.set_defaults(handler=_demo)
    return parser


def _demo(namespace: argparse.Namespace) -> int:
    from worker.demo import run_demo

    return run_demo(namespace.workdir)


def tune_runtime() -> None:
    """Process settings that must be in place before torch is imported (see bench/RESULTS.md).

    THP_MEM_ALLOC_ENABLE: torch allocates large CPU tensors on transparent huge pages, so a fresh
    tensor costs one page fault per 2 MiB instead of per 4 KiB (about 15% of a prune's wall time).
    OMP_WAIT_POLICY=passive: torch's OpenMP threads sleep instead of spinning between ops, so
    they do not starve the numba kernel's threads on a small machine.
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")


def main(argv: Sequence[str] | None = None) -> int:
    tune_runtime()
    parser = build_parser()
    namespace = parser.parse_args(argv)
    return namespace.handler(namespace)


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["add_spec_arguments", "build_parser", "main", "spec_from_args"]

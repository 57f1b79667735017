"""The `fapm` parser and entry point: which command runs, and how its failures are reported."""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Sequence

from worker.cli.common import EXIT_UNEXPECTED, Parser, job_error
from worker.cli.local import demo_command, eval_command, materialize_command, prune_command
from worker.cli.remote import API_URL_ENV, DEFAULT_API_URL, add_client_commands
from worker.cli.spec_flags import add_spec_arguments


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="fapm", description="Prune a fine-tuned model's task vector (FAPM and baselines)."
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="on an unexpected error (a bug), show its traceback instead of one line",
    )
    # --api-url works before or after the subcommand: the subcommands' copy defaults to SUPPRESS
    # so it does not overwrite a value given before the subcommand.
    parser.add_argument(
        "--api-url",
        default=None,
        help=f"the service (default: ${API_URL_ENV} or {DEFAULT_API_URL})",
    )
    api_url = argparse.ArgumentParser(add_help=False)
    api_url.add_argument(
        "--api-url",
        default=argparse.SUPPRESS,
        help=f"the service (default: ${API_URL_ENV} or {DEFAULT_API_URL})",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    prune = commands.add_parser(
        "prune",
        help="prune a base/fine-tuned pair into a new model directory",
        description="Write base + mask * (finetuned - base) as a Hugging Face model directory.",
    )
    add_spec_arguments(prune)
    prune.set_defaults(handler=prune_command)
    compress = commands.add_parser(
        "compress",
        help="prune a model's weights (Wanda, SparseGPT, magnitude) with calibration data",
        description="`fapm prune --prune weights`: the decoder layers' weights of --model, "
        "pruned layer by layer with activations of --calibration-general/--calibration-task.",
    )
    add_spec_arguments(compress)
    compress.set_defaults(handler=prune_command, prune="weights")
    materialize = commands.add_parser(
        "materialize",
        help="rebuild the dense model from a sparse delta (prune --format sparse-delta) and its base",
        description="Write the model that the delta's prune job writes with --format dense, bit "
        "for bit, from --base and --delta; a base other than the delta's (sha256) is refused.",
    )
    materialize.add_argument("--base", required=True, help="the base the delta was made against")
    materialize.add_argument("--delta", required=True, help="the sparse delta (any location)")
    materialize.add_argument("--out", required=True, help="where the dense model goes")
    materialize.add_argument("--overwrite", action="store_true", help="replace fapm's output there")
    materialize.set_defaults(handler=materialize_command)
    evaluate = commands.add_parser(
        "eval",
        parents=[api_url],
        help="measure a model's skill and forgetting against its base (no pruning)",
        description="Skill (exact match of the greedy completion) on --task, perplexity on "
        "--general, for --model and for --base, and the model's skill kept and forgetting left "
        "relative to them. Prints the points on stderr and the JSON on stdout. With --submit "
        "the service measures (an evaluation job; locations are read by the service).",
    )
    evaluate.add_argument("--base", required=True, help="the base model (any location)")
    evaluate.add_argument("--model", required=True, help="the model to measure (any location)")
    evaluate.add_argument(
        "--finetuned",
        default=None,
        help="a fine-tuned reference: the model's skill kept and forgetting left are then "
        "relative to it (e.g. --model is a pruned copy of it)",
    )
    evaluate.add_argument("--task", required=True, help="JSONL of {prompt, completion}")
    evaluate.add_argument("--general", required=True, help="JSONL of {text}")
    evaluate.add_argument("--max-examples", type=int, default=None)
    evaluate.add_argument("--batch-size", type=int, default=None)
    evaluate.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    evaluate.add_argument(
        "--submit",
        action="store_true",
        help="submit it to the service as an evaluation job (prints its id) instead",
    )
    evaluate.add_argument("--wait", action="store_true", help="--submit: follow it to its end")
    evaluate.add_argument(
        "--label", action="append", metavar="KEY=VALUE", help="--submit: label the job"
    )
    evaluate.add_argument("--idempotency-key", help="--submit: resubmitting returns the same job")
    evaluate.add_argument("--json", action="store_true", help="--submit: print the job record")
    evaluate.set_defaults(handler=eval_command)
    demo = commands.add_parser(
        "demo", help="build a tiny base/fine-tuned pair and prune it end to end (a smoke test)"
    )
    demo.add_argument("--workdir", default="fapm-demo", help="directory for the demo models")
    demo.set_defaults(handler=demo_command)
    add_client_commands(commands, api_url)
    return parser


def tune_runtime() -> None:
    """Process settings that must be in place before torch is imported (see bench/RESULTS.md).

    THP_MEM_ALLOC_ENABLE: torch allocates large CPU tensors on transparent huge pages, so a fresh
    tensor costs one page fault per 2 MiB instead of per 4 KiB (about 15% of a prune's wall time).
    OMP_WAIT_POLICY=passive: torch's OpenMP threads sleep instead of spinning between ops, so
    they do not starve the numba kernel's threads on a small machine.
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    # No BLAS in a prune: OpenBLAS's thread pools would only cost start-up time.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    # Chunk buffers reused, not mapped and zeroed afresh for every chunk (worker/allocator.py).
    from worker.allocator import tune_allocator  # no torch

    tune_allocator()


def main(argv: Sequence[str] | None = None) -> int:
    tune_runtime()
    parser = build_parser()
    namespace = parser.parse_args(argv)
    code = run_command(namespace)
    if argv is None:  # the `fapm` program (callers in a longer-lived process pass argv)
        # About to exit: the interpreter would run a last full garbage collection over every
        # object torch and numba created (about 0.5 s, bench/RESULTS.md); frozen ones are skipped.
        gc.freeze()
    return code


def run_command(namespace: argparse.Namespace) -> int:
    """The command's handler; what it did not turn into a message and a status becomes one."""
    from worker.errors import FapmError

    try:
        return namespace.handler(namespace)
    except FapmError as exc:
        return job_error(exc)
    except KeyboardInterrupt:
        print("fapm: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if namespace.debug:
            raise
        detail = (str(exc).splitlines() or [""])[0][:300]
        print(
            f"fapm: error [internal_error]: unexpected {type(exc).__name__}: {detail} "
            "(a bug in fapm: run it again with --debug for the traceback, and report it)",
            file=sys.stderr,
        )
        return EXIT_UNEXPECTED

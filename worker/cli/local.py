"""Commands that run in this process: `fapm prune`, `fapm materialize`, `fapm eval` (without
--submit), `fapm demo`.

Engine imports stay inside the handlers, so the client commands never load torch.
"""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from worker.cli.common import (
    EXIT_USAGE,
    evaluation_spec,
    job_error,
    merge_title,
    print_points,
    progress_bar,
)
from worker.cli.remote import client_command, submit_evaluation
from worker.cli.spec_flags import (
    SpecFileError,
    one_line_validation_error,
    spec_error_line,
    spec_from_args,
)


def _checkpoint_locations(spec) -> list[str]:
    """The job's full checkpoints (not adapters): what early digests can start on."""
    inputs = spec.merge_inputs
    if inputs is not None:
        finetuned = [item.model for item in inputs if not item.adapter]
    else:
        finetuned = [spec.finetuned] if spec.finetuned else []
    return [p for p in (spec.base, *finetuned, spec.adapter, spec.model) if p]


def prune_command(namespace: argparse.Namespace) -> int:
    try:
        spec = spec_from_args(namespace)
    except (ValidationError, SpecFileError) as exc:
        print(f"fapm: error: {spec_error_line(exc)}", file=sys.stderr)
        return EXIT_USAGE

    from worker.io.checkpoint import start_early_digests

    # The report's input digests start on a second core now, overlapping the engine's imports.
    start_early_digests(_checkpoint_locations(spec))

    from worker.errors import FapmError
    from worker.evaluation.job import run_job_spec

    try:
        result = run_job_spec(spec, progress=progress_bar())
    except FapmError as exc:
        status = job_error(exc)
        evaluation = (getattr(exc, "report", None) or {}).get("evaluation")
        if evaluation:
            print_points(evaluation)
        return status
    except ValueError as exc:  # a spec value only the engine can check (e.g. device)
        print(f"fapm: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fapm: interrupted; nothing was written to the output", file=sys.stderr)
        return 130
    totals = result.report["totals"]
    evaluation = result.report.get("evaluation")
    if evaluation:
        print_points(evaluation)
    seconds = f"{result.report['seconds']['total']:.1f}s"
    merge = result.report.get("merge")
    if merge:  # the job's totals are the merged tensors'; what each input kept says more
        kept = ", ".join(
            f"{one['method']} {one['sparsity']:g} kept {one['totals']['kept']} of "
            f"{one['totals']['n']}"
            for one in merge["inputs"]
        )
        title = merge_title(merge["rule"], len(merge["inputs"]))
        print(f"wrote {result.output} ({title}: {kept}; {seconds})")
        for note in merge.get("notes", []):
            print(f"note: {note}", file=sys.stderr)
    else:
        done = result.report["spec"]  # the method and sparsity published ("auto" resolved)
        print(
            f"wrote {result.output} ({done['method']}, sparsity {done['sparsity']:g}: kept "
            f"{totals['kept']} of {totals['n']} update entries, {seconds})"
        )
    for note in result.report.get("notes", []):  # e.g. how tensor names were paired
        print(f"note: {note}", file=sys.stderr)
    return 0


def materialize_command(namespace: argparse.Namespace) -> int:
    """`fapm materialize`: the dense model of a sparse delta, on its base."""
    from worker.spec import JobSpec

    try:
        spec = JobSpec.model_validate(
            {
                "base": namespace.base,
                "output": namespace.out,
                "overwrite": namespace.overwrite,
                "materialize": {"delta": namespace.delta},
            }
        )
    except ValidationError as exc:
        print(f"fapm: error: {one_line_validation_error(exc)}", file=sys.stderr)
        return EXIT_USAGE

    from worker.io.checkpoint import start_early_digests

    # The report's input digests start on a second core now, overlapping the engine's imports.
    start_early_digests(p for p in (spec.base, spec.finetuned, spec.adapter, spec.model) if p)

    from worker.errors import FapmError
    from worker.evaluation.job import run_job_spec

    try:
        result = run_job_spec(spec, progress=progress_bar())
    except FapmError as exc:
        return job_error(exc)
    except KeyboardInterrupt:
        print("fapm: interrupted; nothing was written to the output", file=sys.stderr)
        return 130
    totals = result.report["totals"]
    print(
        f"wrote {result.output} ({totals['tensors']} tensors, {totals['changed']} entries "
        f"from the delta, {result.report['seconds']['total']:.1f}s)"
    )
    return 0


def eval_command(namespace: argparse.Namespace) -> int:
    """`fapm eval`: skill and perplexity of a model the user has, against its base; in this
    process, or with --submit as an evaluation job of the service."""
    import json

    from pydantic import ValidationError as _ValidationError

    try:
        spec = evaluation_spec(namespace)
    except _ValidationError as exc:
        print(f"fapm: error: {one_line_validation_error(exc)}", file=sys.stderr)
        return EXIT_USAGE
    if namespace.submit:  # the same flags, measured by the service; no torch imported here
        return client_command(submit_evaluation)(namespace)

    from worker.errors import FapmError
    from worker.evaluation.standalone import evaluate_model

    settings = spec.evaluate
    try:
        result = evaluate_model(
            namespace.base, namespace.model, settings, namespace.device, namespace.finetuned
        )
    except FapmError as exc:
        return job_error(exc)
    except ValueError as exc:
        print(f"fapm: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print_points(result)
    print(json.dumps(result, indent=2))
    return 0


# -- the service client ---------------------------------------------------------------------------


def demo_command(namespace: argparse.Namespace) -> int:
    from worker.demo import run_demo

    return run_demo(namespace.workdir)

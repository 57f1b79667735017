"""`fapm`: the command line. Its flags are generated from JobSpec, so the CLI and the API cannot drift.

`fapm prune` runs a job in this process; `fapm submit/status/wait/cancel/jobs/report` are a client
of the service's REST API (`--api-url` or FAPM_API_URL; the key only from FAPM_API_KEY, so it never
lands in shell history or `ps`). The client commands import no torch: engine imports stay inside
`_prune` and `_demo`.

Exit codes: 0 success; 2 usage error (bad flags or values, a device or kernel this machine cannot
run, a missing or refused API key, a request the API rejects as invalid, an unknown job); 1 a
failed or cancelled job (bad input files included), an API that cannot be reached or cannot do it
now (409, 429, 5xx); 3 an unexpected error (a bug: `fapm --debug ...` shows its traceback);
130 interrupted. Each with a one-line message `fapm: error [code]: message`, never a traceback.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import typing
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING

from pydantic import ValidationError

from worker.spec import JobSpec

if TYPE_CHECKING:  # the client (and httpx) load only when a client command runs
    from worker.client import FapmClient
    from worker.errors import FapmError

EXIT_USAGE = 2
EXIT_FAILED = 1
EXIT_UNEXPECTED = 3


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (its usage block is what --help is for)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _flag(name: str, field) -> str:
    extra = field.json_schema_extra or {}
    return extra.get("cli") or "--" + name.replace("_", "-")


# Nested JobSpec fields get flat flags: flag -> (field, key in the nested object or None).
NESTED_FLAGS: dict[str, tuple[str, str | None, str]] = {
    "--task": ("evaluate", "task", "evaluate: JSONL of {prompt, completion} (skill)"),
    "--general": ("evaluate", "general", "evaluate: JSONL of {text} (perplexity)"),
    "--max-examples": ("evaluate", "max_examples", "evaluate: only the first N lines of each set"),
    "--eval-batch-size": ("evaluate", "batch_size", "evaluate: sequences per forward pass"),
    "--min-skill-kept": ("target", "min_skill_kept", 'sparsity "auto": the skill floor (0.95)'),
    "--methods": ("methods", None, 'sparsity "auto": comma-separated methods to search'),
    "--bands": ("nps", "bands", "nps: number of bands (8)"),
    "--band-edges": ("nps", "band_edges", "nps: comma-separated rank-fraction edges 0,...,1"),
    "--bounds": ("nps", "bounds", "nps: lo,hi of each band weight (0,2.5)"),
    "--sigma0": ("nps", "sigma0", "nps: CMA-ES initial step size (0.3)"),
    "--population": ("nps", "population", "nps: CMA-ES population (4 + 3 ln bands)"),
    "--generations": ("nps", "generations", "nps: CMA-ES generations (20)"),
    "--objective": ("nps", "objective", "nps: skill or balanced (balanced)"),
    "--lam": ("nps", "lam", "nps: rescale of the kept update (1)"),
    "--nps-seed": ("nps", "seed", "nps: seed of the search (0)"),
    "--max-evaluations": ("nps", "max_evaluations", "nps: stop after N evaluations"),
    "--max-seconds": ("nps", "max_seconds", "nps: stop after N seconds"),
    "--nps-weights": ("nps", "weights", "nps: comma-separated band weights: publish, no search"),
}
# Nested keys whose flag takes a comma-separated list.
LIST_KEYS = frozenset({"band_edges", "bounds", "weights"})
_NESTED_FIELDS = {field for field, _, _ in NESTED_FLAGS.values()}


def add_spec_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per JobSpec field; values are validated by JobSpec, not argparse."""
    for flag, (_, _, help_text) in NESTED_FLAGS.items():
        parser.add_argument(flag, dest=_nested_dest(flag), default=None, help=help_text)
    for name, field in JobSpec.model_fields.items():
        if name in _NESTED_FIELDS:
            continue
        flag = _flag(name, field)
        annotation = field.annotation
        choices = None
        args = typing.get_args(annotation)
        if typing.get_origin(annotation) is typing.Literal:
            choices = list(args)
        if annotation is bool:
            help_text = (field.description or "").replace("%", "%%")
            parser.add_argument(flag, dest=name, action="store_true", help=help_text)
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
            # argparse %-formats help: a literal % (as in "keeps 10%") must be doubled.
            help=((field.description or "") + default_text).replace("%", "%%"),
        )


def _nested_dest(flag: str) -> str:
    return "nested_" + flag.lstrip("-").replace("-", "_")


def spec_from_args(namespace: argparse.Namespace) -> JobSpec:
    values: dict = {
        name: getattr(namespace, name)
        for name in JobSpec.model_fields
        if name not in _NESTED_FIELDS and getattr(namespace, name, None) is not None
    }
    for flag, (field, key, _) in NESTED_FLAGS.items():
        value = getattr(namespace, _nested_dest(flag), None)
        if value is None:
            continue
        if key is None:  # --methods fapm,magnitude
            values[field] = [m.strip() for m in value.split(",") if m.strip()]
        elif key in LIST_KEYS:  # --nps-weights 1,0.5,...
            values.setdefault(field, {})[key] = [v.strip() for v in value.split(",")]
        else:
            values.setdefault(field, {})[key] = value
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

    from worker.errors import FapmError
    from worker.evaluation.job import run_job_spec

    try:
        result = run_job_spec(spec, progress=_progress_bar())
    except FapmError as exc:
        status = _job_error(exc)
        evaluation = (getattr(exc, "report", None) or {}).get("evaluation")
        if evaluation:
            _print_points(evaluation)
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
        _print_points(evaluation)
    done = result.report["spec"]  # the method and sparsity published ("auto" resolved)
    print(
        f"wrote {result.output} ({done['method']}, sparsity {done['sparsity']:g}: kept "
        f"{totals['kept']} of {totals['n']} update entries, "
        f"{result.report['seconds']['total']:.1f}s)"
    )
    for note in result.report.get("notes", []):  # e.g. how tensor names were paired
        print(f"note: {note}", file=sys.stderr)
    return 0


def _job_error(exc: FapmError) -> int:
    """Print a job's typed error (a FapmError); its exit status: 2 for a setting this machine
    cannot run (the error is also a ValueError), else 1."""
    print(f"fapm: error [{exc.code}]: {exc.message}", file=sys.stderr)
    return EXIT_USAGE if isinstance(exc, ValueError) else EXIT_FAILED


def _print_points(evaluation: dict) -> None:
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


def _evaluation_spec(namespace: argparse.Namespace):
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


def _eval(namespace: argparse.Namespace) -> int:
    """`fapm eval`: skill and perplexity of a model the user has, against its base; in this
    process, or with --submit as an evaluation job of the service."""
    import json

    from pydantic import ValidationError as _ValidationError

    try:
        spec = _evaluation_spec(namespace)
    except _ValidationError as exc:
        print(f"fapm: error: {_one_line_validation_error(exc)}", file=sys.stderr)
        return EXIT_USAGE
    if namespace.submit:  # the same flags, measured by the service; no torch imported here
        return _client_command(_submit_evaluation)(namespace)

    from worker.errors import FapmError
    from worker.evaluation.standalone import evaluate_model

    settings = spec.evaluate
    try:
        result = evaluate_model(
            namespace.base, namespace.model, settings, namespace.device, namespace.finetuned
        )
    except FapmError as exc:
        return _job_error(exc)
    except ValueError as exc:
        print(f"fapm: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    _print_points(result)
    print(json.dumps(result, indent=2))
    return 0


# -- the service client ---------------------------------------------------------------------------

API_URL_ENV = "FAPM_API_URL"
API_KEY_ENV = "FAPM_API_KEY"
DEFAULT_API_URL = "http://127.0.0.1:8000"
# Answers that mean "what you asked for is wrong" (fix the command), not "it failed".
_USAGE_STATUSES = frozenset({400, 401, 403, 404, 405, 413, 415, 422})


class _UsageError(Exception):
    """A client command's bad flag value, found before anything is sent."""


def _error(message: str, code: str | None = None) -> None:
    tag = f" [{code}]" if code else ""
    print(f"fapm: error{tag}: {message}", file=sys.stderr)


def _client_command(handler: Callable) -> Callable[[argparse.Namespace], int]:
    """Run `handler(client, namespace)` with a client for the configured API, and turn the
    client's errors into the CLI's one-line messages and exit codes."""

    def run(namespace: argparse.Namespace) -> int:
        from worker.client import ApiError, ClientError, FapmClient

        api_key = os.environ.get(API_KEY_ENV, "").strip()
        if not api_key:
            _error(
                f"{API_KEY_ENV} is not set: put the service's API key in that environment "
                "variable (it is never read from the command line)"
            )
            return EXIT_USAGE
        api_url = namespace.api_url or os.environ.get(API_URL_ENV) or DEFAULT_API_URL
        try:
            with FapmClient(api_url, api_key) as client:
                return handler(client, namespace)
        except _UsageError as exc:
            _error(str(exc))
            return EXIT_USAGE
        except ApiError as exc:
            _error(exc.one_line(), exc.code)
            return EXIT_USAGE if exc.status in _USAGE_STATUSES else EXIT_FAILED
        except ClientError as exc:
            _error(str(exc), "unreachable")
            return EXIT_FAILED
        except KeyboardInterrupt:
            print(
                "fapm: interrupted; the job goes on in the service (fapm cancel stops it)",
                file=sys.stderr,
            )
            return 130

    return run


def _print_json(value: object) -> None:
    import json

    print(json.dumps(value, indent=2, sort_keys=False))


def _labels(pairs: list[str] | None) -> dict[str, str]:
    labels = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise _UsageError(f"--label {pair!r}: use KEY=VALUE")
        labels[key] = value
    return labels


def _submit(client: FapmClient, namespace: argparse.Namespace) -> int:
    secret = None
    if namespace.webhook_secret_env:
        if not namespace.webhook_url:
            raise _UsageError("--webhook-secret-env needs --webhook-url")
        secret = os.environ.get(namespace.webhook_secret_env)
        if not secret:
            raise _UsageError(f"--webhook-secret-env: ${namespace.webhook_secret_env} is not set")
    # Only the flags given: the service fills in its own defaults, as for a curl client.
    body = spec_from_args(namespace).model_dump(mode="json", exclude_unset=True)
    record = client.submit(
        body,
        labels=_labels(namespace.label),
        webhook_url=namespace.webhook_url,
        webhook_secret=secret,
        idempotency_key=namespace.idempotency_key,
    )
    return _submitted(client, namespace, record, "job")


def _submit_evaluation(client: FapmClient, namespace: argparse.Namespace) -> int:
    body = _evaluation_spec(namespace).model_dump(mode="json", exclude_unset=True)
    record = client.submit_evaluation(
        body, labels=_labels(namespace.label), idempotency_key=namespace.idempotency_key
    )
    return _submitted(client, namespace, record, "evaluation job")


def _submitted(client: FapmClient, namespace: argparse.Namespace, record: dict, what: str) -> int:
    """Say what a submission created; with --wait, follow it to its end."""
    if namespace.json:
        if not namespace.wait:  # with --wait, the one JSON document is the final record
            _print_json(record)
    else:
        # The id alone on stdout, so `job=$(fapm submit ...)` works; the rest goes to stderr.
        print(record["id"], flush=True)
    print(
        f"fapm: {what} {record['id']} {record['status']} on queue {record.get('queue')}",
        file=sys.stderr,
    )
    if namespace.wait:
        return _follow(client, record["id"], namespace.json, record["status"])
    return 0


def _submit_handler(namespace: argparse.Namespace) -> int:
    # The spec is checked here first, so a typo costs no round trip and reads as `fapm prune`'s.
    try:
        spec_from_args(namespace)
    except ValidationError as exc:
        print(f"fapm: error: {_one_line_validation_error(exc)}", file=sys.stderr)
        return EXIT_USAGE
    return _client_command(_submit)(namespace)


def _progress_namespace(data: object) -> SimpleNamespace:
    """A progress event's JSON as the attributes `_progress_bar`'s callback reads."""
    fields = {"stage": "", "tensors_done": 0, "tensors_total": 0, "bytes_done": 0, "bytes_total": 0}
    if isinstance(data, dict):
        fields.update(data)
    return SimpleNamespace(**fields)


def _follow(
    client: FapmClient, job_id: str, as_json: bool = False, status: str | None = None
) -> int:
    """Follow the job's events to its end: a bar on a TTY, state changes as lines on stderr
    (`status`: the one already shown). 0 if it succeeded, 1 (with the job's error code) if it
    failed or was cancelled."""
    update = _progress_bar()

    def say(line: str) -> None:
        if update is not None:
            from tqdm import tqdm

            tqdm.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    final: dict = {}
    pruning: SimpleNamespace | None = None  # the last "prune" progress: its totals fill the bar

    def fill_bar() -> None:
        # Progress is written at a bounded rate, so the last "prune" event may stop short of
        # the total; the job got past that stage, so show the bar full before closing it.
        if update is not None and pruning is not None:
            full = {"tensors_done": pruning.tensors_total, "bytes_done": pruning.bytes_total}
            update(SimpleNamespace(**{**vars(pruning), **full}))

    for event in client.events(job_id):
        if event.event == "progress":
            progress = _progress_namespace(event.data)
            if progress.stage == "prune":
                pruning = progress
            elif progress.stage in ("finalize", "done"):
                fill_bar()
            if update is not None:
                update(progress)
        elif event.event == "state" and isinstance(event.data, dict):
            if event.terminal:
                if event.data.get("status") == "succeeded":
                    fill_bar()
                if update is not None:
                    update(SimpleNamespace(stage="done"))
                final = event.data
            elif event.data.get("cancel_requested"):
                say(f"fapm: job {job_id} cancel requested")
            elif event.data.get("status") != status:  # a replayed or repeated state says nothing
                status = event.data.get("status")
                say(f"fapm: job {job_id} {status}")
    # The record has the full result (the report summary) and error; the event is the fallback.
    from worker.client import ClientError

    try:
        record = client.get(job_id)
    except ClientError:  # the event said how it ended; a failed GET must not hide that
        record = {"id": job_id, **final}
    if record.get("status") not in ("succeeded", "failed", "cancelled"):
        record = {**record, **final}
    if as_json:
        _print_json(record)
    return _print_outcome(record, quiet=as_json)


def _print_outcome(record: dict, quiet: bool = False) -> int:
    status = record.get("status")
    if status == "succeeded":
        if not quiet:
            print(_success_line(record))
        return 0
    error = record.get("error") or {}
    code = error.get("code") or status
    message = error.get("message") or f"job {record.get('id')} ended {status}"
    _error(f"job {record.get('id')}: {message}", code)
    return EXIT_FAILED


def _success_line(record: dict) -> str:
    result = record.get("result") or {}
    if record.get("kind") == "evaluation":
        return _evaluation_line(record)
    spec = record.get("spec") or {}
    report = result.get("report") or {}
    totals = report.get("totals") or {}
    seconds = (report.get("seconds") or {}).get("total")
    # The same words as `fapm prune`'s last line.
    # An auto job's result names what it published; its spec says "auto".
    published = (report.get("evaluation") or {}).get("chosen") or spec
    sparsity = published.get("sparsity", 0)
    sparsity_text = f"{sparsity:g}" if isinstance(sparsity, int | float) else str(sparsity)
    text = f"{published.get('method', '?')}, sparsity {sparsity_text}"
    if "kept" in totals and "n" in totals:
        text += f": kept {totals['kept']} of {totals['n']} update entries"
    if isinstance(seconds, int | float):
        text += f", {seconds:.1f}s"
    return f"job {record.get('id')} wrote {result.get('output')} ({text})"


def _evaluation_line(record: dict) -> str:
    """An evaluation job's outcome: every point on stderr (as `fapm eval`), one line on stdout."""
    evaluation = ((record.get("result") or {}).get("report") or {}).get("evaluation") or {}
    _print_points(evaluation)
    point = (evaluation.get("points") or [{}])[0]

    def fmt(value: object) -> str:
        return f"{value:.4g}" if isinstance(value, int | float) else "undefined"

    model = (record.get("spec") or {}).get("model")
    return (
        f"job {record.get('id')} measured {model}: skill {fmt(point.get('skill'))}, "
        f"perplexity {fmt(point.get('perplexity'))}, skill kept {fmt(point.get('skill_kept'))}, "
        f"forgetting left {fmt(point.get('forgetting_left'))}"
    )


def _job_line(record: dict) -> str:
    """What the job does, in one line, for either kind."""
    spec = record.get("spec") or {}
    if record.get("kind") == "evaluation":
        against = spec.get("base")
        if spec.get("finetuned"):
            against += f" (reference {spec['finetuned']})"
        return f"evaluation of {spec.get('model')} against {against}"
    return (
        f"{spec.get('method')} sparsity {spec.get('sparsity')}: {spec.get('base')} + "
        f"{spec.get('finetuned') or spec.get('adapter')} -> {spec.get('output')}"
    )


def _wait(client: FapmClient, namespace: argparse.Namespace) -> int:
    return _follow(client, namespace.job_id, namespace.json)


def _percent(record: dict) -> str:
    fraction = (record.get("progress") or {}).get("fraction")
    return f"{fraction * 100:.0f}%" if isinstance(fraction, int | float) else "-"


def _status(client: FapmClient, namespace: argparse.Namespace) -> int:
    record = client.get(namespace.job_id)
    if namespace.json:
        _print_json(record)
        return 0
    progress = record.get("progress") or {}
    rows = [
        (
            "status",
            f"{record.get('status')} (queue {record.get('queue')}, "
            f"attempts {record.get('attempts', 0)})",
        ),
        ("job", _job_line(record)),
    ]
    if record.get("labels"):
        rows.append(("labels", ", ".join(f"{k}={v}" for k, v in record["labels"].items())))
    line = f"{progress.get('stage', '-')}, {_percent(record)}"
    if progress.get("tensors_total"):
        line += f", {progress.get('tensors_done', 0)}/{progress['tensors_total']} tensors"
    if progress.get("eta_seconds") is not None and record.get("status") == "running":
        line += f", eta {progress['eta_seconds']:.0f} s"
    rows.append(("progress", line))
    if record.get("cancel_requested") and record.get("status") == "running":
        rows.append(("cancel", "requested; it stops at the next tensor"))
    for name in ("created_at", "started_at", "finished_at"):
        if record.get(name):
            rows.append((name.removesuffix("_at"), record[name]))
    if record.get("result"):
        rows.append(("output", record["result"].get("output")))
    if record.get("error"):
        rows.append(("error", f"[{record['error'].get('code')}] {record['error'].get('message')}"))
    print(f"job {record.get('id')}")
    for name, value in rows:
        print(f"  {name + ':':<10} {value}")
    return 0


def _cancel(client: FapmClient, namespace: argparse.Namespace) -> int:
    record = client.cancel(namespace.job_id)
    if namespace.json:
        _print_json(record)
    elif record.get("status") == "cancelled":
        print(f"job {record.get('id')} cancelled")
    else:
        print(
            f"job {record.get('id')} {record.get('status')}: cancel requested, it stops at the "
            "next tensor (fapm wait follows it)"
        )
    return 0


def _jobs(client: FapmClient, namespace: argparse.Namespace) -> int:
    page = client.list(
        status=namespace.status,
        label=namespace.label,
        limit=namespace.limit,
        cursor=namespace.cursor,
    )
    if namespace.json:
        _print_json(page)
        return 0
    jobs = page.get("jobs") or []
    print(f"{'ID':<34} {'STATUS':<10} {'DONE':>5}  {'CREATED (UTC)':<19}  OUTPUT")
    for record in jobs:
        spec = record.get("spec") or {}
        # An evaluation publishes nothing: the model it measures stands in for the output.
        output = spec.get("output") or f"(evaluation of {spec.get('model')})"
        created = str(record.get("created_at", ""))[:19].replace("T", " ")
        print(
            f"{record.get('id', ''):<34} {record.get('status', ''):<10} "
            f"{_percent(record):>5}  {created:<19}  {output}"
        )
    if page.get("next_cursor"):
        print(f"fapm: more jobs: fapm jobs --cursor {page['next_cursor']}", file=sys.stderr)
    return 0


def _report(client: FapmClient, namespace: argparse.Namespace) -> int:
    _print_json(client.report(namespace.job_id))
    return 0


def _add_client_commands(commands, api_url: argparse.ArgumentParser) -> None:
    """The service client's subcommands; `api_url` is a parent parser with --api-url."""

    def command(name: str, handler: Callable, help: str, job_id: bool = True):
        sub = commands.add_parser(
            name, help=help, description=help[0].upper() + help[1:] + ".", parents=[api_url]
        )
        if job_id:
            sub.add_argument("job_id", metavar="JOB_ID", help="the job's id (from fapm submit)")
        sub.add_argument("--json", action="store_true", help="print the JSON the API answered")
        sub.set_defaults(handler=_client_command(handler))
        return sub

    submit = commands.add_parser(
        "submit",
        parents=[api_url],
        help="submit a pruning job to the service (prints its id)",
        description="Submit a job to the fapm service: the same flags as `fapm prune`; paths and "
        "URIs are read by the service, so they name places the service can reach.",
    )
    add_spec_arguments(submit)
    submit.add_argument(
        "--label",
        action="append",
        metavar="KEY=VALUE",
        help="a label for finding the job again (repeatable)",
    )
    submit.add_argument("--webhook-url", help="POSTed the job record when the job ends")
    submit.add_argument(
        "--webhook-secret-env",
        metavar="NAME",
        help="name of the environment variable holding the webhook's signing "
        "secret (a secret on the command line would show in ps and history)",
    )
    submit.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help="resubmitting with the same key (and body) returns the same job",
    )
    submit.add_argument(
        "--wait", action="store_true", help="follow the job to its end, as fapm wait does"
    )
    submit.add_argument("--json", action="store_true", help="print the job record as JSON")
    submit.set_defaults(handler=_submit_handler)

    command("status", _status, "show a job's record")
    command("wait", _wait, "follow a job's progress to its end (exit 0 if it succeeded)")
    command("cancel", _cancel, "cancel a queued or running job")
    command("report", _report, "print a finished job's full pruning report (JSON)")
    jobs = command("jobs", _jobs, "list your jobs, newest first", job_id=False)
    jobs.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    jobs.add_argument("--label", metavar="KEY=VALUE", help="only jobs with this label")
    jobs.add_argument("--limit", type=int, default=20, help="jobs per page (default: 20)")
    jobs.add_argument("--cursor", help="the next page (printed after a full page)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
    prune.set_defaults(handler=_prune)
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
    evaluate.set_defaults(handler=_eval)
    demo = commands.add_parser(
        "demo", help="build a tiny base/fine-tuned pair and prune it end to end (a smoke test)"
    )
    demo.add_argument("--workdir", default="fapm-demo", help="directory for the demo models")
    demo.set_defaults(handler=_demo)
    _add_client_commands(commands, api_url)
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
    code = _run(namespace)
    if argv is None:  # the `fapm` program (callers in a longer-lived process pass argv)
        # About to exit: the interpreter would run a last full garbage collection over every
        # object torch and numba created (about 0.5 s, bench/RESULTS.md); frozen ones are skipped.
        gc.freeze()
    return code


def _run(namespace: argparse.Namespace) -> int:
    """The command's handler; what it did not turn into a message and a status becomes one."""
    from worker.errors import FapmError

    try:
        return namespace.handler(namespace)
    except FapmError as exc:
        return _job_error(exc)
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


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["add_spec_arguments", "build_parser", "main", "spec_from_args"]

"""The client commands of the service's REST API: submit, status, wait, cancel, jobs, report
(and `fapm eval --submit`). They import no torch."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from types import SimpleNamespace
from typing import TYPE_CHECKING

from pydantic import ValidationError

from worker.cli.common import (
    EXIT_FAILED,
    EXIT_USAGE,
    evaluation_spec,
    merge_title,
    print_points,
    progress_bar,
)
from worker.cli.spec_flags import (
    SpecFileError,
    add_spec_arguments,
    spec_error_line,
    spec_from_args,
)

if TYPE_CHECKING:
    from worker.client import FapmClient


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


def client_command(handler: Callable) -> Callable[[argparse.Namespace], int]:
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


def print_json(value: object) -> None:
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


def submit_evaluation(client: FapmClient, namespace: argparse.Namespace) -> int:
    body = evaluation_spec(namespace).model_dump(mode="json", exclude_unset=True)
    record = client.submit_evaluation(
        body, labels=_labels(namespace.label), idempotency_key=namespace.idempotency_key
    )
    return _submitted(client, namespace, record, "evaluation job")


def _submitted(client: FapmClient, namespace: argparse.Namespace, record: dict, what: str) -> int:
    """Say what a submission created; with --wait, follow it to its end."""
    if namespace.json:
        if not namespace.wait:  # with --wait, the one JSON document is the final record
            print_json(record)
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
    except (ValidationError, SpecFileError) as exc:
        print(f"fapm: error: {spec_error_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    return client_command(_submit)(namespace)


def _progress_namespace(data: object) -> SimpleNamespace:
    """A progress event's JSON as the attributes `progress_bar`'s callback reads."""
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
    update = progress_bar()

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
        print_json(record)
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
    if isinstance(spec.get("finetuned"), list):  # a merge: its totals are the merged tensors'
        rule = (spec.get("merge") or {}).get("rule")
        text = merge_title(rule, len(spec["finetuned"]))
        if isinstance(seconds, int | float):
            text += f", {seconds:.1f}s"
        return f"job {record.get('id')} wrote {result.get('output')} ({text})"
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
    print_points(evaluation)
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
    finetuned = spec.get("finetuned")
    if isinstance(finetuned, list):
        models = ", ".join(str(item.get("model")) for item in finetuned if isinstance(item, dict))
        title = merge_title((spec.get("merge") or {}).get("rule"), len(finetuned))
        return f"{title}: {spec.get('base')} + [{models}] -> {spec.get('output')}"
    return (
        f"{spec.get('method')} sparsity {spec.get('sparsity')}: {spec.get('base')} + "
        f"{finetuned or spec.get('adapter')} -> {spec.get('output')}"
    )


def _wait(client: FapmClient, namespace: argparse.Namespace) -> int:
    return _follow(client, namespace.job_id, namespace.json)


def _percent(record: dict) -> str:
    fraction = (record.get("progress") or {}).get("fraction")
    return f"{fraction * 100:.0f}%" if isinstance(fraction, int | float) else "-"


def _status(client: FapmClient, namespace: argparse.Namespace) -> int:
    record = client.get(namespace.job_id)
    if namespace.json:
        print_json(record)
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
        print_json(record)
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
        print_json(page)
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
    print_json(client.report(namespace.job_id))
    return 0


def add_client_commands(commands, api_url: argparse.ArgumentParser) -> None:
    """The service client's subcommands; `api_url` is a parent parser with --api-url."""

    def command(name: str, handler: Callable, help: str, job_id: bool = True):
        sub = commands.add_parser(
            name, help=help, description=help[0].upper() + help[1:] + ".", parents=[api_url]
        )
        if job_id:
            sub.add_argument("job_id", metavar="JOB_ID", help="the job's id (from fapm submit)")
        sub.add_argument("--json", action="store_true", help="print the JSON the API answered")
        sub.set_defaults(handler=client_command(handler))
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

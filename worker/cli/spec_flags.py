"""JobSpec's fields as `fapm prune` flags (generated, so the CLI and the API cannot drift), and
`--spec job.json`: the API's body as a file, the flags given overriding its keys.

The update side (--finetuned, --adapter, --with, --merge-*) is worker/cli/merge_flags.py.
"""

from __future__ import annotations

import argparse
import typing
from pathlib import Path

from pydantic import ValidationError

from worker.cli.merge_flags import add_update_arguments, update_values
from worker.errors import FapmError
from worker.io.safe_json import JsonLimits, load_json
from worker.spec import JobSpec

# A --spec file is a job description, not a model: a few KB; this bounds a wrong file's read.
MAX_SPEC_FILE_BYTES = 1 << 20


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
    "--calibration": ("calibration", "mode", "weights: general, task, mixed or taskaware"),
    "--calibration-general": ("calibration", "general", "weights: JSONL of {text}"),
    "--calibration-task": ("calibration", "task", "weights: JSONL of {prompt, completion}"),
    "--calibration-max-examples": ("calibration", "max_examples", "weights: sequences per set"),
    "--calibration-max-tokens": ("calibration", "max_tokens", "weights: tokens per sequence"),
    "--exclusive-frac": ("calibration", "exclusive_frac", "taskaware: exclusive channels (0.1)"),
    "--beta": ("calibration", "beta", "taskaware: general weight on shared channels (0.5)"),
    "--mlflow-alias": ("mlflow", "alias", "mlflow:// output: alias for the registered version"),
    "--delta": ("materialize", "delta", "materialize: the sparse delta to rebuild on --base"),
}
# Nested keys whose flag takes a comma-separated list.
LIST_KEYS = frozenset({"band_edges", "bounds", "weights"})
_NESTED_FIELDS = {field for field, _, _ in NESTED_FLAGS.values()}
# Fields whose flags merge_flags.py makes (repeatable inputs, --with, --merge-*).
_UPDATE_FIELDS = frozenset({"finetuned", "adapter", "merge"})


class SpecFileError(ValueError):
    """A --spec file that cannot be read as a job's JSON object (a usage error)."""


class _SpecAction(argparse.Action):
    """`--spec JOB.json`: the file may hold the required fields (output), so their flags are
    optional from here on for this parser (JobSpec still demands the values)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        for action in parser._actions:
            if getattr(action, "spec_may_give", False):
                action.required = False


def add_spec_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per JobSpec field; values are validated by JobSpec, not argparse."""
    parser.add_argument(
        "--spec",
        action=_SpecAction,
        metavar="JOB.json",
        help="the job as the API's JSON body (POST /v1/jobs); flags given override its keys "
        "(a section's flag its one key; --finetuned/--adapter the file's whole update side)",
    )
    for flag, (_, _, help_text) in NESTED_FLAGS.items():
        parser.add_argument(flag, dest=_nested_dest(flag), default=None, help=help_text)
    add_update_arguments(parser)
    for name, field in JobSpec.model_fields.items():
        if name in _NESTED_FIELDS or name in _UPDATE_FIELDS:
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
        action = parser.add_argument(
            flag,
            dest=name,
            required=required,
            default=None,
            choices=choices,
            metavar=None if choices else name.upper(),
            # argparse %-formats help: a literal % (as in "keeps 10%") must be doubled.
            help=((field.description or "") + default_text).replace("%", "%%"),
        )
        action.spec_may_give = required  # type: ignore[attr-defined]


def _nested_dest(flag: str) -> str:
    return "nested_" + flag.lstrip("-").replace("-", "_")


def read_spec_file(path: str) -> dict:
    """The JSON object of a --spec file, or SpecFileError saying why not."""
    try:
        with Path(path).open("rb") as file:
            data = file.read(MAX_SPEC_FILE_BYTES + 1)
    except OSError as exc:
        raise SpecFileError(f"--spec {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_SPEC_FILE_BYTES:
        raise SpecFileError(f"--spec {path}: over {MAX_SPEC_FILE_BYTES} bytes (not a job's JSON)")
    try:  # measured before parsing (depth, values, digits), as every JSON fapm did not write
        values = load_json(data, f"--spec {path}", JsonLimits(MAX_SPEC_FILE_BYTES), FapmError)
    except FapmError as exc:
        raise SpecFileError(exc.message) from None
    return typing.cast(dict, values)  # load_json's expect: an object


def _section(values: dict, field: str) -> dict:
    """The nested section `field` of `values`, as a dict a flag may set one key of."""
    section = values.get(field)
    section = dict(section) if isinstance(section, dict) else {}
    values[field] = section
    return section


def spec_from_args(namespace: argparse.Namespace) -> JobSpec:
    """The job the flags (and --spec file) describe; ValidationError or SpecFileError if none."""
    spec_file = getattr(namespace, "spec", None)
    values: dict = read_spec_file(spec_file) if spec_file else {}
    for name in JobSpec.model_fields:
        if name in _NESTED_FIELDS or name in _UPDATE_FIELDS:
            continue
        value = getattr(namespace, name, None)
        if value is not None and value is not False:  # an unset store_true flag overrides nothing
            values[name] = value
    for flag, (field, key, _) in NESTED_FLAGS.items():
        value = getattr(namespace, _nested_dest(flag), None)
        if value is None:
            continue
        if key is None:  # --methods fapm,magnitude
            values[field] = [m.strip() for m in value.split(",") if m.strip()]
        elif key in LIST_KEYS:  # --nps-weights 1,0.5,...
            _section(values, field)[key] = [v.strip() for v in value.split(",")]
        else:
            _section(values, field)[key] = value
    update, merge = update_values(namespace)
    if update:  # the command line's inputs replace the file's, whichever kind they were
        values.pop("finetuned", None)
        values.pop("adapter", None)
        values.update(update)
    if merge:
        _section(values, "merge").update(merge)
    return JobSpec.model_validate(values)


def spec_error_line(exc: ValidationError | SpecFileError) -> str:
    """What `fapm: error: ...` says for a job the flags do not describe."""
    if isinstance(exc, ValidationError):
        return one_line_validation_error(exc)
    return str(exc)


def one_line_validation_error(exc: ValidationError) -> str:
    errors = exc.errors()
    # A union field (finetuned: str | list[MergeInput]) fails once per member: keep the member
    # the value was meant for (the deeper error), not "should be a valid string" for a list.
    deeper = {str(e["loc"][0]) for e in errors if len(e["loc"]) > 2}
    parts = []
    for error in errors:
        where = error["loc"]
        if len(where) == 2 and str(where[0]) in deeper and error["type"].endswith("_type"):
            continue
        # Union members' tags (list[MergeInput]) are pydantic's, not the job's field names.
        loc = ".".join(str(p) for p in where if "[" not in str(p)) or "spec"
        message = error["msg"]
        field = JobSpec.model_fields.get(str(where[0])) if where else None
        if error["type"] == "missing" and field is not None and len(where) == 1:
            message += f" ({_flag(str(where[0]), field)})"  # output: Field required (--out)
        parts.append(f"{loc}: {message}")
    return "invalid job: " + "; ".join(parts)

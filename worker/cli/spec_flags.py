"""JobSpec's fields as `fapm prune` flags (generated, so the CLI and the API cannot drift)."""

from __future__ import annotations

import argparse
import typing

from pydantic import ValidationError

from worker.spec import JobSpec


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


def one_line_validation_error(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        loc = ".".join(str(p) for p in error["loc"]) or "spec"
        parts.append(f"{loc}: {error['msg']}")
    return "invalid job: " + "; ".join(parts)

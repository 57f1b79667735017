"""The update side of a job as flags: `--finetuned`/`--adapter` (repeatable: a merge), `--with`
(one input's options) and `--merge-*` (the merge section), generated from MergeInput's and
MergeSpec's fields so a field added there is a flag here without a CLI change.

    fapm prune --base ./base --out ./merged \\
        --finetuned ./math --with weight=1 method=magnitude sparsity=0.8 \\
        --finetuned s3://models/code/ --with weight=0.7 \\
        --adapter hf://org/chat-lora@main \\
        --merge-rule ties --merge-lam 1.0

Why a separate `--with` and not a suffix on the location (`./math:weight=1`): locations contain
':' and '@' (s3://, hf://org/name@rev, file://), so no suffix syntax is unambiguous; a location is
taken whole, and `--with KEY=VALUE ...` sets options of the `--finetuned`/`--adapter` given just
before it (the value is everything after the first '=', so it may hold '=', ':' or ',').

One `--finetuned` (or one `--adapter`) with no `--with` and no `--merge-*` flag is a single pair,
as it always was; anything more is a merge (`finetuned` as a list), a merge of one included.
"""

from __future__ import annotations

import argparse
import types
import typing

from worker.spec.merge import MergeInput, MergeSpec

# Where the inputs collect, in command-line order: [{"model": ..., "adapter": True?, ...}].
INPUTS_DEST = "update_inputs"
# Keys of `--with`: every MergeInput field but the location, which `--finetuned` gives.
INPUT_OPTION_KEYS: tuple[str, ...] = tuple(n for n in MergeInput.model_fields if n != "model")
MERGE_DEST_PREFIX = "merge_"


def _is_list(annotation: object) -> bool:
    """list[...] or list[...] | None."""
    members = (annotation,)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = typing.get_args(annotation)
    return any(typing.get_origin(member) is list for member in members)


# Keys whose value is a comma-separated list (nps_weights=1,0.5,...), as --nps-weights takes it.
INPUT_LIST_KEYS = frozenset(
    name for name in INPUT_OPTION_KEYS if _is_list(MergeInput.model_fields[name].annotation)
)


class _InputAction(argparse.Action):
    """`--finetuned X` / `--adapter X`: one more input of the update side."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        # A fresh list each time: argparse shares one default object between parses.
        inputs = list(getattr(namespace, INPUTS_DEST, None) or [])
        item: dict[str, object] = {"model": values}
        if self.dest == "adapter":
            item["adapter"] = True
        inputs.append(item)
        setattr(namespace, INPUTS_DEST, inputs)


class _WithAction(argparse.Action):
    """`--with KEY=VALUE ...`: options of the input given just before. Values stay strings;
    JobSpec validates them (a bad number is a usage error naming finetuned.N.key)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        inputs = list(getattr(namespace, INPUTS_DEST, None) or [])
        if not inputs:
            raise argparse.ArgumentError(
                self,
                "sets options of an input: put it after the --finetuned or --adapter it is for",
            )
        item = dict(inputs[-1])
        keys = ", ".join(INPUT_OPTION_KEYS)
        for token in values:
            key, sep, value = token.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or not key:
                raise argparse.ArgumentError(self, f"{token!r}: use KEY=VALUE (keys: {keys})")
            if key not in INPUT_OPTION_KEYS:
                hint = " (the location is --finetuned's value)" if key == "model" else ""
                raise argparse.ArgumentError(
                    self, f"{token!r}: unknown key {key!r}{hint} (keys: {keys})"
                )
            if key == "adapter" and item.get("adapter") is True:  # True only from --adapter
                raise argparse.ArgumentError(
                    self, f"{token!r}: --adapter {item['model']} is an adapter already"
                )
            if key in item:
                raise argparse.ArgumentError(
                    self, f"{token!r}: {key} given twice for {item['model']}"
                )
            item[key] = [v.strip() for v in value.split(",")] if key in INPUT_LIST_KEYS else value
        inputs[-1] = item
        setattr(namespace, INPUTS_DEST, inputs)


def _describe(model: type, name: str) -> str:
    return (model.model_fields[name].description or "").replace("%", "%%")


def add_update_arguments(parser: argparse.ArgumentParser) -> None:
    """--finetuned, --adapter, --with and the --merge-* flags."""
    group = parser.add_argument_group(
        "fine-tunes and merges",
        "One --finetuned (or --adapter) is a pair with --base. Several, or any --with or --merge-* "
        "flag, make a merge (finetuned as a list): each input pruned by its own method and "
        "sparsity (the job's by default), then combined over the base by --merge-rule.",
    )
    group.add_argument(
        "--finetuned",
        dest="finetuned",
        action=_InputAction,
        metavar="LOCATION",
        help="a fine-tuned checkpoint of the base's architecture (directory, file://, s3://, "
        "hf://org/name[@rev]); repeat it (and --adapter) to merge several",
    )
    group.add_argument(
        "--adapter",
        dest="adapter",
        action=_InputAction,
        metavar="LOCATION",
        help="a PEFT LoRA adapter on the base instead of a fine-tuned checkpoint (the output is "
        "the dense merged model, pruned); in a merge, an input with adapter=true",
    )
    options = " ".join(
        f"{key}: {_describe(MergeInput, key).rstrip('.')}." for key in INPUT_OPTION_KEYS
    )
    group.add_argument(
        "--with",
        dest="with_options",
        action=_WithAction,
        nargs="+",
        metavar="KEY=VALUE",
        help="options of the --finetuned or --adapter just before it (makes a merge); each "
        f"KEY=VALUE a separate word, the value everything after the first '='. {options}",
    )
    for name, field in MergeSpec.model_fields.items():
        flag = "--merge-" + name.replace("_", "-")
        dest = MERGE_DEST_PREFIX + name
        help_text = "merge: " + _describe(MergeSpec, name)
        annotation = field.annotation
        if annotation is bool or typing.get_args(annotation) == (bool, type(None)):
            group.add_argument(
                flag, dest=dest, action=argparse.BooleanOptionalAction, default=None,
                help=help_text,
            )  # fmt: skip
            continue
        choices = list(typing.get_args(annotation)) if typing.get_origin(annotation) is typing.Literal else None  # fmt: skip
        group.add_argument(
            flag,
            dest=dest,
            default=None,
            choices=choices,
            metavar=None if choices else name.upper(),
            help=help_text + (f" (default: {field.default})" if field.default is not None else ""),
        )


def update_values(namespace: argparse.Namespace) -> tuple[dict, dict]:
    """(the JobSpec keys of the update side the flags give, the merge section's keys given).

    The first is empty when no --finetuned/--adapter was given (a --spec file may have them)."""
    merge = {
        name: getattr(namespace, MERGE_DEST_PREFIX + name)
        for name in MergeSpec.model_fields
        if getattr(namespace, MERGE_DEST_PREFIX + name, None) is not None
    }
    inputs: list[dict] = getattr(namespace, INPUTS_DEST, None) or []
    if not inputs:
        return {}, merge
    item = inputs[0]
    # Only --finetuned/--adapter themselves (adapter is True, not a --with string): any --with
    # key makes a merge, adapter=... included.
    from_the_flag = {"model", "adapter"} if item.get("adapter") is True else {"model"}
    plain = len(inputs) == 1 and set(item) <= from_the_flag
    if plain and not merge:  # one pair, exactly as before merges existed
        return (
            {"adapter": item["model"]} if item.get("adapter") else {"finetuned": item["model"]}
        ), merge
    return {"finetuned": inputs}, merge

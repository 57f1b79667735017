"""Which base tensor goes with which fine-tuned tensor, from the names alone (headers, no reads).

A fine-tune is often saved under another class than its base: a head on a base encoder
(`BertForSequenceClassification` saves `bert.*` + `classifier.*` where the `BertModel` base saves
`*`), `LlamaForCausalLM` (`model.*` + `lm_head`) against a `LlamaModel` base, a multimodal model
around a text base (`language_model.model.*` against `model.*`), or the other way round. The
names then differ by ONE prefix added on one side, or, in current transformers' multimodal
models, by one leading prefix swapped for another (`model.language_model.layers.*` against
`model.layers.*`). `find_name_map` tries every dotted prefix of either side's names and keeps the
map that pairs the most tensors (a pair: the same name once the prefix is added, removed or
swapped, and `compatible`, which the plan makes shape and dtype class); two maps that pair as
many tensors are ambiguous, and an error, not a guess.

It is one function for every consumer: the plan (the engine, evaluation candidates and scope
model all run on it) and the LoRA reader (an adapter names the modules of the model it was
trained on, which may carry a prefix the base checkpoint does not).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from worker.errors import ArchitectureMismatch


@dataclass(frozen=True)
class NameMap:
    """Fine-tuned name -> base name: strip `finetuned_prefix`, then add `base_prefix`.

    One of the two is non-empty (one prefix, added or removed on one side), or both (one leading
    prefix swapped for another, e.g. `model.language_model.` for `model.`); both empty is
    the identity, the usual case.
    """

    finetuned_prefix: str = ""  # the fine-tune's names carry it, the base's do not
    base_prefix: str = ""  # the base's names carry it, the fine-tune's do not

    @property
    def is_identity(self) -> bool:
        return not self.finetuned_prefix and not self.base_prefix

    def base_name(self, finetuned_name: str) -> str | None:
        """The base name this fine-tuned name pairs with (which the base may lack). A name
        outside the fine-tune's prefix pairs with nothing when the prefix was added (a head the
        base cannot have), and with its own name when one prefix was swapped for another (the
        parts around the swapped one, e.g. a top-level `lm_head`, keep their names)."""
        if not finetuned_name.startswith(self.finetuned_prefix):
            return finetuned_name if self.base_prefix else None
        return self.base_prefix + finetuned_name[len(self.finetuned_prefix) :]

    def describe(self) -> str:
        """In words, for error messages, the report and the card."""
        if self.finetuned_prefix and self.base_prefix:
            return (
                f"the fine-tuned names start with {self.finetuned_prefix!r} where the base's "
                f"start with {self.base_prefix!r}"
            )
        if self.finetuned_prefix:
            return f"the fine-tuned names are the base's with the prefix {self.finetuned_prefix!r}"
        if self.base_prefix:
            return f"the base's names are the fine-tuned ones with the prefix {self.base_prefix!r}"
        return "the same names on both sides"

    def as_report(self) -> dict[str, str]:
        return {
            "finetuned_prefix": self.finetuned_prefix,
            "base_prefix": self.base_prefix,
            "description": self.describe(),
        }


IDENTITY = NameMap()


def _dotted_prefixes(name: str) -> Iterable[tuple[str, str]]:
    """(prefix, rest) at every dot of `name`: "a.b.c" -> ("a.", "b.c"), ("a.b.", "c")."""
    at = name.find(".")
    while at != -1:
        yield name[: at + 1], name[at + 1 :]
        at = name.find(".", at + 1)


def _last_segment(prefix: str) -> str:
    return prefix[:-1].rsplit(".", 1)[-1]


def _count_swaps(
    base_list: list[str],
    finetuned_list: list[str],
    compatible: Callable[[str, str], bool],
    check_cancel: Callable[[], None],
    pairs: Counter[tuple[str, str]],
) -> None:
    """Count maps that swap one leading prefix for another (`model.language_model.` for
    `model.`: current transformers' multimodal models around a text base). Only maps whose two
    prefixes end in different segments are counted: `a.x.` for `x.` is the same map as `a.` for
    nothing, which the add/remove passes count already."""
    by_rest: dict[str, list[str]] = {}
    for name in base_list:
        for prefix, rest in _dotted_prefixes(name):
            by_rest.setdefault(rest, []).append(prefix)
    for name in finetuned_list:
        check_cancel()
        for prefix, rest in _dotted_prefixes(name):
            for base_prefix in by_rest.get(rest, ()):
                if _last_segment(base_prefix) != _last_segment(prefix) and compatible(
                    base_prefix + rest, name
                ):
                    pairs[prefix, base_prefix] += 1


def find_name_map(
    base_names: Iterable[str],
    finetuned_names: Iterable[str],
    compatible: Callable[[str, str], bool] = lambda _base, _finetuned: True,
    check_cancel: Callable[[], None] = lambda: None,
) -> NameMap:
    """The map (identity, one prefix added or removed on one side, or one leading prefix
    swapped for another) that pairs the most tensors.

    `compatible(base_name, finetuned_name)` says whether two same-named tensors may pair (the
    plan: same shape, or added vocabulary rows, and the same dtype class). Cost: one set lookup
    per name and dot, no tensor read. When nothing pairs, the identity is returned (the caller's
    error then names the first unmatched tensor, as without a map). Raises ArchitectureMismatch
    when two maps pair the same, largest number of tensors.
    """
    base_list = list(base_names)
    finetuned_list = list(finetuned_names)
    base_set = set(base_list)
    finetuned_set = set(finetuned_list)
    pairs: Counter[tuple[str, str]] = Counter()  # (finetuned_prefix, base_prefix) -> pairs
    for name in base_list:
        check_cancel()
        if name in finetuned_set and compatible(name, name):
            pairs["", ""] += 1
        for prefix, rest in _dotted_prefixes(name):
            if rest in finetuned_set and compatible(name, rest):
                pairs["", prefix] += 1
    for name in finetuned_list:
        check_cancel()
        for prefix, rest in _dotted_prefixes(name):
            if rest in base_set and compatible(rest, name):
                pairs[prefix, ""] += 1
    swaps: Counter[tuple[str, str]] = Counter()
    _count_swaps(base_list, finetuned_list, compatible, check_cancel, swaps)
    # A swap is taken only where it pairs more than any simpler map: swaps between look-alike
    # prefixes (`layers.0.` for `layers.1.`) pair a few tensors by accident.
    if swaps and max(swaps.values()) > max(pairs.values(), default=0):
        pairs = swaps
    if not pairs:
        return IDENTITY
    most = max(pairs.values())
    best = [NameMap(*key) for key, count in sorted(pairs.items()) if count == most]
    if len(best) > 1:
        raise ArchitectureMismatch(
            f"the base's and the fine-tuned checkpoint's tensor names pair equally well ({most} "
            f"tensors) in {len(best)} ways: "
            + "; ".join(m.describe() for m in best[:3])
            + ": which tensor goes with which is ambiguous"
        )
    return best[0]

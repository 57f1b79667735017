"""What a combine rule is: the pruned task vectors of one tensor in, one merged update out.

The inputs come as a stream (`updates()` yields each input's float32 pruned update T_i and its
weight w_i, one at a time, in the job's order), never as a stack: a rule holds a few accumulators
of the tensor's size, whatever the number of models. A rule that needs two looks at the inputs
may call `updates()` twice, but the engine then reads and prunes each input again: TIES elects
its sign and averages in one look.

The arithmetic is float32, in mergekit's order of operations (worker/engine/merge_methods/*.py
say which function each follows), so a merge of float32 updates gives mergekit's bits: sums are
accumulated input by input, which is the order torch's sum over mergekit's stacked inputs takes
for up to four inputs (more may pair differently in the last bit).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator

import torch

from worker.spec.merge import MergeSpec

# Each call streams (T_i in float32, w_i) for every input of the merge, in order.
Updates = Callable[[], Iterator[tuple[torch.Tensor, float]]]


class CombineRule(ABC):
    name: str
    title: str
    paper_url: str | None = None

    @abstractmethod
    def combine(self, updates: Updates, like: torch.Tensor, merge: MergeSpec) -> torch.Tensor:
        """The merged update, float32 of `like`'s shape and device (the output is W + it)."""

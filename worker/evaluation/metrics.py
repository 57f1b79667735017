"""The numbers: task skill (exact match of greedy generation), completion loss, perplexity.

Definitions (tests/evaluation checks them against a plain one-example-at-a-time loop):

- Task example: prompt ids = tokenizer(prompt) (with the special tokens the tokenizer adds, e.g.
  BOS); completion ids = the tokens of prompt + completion after the prompt's tokens (how
  lm-evaluation-harness splits a continuation, so a completion " 42" tokenizes as it would in
  running text); where the joint tokenization does not start with the prompt's, the completion is
  tokenized on its own. No EOS is appended.
- Skill: exact-match accuracy of greedy generation of len(completion ids) tokens. Greedy decoding
  reproduces the completion exactly when, at every completion position, the argmax of the
  teacher-forced logits is the completion token (until the first mismatch both see the same
  input), so one teacher-forced pass gives the skill and the loss: no generation loop.
  argmax ties go to the lower token id, as in `torch.argmax` and `generate`.
- Completion loss: mean negative log-likelihood per completion token (over all examples' tokens).
- Perplexity: exp(total NLL / predicted tokens) over the general texts; each text (with the
  tokenizer's special tokens) is cut into windows of at most the model's context, and each window
  predicts its tokens after the first.

Batches are right-padded (positions are then those of the unpadded sequence) and sorted by length
so little padding is computed. NLL is summed in float64; log-softmax runs in float32 on the
positions that count only.

A model whose vocabulary does not cover every token id of the encoded sets is refused before its
first batch (architecture_mismatch), not run into an index error (or, on CUDA, a device assert).
`should_cancel` is asked between batches (at most every CANCEL_CHECK_SECONDS), so a cancelled job
stops within one batch, not at the end of a model's evaluation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from worker.errors import ArchitectureMismatch, JobCancelled
from worker.evaluation.data import GeneralText, TaskExample
from worker.evaluation.errors import EmptyEvalSet, EvalDataError
from worker.evaluation.model import vocabulary_rows

# Between batches, the cancellation flag (a Redis read in the worker) is read at most this often.
CANCEL_CHECK_SECONDS = 0.1


@dataclass(frozen=True)
class EncodedExample:
    prompt: list[int]
    completion: list[int]
    line: int


@dataclass(frozen=True)
class TaskScore:
    accuracy: float  # exact-match skill in [0, 1]
    loss: float  # mean completion NLL per token
    examples: int
    tokens: int  # tokens run through the model (prompt + completion)


@dataclass(frozen=True)
class GeneralScore:
    perplexity: float
    nll: float  # mean NLL per predicted token
    predicted: int  # tokens predicted
    tokens: int  # tokens run through the model


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def encode_task(
    tokenizer, examples: list[TaskExample], context: int | None, uri: str
) -> list[EncodedExample]:
    encoded = []
    for example in examples:
        prompt = _ids(tokenizer, example.prompt, special=True)
        joint = _ids(tokenizer, example.prompt + example.completion, special=True)
        if joint[: len(prompt)] == prompt and len(joint) > len(prompt):
            completion = joint[len(prompt) :]
        else:
            completion = _ids(tokenizer, example.completion, special=False)
        if not completion:
            raise EvalDataError(f"{uri} line {example.line}: the completion has no tokens")
        if not prompt:
            raise EvalDataError(
                f"{uri} line {example.line}: the prompt has no tokens and the tokenizer adds "
                "no BOS: nothing to predict the first completion token from"
            )
        if context is not None and len(prompt) + len(completion) > context:
            raise EvalDataError(
                f"{uri} line {example.line}: prompt + completion is "
                f"{len(prompt) + len(completion)} tokens, longer than the model's context "
                f"({context})"
            )
        encoded.append(EncodedExample(prompt, completion, example.line))
    return encoded


def encode_general(
    tokenizer, texts: list[GeneralText], context: int | None, uri: str
) -> list[list[int]]:
    windows = []
    for text in texts:
        ids = _ids(tokenizer, text.text, special=True)
        step = context or max(len(ids), 1)
        windows.extend(w for w in (ids[i : i + step] for i in range(0, len(ids), step)))
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise EmptyEvalSet(f"{uri}: no text has two tokens or more: nothing to predict")
    return windows


def _batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _forward(
    model: torch.nn.Module, rows: list[list[int]], pad_id: int, device: torch.device
) -> torch.Tensor:
    """Logits (batch, longest, vocab) of right-padded rows."""
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    with torch.inference_mode():
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    return out.logits


def _token_nll(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 NLL per position, argmax per position) of (positions, vocab) logits."""
    log_probs = logits.float().log_softmax(-1)
    nll = -log_probs.gather(-1, targets[:, None]).squeeze(-1)
    return nll.double(), logits.argmax(-1)


@dataclass
class Throughput:
    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


class Evaluator:
    """A task set and a general set, tokenized once, scored on any number of models."""

    def __init__(
        self,
        task: list[EncodedExample],
        general: list[list[int]],
        batch_size: int,
        pad_id: int,
        device: torch.device,
        should_cancel: Callable[[], bool] | None = None,
        tokenizer_of: str = "the measured model",
    ) -> None:
        if not task:
            raise EmptyEvalSet("the task set has no examples")
        self.task_set = task
        self.general_set = general
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.device = device
        self.throughput = Throughput()
        self.should_cancel = should_cancel or (lambda: False)
        self.tokenizer_of = tokenizer_of  # for error messages
        self.max_id = max(
            [pad_id] + [max(e.prompt + e.completion) for e in task] + [max(w) for w in general if w]
        )
        self._checked_at = float("-inf")

    def check_vocabulary(self, model: torch.nn.Module, where: str) -> None:
        """Refuse a model that has no row for some token id of the sets."""
        rows = vocabulary_rows(model)
        if self.max_id >= rows:
            raise ArchitectureMismatch(
                f"{where}: its vocabulary has {rows} tokens but the evaluation sets, tokenized "
                f"with the tokenizer of {self.tokenizer_of}, use token id {self.max_id}: are "
                "these models of the same vocabulary?"
            )

    def _cancel_point(self) -> None:
        now = time.monotonic()
        if now - self._checked_at < CANCEL_CHECK_SECONDS:
            return
        self._checked_at = now
        if self.should_cancel():
            raise JobCancelled("the job was cancelled")

    def skill(self, model: torch.nn.Module, where: str = "the model") -> TaskScore:
        self.check_vocabulary(model, where)
        started = time.perf_counter()
        correct, nll_sum, count, tokens = 0, 0.0, 0, 0
        rows = [e.prompt + e.completion for e in self.task_set]
        for batch in _batches([len(r) for r in rows], self.batch_size):
            self._cancel_point()
            logits = _forward(model, [rows[i] for i in batch], self.pad_id, self.device)
            for b, i in enumerate(batch):
                example = self.task_set[i]
                start = len(example.prompt) - 1  # the logits that predict the completion
                positions = logits[b, start : start + len(example.completion)]
                targets = torch.tensor(example.completion, device=positions.device)
                nll, argmax = _token_nll(positions, targets)
                correct += bool(torch.equal(argmax, targets))
                nll_sum += float(nll.sum())
                count += len(example.completion)
                tokens += len(rows[i])
        self._timed(tokens, started)
        return TaskScore(correct / len(self.task_set), nll_sum / count, len(self.task_set), tokens)

    def general(self, model: torch.nn.Module, where: str = "the model") -> GeneralScore:
        self.check_vocabulary(model, where)
        started = time.perf_counter()
        nll_sum, predicted, tokens = 0.0, 0, 0
        windows = self.general_set
        for batch in _batches([len(w) for w in windows], self.batch_size):
            self._cancel_point()
            logits = _forward(model, [windows[i] for i in batch], self.pad_id, self.device)
            for b, i in enumerate(batch):
                window = windows[i]
                targets = torch.tensor(window[1:], device=logits.device)
                nll, _ = _token_nll(logits[b, : len(window) - 1], targets)
                nll_sum += float(nll.sum())
                predicted += len(window) - 1
                tokens += len(window)
        self._timed(tokens, started)
        mean = nll_sum / predicted
        return GeneralScore(math.exp(mean), mean, predicted, tokens)

    def _timed(self, tokens: int, started: float) -> None:
        self.throughput.tokens += tokens
        self.throughput.seconds += time.perf_counter() - started

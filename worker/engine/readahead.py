"""Bounded read-ahead: a reader thread loads the next tensors while the current one is computed.

The bound is in bytes, not items, so a run of large tensors cannot pile up in memory: the reader
waits while the bytes loaded but not yet handed to the consumer would exceed the budget (one item
is always allowed, however large, so progress never stalls). Memory is therefore the item being
computed plus at most `budget_bytes` (or one item) waiting.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

Item = TypeVar("Item")
Loaded = TypeVar("Loaded")

_DONE = object()


def read_ahead(
    items: Iterable[Item],
    load: Callable[[Item], Loaded],
    cost: Callable[[Item], int],
    budget_bytes: int,
) -> Iterator[tuple[Item, Loaded]]:
    """Yield (item, load(item)) in order, loading ahead within `budget_bytes` of waiting items.

    An exception in `load` is re-raised in the consumer. Closing the iterator early (break,
    an exception in the consumer) stops the reader thread.
    """
    results: queue.Queue = queue.Queue()
    in_flight = 0
    condition = threading.Condition()
    stop = threading.Event()

    def reader() -> None:
        nonlocal in_flight
        try:
            for item in items:
                size = cost(item)
                with condition:
                    while in_flight > 0 and in_flight + size > budget_bytes and not stop.is_set():
                        condition.wait(0.1)
                    if stop.is_set():
                        return
                    in_flight += size
                results.put((item, load(item), size))
        except BaseException as exc:  # handed to the consumer
            results.put(exc)
            return
        results.put(_DONE)

    thread = threading.Thread(target=reader, name="fapm-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            got = results.get()
            if got is _DONE:
                return
            if isinstance(got, BaseException):
                raise got
            item, loaded, size = got
            del got
            with condition:  # handed over: the reader may fetch the next one meanwhile
                in_flight -= size
                condition.notify_all()
            yield item, loaded
            del loaded
    finally:
        stop.set()
        with condition:
            condition.notify_all()
        thread.join(timeout=30)

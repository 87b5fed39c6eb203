"""Work done ahead in threads and handed over in order, a bounded number of items at a time: the
video decoding of the next questions while the model answers the current ones. Threads, not
processes: PyAV and decord release the GIL while they decode, and the frames stay in this process
(a per-video cache keeps them; another process would have to send them back)."""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator


def ahead(items: Iterable, work: Callable, *, workers: int = 2, depth: int = 4) -> Iterator[tuple]:
    """(item, work(item) or None, the exception it raised or None) for each item, in order. At most
    `depth` items are taken from `items` and worked on (or done and waiting) at a time, so what
    they hold in memory stays bounded however long `items` is."""
    feed = iter(items)
    pending: deque = deque()
    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="sharp-prefetch")
    try:
        while True:
            while len(pending) < max(1, depth):
                try:
                    item = next(feed)
                except StopIteration:
                    break
                pending.append((item, pool.submit(work, item)))
            if not pending:
                return
            item, future = pending.popleft()
            try:
                result, error = future.result(), None
            except Exception as exc:  # noqa: BLE001 - handed to the caller with its item
                result, error = None, exc
            yield item, result, error
    finally:
        pool.shutdown(wait=True, cancel_futures=True)

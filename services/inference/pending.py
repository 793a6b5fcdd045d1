"""The hand-over between paho's network thread and the inference worker thread.

``PendingQueue`` is a bounded FIFO whose ``put`` blocks while it is full. That blocking
is the back-pressure: while the network thread waits here it reads nothing more from
the socket, so the broker keeps every further face queued in this worker's session,
un-acknowledged, instead of the worker dropping anything. It cannot deadlock because the
worker never waits for the network thread: it publishes without blocking and checks
for PUBACKs between batches (see ``service.InferenceWorker``).

``RecentIds`` remembers face ids for a while, to count faces that arrive twice.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class PendingQueue(Generic[T]):
    """A bounded, closable FIFO of items waiting for the worker.

    capacity: most items held; ``put`` blocks beyond it.
    arrived_at: the monotonic time an item arrived, so a batch waits at most
        ``max_wait_s`` counted from its oldest face, not from when the worker looked.
    on_depth: called with the new depth after every change (the ``pending`` gauge).
    """

    def __init__(
        self,
        capacity: int,
        arrived_at: Callable[[T], float],
        on_depth: Callable[[int], None] = lambda depth: None,
    ) -> None:
        self.capacity = capacity
        self._arrived_at = arrived_at
        self._on_depth = on_depth
        self._items: deque[T] = deque()
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, item: T) -> bool:
        """Append item, waiting while the queue is full; False once the queue is closed."""
        with self._cond:
            while len(self._items) >= self.capacity and not self._closed:
                self._cond.wait()
            if self._closed:
                return False
            self._items.append(item)
            depth = len(self._items)
            self._cond.notify_all()
        self._on_depth(depth)
        return True

    def take_batch(self, max_items: int, max_wait_s: float, idle_s: float) -> list[T]:
        """Up to max_items items; [] when none came within idle_s or the queue is closed.

        Once there is an item, waits until max_items are there, the queue is full, or the
        oldest item has waited max_wait_s, whichever comes first.
        """
        with self._cond:
            if not self._items and not self._closed:
                self._cond.wait(idle_s)
            if not self._items or self._closed:
                return []
            enough = min(max_items, self.capacity)
            deadline = self._arrived_at(self._items[0]) + max_wait_s
            while len(self._items) < enough and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            if self._closed:
                return []
            batch = [self._items.popleft() for _ in range(min(max_items, len(self._items)))]
            depth = len(self._items)
            self._cond.notify_all()
        self._on_depth(depth)
        return batch

    def close(self) -> list[T]:
        """Refuse further items, wake every waiter, and return what was still queued."""
        with self._cond:
            self._closed = True
            left = list(self._items)
            self._items.clear()
            self._cond.notify_all()
        self._on_depth(0)
        return left


class RecentIds:
    """Ids seen within the last ``window_s`` seconds, at most ``limit`` of them."""

    def __init__(self, window_s: float, limit: int = 100_000) -> None:
        self.window_s = window_s
        self.limit = limit
        self._seen: OrderedDict[str, float] = OrderedDict()

    def seen_before(self, key: str, now: float | None = None) -> bool:
        """Record key; True when it was already recorded within the window."""
        now = time.monotonic() if now is None else now
        while self._seen:
            oldest, at = next(iter(self._seen.items()))
            if now - at <= self.window_s and len(self._seen) < self.limit:
                break
            del self._seen[oldest]
        again = key in self._seen and now - self._seen[key] <= self.window_s
        self._seen[key] = now
        self._seen.move_to_end(key)
        return again

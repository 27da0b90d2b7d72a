"""One thread that stops onnxruntime runs past their time limit, for every session in the process.

A run arms a deadline before it starts and disarms it when it ends; when a deadline passes first, the
thread sets that run's `RunOptions.terminate` and onnxruntime stops the run at its next node. One thread
serves all runs: a server makes hundreds of runs a second, and a thread started for each run (what
threading.Timer does) cost about as much as a small model's run itself on a 2-core box.
"""

from __future__ import annotations

import heapq
import itertools
import os
import threading
import time
from typing import Any


class Watchdog:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int]] = []  # (deadline, key), disarmed keys removed lazily
        self._armed: dict[int, Any] = {}  # key -> the run's RunOptions
        self._keys = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, options: Any, seconds: float) -> int:
        """Set `options.terminate` in `seconds` unless disarmed first; the key that disarms it."""
        deadline = time.monotonic() + seconds
        with self._cond:
            key = next(self._keys)
            self._armed[key] = options
            heapq.heappush(self._heap, (deadline, key))
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="vggspec-watchdog", daemon=True)
                self._thread.start()
            elif self._heap[0][1] == key:  # only an earlier deadline than the one waited for needs a wake-up
                self._cond.notify()
        return key

    def disarm(self, key: int) -> None:
        with self._cond:
            self._armed.pop(key, None)
            # Disarmed deadlines leave the heap when they come due; a long limit with many short runs
            # would pile them up, so the heap is rebuilt once most of it is dead.
            if len(self._heap) > 64 and len(self._heap) > 2 * len(self._armed):
                self._heap = [entry for entry in self._heap if entry[1] in self._armed]
                heapq.heapify(self._heap)

    @property
    def pending(self) -> int:
        """Deadlines held, live or not yet dropped (for tests)."""
        return len(self._heap)

    def _watch(self) -> None:
        with self._cond:
            while True:
                while self._heap and self._heap[0][1] not in self._armed:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                left = self._heap[0][0] - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                _, key = heapq.heappop(self._heap)
                self._armed.pop(key).terminate = True


WATCHDOG = Watchdog()


def _after_fork() -> None:
    # A forked child has no copy of the thread; it starts its own on its first run.
    global WATCHDOG
    WATCHDOG = Watchdog()


os.register_at_fork(after_in_child=_after_fork)


def arm(options: Any, seconds: float) -> int:
    """WATCHDOG.arm, looked up at call time (a forked child has its own)."""
    return WATCHDOG.arm(options, seconds)


def disarm(key: int) -> None:
    WATCHDOG.disarm(key)

"""Dynamic batching: inputs of one shape that queue while the previous batch runs (and, given a delay, that
arrive within it) run as one onnxruntime batch.

Without a delay (the default, as Triton's dynamic batcher) a batch is whatever has queued when the engine
comes free: one client alone is never kept waiting for others that are not coming, and under load the queue
fills the batch while the previous one runs. Measured on narrow D (2 cores, RESULTS.md section 11), waiting
5 ms cut one client's images/s five-fold and four clients' by two thirds, and bought nothing at 16 or 64.

Each model has one Batcher and one worker thread that owns its session's runs: callers (the event loop
for protocol requests, worker threads for images) submit an input batch and get a Future. onnxruntime
releases the GIL while it runs, so the event loop stays free. A failed batch is retried member by member,
so one bad input fails only its own request.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

import numpy as np

Run = Callable[[np.ndarray], list[np.ndarray]]  # an input batch -> every output, batch axis first


class Closed(RuntimeError):
    """The batcher was closed (its model was replaced or the server is stopping) before the input came."""


@dataclass
class _Item:
    x: np.ndarray
    future: Future = field(default_factory=Future)

    @property
    def key(self) -> tuple:
        return (self.x.shape[1:], self.x.dtype.str)


class Batcher:
    """Collects submitted inputs into batches of up to `max_batch` rows, waiting at most `max_delay_s`
    after the first one for others of the same shape."""

    def __init__(self, run: Run, max_batch: int = 8, max_delay_s: float = 0.0, name: str = "model",
                 observe: Callable[[int], None] | None = None) -> None:
        self._run_fn, self.max_batch, self.max_delay_s = run, max(1, max_batch), max(0.0, max_delay_s)
        self._observe = observe or (lambda rows: None)
        self._pending: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"vggspec-batcher-{name}", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Inputs waiting for a batch."""
        return len(self._pending)

    def submit(self, x: np.ndarray) -> Future:
        """Queue one input batch (N, ...); the Future resolves to its outputs, or to the error that failed it."""
        item = _Item(x)
        with self._cond:
            if self._closed:
                raise Closed("the model is no longer served")
            self._pending.append(item)
            self._cond.notify()
        return item.future

    def close(self, wait: bool = True) -> None:
        """Run what is queued, then stop the worker thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if wait and threading.current_thread() is not self._thread:
            self._thread.join()

    def _loop(self) -> None:
        while True:
            items = self._collect()
            if items is None:
                return
            self._run(items)

    def _collect(self) -> list[_Item] | None:
        """The next batch: the oldest input plus later ones of its shape, until full or the delay ends."""
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if not self._pending:
                return None
            first = self._pending.popleft()
            items, rows = [first], len(first.x)
            deadline = time.monotonic() + self.max_delay_s
            while rows < self.max_batch:
                match = next((it for it in self._pending
                              if it.key == first.key and rows + len(it.x) <= self.max_batch), None)
                if match is not None:
                    self._pending.remove(match)
                    items.append(match)
                    rows += len(match.x)
                    continue
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    break
                self._cond.wait(left)
        return [it for it in items if it.future.set_running_or_notify_cancel()]

    def _run(self, items: list[_Item]) -> None:
        if not items:
            return
        x = items[0].x if len(items) == 1 else np.concatenate([it.x for it in items])
        self._observe(len(x))  # every onnxruntime run, failed ones too
        try:
            outputs = self._run_fn(x)
        except BaseException as exc:  # noqa: B036 (handed to the waiting request, never lost in this thread)
            if len(items) == 1:
                _settle(items[0].future, error=exc)
            else:  # which input failed it? each one alone: the others still get their answer
                for item in items:
                    self._run_one(item)
            return
        start = 0
        for item in items:
            n = len(item.x)
            _settle(item.future, [o[start:start + n] for o in outputs])
            start += n

    def _run_one(self, item: _Item) -> None:
        self._observe(len(item.x))
        try:
            outputs = self._run_fn(item.x)
        except BaseException as exc:  # noqa: B036
            _settle(item.future, error=exc)
            return
        _settle(item.future, outputs)


def _settle(future: Future, result: list[np.ndarray] | None = None, error: BaseException | None = None) -> None:
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:  # cancelled by a request that gave up (timeout, disconnect)
        pass

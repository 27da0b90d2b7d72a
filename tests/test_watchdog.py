"""The run watchdog: one thread for every onnxruntime run's time limit (vggspec/runtime/watchdog.py)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

from vggspec.runtime.watchdog import Watchdog


def _options() -> SimpleNamespace:
    return SimpleNamespace(terminate=False)


def _wait_for(predicate, seconds: float = 5.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


def test_a_deadline_that_passes_terminates_its_run_only():
    dog = Watchdog()
    late, early = _options(), _options()
    dog.arm(late, 60.0)
    dog.arm(early, 0.05)  # earlier than the deadline the thread waits for: it must be woken
    assert _wait_for(lambda: early.terminate)
    assert late.terminate is False


def test_a_disarmed_run_is_never_terminated():
    dog = Watchdog()
    options = _options()
    dog.disarm(dog.arm(options, 0.05))
    time.sleep(0.2)
    assert options.terminate is False


def test_many_runs_share_one_thread_and_the_heap_stays_bounded():
    dog = Watchdog()
    before = threading.active_count()
    for _ in range(5000):
        dog.disarm(dog.arm(_options(), 300.0))
    assert threading.active_count() <= before + 1
    assert dog.pending <= 130  # rebuilt once most of it is dead, never 5,000 stale deadlines
    options = _options()
    dog.arm(options, 0.05)
    assert _wait_for(lambda: options.terminate)

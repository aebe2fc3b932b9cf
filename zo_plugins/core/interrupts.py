"""Passes that write the weights run with ``KeyboardInterrupt`` deferred: a Ctrl-C (SIGINT)
that arrives in the middle of a pass is delivered when the pass has finished, so an interrupt
never leaves a tensor half-updated or half-shifted."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

__all__ = ["deferred_interrupts"]


@contextmanager
def deferred_interrupts():
    """Hold SIGINT for the duration of the block (main thread only; elsewhere a no-op), then
    deliver it to the handler that was installed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    try:
        previous = signal.getsignal(signal.SIGINT)
    except (ValueError, OSError):  # pragma: no cover - no signal support here
        yield
        return
    if not callable(previous):  # SIG_IGN / SIG_DFL: nothing of ours to defer to
        yield
        return
    received: list[tuple[int, object]] = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            previous(*received[0])

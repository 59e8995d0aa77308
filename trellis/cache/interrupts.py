"""A re-entrant lock under which Ctrl-C waits: the prefix cache's bookkeeping (reference counts,
the radix tree, the sessions) changes in several steps, and a ``KeyboardInterrupt`` between two of
them would leave it inconsistent (a block freed twice, a node locked for ever, a session held by
nobody). Every change happens under ``KVCacheManager.lock``, which is this lock: in the main thread,
where Python raises ``KeyboardInterrupt``, its outermost hold defers SIGINT and delivers it on
release to the handler it found, so the interrupt comes between two whole changes. Forwards run
outside it and stay interruptible."""

from __future__ import annotations

import signal
import threading


class InterruptDeferringLock:
    """``threading.RLock`` whose outermost hold in the main thread defers SIGINT (see the module)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._main_depth = 0  # the main thread's holds (only it changes this, while holding the lock)
        self._previous: object = None  # SIGINT's handler before the outermost hold; None: not deferring
        self._deferred = False

    def __enter__(self) -> None:
        self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if not self._lock.acquire(blocking, timeout):
            return False
        if threading.current_thread() is threading.main_thread():
            if self._main_depth == 0:
                self._defer()
            self._main_depth += 1
        return True

    def release(self) -> None:
        deliver = False
        if threading.current_thread() is threading.main_thread():
            self._main_depth -= 1
            if self._main_depth == 0:
                deliver = self._restore()
        self._lock.release()
        if deliver:  # to the handler now back in place, as if the signal had come just now
            signal.raise_signal(signal.SIGINT)

    def _defer(self) -> None:
        previous = signal.getsignal(signal.SIGINT)
        if previous is None:  # a handler not installed from Python: it could not be put back
            return
        self._previous, self._deferred = previous, False
        signal.signal(signal.SIGINT, self._note)

    def _note(self, signum: int, frame: object) -> None:
        self._deferred = True

    def _restore(self) -> bool:
        """Put the handler back; whether a SIGINT came meanwhile."""
        if self._previous is None:
            return False
        signal.signal(signal.SIGINT, self._previous)
        self._previous = None
        return self._deferred

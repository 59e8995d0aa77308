"""A re-entrant lock under which Ctrl-C waits: the prefix cache's bookkeeping (reference counts,
the radix tree, the sessions) changes in several steps, and a ``KeyboardInterrupt`` between two of
them would leave it inconsistent (a block freed twice, a node locked for ever, a session held by
nobody). Every change happens under ``KVCacheManager.lock``, which is this lock.

In the main thread, where Python raises ``KeyboardInterrupt``, the first hold puts a SIGINT
handler of Trellis' in front of the one it finds: outside any hold it hands the signal on at once,
inside one it notes it and hands it on when the outermost hold ends, so the interrupt comes between
two whole changes. It is installed once per process, not swapped at every hold (reading or setting
a handler costs microseconds, a hold a fraction of one); a handler installed later in its place
gets Ctrl-C as it would without Trellis. Forwards run outside the lock and stay interruptible."""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

_MAIN_THREAD = threading.main_thread().ident
_main_holds = 0  # the main thread's holds of any such lock (only the main thread changes it)
_deferred = False  # a SIGINT came during them
_installed = False  # whether the first hold in the main thread has looked at the handler
_handed_on: object = None  # the handler ours stands in front of


def _hand_on(signum: int, frame: FrameType | None) -> None:
    """Give SIGINT to the handler ours stands in front of, as if ours were not there."""
    handler = _handed_on
    if callable(handler):
        handler(signum, frame)  # Python's default raises KeyboardInterrupt from here
    elif handler == signal.SIG_DFL:  # the process ends, as it would have
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    # (SIG_IGN: ignored, as it would have been)


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    global _deferred
    if _main_holds:
        _deferred = True
    else:
        _hand_on(signum, frame)


def _stand_in_front() -> None:
    """Put ``_on_sigint`` in front of the current SIGINT handler, unless that one was not installed
    from Python (it could not be handed the signal)."""
    global _handed_on, _installed
    _installed = True
    current = signal.getsignal(signal.SIGINT)
    if current is not None:
        _handed_on = current
        signal.signal(signal.SIGINT, _on_sigint)


class InterruptDeferringLock:
    """``threading.RLock`` whose holds in the main thread defer Ctrl-C (see the module)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()

    def __enter__(self) -> None:
        self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        global _main_holds
        if not self._lock.acquire(blocking, timeout):
            return False
        if threading.get_ident() == _MAIN_THREAD:
            if not _installed:
                _stand_in_front()
            _main_holds += 1
        return True

    def release(self) -> None:
        global _main_holds, _deferred
        deliver = False
        if threading.get_ident() == _MAIN_THREAD:
            _main_holds -= 1
            if _main_holds == 0 and _deferred:
                deliver, _deferred = True, False
        self._lock.release()
        if deliver:
            _hand_on(signal.SIGINT, None)

"""Per-call time bounds for in-process reward scoring (`RewardScorer(num_workers=0)`).

On the main thread a watchdog thread signals the main thread at a call's deadline and the
handler raises into the call; off it, where no signal can reach, each call runs in a daemon
thread that is abandoned at its deadline. Never SIGALRM: math-verify's own timeouts use it.
"""

import functools
import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

# The watchdog's signal to the main thread.
INTERRUPT = signal.SIGUSR1


class SampleTimeout(BaseException):
    """Raised in the main thread when an in-process sample runs past its deadline.

    A BaseException, so that a reward's `except Exception` does not swallow it.
    """


class MainThreadDeadline:
    """Bounds calls on the main thread: at a call's deadline a watchdog thread signals the main
    thread (`INTERRUPT`), whose handler raises `SampleTimeout` into the running call.

    The handler raises only while the call the watchdog expired is still running, and clears
    that mark as it raises, so that it raises at most once per call and never into the code
    after a call that returned just as its deadline passed. On exit the watchdog is stopped, a
    signal of it still pending is swallowed, and the previous handler is put back.
    """

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._cond = threading.Condition()
        self._armed: tuple[object, float] | None = None  # (call token, time.monotonic() deadline)
        self._closed = False
        self._expired: object | None = None  # the token of the last call the watchdog expired
        self._running: object | None = None  # the token of the call running now
        self._previous: Any = None
        self._watchdog = threading.Thread(
            target=self._watch, name="aapo-reward-watchdog", daemon=True
        )

    def __enter__(self) -> "MainThreadDeadline":
        self._previous = signal.signal(INTERRUPT, self._on_signal)
        self._watchdog.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._watchdog.join()
        # The watchdog may have signalled just as the last call returned; left pending, that
        # signal would reach the previous handler (by default: terminate the process).
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {INTERRUPT})
        try:
            if INTERRUPT in signal.sigpending():
                signal.sigwait({INTERRUPT})
            signal.signal(INTERRUPT, self._previous)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def run(self, call: Callable[[], Any]) -> Any:
        """`call()`, or None when it runs past timeout_s (it is then interrupted)."""
        token = object()
        try:
            self._running = token
            with self._cond:
                self._armed = (token, time.monotonic() + self.timeout_s)
                self._cond.notify()
            try:
                return call()
            finally:
                self._running = None
                with self._cond:
                    self._armed = None
        except SampleTimeout:
            return None

    def _on_signal(self, signum: int, frame: Any) -> None:
        del signum, frame  # another sender's signal (no call expired) is ignored
        if self._running is not None and self._running is self._expired:
            self._running = None
            raise SampleTimeout

    def _watch(self) -> None:
        main = threading.main_thread().ident
        with self._cond:
            while not self._closed:
                if self._armed is None:
                    self._cond.wait()
                    continue
                token, deadline = self._armed
                left = deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                self._armed = None
                self._expired = token
                signal.pthread_kill(main, INTERRUPT)


class HelperThreadDeadline:
    """Bounds calls off the main thread, where no signal can reach: each call runs in a daemon
    thread that is abandoned, still running, at its deadline."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s

    def __enter__(self) -> "HelperThreadDeadline":
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def run(self, call: Callable[[], Any]) -> Any:
        """`call()`, or None when it runs past timeout_s (it then keeps running, abandoned)."""
        outcome: dict[str, Any] = {}

        def target() -> None:
            try:
                outcome["value"] = call()
            except BaseException as e:
                outcome["error"] = e

        thread = threading.Thread(target=target, name="aapo-reward-sample", daemon=True)
        thread.start()
        thread.join(self.timeout_s)
        if thread.is_alive():
            _warn_abandoned()
            return None
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]


@functools.cache
def _warn_abandoned() -> None:
    log.warning(
        "an in-process reward (num_workers=0, scored off the main thread) ran past timeout_s: "
        "its sample scores failure_value, but its thread cannot be stopped and keeps running "
        "(and holding the GIL if CPU-bound); use worker processes (num_workers > 0)"
    )


def for_this_thread(timeout_s: float) -> "MainThreadDeadline | HelperThreadDeadline":
    """The bound for calls made from the current thread: `MainThreadDeadline` on the main
    thread, `HelperThreadDeadline` elsewhere, or where SIGUSR1's handler was installed
    outside Python (`faulthandler.register`: `getsignal` is None) and could not be put back.
    Use as a context manager; `run(call)` returns `call()` or None past `timeout_s`."""
    interruptible = (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(INTERRUPT) is not None
    )
    return (MainThreadDeadline if interruptible else HelperThreadDeadline)(timeout_s)

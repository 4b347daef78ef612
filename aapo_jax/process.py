"""The training process's life: its stop signals (the first finishes the step, a second stops
at once) and its wall clock (from the process's start, summed over every process of a run)."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from aapo_jax import metrics

logger = logging.getLogger(__name__)

# Signals that finish the current step, save and return; a second one stops at once.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(KeyboardInterrupt):
    """A second SIGTERM or SIGINT: the run stops at once (the last checkpoint is kept).

    Attributes:
      signum: the signal's number (the process conventionally exits with 128 + signum).
    """

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"{signal.Signals(signum).name} received twice: stopped at once")


class StopSignals:
    """SIGTERM and SIGINT handled for a block (`with StopSignals() as stop:`; main thread).

    The first sets `requested` (the loop finishes its step, saves and returns). A second
    raises `Interrupted` where the main thread is. CPython drops an exception raised in a
    garbage-collector callback, so from then on the signal is sent again every half second
    until the block is left (those dropped exceptions are not printed), and `check()` raises
    at the loop's own safe points. On exit the previous handlers are back.
    """

    def __init__(self):
        self.requested = False
        self._signum: int | None = None
        self._second = threading.Event()  # a second stop signal arrived
        self._left = threading.Event()  # the block was left
        self._previous: dict = {}
        self._unraisable_hook = None

    def __enter__(self) -> StopSignals:
        self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        self._left.set()
        if self._second.is_set():
            sys.unraisablehook = self._unraisable_hook
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def check(self) -> None:
        """Raises `Interrupted` if a second stop signal came (its exception may have been
        dropped where it was raised), so that no further step or save starts."""
        if self._second.is_set():
            raise Interrupted(self._signum)

    def _handle(self, signum, frame) -> None:
        del frame
        if self._left.is_set():  # already on its way out
            return
        if self.requested:
            if not self._second.is_set():
                self._signum = signum
                self._second.set()
                self._unraisable_hook = sys.unraisablehook
                sys.unraisablehook = _quiet_interrupts(sys.unraisablehook)
                threading.Thread(target=self._repeat, args=(signum,), daemon=True).start()
            raise Interrupted(signum)
        logger.warning(
            "%s: finishing the current step, then saving and exiting (send it again to stop "
            "at once, keeping the last checkpoint).",
            signal.Signals(signum).name,
        )
        self.requested = True

    def _repeat(self, signum: int) -> None:
        while not self._left.wait(0.5):
            os.kill(os.getpid(), signum)


def _quiet_interrupts(hook):
    """`sys.unraisablehook` that drops an `Interrupted` raised where Python cannot pass it
    on (a garbage-collector callback); the signal is sent again (`StopSignals._repeat`)."""

    def quiet(unraisable):
        if not isinstance(unraisable.exc_value, Interrupted):
            hook(unraisable)

    return quiet


def process_start_time() -> float | None:
    """When this process started (seconds since the epoch), from /proc on Linux; None
    where that cannot be read."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")


class WallClock:
    """This process's wall seconds, kept beside those of earlier processes in a JSON file.

    A run killed and resumed N times is N + 1 processes, each recorded from `start`
    (default: now; `experiments.train` passes `process_start_time()`, so that imports
    and model loading count); `total()` sums them all (up to each one's last `tick`, at
    most `every_s` before it died). With `background`, a thread ticks every `every_s`
    until `stop()`. Only the enabled (first) process writes.
    """

    def __init__(
        self,
        path: Path,
        *,
        enabled: bool = True,
        every_s: float = 5.0,
        background: bool = False,
        start: float | None = None,
    ):
        self.path, self.enabled, self.every_s = path, enabled, every_s
        self.start = time.time() if start is None else start
        self._written = 0.0
        self._lock = threading.Lock()
        previous = json.loads(path.read_text()) if path.exists() else []
        self._earlier = [float(s) for s in previous]
        self.tick(force=True)  # this process counts, even if it dies before its next tick
        self._stopped = threading.Event()
        if background and enabled:
            threading.Thread(target=self._tick_until_stopped, daemon=True).start()

    def _tick_until_stopped(self) -> None:
        while not self._stopped.wait(self.every_s):
            self.tick()

    def stop(self) -> None:
        """Stops the background ticks, after a last one."""
        self._stopped.set()
        self.tick(force=True)

    def elapsed(self) -> float:
        return time.time() - self.start

    def tick(self, force: bool = False) -> None:
        """Record the elapsed time (at most every `every_s` seconds unless `force`)."""
        now = self.elapsed()
        if not self.enabled or (not force and now - self._written < self.every_s):
            return
        with self._lock:
            metrics.replace_text(self.path, json.dumps([*self._earlier, round(now, 3)]))
            self._written = now

    def total(self) -> float:
        return sum(self._earlier) + self.elapsed()

    def processes(self) -> int:
        return len(self._earlier) + 1

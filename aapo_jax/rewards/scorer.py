"""Bounded-time host reward scoring in a pool of worker processes, with per-call stats."""

import collections
import dataclasses
import functools
import logging
import math
import multiprocessing
import pickle
import signal
import sys
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

import numpy as np

from aapo_jax.rewards import deadline as deadline_lib
from aapo_jax.rewards.base import (
    ERRORS,
    GOLD_UNPARSABLE,
    TIMEOUTS,
    HostReward,
    RewardContractError,
    check_rewards,
)
from aapo_jax.rewards.combine import WeightedSum

log = logging.getLogger(__name__)

# Why processes: math-verify's timeouts use signal.alarm (main thread only), and a CPU-bound sympy
# call (`\boxed{9^{9^{9^{9}}}}` vs 42) cannot be interrupted from another thread; a process can
# always be killed. Protocol, one duplex pipe per worker: STARTED (imports and unpickling done),
# WARMING <name> before each component's warm-up call, READY; then chunks of samples in, one
# answer per sample out as soon as it is scored, or CONTRACT <message> (and the worker exits)
# when a reward breaks the return contract. The parent's deadline for a worker is
# startup_timeout_s until STARTED, timeout_s + WARMUP_ALLOWANCE_S per warm-up call, then "last
# answer (or dispatch) + timeout_s", so chunks amortise IPC without loosening the per-sample
# bound; at a deadline the chunk's unanswered head is the stuck sample, the rest is re-queued.
# Never 'fork': the parent has JAX loaded and is multithreaded.

KILLED = "killed"  # workers killed at a deadline
CRASHED = "crashed"  # workers that died on their own while scoring (their sample: an error)

# A worker's warm-up call of each component may take this much longer than timeout_s: the first
# call of a reward pays its lazy imports (math-verify with sympy, reasoning-gym: a few seconds).
WARMUP_ALLOWANCE_S = 10.0

# Control messages from a worker, as tuples (tag, ...); a sample's answer starts with its index.
_STARTED = "started"
_WARMING = "warming"
_READY = "ready"
_CONTRACT = "contract"
_WARMUP_CALL = "fn(['warmup'], answers=['0'])"
_RESERVED_KWARGS = ("stats",)
_MAX_CHUNK = 32

Components = dict[str, tuple[HostReward, float]]


@dataclasses.dataclass(frozen=True)
class ScoreResult:
    """One scored batch.

    Attributes:
      rewards: f32[N], Σ_k w_k · components[k].
      components: {name: f32[N]} unweighted component rewards.
      stats: counters (samples with a timeout / error / unparsable gold, workers killed /
        crashed), `seconds` (wall time) and `mean/<name>` for each component and the total.
      first_error: the first exception message of the batch, for logs; None if none.
      flags: {counter: f32[N]} 1.0 for each sample the event happened to (a timeout, an
        error, an unparsable gold, its worker killed or crashed while scoring it).
    """

    rewards: np.ndarray
    components: dict[str, np.ndarray]
    stats: dict[str, float]
    first_error: str | None = None
    flags: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def _normalize(rewards: Any) -> Components:
    if isinstance(rewards, WeightedSum):
        return dict(rewards.components)
    if isinstance(rewards, Mapping):
        return dict(WeightedSum(dict(rewards)).components)
    if callable(rewards):
        return {"reward": (rewards, 1.0)}
    raise TypeError(
        "rewards must be a host reward fn, a {name: (fn, weight)} mapping or a WeightedSum, "
        f"got {type(rewards).__name__}"
    )


def _split_kwargs(kwargs: Mapping[str, Any], n: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(per_sample, shared): list / tuple / ndarray values of length N are per-sample fields."""
    per_sample, shared = {}, {}
    for key, value in kwargs.items():
        if key in _RESERVED_KWARGS:
            raise ValueError(f"keyword {key!r} is reserved for the scorer")
        is_sequence = isinstance(value, (list, tuple)) or (
            isinstance(value, np.ndarray) and value.ndim > 0
        )
        if is_sequence and len(value) == n:
            per_sample[key] = value
        else:
            shared[key] = value
    return per_sample, shared


def _take(value: Any, i: int) -> Any:
    return value[i : i + 1] if isinstance(value, np.ndarray) else [value[i]]


def _score_sample(
    components: Components,
    completion: str,
    answer: str,
    sample_kwargs: Mapping[str, Any],
    shared_kwargs: Mapping[str, Any],
    failure_value: float,
) -> tuple[tuple[float, ...], dict[str, int], str | None]:
    """Scores one sample with every component; an exception gives failure_value and an error.

    Raises:
      RewardContractError: a component returned something other than one real number.
    """
    flags: dict[str, int] = {}
    values = []
    first_error = None
    for name, (fn, _) in components.items():
        try:
            out = fn([completion], answers=[answer], stats=flags, **shared_kwargs, **sample_kwargs)
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
        else:
            # Outside the try: a broken contract is the reward's bug, not this sample's error.
            value = float(check_rewards(name, out, 1)[0])
            error = None if math.isfinite(value) else f"returned a non-finite reward {value}"
        if error:
            flags[ERRORS] = flags.get(ERRORS, 0) + 1
            first_error = first_error or f"reward {name!r}: {error}"[:500]
            value = failure_value
        values.append(value)
    return tuple(values), flags, first_error


def _check_sendable(name: str, fn: HostReward) -> None:
    """Raises ValueError early for a reward that a fresh worker process could not import."""
    hint = "use a module-level function (or functools.partial of one), or num_workers=0"
    try:
        pickle.dumps(fn)
    except Exception as e:
        raise ValueError(f"reward {name!r} cannot be sent to a worker process ({e}); {hint}") from e
    root = fn
    while isinstance(root, functools.partial):
        root = root.func
    if getattr(root, "__module__", None) == "__main__" and not hasattr(
        sys.modules["__main__"], "__file__"
    ):
        raise ValueError(
            f"reward {name!r} is defined in an interactive __main__ (a notebook), which worker "
            f"processes cannot import; {hint}"
        )


def _worker_main(conn: Connection, components: Components, failure_value: float) -> None:
    """Worker process: STARTED, a warm-up call of each component, READY, then answer each sample
    of each chunk as it is scored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    conn.send((_STARTED,))  # the rewards are unpickled (their modules imported) by now
    # The warm-up triggers lazy imports (math-verify, reasoning-gym) before READY, so that the
    # first real sample is not charged them against its deadline. Failures are expected here.
    for name, (fn, _) in components.items():
        conn.send((_WARMING, name))
        try:
            fn(["warmup"], answers=["0"])
        except Exception:
            pass
    conn.send((_READY,))
    while True:
        try:
            message = conn.recv()
        except EOFError:  # the parent is gone
            return
        if message is None:
            return
        shared_kwargs, tasks = message
        for index, completion, answer, sample_kwargs in tasks:
            try:
                values, flags, error = _score_sample(
                    components, completion, answer, sample_kwargs, shared_kwargs, failure_value
                )
            except RewardContractError as e:
                conn.send((_CONTRACT, str(e)))  # the parent raises it and drops the workers
                return
            conn.send((index, values, flags, error))


@dataclasses.dataclass(eq=False)
class _Worker:
    process: Any  # multiprocessing.process.BaseProcess
    conn: Connection
    deadline: float  # time.monotonic(); the start-up / warm-up deadline until ready
    started: bool = False  # start-up done (imports, unpickling the rewards)
    warming: str | None = None  # the component whose warm-up call runs
    ready: bool = False
    pending: collections.deque = dataclasses.field(default_factory=collections.deque)


def _kill(worker: _Worker) -> None:
    if worker.process.is_alive():
        worker.process.kill()
    worker.process.join(timeout=5.0)
    worker.conn.close()


def _kill_all(workers: list[_Worker]) -> None:
    for worker in workers:
        _kill(worker)
    workers.clear()


@dataclasses.dataclass
class _Batch:
    """The state of one batch being scored."""

    completions: Sequence[str]
    answers: Sequence[str]
    per_sample: Mapping[str, Any]
    shared: Mapping[str, Any]
    values: np.ndarray  # f32[N, C], prefilled with failure_value
    queue: collections.deque  # sample indices not sent to a worker yet
    remaining: int  # samples without a result
    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    errors: list[str] = dataclasses.field(default_factory=list)
    flags: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # f32[N] per counter

    def flag(self, index: int, key: str) -> None:
        """Counts event `key` once for sample `index`, in `counts` and in its `flags` row."""
        row = self.flags.setdefault(key, np.zeros(len(self.completions), np.float32))
        self.counts[key] += 1 - int(row[index])
        row[index] = 1.0

    def task(self, i: int) -> tuple[int, str, str, dict[str, Any]]:
        sample_kwargs = {k: _take(v, i) for k, v in self.per_sample.items()}
        return i, self.completions[i], self.answers[i], sample_kwargs

    def finish(
        self, index: int, row: Sequence[float], flags: Mapping[str, int], error: str | None
    ) -> None:
        self.values[index] = row
        for key, count in flags.items():
            if count:
                self.flag(index, key)
        if error:
            self.errors.append(error)
        self.remaining -= 1

    def fail(self, index: int, *events: str) -> None:
        """Leaves sample `index` at failure_value (its prefilled row) and counts its events."""
        self.remaining -= 1
        for key in events:
            self.flag(index, key)

    def fail_head(self, worker: _Worker, reason: str, error: str | None = None) -> None:
        """Fails the sample a lost worker was scoring (the head of its chunk); re-queues the rest.

        A killed worker's sample is a timeout; a crashed one's is an error.
        """
        if not worker.pending:
            return
        self.fail(worker.pending.popleft(), reason, TIMEOUTS if reason == KILLED else ERRORS)
        if error:
            self.errors.append(error)
        self.queue.extendleft(reversed(worker.pending))
        worker.pending.clear()


class RewardScorer:
    """Scores batches of completions with host rewards, bounding the time of each sample.

    Usage:
        with RewardScorer({"format": (format_reward, 1.0), "cosine": (cosine, 2.0)}) as scorer:
            rewards_N, stats = scorer(completions, answers, completion_lengths=lengths_N)

    Each sample is scored by calling every component on a batch of one, in a worker process:
    `fn([completion], answers=[answer], stats=..., **per_sample_kwargs, **shared_kwargs)`.
    Keyword arguments whose value is a list / tuple / ndarray of length N are per-sample fields
    (sample i gets `[value[i]]`, or `value[i:i+1]` for an array); any other value is passed to
    every sample as is. Reward functions must be picklable (module-level functions,
    `functools.partial` of them, or instances like `GymReward`); functions defined in a notebook's
    `__main__` cannot be imported by worker processes: use `num_workers=0` for those.

    A sample that runs past `timeout_s` gets `failure_value` for every component and counts in
    `stats["timeouts"]`; its worker is killed and a new one started (in the background). A
    component that raises gets `failure_value` and counts in `stats["errors"]`; math-verify's own
    (soft) timeouts inside the workers also count in `timeouts`. A component that returns
    anything but one real number per completion (a string, a wrong shape) is a bug in the reward:
    `score` raises `RewardContractError` naming it.

    Before a new worker reports ready it calls each component once, `fn(['warmup'],
    answers=['0'])`, to pay its lazy imports; that call may take `timeout_s +
    WARMUP_ALLOWANCE_S`, past which `score` raises a RuntimeError naming the component.

    `num_workers=0` scores in the calling thread, for tests / debugging, with the same
    `timeout_s` bound per sample. On the main thread a watchdog thread interrupts the sample at
    its deadline with a signal (SIGUSR1, whose handler the scorer borrows during the call; never
    SIGALRM, which math-verify's own timeouts use there), raising an exception a reward's `except
    Exception` cannot catch. That stops sleeps and pure-Python loops (sympy included), not a C
    call that never returns to Python (a runaway regex), nor a reward that catches BaseException.
    Off the main thread, where signals cannot be delivered (and math-verify's timeouts are off),
    each sample runs in a helper thread that is abandoned, still running, at its deadline: a
    thread cannot be killed. Worker processes have neither limit.

    With workers, `score` may run in a background thread (to overlap with device work); calls
    are serialised. Workers use the 'spawn' start method, which re-imports the main script in
    each worker: keep a script's work under `if __name__ == "__main__":` (absl's `app.run`
    idiom does).

    Args:
      rewards: a host reward fn, a {name: (fn, weight)} mapping, or a `WeightedSum`.
      timeout_s: wall-clock bound for one sample (all components), seconds.
      num_workers: worker processes; 0 scores in-process.
      failure_value: reward of each component of a sample that timed out or raised.
      chunk_size: samples per message to a worker; None picks ~N / (4 · num_workers), ≤ 32.
      start_method: multiprocessing start method, 'spawn' or 'forkserver' (never 'fork': JAX).
      startup_timeout_s: how long a new worker may take to start (import its modules, unpickle
        the rewards); each component's warm-up call then has timeout_s + WARMUP_ALLOWANCE_S.
    """

    def __init__(
        self,
        rewards: HostReward | Mapping[str, tuple[HostReward, float]] | WeightedSum,
        *,
        timeout_s: float = 5.0,
        num_workers: int = 2,
        failure_value: float = 0.0,
        chunk_size: int | None = None,
        start_method: str = "spawn",
        startup_timeout_s: float = 120.0,
    ) -> None:
        self.components = _normalize(rewards)
        if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
        if not (isinstance(num_workers, int) and num_workers >= 0):
            raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
        if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size >= 1):
            raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
        if start_method not in ("spawn", "forkserver"):
            raise ValueError(
                f"start_method must be 'spawn' or 'forkserver' (forking a process with JAX "
                f"loaded is unsafe), got {start_method!r}"
            )
        if not math.isfinite(failure_value):
            raise ValueError(f"failure_value must be finite, got {failure_value}")
        self.timeout_s = float(timeout_s)
        self.num_workers = num_workers
        self.failure_value = float(failure_value)
        self.chunk_size = chunk_size
        self.startup_timeout_s = float(startup_timeout_s)
        self._context = multiprocessing.get_context(start_method)
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._weights = np.asarray([w for _, w in self.components.values()], dtype=np.float32)
        if num_workers > 0:
            for name, (fn, _) in self.components.items():
                _check_sendable(name, fn)
        # Kill the workers when the scorer is garbage-collected without close().
        self._finalizer = weakref.finalize(self, _kill_all, self._workers)

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> "RewardScorer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stops the workers (a later call starts new ones)."""
        with self._lock:
            # Workers hold no state worth a graceful exit, and an exiting sympy process takes
            # ~0.3 s to tear down: kill them.
            _kill_all(self._workers)

    @property
    def worker_pids(self) -> list[int]:
        """PIDs of the current worker processes (for diagnostics)."""
        return [w.process.pid for w in self._workers]

    def _spawn(self) -> _Worker:
        parent_conn, child_conn = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_worker_main,
            args=(child_conn, self.components, self.failure_value),
            name="aapo-reward-worker",
            daemon=True,
        )
        process.start()
        child_conn.close()  # so that the parent sees EOF when the worker dies
        return _Worker(process, parent_conn, deadline=time.monotonic() + self.startup_timeout_s)

    def _replace(self, worker: _Worker) -> None:
        _kill(worker)
        self._workers[self._workers.index(worker)] = self._spawn()

    # -- scoring -----------------------------------------------------------------------------

    def __call__(
        self, completions: Sequence[str], answers: Sequence[str], **kwargs: Any
    ) -> tuple[np.ndarray, dict[str, float]]:
        """Returns (rewards f32[N], stats); see `score` for the full result."""
        result = self.score(completions, answers, **kwargs)
        return result.rewards, result.stats

    def score(
        self, completions: Sequence[str], answers: Sequence[str], **kwargs: Any
    ) -> ScoreResult:
        """Scores N completions against their aligned gold answers."""
        if isinstance(completions, str) or isinstance(answers, str):
            raise TypeError("completions and answers must be sequences of strings, not a string")
        n = len(completions)
        if len(answers) != n:
            raise ValueError(f"got {n} completions but {len(answers)} answers")
        for c in completions:
            if not isinstance(c, str):
                raise TypeError(f"completions must be strings, got {type(c).__name__}")
        per_sample, shared = _split_kwargs(kwargs, n)
        batch = _Batch(
            completions,
            answers,
            per_sample,
            shared,
            values=np.full((n, len(self.components)), self.failure_value, dtype=np.float32),
            queue=collections.deque(range(n)),
            remaining=n,
        )
        start = time.perf_counter()
        with self._lock:
            if self.num_workers == 0:
                self._score_in_process(batch)
            elif n:
                try:
                    self._score_in_pool(batch)
                except BaseException:
                    # Workers may hold stale work: drop them all, the next call starts afresh.
                    _kill_all(self._workers)
                    raise
        return self._result(batch, time.perf_counter() - start)

    def _result(self, batch: _Batch, seconds: float) -> ScoreResult:
        values = batch.values
        rewards = (values @ self._weights).astype(np.float32)
        components = {name: values[:, k].copy() for k, name in enumerate(self.components)}
        stats: dict[str, float] = {
            TIMEOUTS: 0,
            ERRORS: 0,
            GOLD_UNPARSABLE: 0,
            KILLED: 0,
            CRASHED: 0,
            **batch.counts,
        }
        stats["seconds"] = seconds
        for name, column in components.items():
            stats[f"mean/{name}"] = float(column.mean()) if len(column) else 0.0
        stats["mean/total"] = float(rewards.mean()) if len(rewards) else 0.0
        first_error = batch.errors[0] if batch.errors else None
        if stats[TIMEOUTS] or stats[ERRORS]:
            log.warning(
                "reward scoring: %d/%d samples timed out, %d raised (first error: %s)",
                stats[TIMEOUTS],
                len(values),
                stats[ERRORS],
                first_error,
            )
        return ScoreResult(rewards, components, stats, first_error, dict(batch.flags))

    def _score_in_process(self, batch: _Batch) -> None:
        with deadline_lib.for_this_thread(self.timeout_s) as deadline:
            while batch.queue:
                index, completion, answer, sample_kwargs = batch.task(batch.queue.popleft())
                scored = deadline.run(
                    functools.partial(
                        _score_sample,
                        self.components,
                        completion,
                        answer,
                        sample_kwargs,
                        batch.shared,
                        self.failure_value,
                    )
                )
                if scored is None:  # like a killed worker's sample: its partial results are lost
                    batch.fail(index, TIMEOUTS)
                else:
                    batch.finish(index, *scored)

    def _score_in_pool(self, batch: _Batch) -> None:
        while len(self._workers) < self.num_workers:
            self._workers.append(self._spawn())
        n = len(batch.completions)
        chunk_size = self.chunk_size or max(1, min(_MAX_CHUNK, -(-n // (4 * self.num_workers))))
        while batch.remaining:
            for worker in list(self._workers):
                if worker.ready and not worker.pending and batch.queue:
                    self._dispatch(worker, batch, chunk_size)
            waiting = [w for w in self._workers if w.pending or not w.ready]
            if not waiting:
                raise RuntimeError("reward scorer has work left but no live workers")
            timeout = max(0.0, min(w.deadline for w in waiting) - time.monotonic())
            readable = set(wait([w.conn for w in waiting], timeout=timeout))
            for worker in waiting:
                if worker.conn in readable:
                    self._drain(worker, batch)
            self._enforce_deadlines(batch)

    def _dispatch(self, worker: _Worker, batch: _Batch, chunk_size: int) -> None:
        chunk = [batch.queue.popleft() for _ in range(min(chunk_size, len(batch.queue)))]
        try:
            worker.conn.send((batch.shared, [batch.task(i) for i in chunk]))
        except OSError:  # it died while idle: nothing of this chunk was scored
            batch.queue.extendleft(reversed(chunk))
            batch.counts[CRASHED] += 1
            self._replace(worker)
            return
        worker.pending.extend(chunk)
        worker.deadline = time.monotonic() + self.timeout_s

    def _drain(self, worker: _Worker, batch: _Batch) -> None:
        """Reads every message waiting from a worker; handles its death."""
        try:
            while worker.conn.poll():
                message = worker.conn.recv()
                if message[0] == _CONTRACT:
                    raise RewardContractError(message[1])
                if not worker.ready:
                    self._start_up(worker, message)
                    continue
                index, row, flags, error = message
                expected = worker.pending.popleft()
                if index != expected:
                    raise RuntimeError(f"reward worker answered sample {index}, not {expected}")
                batch.finish(index, row, flags, error)
                worker.deadline = time.monotonic() + self.timeout_s
        except (EOFError, OSError):
            if not worker.ready:
                worker.process.join(timeout=1.0)
                if (worker.process.exitcode or 0) < 0:  # killed by a signal from outside
                    batch.counts[CRASHED] += 1
                    self._replace(worker)
                    return
                if worker.started:
                    raise RuntimeError(
                        f"reward worker died in the warm-up call {_WARMUP_CALL} of reward "
                        f"{worker.warming!r} (exit code {worker.process.exitcode})"
                    ) from None
                raise RuntimeError(
                    f"reward worker died while starting (exit code {worker.process.exitcode}); "
                    "see its traceback above. Are the reward functions importable in a fresh "
                    "process (not defined in a notebook, main script guarded by __main__)?"
                ) from None
            batch.fail_head(worker, CRASHED, "a reward worker process died while scoring")
            self._replace(worker)

    def _start_up(self, worker: _Worker, message: tuple[Any, ...]) -> None:
        """Follows a new worker through STARTED, WARMING <name> ... and READY."""
        if message[0] == _STARTED:
            worker.started = True
            worker.deadline = time.monotonic() + self.timeout_s + WARMUP_ALLOWANCE_S
        elif message[0] == _WARMING:
            worker.warming = message[1]
            worker.deadline = time.monotonic() + self.timeout_s + WARMUP_ALLOWANCE_S
        elif message[0] == _READY:
            worker.ready, worker.warming = True, None
        else:
            raise RuntimeError(f"reward worker sent {message!r} before it was ready")

    def _enforce_deadlines(self, batch: _Batch) -> None:
        now = time.monotonic()
        for worker in list(self._workers):
            if now < worker.deadline or worker.conn.poll():
                continue  # in time, or its answer is already waiting in the pipe
            if not worker.ready:
                _kill(worker)
                if worker.started:
                    raise RuntimeError(
                        f"reward {worker.warming!r}: its warm-up call {_WARMUP_CALL} did not "
                        f"return within {self.timeout_s + WARMUP_ALLOWANCE_S} s (timeout_s + "
                        f"WARMUP_ALLOWANCE_S); the worker had finished starting up. A host reward "
                        "must return (or raise) promptly for any completion, 'warmup' included"
                    )
                raise RuntimeError(
                    f"reward worker did not start within {self.startup_timeout_s} s "
                    "(startup_timeout_s: importing its modules and unpickling the rewards)"
                )
            if worker.pending:
                batch.fail_head(worker, KILLED)
                self._replace(worker)

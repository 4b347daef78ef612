"""One process per workdir: an exclusive OS-level lock held for the life of a run."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path


class WorkdirBusyError(RuntimeError):
    """Another process holds the workdir's lock; the message names its pid and host."""


def lock_path(workdir: str | os.PathLike, process_index: int = 0) -> Path:
    """The lock file of process `process_index` of a run in `workdir` (`.lock` for the
    first process, `.lock.<i>` for the others of a multi-process run)."""
    name = ".lock" if process_index == 0 else f".lock.{process_index}"
    return Path(workdir) / name


class WorkdirLock:
    """An exclusive `flock` on `workdir/.lock` (`.lock.<i>` for process i of a
    `--distributed` run), taken when made and held until `release()`.

    The kernel releases it when the process ends in any way, `kill -9` included, so a
    crash never leaves a stale lock behind; the file itself stays, holding the last
    holder's pid, host, start time and command line for the message a refused process
    prints. Each process of a multi-process run locks its own file, so the processes of
    one run share the workdir while a second run's process i is refused by the first's.
    `flock` is local to a machine on some network file systems: two hosts sharing one
    directory over NFS may not see each other's locks.

    Raises:
      WorkdirBusyError: another process (or another lock in this one) holds it.
    """

    def __init__(self, workdir: str | os.PathLike, process_index: int = 0):
        self.path = lock_path(workdir, process_index)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise WorkdirBusyError(
                f"{Path(workdir)} is in use by another run: {_describe(holder)} holds "
                f"{self.path}. Two runs in one workdir would overwrite each other's "
                "checkpoints and metrics: wait for it to end (or stop it), or use another "
                "--workdir."
            ) from None
        self._fd: int | None = fd
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Unlock (the file stays). Safe to call twice."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> WorkdirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 65536, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if "pid" not in holder:
        return "a process that has not written its name yet"
    mine = holder.get("host") == socket.gethostname() and holder["pid"] == os.getpid()
    who = f"pid {holder['pid']} on host {holder.get('host', '?')}" + (
        " (this process)" if mine else ""
    )
    extra = ", ".join(f"{k} {holder[k]!r}" for k in ("started", "command") if holder.get(k))
    return f"{who} ({extra})" if extra else who

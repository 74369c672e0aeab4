"""One trainer per workdir: WORKDIR/train.lock, a JSON file {"host", "pid", "time"} created
atomically (O_CREAT | O_EXCL, which also holds on NFS v3+) by the run's process 0 and removed when
the run ends. A lock whose process is gone (same host, pid not running) is stale: it is replaced
with a warning. A lock from another host cannot be checked from here: the error says so and how
to remove it."""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_FILE = "train.lock"


class WorkdirLockedError(RuntimeError):
    """Another trainer holds the workdir's lock."""


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


class WorkdirLock:
    """`with WorkdirLock(workdir):` holds WORKDIR/train.lock for the block (see the module)."""

    def __init__(self, workdir: str | os.PathLike):
        self.path = Path(workdir) / LOCK_FILE
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
        for _ in range(3):  # a stale lock removed by another starting trainer: try again
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except OSError as err:
                if err.errno != errno.EEXIST:
                    raise
                self._check_existing(me)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me) + "\n")
            self.held = True
            return
        raise WorkdirLockedError(f"could not take the lock {self.path}; another trainer is "
                                 f"starting in this workdir")

    def _check_existing(self, me: dict) -> None:
        """Remove a stale lock; raise WorkdirLockedError for a live one."""
        try:
            owner = json.loads(self.path.read_text())
            host, pid = str(owner["host"]), int(owner["pid"])
        except FileNotFoundError:
            return  # released meanwhile
        except (ValueError, KeyError, TypeError):
            # Torn or foreign: unreadable as a lock, so no process can be shown to hold it.
            raise WorkdirLockedError(
                f"{self.path} exists but is not a lock this project wrote; if no trainer uses this "
                f"workdir, delete it and start again") from None
        if host == me["host"] and not _pid_running(pid):
            log.warning("removing the stale lock %s (process %d on %s is gone)", self.path, pid,
                        host)
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            return
        where = "this host" if host == me["host"] else f"host {host}"
        raise WorkdirLockedError(
            f"another trainer (pid {pid} on {where}) uses this workdir: {self.path} is its lock. "
            f"Stop it first, or use another --workdir"
            + ("" if host == me["host"] else
               f"; if that process is gone, delete {self.path} and start again"))

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


__all__ = ["LOCK_FILE", "WorkdirLock", "WorkdirLockedError"]

"""One writer per run directory: a lock file holding the owner's pid and host name.

``<run_dir>/.lock`` is created with ``O_CREAT | O_EXCL`` (atomic on local file systems), holds
``{"pid", "hostname", "started", "command"}`` and is removed when the run ends, however it
ends (a Python exception or Ctrl-C included). A second training, resume or comparison that
targets the same folder is refused with a message naming the owner.

A lock left by a process that was killed (``kill -9``, power loss) is *stale*: when its host
name is this machine's and no process with its pid runs any more (or the pid now belongs to a
process started after the lock was written), it is removed and the new run proceeds, with a
warning; so is an empty lock file older than 10 s (its writer died between creating and
filling it). A lock from another host cannot be checked from here: the message says to delete
the file once that run is known to be over.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from lorax_cil.errors import UserError

__all__ = ["LOCK_NAME", "RunLockedError", "RunLock"]

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class RunLockedError(UserError):
    """The run directory is in use by another live process."""


def _process_start(pid: int) -> float | None:
    """Start time of ``pid`` in seconds since the epoch (Linux ``/proc``), else ``None``."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 of stat(5): start time in clock ticks after boot
        with open("/proc/stat", encoding="ascii") as fh:
            btime = next(int(line.split()[1]) for line in fh if line.startswith("btime"))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """Context manager holding ``<run_dir>/.lock`` (see the module doc).

    Args:
        run_dir: the run directory (created when missing).
        what: the flag that named the folder, for messages (``--out``, ``--resume``).
    """

    def __init__(self, run_dir: str | os.PathLike, *, what: str = "--out") -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.what = what
        self.held = False

    def _record(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "hostname": socket.gethostname(), "started": time.time(),
                "command": " ".join(sys.argv[:1] + sys.argv[1:8])}

    def _read(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _stale(self, owner: dict[str, Any]) -> bool:
        if not owner:
            # empty or unreadable: its writer died between creating and filling it (the record
            # is written right after the file is created), unless that happened just now
            try:
                return time.time() - self.path.stat().st_mtime > 10.0
            except FileNotFoundError:
                return False
        if owner.get("hostname") != socket.gethostname():
            return False
        pid = owner.get("pid")
        if not isinstance(pid, int) or isinstance(pid, bool):
            return False
        if not _alive(pid):
            return True
        start = _process_start(pid)
        written = owner.get("started")
        # the pid was reused by a process that started after the lock was written
        return start is not None and isinstance(written, (int, float)) and start > written + 1.0

    def acquire(self) -> "RunLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._read()
                if owner is None:
                    continue  # released between our attempts
                if self._stale(owner):
                    # Move the stale file aside first, so two processes recovering it at the
                    # same time cannot both take the lock.
                    aside = self.path.with_name(f"{LOCK_NAME}.stale.{os.getpid()}")
                    try:
                        os.replace(self.path, aside)
                    except FileNotFoundError:
                        continue
                    aside.unlink(missing_ok=True)
                    logger.warning("removed the stale lock of process %s on %s (it no longer "
                                   "runs) from %s", owner.get("pid"), owner.get("hostname"),
                                   self.run_dir)
                    continue
                who = (f"process {owner.get('pid')} on host {owner.get('hostname')}" if owner
                       else "another process (unreadable lock file)")
                raise RunLockedError(
                    f"{self.what} {self.run_dir} is in use by {who} (lock file {self.path}); "
                    "wait for that run to end or choose another folder; if it is known to be "
                    "over (e.g. its machine was switched off), delete the lock file") from None
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    json.dump(self._record(), fh)
            except OSError as exc:  # e.g. a full disk: leave no empty lock behind
                self.path.unlink(missing_ok=True)
                raise OSError(exc.errno, exc.strerror or str(exc), str(self.path)) from exc
            self.held = True
            return self
        raise RunLockedError(f"could not lock {self.run_dir} ({self.path} keeps changing): "
                             "another process is starting a run there")

    def release(self) -> None:
        if self.held:
            owner = self._read()
            if owner and owner.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

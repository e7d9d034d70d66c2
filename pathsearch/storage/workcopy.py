"""This machine's working copy of a run kept in an object store, claimed by the one live process that uses it.

A claim is an exclusive `flock` on a lock file inside the copy, held on a file descriptor for the life of the search:
a process that ends, however it ends, lets go of it by itself, so a copy nobody holds is stale (a cache to clear or
remove). The lock file says who holds it (pid, host, command), for the refusals. Stdlib only; no pathsearch module.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import shutil
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

LOCK_FILE = ".pathsearch-lock"  # a dot-name: storage.upload never uploads it
_HELD = threading.local()  # .claims: {path: WorkingCopy}, the claims this thread holds


class InUse(ValueError):
    """A live process holds the working copy; the message names the copy and the process."""

    def __init__(self, path: Path, holder: dict[str, object]) -> None:
        pid, command, host = holder.get("pid"), holder.get("command"), holder.get("host")
        who = f"process {pid} ({command})" if pid else "another process"
        where = "this machine" if host in (None, socket.gethostname()) else str(host)
        super().__init__(f"this machine's working copy {path} is in use by {who} on {where}")
        self.path, self.holder = path, holder


@dataclass
class WorkingCopy:
    """A folder this process has claimed: `claim` made it (`made`) or found it; `release` lets go of it."""

    path: Path
    fd: int
    made: bool
    held: bool = True

    def clear(self) -> None:
        """Empties the folder (a stale copy: nothing in it is used again); the claim stays."""
        for entry in self.path.iterdir():
            if entry.name == LOCK_FILE:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def release(self, remove: bool = False) -> None:
        """Lets go of the claim; with `remove`, deletes the folder first (while still holding it, so no other
        process claims a half-deleted folder: one that opened the lock file before it was deleted sees that and
        takes the new one)."""
        if not self.held:
            return
        try:
            if remove:
                shutil.rmtree(self.path, ignore_errors=True)
        finally:
            os.close(self.fd)  # the flock ends with its last descriptor
            self.held = False
            _claims().pop(self.path, None)


def claim(path: Path) -> WorkingCopy:
    """Claims the folder `path` (made when missing, with its parents) for this process, until `release` or the
    process's end. Two claims of one folder never both succeed, in two processes or in two threads of one.

    Raises:
        InUse: a live process holds it (this one included, through another claim).
    """
    path = Path(path)
    made = not path.exists()
    while True:
        path.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # the holder before us removed the folder just now
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise InUse(path, holder) from None
        except BaseException:
            os.close(fd)
            raise
        # the holder before us may have removed the folder between our open and our flock: then this lock is on a
        # file no one else will open, and the claim is retried on the lock file that is there now
        try:
            here, ours = os.stat(path / LOCK_FILE), os.fstat(fd)
            if (here.st_dev, here.st_ino) == (ours.st_dev, ours.st_ino):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": _command()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    copy = WorkingCopy(path, fd, made)
    _claims()[path] = copy
    return copy


def held(path: Path) -> WorkingCopy | None:
    """This thread's claim on the folder `path`, if it holds one."""
    copy = _claims().get(Path(path))
    return copy if copy is not None and copy.held else None


def release(path: Path, remove: bool = False) -> None:
    """Lets go of this thread's claim on `path` (nothing when it holds none); `remove` deletes the folder first."""
    copy = held(path)
    if copy is not None:
        copy.release(remove=remove)


def _claims() -> dict[Path, WorkingCopy]:
    if not hasattr(_HELD, "claims"):
        _HELD.claims = {}
    claims: dict[Path, WorkingCopy] = _HELD.claims
    return claims


def _read_holder(fd: int, wait_s: float = 0.5) -> dict[str, object]:
    """What the holder wrote into the lock file; it writes just after it takes the lock, so an empty or half-written
    file is read again for up to `wait_s` ({} if it stays so)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            found = json.loads(os.pread(fd, 65536, 0).decode())
            if isinstance(found, dict) and found:
                return found
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            return {}
        time.sleep(0.01)


def _command() -> str:
    """This process's command line, shortened for a one-line message."""
    command = shlex.join([Path(sys.argv[0]).name if sys.argv and sys.argv[0] else sys.executable, *sys.argv[1:]])
    return command if len(command) <= 200 else command[:197] + "..."

"""Run folders and run names that no two runs share: `<stem>-<YYYYmmdd-HHMMSS>`, then -2, -3, ..., each taken
atomically (a folder's mkdir, a Ray job's submission id). Used by `train`, `search` and `submit`; stdlib only.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Callable
from pathlib import Path


def name_problems(name: str | None, flag: str = "--name") -> list[str]:
    """A run's own name becomes a folder, an MLflow run name and a Ray job id: one path component of letters,
    digits, `.`, `_` and `-`, not starting with `.` or `-`."""
    if name is None:
        return []
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", name):
        return [
            f"{flag} {name!r}: a run name is one folder name of letters, digits, '.', '_' and '-' (not starting with "
            "'.' or '-'); leave it out for the file's name and the time"
        ]
    return []


def unique_run_name(stem: str, claim: Callable[[str], bool]) -> str:
    """The first of `<stem>-<YYYYmmdd-HHMMSS>`, then with -2, -3, ... appended, that `claim` takes.

    `claim(name)` takes the name atomically and returns False when it is taken already, so runs started in the same
    second get different names: a folder's mkdir (unique_run_dir), a Ray job's submission id (cluster.py).
    """
    base = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    for n in itertools.count(1):
        name = base if n == 1 else f"{base}-{n}"
        if claim(name):
            return name
    raise AssertionError("unreachable")


def unique_run_dir(
    parent: str | Path, stem: str, name: str | Path | None = None, flag: str = "--name", or_else: str = ""
) -> Path:
    """Creates a run's new folder and returns it: no two runs ever share one.

    Args:
        parent: the folder it goes in (created when missing).
        stem: without `name`: the folder is `<stem>-<YYYYmmdd-HHMMSS>`, with -2, -3, ... when that is taken (made
            by mkdir, which fails when the folder exists, so two runs started in the same second get two folders).
        name: the user's own name (--name, --out): exactly `parent/name` (an absolute path stands alone).
        flag, or_else: name the option and the alternative in the error.

    Raises:
        ValueError: `name` exists already. Another run's folder is never reused: its checkpoints and results would
            mix with the new run's.
    """
    root = Path(parent).expanduser()
    if name is not None:
        path = root / Path(name).expanduser()
        try:
            path.mkdir(parents=True)
        except FileExistsError:
            where = f"{flag} {name}: {path}" if str(path) != str(name) else f"{flag} {path}:"
            alternative = f", or {or_else}" if or_else else ""
            raise ValueError(f"{where} already exists; choose another {flag}{alternative}") from None
        return path
    root.mkdir(parents=True, exist_ok=True)

    def make(candidate: str) -> bool:
        try:
            (root / candidate).mkdir()
        except FileExistsError:
            return False
        return True

    return root / unique_run_name(stem, make)

"""The user-facing error, and writes that never leave a half-written artifact."""
from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np


class CompetitionError(Exception):
    """A bad input or environment, explained in one message that names the file and the fix.

    Entry points print it on one line and exit with status 2 instead of a traceback.
    """


def cli(main):
    """Wrap an entry point so a CompetitionError prints one clear line, not a traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except CompetitionError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None):
    """Yield a temporary path next to `path`; rename it over `path` only if the block succeeds.

    A crash or Ctrl-C mid-write leaves the previous file (or nothing), never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix or path.suffix)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; artifacts get the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_npy(path, array: np.ndarray) -> None:
    with atomic_path(path, ".npy") as tmp:
        np.save(tmp, array)


def save_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def save_json(path, obj) -> None:
    save_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_json(path, default=None):
    """A JSON file's content, or `default` when it is missing or unreadable (a half-written or
    hand-edited bookkeeping file is then rebuilt, never trusted)."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        return default

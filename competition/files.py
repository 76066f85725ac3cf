"""The user-facing error, and writes that never leave a half-written artifact."""
from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np


class CompetitionError(Exception):
    """A bad input or environment, explained in one message that names the file and the fix.

    Entry points print it on one line and exit with status 2 instead of a traceback.
    """


class Interrupted(Exception):
    """A run stopped on request (SIGINT / SIGTERM) after saving what it needs to continue; the
    message says how. Entry points print it and exit with 130, the shell's code for Ctrl-C."""


def cli(main):
    """Wrap an entry point so a CompetitionError prints one clear line (exit 2), a requested stop
    its resume hint (exit 130), and Ctrl-C one line (exit 130) instead of a traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except CompetitionError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except Interrupted as e:
            print(f"stopped: {e}", file=sys.stderr)
            sys.exit(130)
        except KeyboardInterrupt:
            print("interrupted (Ctrl-C); files written so far are complete, nothing is half-written", file=sys.stderr)
            sys.exit(130)
        except OSError as e:  # disk full, read-only folder, permissions: the file and the fix, no traceback
            where = f" ({e.filename})" if getattr(e, "filename", None) else ""
            fix = {28: "free some disk space", 30: "choose a writable folder", 13: "check the folder's permissions",
                   122: "free some quota"}.get(e.errno, "check the path and the disk")
            print(f"error: {e.strerror or e}{where}: {fix}, then rerun; files are written whole or not at all",
                  file=sys.stderr)
            sys.exit(2)

    return wrapper


# Never a leading dot: `.` and `..` would write into, or with --force delete, the folder above, and
# hidden names are this code's own (the copy of a run --force sets aside, a run's .lock), so no run
# or submission can be named like one of them.
NAME_RULE = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]*")


def check_name(value, what: str, nested: bool = False) -> str:
    """A run or submission name becomes a file or folder name: letters, digits and . _ + -, not
    starting with '.' (NAME_RULE). `nested`: several such parts joined by / (a run under
    models/ablations/<study>/), never absolute."""
    parts = value.split("/") if isinstance(value, str) and nested else [value]
    if not all(isinstance(x, str) and NAME_RULE.fullmatch(x) for x in parts):
        raise CompetitionError(f"{what} {value!r}: use letters, digits and . _ + - (a file or folder name, not "
                               f"starting with '.'; no spaces{', no leading or doubled /' if nested else ', no /'})")
    return value


def check_inside(path, folder, what: str) -> Path:
    """`path` resolved, refused unless it lies strictly inside `folder` (before a destructive step)."""
    target, root = Path(path).resolve(), Path(folder).resolve()
    if target == root or root not in target.parents:
        raise CompetitionError(f"{what}: {target} is not inside {root}; refused (nothing moved or deleted)")
    return target


def count(text: str) -> int:
    """argparse type of a count flag (rounds, steps, batches, bins): a whole number >= 1, so a
    `--rounds -3` is one usage error instead of a recorded nonsense value."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be at least 1")
    return value


def count0(text: str) -> int:
    """The same, where 0 has a documented meaning (0: all images, or: no processes of its own)."""
    return 0 if text.strip() in ("0", "+0", "-0") else count(text)


def check_writable(folder, what: str = "folder") -> None:
    """An error naming the folder and the fix unless files can be created in it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".write-test-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise CompetitionError(f"cannot write in {folder} ({e.strerror or e}): make it writable, or choose another "
                               f"{what}") from None


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
        try:
            os.replace(tmp, path)
        except OSError as e:  # the error names the file the user asked for, not the hidden temporary one
            raise OSError(e.errno, e.strerror, str(path)) from None
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


def read_json(path, default=None, kind: type | None = None):
    """A JSON file's content, or `default` when it is missing or unreadable (a half-written or
    hand-edited bookkeeping file is then rebuilt, never trusted). `kind` (dict, list): content of
    another type counts as unreadable too, so a caller that expects a mapping never gets a list."""
    try:
        out = json.loads(Path(path).read_text())
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, ValueError, UnicodeDecodeError):
        return default
    return default if kind is not None and not isinstance(out, kind) else out


def read_npz(path, keys, what: str) -> dict:
    """The arrays `keys` of an .npz, or one error naming the file and what it should be."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in keys}
    except FileNotFoundError:
        raise CompetitionError(f"{path} does not exist ({what})") from None
    except Exception as e:
        raise CompetitionError(f"{path} is not {what} ({type(e).__name__}: {e})") from None

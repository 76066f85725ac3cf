"""Subprocesses started when the test session starts (conftest.py, marker `start_early`).

A test whose time is a subprocess it waits on (bench/gpu_check.sh --dry-run, the 2-process DDP
launch, `--help` of every stage, ...) names a launcher: `@pytest.mark.start_early.with_args(launch)`.
conftest calls `launch(folder)` for every selected test that carries the marker as soon as
collection ends, so the process runs on the core that the in-process tests (one thread each)
leave idle; the test receives that `Started` from the `early` fixture and checks its result when
it comes up, after the tests without one. The command and what the test asserts are what they would
be if the test started it itself; only the start is earlier. When several tests each check a part
of one piece of work (the smoke run of every ablation study), one process does it for all of them
and pays for its imports once: `with_args(launch, shared=True)`, and conftest calls
`launch(folder, items)` once, with the selected tests. Output goes to files, so nothing blocks
while no one reads.

A launcher whose process runs long (minutes of CPU: the studies, the GPU check's dry run, DDP)
passes `beside=True`: it and what it starts keep off one core, the one the in-process tests (one
thread) compute on, instead of slowing them down with a share of it; once a test waits on any
started process (the in-process work is then done), every one of them may use all cores again."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

LIVE: list["Started"] = []  # killed at the end of the session if still running (pytest -x, Ctrl-C)


def python_on_path(folder: Path) -> str:
    """A PATH whose `python` is this interpreter (sys.executable), for scripts that call `python`
    themselves (bench/gpu_check.sh): a wrapper that execs it, so a virtual environment stays one."""
    folder.mkdir(parents=True, exist_ok=True)
    wrapper = folder / "python"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"


class Started:
    """One subprocess in a session of its own, stdout and stderr in files under `folder`; it and
    whatever it started are killed if it outlives `timeout` seconds from its start. `on_line(line,
    proc)`, if given, sees each stdout line as it is printed (e.g. to send a signal at a point).
    `elapsed`: its wall time from start to exit, whenever the test looks."""

    def __init__(self, cmd: list[str], folder: Path, timeout: float, env: dict | None = None,
                 cwd: Path | None = None, on_line: Callable[[str, subprocess.Popen], None] | None = None,
                 beside: bool = False):
        self.cmd, self.timeout, self.folder, self.on_line = cmd, timeout, folder, on_line
        folder.mkdir(parents=True, exist_ok=True)
        self.out, self.err = folder / "stdout.txt", folder / "stderr.txt"
        self.elapsed: float | None = None
        self.error: BaseException | None = None
        cores = _all_cores()
        with open(self.err, "w") as err:
            self.t0 = time.monotonic()
            if beside:  # the child inherits the starting thread's cores, from its first instruction
                _set_cores(0, cores[1:])
            try:
                self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                                             env=env, cwd=cwd or folder, text=True, start_new_session=True)
            finally:
                if beside:
                    _set_cores(0, cores)
        self.watcher = threading.Thread(target=self._watch, daemon=True)
        self.watcher.start()
        LIVE.append(self)

    def _watch(self) -> None:
        with open(self.out, "w") as out:
            for line in self.proc.stdout:
                out.write(line)
                out.flush()
                if self.on_line is not None and self.error is None:
                    try:
                        self.on_line(line, self.proc)
                    except BaseException as e:  # reported by result()
                        self.error = e
        self.proc.wait()
        self.elapsed = time.monotonic() - self.t0

    def result(self) -> subprocess.CompletedProcess:
        """Wait for the exit (the rest of `timeout`), then its return code and output."""
        for started in LIVE:  # this process now only waits: its core is free for them
            started.widen()
        self.watcher.join(max(1.0, self.timeout - (time.monotonic() - self.t0)))
        if self.watcher.is_alive():
            self.kill()
            raise subprocess.TimeoutExpired(self.cmd, self.timeout)
        if self.error is not None:
            raise self.error
        return subprocess.CompletedProcess(self.cmd, self.proc.returncode, self.out.read_text(), self.err.read_text())

    def widen(self) -> None:
        """Let this process and everything it started (its session) use every core again."""
        if self.proc.poll() is None:
            for pid in _session(self.proc.pid):
                for tid in _threads(pid):  # affinity is per thread: OpenMP's pool was pinned with the main one
                    _set_cores(tid, _all_cores())

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: this process and its children only
            except ProcessLookupError:
                pass
            self.proc.wait()
        self.watcher.join(5)


def _all_cores() -> list[int]:
    """The cores this process may use, in order (all of them on a machine without affinity)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def _set_cores(pid: int, cores: list[int]) -> None:
    """Best effort: where affinity cannot be set (another OS, one core, a process gone) nothing changes."""
    if cores and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(pid, cores)
        except OSError:
            pass


def _threads(pid: int) -> list[int]:
    """The threads of process `pid` (its main thread alone where /proc is missing or it has gone)."""
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")] or [pid]
    except OSError:
        return [pid]


def _session(sid: int) -> list[int]:
    """The processes of session `sid` (Started runs each command in a session of its own), from /proc."""
    pids = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session ...
            if len(fields) > 3 and fields[3] == str(sid):
                pids.append(int(entry))
    return pids or [sid]

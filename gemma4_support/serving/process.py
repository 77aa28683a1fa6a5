"""Supervised child processes: started in their own session and process group, logged to a file, stopped whole.

`spawn` starts a command with stdout+stderr going to a log file (or to the caller's own streams), in a new
session (its own process group), with ``PR_SET_PDEATHSIG`` on Linux (a killed parent leaves no orphan), SIGINT
honoured even when the caller ignores it, and an ``atexit`` hook that stops every process still running at
interpreter exit. `SupervisedProcess.send_signal` forwards a signal to the group and every descendant seen;
`SupervisedProcess.stop` sends SIGTERM to the process group and to every descendant recorded while it ran
(servers fork workers that may change group), waits, escalates to SIGKILL, and reports what survived.
`wait_until` is the one polling loop: until a check passes, the process exits, or a deadline passes.
"""
from __future__ import annotations

import atexit
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["SupervisedProcess", "set_pdeathsig", "spawn", "stop_at_exit", "tail", "wait_until"]

_LIVE: set["SupervisedProcess"] = set()
_LIVE_LOCK = threading.Lock()


@dataclass(eq=False)
class SupervisedProcess:
    """A child process group this module started: its log, every descendant seen, and how to stop them all."""

    popen: subprocess.Popen
    log_path: Path | None
    command: list[str]
    stop_grace_s: float = 20.0
    seen: dict[int, float] = field(default_factory=dict)  # pid -> create_time of every process seen
    _log_file: object | None = field(default=None, repr=False)
    _stopped: bool = field(default=False, repr=False)

    @property
    def pid(self) -> int:
        """The child's pid (also its process group id)."""
        return self.popen.pid

    def is_running(self) -> bool:
        """Whether the child itself is still alive."""
        return self.popen.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the child's log."""
        return tail(self.log_path, lines)

    def refresh_process_tree(self) -> list[int]:
        """Record every current descendant (so `stop` can end them all); returns the tree's pids."""
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        for p in procs:
            try:
                self.seen.setdefault(p.pid, p.create_time())
            except psutil.NoSuchProcess:
                pass
        return [p.pid for p in procs]

    def surviving_processes(self) -> list[int]:
        """Pids of processes this child started (its group and every descendant seen) that still exist."""
        import psutil

        alive = set()
        for pid, created in self.seen.items():
            try:
                p = psutil.Process(pid)
                if abs(p.create_time() - created) < 1e-3 and p.status() != psutil.STATUS_ZOMBIE:
                    alive.add(pid)
            except psutil.NoSuchProcess:
                continue
        for p in psutil.process_iter(["pid"]):
            try:
                if os.getpgid(p.pid) == self.pid and p.status() != psutil.STATUS_ZOMBIE:
                    alive.add(p.pid)
            except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
                continue
        return sorted(alive)

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the child's process group and to every descendant seen (now or before)."""
        self.refresh_process_tree()
        self._signal_all(sig)

    def _signal_all(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in self.surviving_processes():
            try:
                if os.getpgid(pid) != self.pid:  # the group had it already: once is enough
                    os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def stop(self, grace_s: float | None = None) -> list[int]:
        """SIGTERM the group and every descendant, SIGKILL what remains after ``grace_s``; returns the survivors."""
        if self._stopped:
            return self.surviving_processes()
        grace_s = self.stop_grace_s if grace_s is None else grace_s
        self.refresh_process_tree()
        try:
            self._signal_all(signal.SIGTERM)
            if not self._all_gone_within(grace_s):
                self._signal_all(signal.SIGKILL)
                self._all_gone_within(10.0)
            self._reap(5.0)
        finally:
            self._stopped = True
            with _LIVE_LOCK:
                _LIVE.discard(self)
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None
        return self.surviving_processes()

    def _all_gone_within(self, timeout_s: float) -> bool:
        try:
            wait_until(lambda: not self.surviving_processes(), timeout_s, interval_s=0.1)
            return True
        except TimeoutError:
            return False

    def _reap(self, timeout_s: float) -> None:
        try:
            self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass


def tail(path: Path | None, lines: int) -> str:
    """The last ``lines`` lines of a text file ('' when it does not exist)."""
    if path is None or not Path(path).exists():
        return ""
    data = Path(path).read_bytes()[-200_000:].decode("utf-8", errors="replace")
    return "\n".join(data.splitlines()[-lines:])


def set_pdeathsig(sig: int = signal.SIGTERM) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent exits (PR_SET_PDEATHSIG); False where unsupported."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        return libc.prctl(1, int(sig)) == 0  # PR_SET_PDEATHSIG
    except Exception:
        return False


def _child_setup() -> None:  # runs in the child between fork and exec
    set_pdeathsig(signal.SIGTERM)
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a forwarded SIGINT must not meet an inherited "ignore"
    except (ValueError, OSError):
        pass


def spawn(argv: Sequence[str], log_path: Path | None, env: Mapping[str, str] | None = None,
          stop_grace_s: float = 20.0) -> SupervisedProcess:
    """Start ``argv`` in its own session with output to ``log_path`` (None: the caller's stdin, stdout and stderr);
    it is stopped at interpreter exit at the latest."""
    log_file = None
    if log_path is not None:
        log_file = open(log_path, "ab", buffering=0)  # noqa: SIM115 - closed by stop()
        log_file.write(("$ " + shlex.join(argv) + "\n").encode())
    popen = subprocess.Popen(
        list(argv), stdin=subprocess.DEVNULL if log_file else None, stdout=log_file,
        stderr=subprocess.STDOUT if log_file else None, env=None if env is None else dict(env), start_new_session=True,
        preexec_fn=_child_setup if sys.platform.startswith("linux") else None,
    )
    child = SupervisedProcess(popen, None if log_path is None else Path(log_path), list(argv), stop_grace_s,
                              _log_file=log_file)
    child.refresh_process_tree()
    with _LIVE_LOCK:
        _LIVE.add(child)
    return child


def wait_until(ready: Callable[[], bool], timeout_s: float, child: SupervisedProcess | None = None,
               interval_s: float = 0.5) -> float:
    """Poll ``ready`` until it is true; returns the seconds waited. Raises ChildProcessError when ``child`` exits
    first (its exit code as the argument) and TimeoutError after ``timeout_s``."""
    t0 = time.monotonic()
    while True:
        if child is not None:
            child.refresh_process_tree()
            if child.popen.poll() is not None:
                raise ChildProcessError(child.popen.returncode)
        if ready():
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(timeout_s)
        time.sleep(interval_s)


def stop_at_exit(live: set, lock: threading.Lock, grace_s: float = 5.0) -> None:
    """Stop each object of `live` (anything with stop(grace_s=...)) at interpreter exit; a failure stops no other."""
    with lock:
        pending = list(live)
    for item in pending:
        try:
            item.stop(grace_s=grace_s)
        except Exception:
            pass


@atexit.register
def _stop_all() -> None:
    stop_at_exit(_LIVE, _LIVE_LOCK)

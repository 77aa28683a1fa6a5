"""Signal handling of the suite's pytest sessions: SIGTERM interrupts as SIGINT does; held while reports are written.

`_install_interrupts` makes SIGINT / SIGTERM pytest's orderly interruption (KeyboardInterrupt, so fixtures tear down
and vLLM servers stop) in the controller and every xdist worker, passed on to the children in the process group;
`_restore_interrupts` puts the previous handlers back. `_RECEIVED` keeps the signals that interrupted this process
(a repeat within `_DUPLICATE_S` counts once), and `_signals_held` holds them while the run's reports are written.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

_HANDLERS = pytest.StashKey[dict]()
_INTERRUPTS = (signal.SIGINT, signal.SIGTERM)
_RECEIVED: list[tuple[str, float]] = []  # the signals that interrupted this process: name, monotonic time
_DUPLICATE_S = 2.0


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def _note(signum: int) -> bool:
    """Record an interrupting signal; False when it repeats the last one within _DUPLICATE_S (the same interruption
    delivered twice: to the process group, and forwarded by a parent)."""
    now = time.monotonic()
    if _RECEIVED and now - _RECEIVED[-1][1] < _DUPLICATE_S:
        return False
    _RECEIVED.append((signal.Signals(signum).name, now))
    return True


def _interrupt(signum: int, _frame: object) -> None:
    """SIGINT / SIGTERM handler: pytest's orderly interruption (KeyboardInterrupt), passed on to the children in this
    process's group (the xdist workers, when only the controller was signalled)."""
    if not _note(signum):
        return
    import psutil

    for child in psutil.Process().children():
        try:
            if os.getpgid(child.pid) == os.getpgrp():
                child.send_signal(signum)
        except (OSError, psutil.Error):
            continue
    raise KeyboardInterrupt(f"{_RECEIVED[-1][0]} received")


def _install_interrupts(config: pytest.Config) -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    previous = {}
    for sig in _INTERRUPTS:
        current = signal.getsignal(sig)
        if current in (signal.default_int_handler, signal.SIG_DFL):  # an ignored signal stays ignored
            previous[sig] = signal.signal(sig, _interrupt)
    config.stash[_HANDLERS] = previous
    if _is_worker(config):  # a worker whose controller dies is interrupted too
        from gemma4_support.serving.process import set_pdeathsig

        set_pdeathsig(signal.SIGTERM)


def _restore_interrupts(config: pytest.Config) -> None:
    """Put back the SIGINT / SIGTERM handlers `_install_interrupts` replaced."""
    for sig, handler in config.stash.get(_HANDLERS, {}).items():
        signal.signal(sig, handler)


@contextmanager
def _signals_held() -> Iterator[list[str]]:
    """Hold SIGINT / SIGTERM (a second one interrupts); yields the names of those that arrived."""
    held: list[str] = []

    def hold(signum: int, _frame: object) -> None:
        if _note(signum):
            held.append(signal.Signals(signum).name)
        if len(held) > 1:
            raise KeyboardInterrupt(f"{held[-1]} received twice while the reports were written")

    on_main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, hold) for sig in _INTERRUPTS
                if on_main and signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        yield held
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

"""Who owns a run, and SIGTERM while one is open.

A run records the host, pid and start time of the process that opened it, so a later open can tell a
run whose process is gone (killed, crashed, rebooted: it stays ``running``) from one still going
(:func:`owner_alive`). Inside ``LatentDB.run()`` SIGTERM becomes :class:`~interlatent.errors.Terminated`,
so the run is marked ``interrupted`` on the way out (:func:`arm_sigterm`, :func:`sigterm_held`).
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from interlatent.errors import Terminated

OWNER_GONE = "owner process gone (killed?)"


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """``(state, start time in clock ticks since boot)`` of a process from ``/proc`` (Linux), else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the name may hold spaces and parentheses
    return fields[0], fields[19]  # stat fields 3 (state) and 22 (starttime)


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def process_identity(pid: int) -> str | None:
    """``boot id:start time`` of a process: a pid reused after the process ended, or after a reboot,
    gets another identity. None where ``/proc`` cannot tell (not Linux, or no such process)."""
    stat, boot = _proc_stat(pid), _boot_id()
    return None if stat is None or boot is None else f"{boot}:{stat[1]}"


_OWN_IDENTITY = (socket.gethostname(), os.getpid(), process_identity(os.getpid()))


def own_identity() -> tuple[str, int, str | None]:
    """(hostname, pid, identity) of this process (recomputed after a fork)."""
    global _OWN_IDENTITY
    if _OWN_IDENTITY[1] != os.getpid():
        _OWN_IDENTITY = (socket.gethostname(), os.getpid(), process_identity(os.getpid()))
    return _OWN_IDENTITY


def owner_alive(host: str | None, pid: int | None, identity: str | None) -> bool | None:
    """Whether the process that owns a run still runs: True, False, or None where this machine
    cannot tell (another host, no owner recorded, or no POSIX signals)."""
    if host is None or pid is None or host != socket.gethostname() or os.name != "posix":
        return None
    try:
        os.kill(int(pid), 0)  # signal 0 checks existence only
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user
    except OSError:
        return None
    stat = _proc_stat(int(pid))
    if stat is not None and stat[0] in ("Z", "X"):
        return False  # killed, not yet reaped by its parent
    if identity is not None and stat is not None and process_identity(int(pid)) != identity:
        return False  # the pid now belongs to another process (or the machine rebooted)
    return True


_sigterm_lock = threading.Lock()
_sigterm_depth = 0
_sigterm_previous: Any = None
_sigterm_held_depth = 0  # > 0 while the main thread writes a run's final status
_sigterm_pending = False


def _on_sigterm(signum: int, frame: Any) -> None:
    global _sigterm_pending
    previous = _sigterm_previous
    if callable(previous):  # a handler installed before the run: it still hears the signal
        previous(signum, frame)
    if _sigterm_held_depth:
        _sigterm_pending = True  # raised once the run's status is written
        return
    raise Terminated("received SIGTERM")


def arm_sigterm() -> bool:
    """Turn SIGTERM into :class:`Terminated` while a run is open (main thread only; nested runs
    share one handler). Returns whether it was armed (pair with :func:`disarm_sigterm`)."""
    global _sigterm_depth, _sigterm_previous
    if threading.current_thread() is not threading.main_thread():
        return False  # signals reach the main thread only; a killed process is found on reopen
    with _sigterm_lock:
        if _sigterm_depth == 0:
            previous = signal.getsignal(signal.SIGTERM)
            if previous is signal.SIG_IGN:
                return False  # the program chose to ignore SIGTERM: keep it that way
            try:
                signal.signal(signal.SIGTERM, _on_sigterm)
            except ValueError:  # not the main interpreter
                return False
            _sigterm_previous = previous
        _sigterm_depth += 1
    return True


def disarm_sigterm() -> None:
    global _sigterm_depth, _sigterm_previous
    with _sigterm_lock:
        _sigterm_depth -= 1
        if _sigterm_depth == 0:
            if signal.getsignal(signal.SIGTERM) is _on_sigterm:  # unless someone replaced it meanwhile
                previous = _sigterm_previous
                signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
            _sigterm_previous = None


@contextmanager
def sigterm_held(raise_pending: bool = True) -> Iterator[None]:
    """Defer SIGTERM while the main thread writes a run's final status (Python runs signal handlers
    in the main thread only); a SIGTERM that came meanwhile raises :class:`Terminated` afterwards."""
    global _sigterm_held_depth, _sigterm_pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _sigterm_held_depth += 1
    try:
        yield
    finally:
        _sigterm_held_depth -= 1
    if _sigterm_held_depth == 0 and _sigterm_pending:
        _sigterm_pending = False
        if raise_pending:
            raise Terminated("received SIGTERM")

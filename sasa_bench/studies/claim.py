"""Claiming units, so N ``ablate`` processes (on one machine or many, over a shared results
folder) split a study by themselves, without ``--shard``.

Before running a unit a process creates ``<results>/<study>/.<unit>.lock`` with ``O_CREAT |
O_EXCL`` (atomic on local file systems and on NFS v3 and later): exactly one process wins, the
others move on to the next unit. The lock holds who owns it (JSON: pid, host, boot id, the
process's start time, a random token, time, command). While the unit runs, a heartbeat thread
touches the lock every :data:`HEARTBEAT_S` seconds; when the result is written the lock is removed.

A lock is **stale**, and another process takes it over, when:

* its holder ran on this host (same host name and boot id) and that process is gone: the pid is
  not alive, or now belongs to a process started at another time (pid reuse); or the host's boot
  id changed (rebooted since);
* its holder ran on another host (we cannot see its processes) and its heartbeat stopped: the
  lock file was not touched for ``timeout_s`` seconds (``--lock-timeout``, default
  :data:`DEFAULT_TIMEOUT_S`; the hosts' clocks must agree to well within it, as NTP gives), the
  rule of ``flufl.lock``'s lifetimes. A holder that was only paused (SIGSTOP, a frozen VM) for
  longer loses its unit; both then write the same result file (atomically), which costs time,
  not correctness.

Taking over is itself guarded: the taker creates ``.<unit>.lock.break`` with ``O_EXCL``, re-reads
the lock (still the same stale holder?), removes it, and removes the break file; then it competes
for the lock with ``O_EXCL`` like anyone else. So two processes that both find a lock stale never
both run the unit.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sasa_bench.store import pid_alive

HEARTBEAT_S = 30.0  # a held lock is touched this often
DEFAULT_TIMEOUT_S = 600.0  # another host's lock untouched this long is stale (20 missed heartbeats)
BREAK_STALE_S = 60.0  # a ``.break`` file (a takeover in progress takes milliseconds) this old is left over
LOCK_SUFFIX = ".lock"


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _start_ticks(pid: int) -> int | None:
    """The process's start time (clock ticks since boot, /proc/PID/stat field 22): with the pid,
    it names one process even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def me(token: str, command: str = "") -> dict[str, Any]:
    """What this process writes into a lock it holds."""
    pid = os.getpid()
    return {
        "pid": pid, "host": socket.gethostname(), "boot_id": _boot_id(), "start_ticks": _start_ticks(pid),
        "token": token, "time": time.time(), "command": command or " ".join(sys.argv),
    }


def lock_path(result_file: Path) -> Path:
    """The lock of the unit whose result is ``result_file`` (hidden, beside it; `report` ignores it)."""
    return result_file.with_name(f".{result_file.stem}{LOCK_SUFFIX}")


def read_lock(path: Path) -> dict[str, Any] | None:
    """The holder's record; None if the file is gone; {} if it is not (yet) readable JSON."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        rec = json.loads(text)
    except ValueError:
        return {}
    return rec if isinstance(rec, dict) else {}


def describe(holder: dict[str, Any]) -> str:
    return f"{holder.get('host', '?')}:{holder.get('pid', '?')}"


def stale_reason(holder: dict[str, Any], age_s: float, timeout_s: float) -> str | None:
    """Why a lock whose record is ``holder`` and whose file was last touched ``age_s`` seconds ago
    is stale, or None while its holder may still be running the unit."""
    if age_s > timeout_s:
        return f"not touched for {age_s:.0f} s (> --lock-timeout {timeout_s:.0f} s)"
    if not holder:  # being written right now, or damaged: only the timeout decides
        return None
    if holder.get("host") != socket.gethostname():
        return None
    boot = _boot_id()
    if holder.get("boot_id") and boot and holder["boot_id"] != boot:
        return "its host rebooted since"
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return None
    if not pid_alive(pid):
        return f"process {pid} on this host is gone"
    ticks = holder.get("start_ticks")
    if ticks is not None and _start_ticks(pid) not in (None, ticks):
        return f"process {pid} on this host is gone (its pid was reused)"
    return None


def _create(path: Path, record: dict[str, Any]) -> bool:
    """Create ``path`` holding ``record`` iff it does not exist (``O_EXCL``)."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    except OSError as e:  # a full disk, no permission: one line naming the lock (its folder)
        raise OSError(e.errno, e.strerror, str(path.parent)) from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(record))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        path.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path.parent)) from None
    return True


def _age(path: Path) -> float | None:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None


def _break(path: Path, seen: dict[str, Any], token: str) -> bool:
    """Remove the stale lock ``path`` if it still holds ``seen`` (guarded by a ``.break`` file)."""
    guard = path.with_name(path.name + ".break")
    if not _create(guard, {"token": token, "host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}):
        age = _age(guard)
        g = read_lock(guard) or {}
        if age is not None and (age > BREAK_STALE_S or stale_reason(g, 0.0, float("inf")) is not None):
            guard.unlink(missing_ok=True)  # a taker that died mid-takeover
        return False
    try:
        now = read_lock(path)
        if now is None:
            return True
        if now != seen:  # someone else took it over (and holds it) meanwhile
            return False
        path.unlink(missing_ok=True)
        return True
    finally:
        guard.unlink(missing_ok=True)


@dataclass
class Busy:
    """A unit another process holds."""

    holder: dict[str, Any]

    def __str__(self) -> str:
        return describe(self.holder)


class Claims:
    """The unit locks one process holds, with one heartbeat thread for all of them.

    ``claim(result_file)`` returns True (ours now), or a :class:`Busy` naming the live holder;
    a stale lock is taken over (``log`` says whose and why). ``release`` removes a lock of ours.
    Use as a context manager: leaving releases everything still held."""

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S, log: Any = None, command: str = "") -> None:
        self.timeout_s, self.log, self.command = timeout_s, log, command
        self.token = secrets.token_hex(8)
        self.held: dict[Path, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Claims:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def claim(self, result_file: Path) -> bool | Busy:
        path = lock_path(Path(result_file))
        path.parent.mkdir(parents=True, exist_ok=True)
        record = me(self.token, self.command)
        for _ in range(3):  # create; or judge the holder, take a stale lock over and create again
            if _create(path, record):
                with self._lock:
                    self.held[path] = record
                self._start_heartbeat()
                return True
            holder = read_lock(path)
            age = _age(path)
            if holder is None or age is None:
                continue  # released just now: try again
            if holder.get("token") == self.token:
                return True  # ours already
            why = stale_reason(holder, age, self.timeout_s)
            if why is None:
                return Busy(holder)
            if _break(path, holder, self.token) and self.log:
                self.log(f"{path.name[1:-len(LOCK_SUFFIX)]}: taking over the lock of {describe(holder)} ({why})")
        holder = read_lock(path) or {}
        return Busy(holder)

    def owns(self, result_file: Path) -> bool:
        """Whether the lock is still ours (False after another process took it over)."""
        rec = read_lock(lock_path(Path(result_file)))
        return bool(rec) and rec.get("token") == self.token

    def release(self, result_file: Path) -> None:
        path = lock_path(Path(result_file))
        with self._lock:
            self.held.pop(path, None)
        rec = read_lock(path)
        if rec and rec.get("token") == self.token:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        self._stop.set()
        for path in list(self.held):
            self.release(path.with_name(path.name[1:-len(LOCK_SUFFIX)] + ".json"))
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _start_heartbeat(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._beat, name="sasa-bench-lock-heartbeat", daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with self._lock:
                paths = list(self.held)
            for path in paths:
                with contextlib.suppress(OSError):
                    os.utime(path)  # the time a taker on another host compares with --lock-timeout

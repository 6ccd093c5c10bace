"""The run directory: made or reopened safely, locked to one driver for that driver's life, written atomically.

One writer per run directory. A driver holds two guards for as long as it lives:

* an OS lock, `flock` on RUN_DIR/.lock: exact on one host (the kernel drops it when the process dies, however it
  dies, so a crashed driver's lock is taken over at once), and across hosts on NFS (Linux maps flock to NFS byte
  range locks);
* a lease, RUN_DIR/.lease: a JSON file naming the holder (host, pid, start time) whose `heartbeat` the holder
  renews every `ENKG_LEASE_HEARTBEAT` seconds (default 10). It guards file systems where advisory locks do not
  reach other hosts (Lustre mounted without `flock`, or with `localflock`; some FUSE and object-store mounts): a
  lease held by another host and renewed within `ENKG_LEASE_SECONDS` (default 60) refuses the run; an older one is
  stale and taken over. The lease is created with O_EXCL and a stale one is first renamed away, so two drivers that
  find it stale at once cannot both take it. The hosts' clocks must agree to well within the lease time (NTP).

A driver that finds its own lease taken (it was stalled longer than the lease time) or its run directory gone stops
at its next safe point (interrupt.fail), with every committed step kept.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from enkg_dist import interrupt

LOCK_FILE, LEASE_FILE = ".lock", ".lease"


class RunDirError(ValueError):
    """The run directory cannot be used; the message is one line naming the path."""


class RunDirLocked(RunDirError):
    """Another driver holds the run directory."""


class RunStopped(RuntimeError):
    """A fault of the machine (disk full, a write refused, out of memory) stopped a run whose committed steps are
    kept; the message is one line that says how to continue."""


def fault_line(e: BaseException, where: str | None = None) -> str:
    """One line for an operating-system fault, found in `e` or the errors that caused it, naming the file (or
    `where`, when the error names none)."""
    seen, err = set(), e
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno is not None:
            where = f" ({err.filename})" if err.filename else f" (writing under {where})" if where else ""
            if err.errno == errno.ENOSPC:
                return f"no space left on device{where}"
            if err.errno == errno.EDQUOT:
                return f"disk quota exceeded{where}"
            if err.errno == errno.ENOENT:
                return f"a file or directory of the run disappeared{where}"
            return f"{err.strerror or type(err).__name__}{where}"
        if isinstance(err, MemoryError):
            return "out of memory (MemoryError): lower the ensemble size (enkg.ensemble_size or eki.ensemble_size)"
        err = err.__cause__ or err.__context__
    return " ".join(str(e).split()) or type(e).__name__


def _why(e: OSError) -> str:
    return e.strerror or type(e).__name__


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write a file whole or not at all (temporary file in the same directory, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def replace_atomic(path: Path, write) -> None:
    """`write(tmp)` writes a temporary file beside `path`, which then replaces `path` in one rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _seconds(name: str, default: float) -> float:
    try:
        return max(0.05, float(os.environ.get(name, default)))
    except ValueError:
        return default


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder_text(h: dict, now: float | None = None) -> str:
    text = f"pid {h.get('pid', '?')} on host {h.get('host', '?')}, started {h.get('started', '?')}"
    if now is not None and isinstance(h.get("heartbeat"), (int, float)):
        text += f", lease renewed {now - h['heartbeat']:.0f} s ago"
    return text


@dataclass
class RunDirLock:
    """flock + lease on a run directory (see the module's docstring)."""

    run_dir: Path
    lease_seconds: float = field(default_factory=lambda: _seconds("ENKG_LEASE_SECONDS", 60.0))
    heartbeat: float = field(default_factory=lambda: _seconds("ENKG_LEASE_HEARTBEAT", 10.0))
    note: str | None = None  # what was taken over, if anything
    _fd: int | None = None
    _me: dict = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _fault: Exception | None = None

    def acquire(self) -> RunDirLock:
        d = self.run_dir
        try:
            self._fd = os.open(d / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunDirError(f"run directory {d} is not writable ({_why(e)})") from None
        flocked = True
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read_lease() or self._read_lock() or {}
            self._close_fd()
            raise RunDirLocked(f"run directory {d} is in use by {_holder_text(holder)} (lock {d / LOCK_FILE}); "
                               "wait for that run to end, or stop it") from None
        except OSError as e:  # no advisory locks on this file system: the lease alone guards it
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                self._close_fd()
                raise RunDirError(f"run directory {d}: cannot lock {d / LOCK_FILE} ({_why(e)})") from None
            flocked = False
        try:
            self._take_lease(flocked)
            if flocked:  # the holder, for a driver refused by the lock before it reads the lease
                os.ftruncate(self._fd, 0)
                os.pwrite(self._fd, json.dumps(self._me).encode(), 0)
        except BaseException:
            self._close_fd()
            raise
        self._thread = threading.Thread(target=self._renew, name=f"run-dir-lease {d}", daemon=True)
        self._thread.start()
        return self

    def _read_lock(self) -> dict | None:
        try:
            return json.loads((self.run_dir / LOCK_FILE).read_text())
        except (OSError, ValueError):
            return None

    def _read_lease(self) -> dict | None:
        try:
            return json.loads((self.run_dir / LEASE_FILE).read_text())
        except (OSError, ValueError):
            return None

    def _take_lease(self, flocked: bool) -> None:
        d, host, now = self.run_dir, socket.gethostname(), time.time()
        self._me = {"host": host, "pid": os.getpid(), "token": uuid.uuid4().hex,
                    "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "heartbeat": now}
        old = self._read_lease()
        if old is not None:
            same_host = old.get("host") == host
            age = now - float(old.get("heartbeat", 0) or 0)
            dead_here = same_host and (flocked or not _alive(int(old.get("pid", -1))))
            if not dead_here and age < self.lease_seconds:
                raise RunDirLocked(f"run directory {d} is in use by {_holder_text(old, now)} (lease {d / LEASE_FILE}; "
                                   "advisory locks may not reach other hosts on this file system); if that run is "
                                   f"gone, its lease goes stale {self.lease_seconds:.0f} s after its last renewal")
            self.note = f"took over the run directory from {_holder_text(old)}, which is gone"
            with contextlib.suppress(FileNotFoundError):  # only one of two racing takers renames it away
                os.rename(d / LEASE_FILE, d / f"{LEASE_FILE}.stale-{uuid.uuid4().hex[:8]}")
            for stale in d.glob(f"{LEASE_FILE}.stale-*"):
                with contextlib.suppress(OSError):
                    stale.unlink()
        try:
            fd = os.open(d / LEASE_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = self._read_lease() or {}
            raise RunDirLocked(f"run directory {d} was just taken by {_holder_text(holder)}") from None
        except OSError as e:
            raise RunDirError(f"run directory {d} is not writable ({_why(e)})") from None
        with os.fdopen(fd, "w") as f:
            json.dump(self._me, f)

    def _renew(self) -> None:
        """Heartbeat thread: renew the lease; stop the run at its next safe point when the lease or the directory
        is gone or taken."""
        while not self._stop.wait(self.heartbeat):
            lease = self._read_lease()
            if not (self.run_dir / LOCK_FILE).exists():  # writes in flight may have made the directory again
                self._fail(RunDirError(f"run directory {self.run_dir} disappeared during the run (its lock file is "
                                       "gone); stopping"))
                return
            if lease is None or lease.get("token") != self._me["token"]:
                who = _holder_text(lease) if lease else "nobody (the lease file is gone)"
                self._fail(RunDirError(f"run directory {self.run_dir}: this driver's lease is now held by {who}; "
                                       "stopping so that one driver writes the run"))
                return
            self._me["heartbeat"] = time.time()
            with contextlib.suppress(OSError):  # a full disk: the store reports it; the lease goes stale later
                write_atomic(self.run_dir / LEASE_FILE, json.dumps(self._me))

    def _fail(self, e: Exception) -> None:
        self._fault = e
        interrupt.fail(e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        lease = self._read_lease()
        if lease is not None and lease.get("token") == self._me.get("token"):
            with contextlib.suppress(OSError):
                (self.run_dir / LEASE_FILE).unlink()
        self._close_fd()
        if self._fault is not None:
            interrupt.clear_fault(self._fault)

    def _close_fd(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


@dataclass
class RunDirectory:
    """A prepared, locked run directory: `resuming` when it holds a store to continue."""

    path: Path
    resuming: bool
    lock: RunDirLock
    created: bool  # this call made the directory
    notes: list[str] = field(default_factory=list)

    def discard_if_unused(self, committed_step: int) -> None:
        """After a setup failure: remove the directory this call made, when nothing was committed in it."""
        if self.created and committed_step < 0:
            self.lock.release()
            shutil.rmtree(self.path, ignore_errors=True)

    def close(self) -> None:
        self.lock.release()


def choose(output_dir: str, name: str, run_dir: str | Path | None) -> Path:
    """The run directory: `run_dir`, or a new OUTPUT_DIR/NAME-TIME."""
    if run_dir is not None:
        return Path(run_dir)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(output_dir) / f"{name}-{stamp}"
    path, i = base, 1
    while path.exists():
        path, i = Path(f"{base}-{i}"), i + 1
    return path


def make_and_lock(path: Path, what: str = "--run-dir") -> tuple[RunDirLock, bool]:
    """Create the directory if needed (one-line errors naming it) and lock it; (lock, whether it was made)."""
    if path.exists() and not path.is_dir():
        raise RunDirError(f"run directory {path} ({what}) is a file, not a directory; choose another path")
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise RunDirError(f"cannot create run directory {path} ({what}): a parent of it is a file") from None
    except OSError as e:
        raise RunDirError(f"cannot create run directory {path} ({what}): {_why(e)}") from None
    try:
        return RunDirLock(path).acquire(), created
    except BaseException:
        if created:
            shutil.rmtree(path, ignore_errors=True)
        raise

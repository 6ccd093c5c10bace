"""A forward model that runs a user's simulator program once per ensemble member.

Each member gets its own work directory (``<scratch_dir>/enkg-call-XXXX/<member>/``) holding ``input.npy`` (the
member's state, float64, of shape ``state_shape``); the program must write ``obs_size`` values to ``output.npy`` (or
``output.npz`` / ``output.npy.npz`` with key ``psi``) and exit 0. The command is an argv list, never run through a
shell; in each argument (and in `env` values) ``{input}``, ``{output}``, ``{workdir}``, ``{member}`` and ``{ranks}``
are replaced by plain text substitution, so other braces, quotes, ``;`` or ``$(...)`` reach the program literally.
The program runs in its work directory (so give paths in `command` as absolute ones, or set `cwd`), in a new
session: on a timeout its whole process group (an MPI launcher and its ranks included) is killed. Successful
members' directories are removed (failed ones kept unless keep_failed=False; all kept with keep_workdirs=True).

Every failure fails only its member, with a one-line reason in the ForwardResult and the details (command, work
directory, stderr tail) in `last_failures`.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from enkg_dist.localisation import Geometry
from enkg_dist.problems.base import ForwardModel, ForwardResult

_PLACEHOLDER = re.compile(r"\{(input|output|workdir|member|ranks)\}")
STDERR_LINES, STDERR_CHARS = 20, 2000  # how much of a failed program's stderr is reported


def substitute(arg: str, values: dict[str, str]) -> str:
    """Replace the placeholders in one pass (never str.format: other braces stay, substituted text is not rescanned)."""
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], arg)


def resolve_program(prog: str) -> str:
    """The absolute path of an executable (as shutil.which finds it), or a clear FileNotFoundError."""
    if _PLACEHOLDER.search(prog):
        return prog  # only known per member
    path = shutil.which(prog)
    if path is None:
        where = "" if os.sep in prog else " on PATH"
        raise FileNotFoundError(f"program {prog!r} not found{where} or not executable")
    return os.path.abspath(path)


@dataclass
class MemberRun:
    """One member's outcome: psi (m,) when it succeeded, else a one-line reason and multi-line details."""

    psi: np.ndarray | None
    reason: str | None = None
    detail: str = ""


class ExternalProgramForward(ForwardModel):
    """G(x): `launcher + command` run once per member (up to `max_parallel` at once), exchanging .npy files."""

    def __init__(
        self,
        command: Sequence[str],
        state_shape: Sequence[int],
        obs_size: int,
        *,
        launcher: Sequence[str] | None = None,
        ranks: int = 1,
        timeout: float | None = None,
        scratch_dir: str | os.PathLike | None = None,
        max_parallel: int = 1,
        env: dict[str, str] | None = None,
        keep_workdirs: bool = False,
        keep_failed: bool = True,
        cwd: str | os.PathLike | None = None,
        kill_grace: float = 2.0,
    ):
        if isinstance(command, str) or isinstance(launcher, str):
            raise TypeError("command and launcher are argv lists, not strings: they are never run through a shell")
        if not command:
            raise ValueError("command is empty")
        if ranks < 1 or max_parallel < 1 or (timeout is not None and timeout <= 0):
            raise ValueError(f"need ranks >= 1, max_parallel >= 1, timeout > 0 or None; got {ranks}, {max_parallel}, "
                             f"{timeout}")
        self.launcher = [str(a) for a in launcher or []]
        self.command = [str(a) for a in command]
        if self.launcher:
            self.launcher[0] = resolve_program(self.launcher[0])
        self.command[0] = resolve_program(self.command[0])
        self.state_shape, self.obs_size = tuple(int(s) for s in state_shape), int(obs_size)
        self.ranks, self.timeout, self.max_parallel = int(ranks), timeout, int(max_parallel)
        self.scratch_dir = Path(scratch_dir if scratch_dir is not None else tempfile.gettempdir()).absolute()
        self.env = dict(env or {})
        self.keep_workdirs, self.keep_failed = keep_workdirs, keep_failed
        self.cwd, self.kill_grace = cwd, kill_grace
        self.obs_coordinates = None  # (m, 2) grid coordinates of the outputs, when declared (for localisation)
        self.last_failures: dict[int, str] = {}  # member -> reason, command, work directory and stderr tail
        self._live: dict[int, subprocess.Popen] = {}  # pid -> running program, for killing on an interrupt
        self._lock = threading.Lock()
        self._aborting = False

    def geometry(self):
        """A (C, n, n) state on the periodic n x n grid with the declared output coordinates, or None."""
        if self.obs_coordinates is None or len(self.state_shape) != 3 or self.state_shape[1] != self.state_shape[2]:
            return None
        return Geometry(self.state_shape[1], self.state_shape[0], self.obs_coordinates)

    def __getstate__(self) -> dict:
        """Picklable (for shipping to workers): the lock and the running-program table are per process."""
        return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_live")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock(), _live={})

    def __call__(self, x: torch.Tensor, members: Sequence[int] | None = None) -> ForwardResult:
        self.check_input(x)
        members = list(range(x.shape[0])) if members is None else [int(m) for m in members]
        if len(members) != x.shape[0] or len(set(members)) != len(members):
            raise ValueError(f"need one distinct member index per row: {x.shape[0]} rows, members {members}")
        rows = x.detach().cpu().to(torch.float64).numpy()
        self.scratch_dir.mkdir(parents=True, exist_ok=True)
        call_dir = Path(tempfile.mkdtemp(prefix="enkg-call-", dir=self.scratch_dir))
        self._aborting = False
        runs = self._run_all(call_dir, members, rows)
        self.last_failures = {m: r.detail for m, r in zip(members, runs) if r.reason is not None}
        self._clean(call_dir, members, runs)
        psi = torch.full((len(runs), self.obs_size), float("nan"), dtype=x.dtype)
        for i, r in enumerate(runs):
            if r.psi is not None:
                psi[i] = torch.from_numpy(r.psi)
        ok = torch.tensor([r.reason is None for r in runs], dtype=torch.bool)
        return ForwardResult(psi.to(x.device), ok.to(x.device), [r.reason for r in runs])

    def _run_all(self, call_dir: Path, members: list[int], rows: np.ndarray) -> list[MemberRun]:
        """Each member's run, in row order, with at most max_parallel programs at once."""
        def work(i: int) -> MemberRun:
            return self._run_member(call_dir / str(members[i]), members[i], rows[i])

        workers = min(self.max_parallel, len(members))
        if workers <= 1:
            return [work(i) for i in range(len(members))]
        pool = ThreadPoolExecutor(workers, thread_name_prefix="enkg-external")
        try:
            return list(pool.map(work, range(len(members))))
        except BaseException:  # e.g. Ctrl-C: the programs run in their own sessions and would not see it
            pool.shutdown(wait=False, cancel_futures=True)
            self._kill_live()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def argv(self, workdir: Path, member: int) -> tuple[list[str], dict[str, str]]:
        """The member's argv and its environment additions, placeholders substituted."""
        values = {"input": str(workdir / "input.npy"), "output": str(workdir / "output.npy"),
                  "workdir": str(workdir), "member": str(member), "ranks": str(self.ranks)}
        return ([substitute(a, values) for a in self.launcher + self.command],
                {k: substitute(str(v), values) for k, v in self.env.items()})

    def _run_member(self, workdir: Path, member: int, row: np.ndarray) -> MemberRun:
        workdir.mkdir()
        np.save(workdir / "input.npy", np.ascontiguousarray(row.reshape(self.state_shape), dtype=np.float64))
        argv, env = self.argv(workdir, member)
        with open(workdir / "stdout.txt", "wb") as out, open(workdir / "stderr.txt", "wb") as err:
            try:
                proc = subprocess.Popen(argv, cwd=self.cwd or workdir, env={**os.environ, **env}, shell=False,
                                        stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True)
            except OSError as e:  # FileNotFoundError, PermissionError, exec format error, ...
                reason = f"program not found or not executable: {argv[0]!r} ({e.strerror or e})"
                return self._failed(reason, argv, workdir, member)
            in_time = self._finish(proc)
        tail = stderr_tail(workdir / "stderr.txt")
        if not in_time:
            return self._failed(f"timeout after {self.timeout:g} s: process group killed", argv, workdir, member, tail)
        if proc.returncode != 0:
            return self._failed(f"{exit_status(proc.returncode)}: {one_line(tail)}", argv, workdir, member, tail)
        psi, reason = read_output(workdir / "output.npy", self.obs_size)
        if reason is not None:
            return self._failed(reason, argv, workdir, member, tail)
        return MemberRun(psi)

    def _finish(self, proc: subprocess.Popen) -> bool:
        """Wait for the program up to the timeout, then kill its whole process group and reap it; True if in time."""
        with self._lock:
            self._live[proc.pid] = proc
            if self._aborting:
                kill_group(proc.pid, signal.SIGKILL)
        try:
            in_time = wait_unreaped(proc, self.timeout)
            if not in_time:
                kill_group(proc.pid, signal.SIGTERM)  # lets an MPI launcher take its ranks down
                wait_unreaped(proc, self.kill_grace)
            return in_time
        finally:
            # the leader is not reaped yet, so its pid still names this group: SIGKILL whatever is left of it
            kill_group(proc.pid, signal.SIGKILL)
            with self._lock:
                self._live.pop(proc.pid, None)
            proc.wait()

    def _kill_live(self) -> None:
        """Kill every running program, and any that starts later in this call."""
        with self._lock:
            self._aborting = True
            for pid in list(self._live):
                kill_group(pid, signal.SIGKILL)

    def _failed(self, reason: str, argv: list[str], workdir: Path, member: int, tail: str = "") -> MemberRun:
        kept = self.keep_workdirs or self.keep_failed
        detail = (f"member {member}: {reason}\ncommand: {shlex.join(argv)}\n"
                  f"workdir: {workdir}{'' if kept else ' (removed)'}\n"
                  f"stderr (last {STDERR_LINES} lines):\n{tail}")
        return MemberRun(None, reason, detail)

    def _clean(self, call_dir: Path, members: list[int], runs: list[MemberRun]) -> None:
        """Remove the work directories of succeeded members (and failed ones unless keep_failed)."""
        if self.keep_workdirs:
            return
        for m, r in zip(members, runs):
            if r.reason is None or not self.keep_failed:
                shutil.rmtree(call_dir / str(m), ignore_errors=True)
        try:
            call_dir.rmdir()
        except OSError:
            pass  # it still holds kept failures


def wait_unreaped(proc: subprocess.Popen, timeout: float | None) -> bool:
    """Wait until the process exits (True) or the timeout passes (False), leaving it unreaped (a zombie)."""
    if not hasattr(os, "waitid"):  # no WNOWAIT here: reap it (a tiny race with pid reuse before killpg)
        try:
            proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = 0.001
    while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return False
        delay = min(2 * delay, 0.05)
        time.sleep(delay if left is None else min(delay, left))
    return True


def kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # nothing left in the group


def exit_status(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def stderr_tail(path: Path) -> str:
    """The last STDERR_LINES lines (at most STDERR_CHARS characters) of a file."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 16 * STDERR_CHARS))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-STDERR_LINES:])[-STDERR_CHARS:]


def one_line(text: str) -> str:
    """Multi-line text as one line: non-blank lines joined by ' | '."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " | ".join(lines) if lines else "(no stderr)"


def read_output(path: Path, m: int) -> tuple[np.ndarray | None, str | None]:
    """(psi (m,) float64, None), or (None, why not): missing, malformed or non-finite output."""
    npz = path.with_suffix(".npz")
    # np.savez(path) writes path + ".npz"
    found = next((p for p in (path, npz, path.with_name(path.name + ".npz")) if p.exists()), None)
    if found is None:
        return None, f"missing output: the program exited 0 but wrote neither {path.name} nor {npz.name}"
    try:
        with open(found, "rb") as f:
            head = f.read(6)
        if head != b"\x93NUMPY" and head[:4] != b"PK\x03\x04":  # else numpy would blame pickling
            return None, f"malformed output in {found.name}: not an .npy or .npz file (it starts with {head!r})"
        loaded = np.load(found, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                if "psi" not in loaded.files:
                    return None, f"malformed output in {found.name}: no array 'psi' (it has {loaded.files})"
                loaded = loaded["psi"]
    except Exception as e:  # anything np.load cannot read is the program's fault
        why = f"{type(e).__name__}: {one_line(str(e))}"
        return None, f"malformed output in {found.name}: not a loadable array ({why})"
    arr = np.asarray(loaded)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        return None, f"malformed output in {found.name}: dtype {arr.dtype} is not real numbers"
    if arr.size != m:
        return None, f"malformed output in {found.name}: {arr.size} values of shape {arr.shape}, expected {m}"
    psi = arr.astype(np.float64).reshape(m)
    bad = int((~np.isfinite(psi)).sum())
    if bad:
        return None, f"non-finite values in {found.name}: {bad} of {m}"
    return psi, None


def example_forward(n: int, k: int = 2, steps: int = 5, **kwargs) -> ExternalProgramForward:
    """G for enkg_dist.problems.example_program on an n x n grid, one Python process per member."""
    command = [sys.executable, "-m", "enkg_dist.problems.example_program", "{input}", "{output}",
               "--k", str(k), "--steps", str(steps)]
    return ExternalProgramForward(command, (1, n, n), len(range(0, n, k)) ** 2, **kwargs)

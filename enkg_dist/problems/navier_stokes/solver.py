"""Batched solve of 2D Navier–Stokes to time T, with a step rule per member, per batch ("paper") or fixed.

Step rule (the authors', enkg.md §4): dt = min(cfl h / max|u|, 0.5 h^2 / mu), last step clipped to land on T, with
h = 1/N (not the grid spacing 2 pi/N: 2 pi times more cautious), cfl = 0.5 and mu = nu sqrt(max|f|) (= 0.01 at
Re = 200 with f = -4 cos 4y; mu = nu without forcing). "per_member" applies it to each member's own max|u|, so a
member's trajectory does not depend on its batch-mates; "paper" takes the max over the batch, as the authors do.

Members are solved in lanes of `chunk` members (one batched FFT call per stage; members that reach T, blow up or
exhaust `max_steps` leave their lane). Each step costs 12 real FFTs (an unavoidable 5 per tendency evaluation, 2 for
the step rule's velocity, which is the unmasked field's and so cannot share the tendency's masked transforms), in 4
stacked transforms: the step rule's velocity comes out of the predictor's inverse transform (`kernels.look`);
spectra are k1-contiguous (`kernels.rfft2_k1`). A lane's step and look are one call (`kernels.lane_step`), on CPU
compiled by TorchScript, which runs it without holding the GIL. On CPU the lanes run on torch.get_num_threads()
threads (`lane_threads.py`), each computing with one intra-op thread: a member's bits depend on the members in its
lane (chunk) only, never on the thread count; with chunk=1 they depend on nothing but the member. In per-member and
fixed modes lanes run to T independently; in paper mode they advance in lock-step, the batch's step taken between
steps, and share the step's Crank–Nicolson factors. CPU solves run the same step in C (`fused.py`, built at first
use where a C compiler is found; the same bits): the whole lane step in one call where it binds torch's MKL, a member
at a time; else its elementwise passes, in one-thread solves from FUSED_FROM_N on.
On CPU a solve keeps freed memory in its process
(`enkg_dist.heap`): a lane's temporaries exceed malloc's mmap threshold, and would otherwise come back as fresh pages.
"""

from __future__ import annotations

import math
import threading
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from enkg_dist.heap import retain_freed_memory
from enkg_dist.problems.navier_stokes.equation import NavierStokes2D, k1_contiguous
from enkg_dist.problems.navier_stokes import fused, kernels
from enkg_dist.problems.navier_stokes.kernels import scripted
from enkg_dist.problems.navier_stokes.lane_threads import run_all, single_threaded_ops

MODES = ("per_member", "fixed", "paper")
LANDING_TOL = 1e-9  # a step within this fraction of dt of T is stretched to land on T (no sliver step)
LANE_BYTES = 8 << 20  # default lane on CPU: as many members as keep their ~20 work arrays within this
MAX_CHUNK = 64
C_STEP_LANES = 32  # the whole step in C: the most members a lane takes beyond the first rule's (default_chunk)
# the fused lane step (fused.py) runs every CPU solve where it binds MKL (one C call a lane step, no GIL: 1.2-1.9x
# the scripted kernel at 32^2-128^2, one and two threads); without MKL its transforms are torch calls between the C
# passes, and it runs one-thread solves from this grid on only: 8-20 % faster at 64^2 and 128^2, no faster at 32^2,
# and with lanes on two threads its Python glue queues for the GIL
FUSED_FROM_N = 64


@dataclass
class SolveResult:
    """omega (B, N, N): w(., T), NaN for failed members; steps (B,) steps each member took; ok (B,); reasons[b] why
    member b failed (None if it reached T); t (B,) time reached; batch_steps: the most steps any member took (the
    lock-step rounds in paper and fixed modes)."""

    omega: torch.Tensor
    steps: torch.Tensor
    ok: torch.Tensor
    reasons: list[str | None]
    t: torch.Tensor
    batch_steps: int

    @property
    def member_steps(self) -> int:
        """Total member-steps: the work done, in single-member step units."""
        return int(self.steps.sum())


def step_viscosity(eq: NavierStokes2D) -> float:
    """mu = nu sqrt(max|f|) with forcing, nu without: the authors' viscous step-limit constant."""
    return eq.nu * (math.sqrt(abs(eq.forcing_amplitude)) if eq.forcing_amplitude else 1.0)


def cfl_step(max_speed: torch.Tensor, h: float, mu: float, cfl: float = 0.5) -> torch.Tensor:
    """dt = min(cfl h / max|u|, 0.5 h^2 / mu), elementwise (max|u| = 0 gives the viscous limit)."""
    return torch.minimum(cfl * h / max_speed.to(torch.float64), torch.tensor(0.5 * h * h / mu, dtype=torch.float64,
                                                                              device=max_speed.device))


def _cfl_steps(speeds: list[float], h: float, mu: float, cfl: float) -> list[float]:
    """cfl_step on a list of float64 speeds, in Python floats (the same IEEE double operations)."""
    viscous = 0.5 * h * h / mu
    return [min(cfl * h / s, viscous) if s != 0 else viscous for s in speeds]  # NaN speed -> NaN step


def default_chunk(n: int, dtype: torch.dtype, whole_step_in_c: bool = False) -> int:
    """Members per lane on CPU: the largest power of two (1..MAX_CHUNK) whose ~20 real n x n work arrays per member
    fit in LANE_BYTES. Small grids batch to spread the per-call overhead; larger lanes fall out of cache. Measured
    with freed memory retained (the solver's default), one thread, float32, member-steps/s by members per lane:
    128^2 paper mode 1709 / 1981 / 2163 / 1933 / 1646 for 1 / 2 / 4 / 8 / 16 in one run, 2 and 4 within noise of
    each other in six alternating rounds (0.84-1.19); 64^2 per-member steps 5962 / 7357 / 8184 / 7562 for 4 / 8 /
    16 / 32, and 16 ahead of 8 by 10 % in a second session.

    The whole step in C (`whole_step_in_c`) works a member at a time in one member's scratch: only the lane's state
    (~8 arrays a member) counts. Float32, one thread, seconds by members per lane: 128^2, 16 members, paper mode
    1.95 / 1.87 / 1.80 for 4 / 8 / 16, per-member 1.56 / 1.47 / 1.47; 32 members, per-member 1.55 / 1.57 / 1.69
    for 8 / 16 / 32; 64^2, 64 members 2.18 / 2.06 / 1.96 / 1.97 for 8 / 16 / 32 / 64; 32^2 0.78 / 0.67 / 0.63 /
    0.61. Those lanes stop at C_STEP_LANES where the first rule's are not larger: 64 at 64^2 ran no faster than 32,
    and `batch_invariant`'s check of every size up to it took 1.83 s against 0.51 s. `resolve_chunk` gives each
    thread a lane at least."""
    size = torch.empty((), dtype=dtype).element_size()

    def fit(arrays: int) -> int:
        return max(1, min(MAX_CHUNK, 2 ** int(math.log2(max(LANE_BYTES // (arrays * n * n * size), 1)))))

    return max(fit(20), min(fit(8), C_STEP_LANES)) if whole_step_in_c else fit(20)


AUTO = "auto"
_CHECKED: dict[tuple, bool] = {}  # batch_invariant's verdicts in this process
_checked_lock = threading.Lock()


def batch_invariant(eq: NavierStokes2D, chunk: int, mode: str = "per_member", dt: float | None = None) -> bool:
    """Whether lanes of up to `chunk` members give every member the bits it gets alone (chunk=1), on this machine:
    a few steps of `chunk` smooth random fields, each alone and in a batch of every size 1..chunk (the sizes a lane
    takes as its members land), compared bit for bit. Batched FFT and vector kernels may differ at round-off from
    single ones on some CPUs (measured: AVX-512), so this is checked, not assumed. Once per (equation, chunk, mode)
    in a process; paper mode couples the batch's members through its step, so it is not checked (False)."""
    if mode == "paper" or chunk <= 1:
        return chunk <= 1
    key = (eq.n, eq.Re, eq.forcing_amplitude, eq.forcing_wavenumber, eq.dealias, eq.dtype, str(eq.device), chunk,
           mode, dt)
    with _checked_lock:
        if key not in _CHECKED:
            _CHECKED[key] = _same_bits_batched(eq, chunk, mode, dt)
        return _CHECKED[key]


def _same_bits_batched(eq: NavierStokes2D, chunk: int, mode: str, dt: float | None) -> bool:
    """batch_invariant's check (members of unequal speeds: they land at different steps and the lanes shrink)."""
    g = torch.Generator().manual_seed(20241130)
    noise = torch.randn(chunk, eq.n, eq.n, generator=g, dtype=torch.float64)
    w_hat = torch.fft.rfft2(noise) * eq.inv_lap.to(torch.float64).cpu()  # a smooth field: amplitude ~ 1/|k|^2
    w = torch.fft.irfft2(w_hat, s=(eq.n, eq.n))
    w0 = (w * (torch.linspace(3.0, 9.0, chunk, dtype=torch.float64) / w.std(dim=(-2, -1)))[:, None, None])
    w0 = w0.to(device=eq.device, dtype=eq.dtype)
    h = 1.0 / eq.n
    dt0 = dt if mode == "fixed" else float(cfl_step(eq.max_speed(eq.fft(w0[:1])), h, step_viscosity(eq))[0])
    T = 1.5 * dt0  # 2 steps for the slowest member, more for the faster ones
    kw = dict(mode=mode, equation=eq, dt=dt, max_steps=64, threads=1)
    alone = [solve(w0[i : i + 1], T, chunk=1, **kw) for i in range(chunk)]
    for b in range(1, chunk + 1):
        batched = solve(w0[:b], T, chunk=b, **kw)
        for i in range(b):
            if not (torch.equal(batched.steps[i : i + 1], alone[i].steps)
                    and torch.allclose(batched.omega[i], alone[i].omega[0], rtol=0, atol=0, equal_nan=True)):
                return False
    return True


def resolve_chunk(chunk: int | str | None, eq: NavierStokes2D, mode: str, dt: float | None, batch: int,
                  threads: int = 1, whole_step_in_c: bool = False) -> int:
    """Members per lane: chunk as given; None: `default_chunk`, with the whole step in C (`whole_step_in_c`) at most
    the batch's share of each of `threads` threads (two threads with 16 members, paper mode at 128^2: lanes of 4 / 8
    1.20 / 1.09 s, per-member 0.89 / 0.78 s; the whole batch off the CPU); "auto": that where `batch_invariant` finds
    lanes up to the default give chunk=1's bits on this machine, else 1 (the whole batch off the CPU). The check covers
    every lane size up to the default, so one check per process serves every batch size."""
    if chunk is None or chunk == AUTO:
        if eq.device.type != "cpu":
            return max(batch, 1)
        k = default_chunk(eq.n, eq.dtype, whole_step_in_c)
        use = max(1, min(k, -(-batch // max(threads, 1)))) if whole_step_in_c else k
        return use if chunk is None or batch_invariant(eq, k, mode, dt) else 1
    if not (isinstance(chunk, int) and chunk >= 1):
        raise ValueError(f"chunk must be a positive integer, None or {AUTO!r}, got {chunk!r}")
    return chunk


def whole_step_in_c(eq: NavierStokes2D, tracked: bool = False) -> bool:
    """Whether a solve of eq runs the whole lane step in C (`fused.lane_step` with MKL bound): on CPU, not under
    autograd (`tracked`), where the fused library is usable for eq's grid and dtype and binds MKL."""
    return (not tracked and eq.device.type == "cpu" and fused.usable(eq.n, eq.dtype, eq.device)
            and fused.mkl_bound())


def _default_equation(omega: torch.Tensor, mode: str) -> NavierStokes2D:
    return NavierStokes2D(omega.shape[-1], dealias="disc" if mode == "paper" else "two_thirds", dtype=omega.dtype,
                          device=omega.device)


class _Lane:
    """Members solved together, one batched FFT call per stage: their state, times, step counts, and what was found
    so far (w(T) of the members that landed, reasons of those that failed). Pending n1 / speed: N(w) and max|u| at
    the current state, computed at the end of the previous step (the next step's predictor and step rule)."""

    def __init__(self, members: list[int], w_hat: torch.Tensor, eq: NavierStokes2D, adaptive: bool, lane_kernels,
                 factors: _StepFactors):
        self.members, self.w_hat, self.eq, self.adaptive, self._factors = members, w_hat, eq, adaptive, factors
        self._step_kernel, self._look_kernel = lane_kernels  # kernels.lane_step and kernels.look, scripted or not
        self.t = [0.0] * len(members)
        self.steps = [0] * len(members)
        self.finished: list[tuple[int, torch.Tensor | None, int, float, str | None]] = []
        self._consts = eq.kernel_constants(adaptive)
        self.n1 = self.speed = None
        self._look()

    def _look(self) -> None:
        """N(w) (and max|u| when the step is adaptive) at the current state."""
        _, look_mult, flux_mult, f_mode, kf, n = self._consts
        self.n1, self.speed = self._look_kernel(self.w_hat, look_mult, flux_mult, f_mode, kf, n)

    def speeds(self) -> list[float]:
        """max|u| per member as float64 (NaN or inf: the velocity is not finite): sqrt in the field's dtype."""
        return self.speed.tolist()  # float32 values are exact as Python floats

    def advance(self, steps: list[float], bad_speed: list[bool], T: float, max_steps: int) -> None:
        """One step of every member by its dt (landing on T when within LANDING_TOL), then who leaves and why."""
        last, dts = [], []
        for i, dt in enumerate(steps):
            rem = T - self.t[i]
            land = rem <= dt * (1 + LANDING_TOL)
            last.append(land)
            dts.append(rem if land else dt)
        one = all(d == dts[0] for d in dts)  # one member, or paper mode: a float, no per-member factors
        per_member = None if one else torch.tensor(dts, dtype=self.eq.dtype, device=self.w_hat.device)[:, None, None]
        e, g = self._factors(dts[0] if one else 0.0, per_member)
        self.w_hat, self.n1, self.speed, sums = self._step_kernel(self.w_hat, self.n1, e, g, *self._consts)
        finite = _finite_rows(self.w_hat, sums)
        keep, leaving = [], []
        for i in range(len(self.members)):
            self.t[i] = T if last[i] else self.t[i] + dts[i]
            self.steps[i] += 1
            bad = bad_speed[i] or not finite[i]
            over = not last[i] and self.steps[i] >= max_steps
            if not (bad or last[i] or over):
                keep.append(i)
                continue
            at = f"at step {self.steps[i]} (t={self.t[i]:.4g})"
            if bad:
                reason = f"non-finite {'velocity' if bad_speed[i] else 'vorticity'} {at}"
            elif over:
                reason = f"step budget exhausted: {max_steps} steps reached only t={self.t[i]:.4g} < T={T:g}"
            else:
                reason = None
            leaving.append((i, reason))
        if not leaving:
            return  # the step's kernel looked at the new state already
        landed = [i for i, reason in leaving if reason is None]
        omega = self.eq.ifft(self.w_hat[landed]) if landed else None
        for i, reason in leaving:
            field = omega[landed.index(i)] if reason is None else None
            self.finished.append((self.members[i], field, self.steps[i], self.t[i], reason))
        self.members = [self.members[i] for i in keep]
        self.t = [self.t[i] for i in keep]
        self.steps = [self.steps[i] for i in keep]
        self.w_hat = k1_contiguous(self.w_hat[keep])
        if keep:
            self._look()


class _StepFactors:
    """`kernels.cn_factors` for a solve's lanes, those of the last single dt kept: in paper and fixed modes every lane
    takes the same step, so one computation serves them all (the same bits as each lane's own)."""

    def __init__(self, half_viscous_c: torch.Tensor, kernel):
        self.half_viscous_c, self.kernel = half_viscous_c, kernel
        self.last: tuple | None = None  # (dt, e, g); replaced whole, so lane threads may share it

    def __call__(self, dt: float, dts: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if dts is not None:
            return self.kernel(self.half_viscous_c, 0.0, dts)
        last = self.last
        if last is None or last[0] != dt:
            last = (dt, *self.kernel(self.half_viscous_c, dt, None))
            self.last = last
        return last[1], last[2]


def _finite_rows(w_hat: torch.Tensor, sums: torch.Tensor) -> list[bool]:
    """Whether each member's field is finite, from the sum per member of its real and imaginary parts, confirmed
    elementwise where that is not finite (a sum of finite values can overflow)."""
    finite = [math.isfinite(x) for x in sums.tolist()]  # a torch op here cost 2 % of a 128^2 step
    for i, ok in enumerate(finite):
        if not ok:
            finite[i] = bool(torch.isfinite(torch.view_as_real(w_hat[i])).all())
    return finite


def solve(omega0: torch.Tensor, T: float = 1.0, *, mode: str = "per_member", equation: NavierStokes2D | None = None,
          dt: float | None = None, cfl: float = 0.5, h: float | None = None, max_steps: int = 100_000,
          chunk: int | str | None = None, threads: int | None = None) -> SolveResult:
    """w(., T) from w(., 0) = omega0 (B, N, N), float32 or float64, on omega0's device.

    mode "per_member" | "paper" use the step rule above; "fixed" uses the given dt. The default equation is Re = 200,
    f = -4 cos 4y, with 2/3-rule dealiasing, or the authors' disc mask in "paper" mode; a given `equation` is used as
    is (cast to omega0's dtype and device). A member is failed, with a reason, when its field is or becomes
    non-finite or when it has taken `max_steps` steps without reaching T; the others carry on. chunk: members per
    lane, i.e. per FFT call (default `default_chunk` on CPU, the whole batch elsewhere); chunk=1 makes each member's
    bits independent of the batch, and "auto" the default where that gives chunk=1's bits here (`resolve_chunk`).
    threads: CPU threads to spread the lanes over (default torch.get_num_threads()); results do not depend on it.
    """
    if mode not in MODES:
        raise ValueError(f"unknown step mode {mode!r}; choose one of {MODES}")
    if mode == "fixed" and not (dt is not None and dt > 0):
        raise ValueError(f"mode 'fixed' needs a positive dt, got {dt}")
    if omega0.ndim != 3 or omega0.shape[-1] != omega0.shape[-2]:
        raise ValueError(f"omega0 must be (B, N, N), got {tuple(omega0.shape)}")
    if not omega0.is_floating_point() or omega0.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"omega0 must be float32 or float64, got {omega0.dtype}")
    eq = (equation or _default_equation(omega0, mode)).to(omega0.dtype, omega0.device)
    if eq.n != omega0.shape[-1]:
        raise ValueError(f"equation is for {eq.n}^2 grids, omega0 is {omega0.shape[-1]}^2")
    h = 1.0 / eq.n if h is None else float(h)
    cpu = omega0.device.type == "cpu"
    if cpu:
        retain_freed_memory()  # a lane's temporaries exceed malloc's mmap threshold: page faults on every op otherwise
    threads = (threads or torch.get_num_threads()) if cpu else 1
    # under autograd the kernels run eager (see below), never the C step
    tracked = torch.is_grad_enabled() and omega0.requires_grad
    whole_c = whole_step_in_c(eq, tracked)
    chunk = resolve_chunk(chunk, eq, mode, dt, omega0.shape[0], threads, whole_c)
    mu = step_viscosity(eq)
    T = float(T)
    if not T >= 0:
        raise ValueError(f"T must be >= 0, got {T}")

    B, dev = omega0.shape[0], omega0.device
    out = torch.full_like(omega0, float("nan"))
    t = torch.zeros(B, dtype=torch.float64, device=dev)
    steps = torch.zeros(B, dtype=torch.long, device=dev)
    reasons: list[str | None] = [None] * B
    finite0 = torch.isfinite(omega0).all(dim=(-2, -1)).tolist()
    for b, fin in enumerate(finite0):
        if not fin:
            reasons[b] = "non-finite initial vorticity"
    active = [b for b in range(B) if finite0[b]]
    if T == 0:
        out[active] = omega0[active]
        active = []
    groups = [active[i : i + chunk] for i in range(0, len(active), chunk)]
    lanes: list[_Lane] = [None] * len(groups)
    adaptive = mode != "fixed"

    # CPU lanes run the TorchScript kernels (no GIL between lane threads), compiled here before any lane thread
    # starts; a GPU runs one lane, eager (TorchScript's GPU fusers would change the arithmetic). Under autograd the
    # kernels run eager: TorchScript's autodiff runs a graph with requires_grad False inside, so the inverse FFT's
    # CPU branch (out=, not differentiable) dropped gradients whenever a process's first scripted call was tracked;
    # the C step has no backward at all
    script = cpu and not tracked
    lane_kernels = (kernels.lane_step, kernels.look)
    if script:
        lane_kernels = (scripted(kernels.lane_step), scripted(kernels.look))
    if whole_c or (not tracked and threads == 1 and eq.n >= FUSED_FROM_N
                   and fused.usable(eq.n, eq.dtype, omega0.device)):
        lane_kernels = (fused.lane_step, lane_kernels[1])  # the same bits, in C
    factor_kernel = scripted(kernels.cn_factors) if script else kernels.cn_factors
    if lane_kernels[0] is fused.lane_step:
        factor_kernel = fused.cn_factors  # one C pass for torch's five, the same bits
    factors = _StepFactors(eq.half_viscous_c, factor_kernel)

    def start(k: int) -> None:
        lanes[k] = _Lane(groups[k], eq.fft(omega0[groups[k]], k1_contiguous=True), eq, adaptive, lane_kernels, factors)

    def rule(lane: _Lane) -> tuple[list[float], list[bool]]:
        """This lane's own steps and non-finite-speed flags (per-member rule, or the fixed dt)."""
        if not adaptive:
            return [float(dt)] * len(lane.members), [False] * len(lane.members)
        speeds = lane.speeds()
        return _cfl_steps(speeds, h, mu, cfl), [not math.isfinite(s) for s in speeds]

    def run_lane(k: int) -> None:
        start(k)
        lane = lanes[k]
        while lane.members:
            lane.advance(*rule(lane), T, max_steps)

    with single_threaded_ops() if cpu else nullcontext():
        if mode != "paper":
            run_all([lambda k=k: run_lane(k) for k in range(len(groups))], threads)
        else:
            run_all([lambda k=k: start(k) for k in range(len(groups))], threads)
            while any(lane.members for lane in lanes):
                live = [lane for lane in lanes if lane.members]
                rules = [rule(lane) for lane in live]
                good = [s for st, bad in rules for s, b in zip(st, bad) if not b]
                batch_dt = min(good) if good else None  # one step for the whole batch: its fastest member sets it
                run_all([lambda lane=lane, st=st, bad=bad: lane.advance(
                    [batch_dt if batch_dt is not None else s for s in st], bad, T, max_steps)
                    for lane, (st, bad) in zip(live, rules)], threads)

    for lane in lanes:
        for member, omega, n_steps, t_end, reason in lane.finished:
            steps[member], t[member], reasons[member] = n_steps, t_end, reason
            if omega is not None:
                out[member] = omega
    ok = torch.tensor([r is None for r in reasons], dtype=torch.bool, device=dev)
    return SolveResult(out, steps, ok, reasons, t, int(steps.max()) if B else 0)


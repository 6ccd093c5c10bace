"""The solver's inner loop as free functions of tensors: k1-contiguous FFTs, the tendency from stacked spectra, the
Heun/Crank–Nicolson step (integrator.py) and a lane's whole step, written in the TorchScript subset.

`NavierStokes2D`, `heun_cn_step`, the MPI solver's ranks and the solver's lanes all call these, so there is one copy
of the arithmetic.
`scripted(fn)` is the same function compiled by TorchScript: the same aten ops in the same order (bit for bit the
eager results, tested), run by the C++ interpreter, which does not hold the GIL. A lane step is ~45 torch ops; in eager
mode each takes the GIL for a few microseconds, so lanes on two threads queue for it (measured: two threads slower
than one on small grids). Set ENKG_NS_SCRIPT=0, or run where TorchScript is unavailable, to use the eager functions.
"""

from __future__ import annotations

import functools
import os
import threading
import warnings
from typing import Optional, Tuple

import torch


def rfft2_k1(w: torch.Tensor) -> torch.Tensor:
    """rfft2 over the last two axes, laid out with k1 (axis -2) contiguous: rfft along y, one transposing copy, fft
    along x (torch's rfft2 transposes twice, in its own copies, and then runs MKL along strided columns)."""
    a = torch.fft.rfft(w, dim=-1)
    return torch.fft.fft(a.transpose(-1, -2).contiguous(), dim=-1).transpose(-1, -2)


def irfft2_k1(w_hat: torch.Tensor, n: int, scaled: bool = True) -> torch.Tensor:
    """irfft2 over the last two axes of a k1-contiguous spectrum: ifft along x, one transposing copy, irfft along y.
    scaled=False leaves out the 1/n^2 (the caller folded it into its multipliers: one pass less per transform, and
    the same bits when n is a power of two). On CPU the ifft writes rows padded to n + 8: the transposing copy then
    reads them at a stride that is not a power of two (at n = 128 it is 2.4 times faster, cache-set conflicts);
    not under autograd, which does not differentiate out= arguments."""
    norm = "backward" if scaled else "forward"
    a = w_hat.transpose(-1, -2)  # (..., n//2+1, n): k2 rows, k1 contiguous
    if w_hat.is_cuda or w_hat.requires_grad:
        z = torch.fft.ifft(a, dim=-1, norm=norm)
    else:
        z = torch.empty(list(a.shape[:-1]) + [n + 8], dtype=a.dtype, device=a.device).narrow(-1, 0, n)
        torch.fft.ifft(a, dim=-1, norm=norm, out=z)
    return torch.fft.irfft(z.transpose(-1, -2).contiguous(), n=n, dim=-1, norm=norm)


def tendency_from_spectra(spec: torch.Tensor, flux_mult: torch.Tensor, f_mode: float, kf: int, n: int
                          ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """N(w_hat) = -F[div(u w)] + f_hat from the spectra (..., K, n, n//2+1) of masked w, u, v, and max(u^2 + v^2)
    per member over fields 4-5 (the unmasked velocity) when K = 5, the spectra scaled by 1/n^2 (the inverse FFT's
    normalisation, which the multipliers that make them carry). f_mode: the forcing's one mode, at (0, kf)."""
    fields = irfft2_k1(spec, n, False)  # (..., K, n, n); the multipliers carry the 1/n^2
    flux = fields[..., 1:3, :, :] * fields[..., 0:1, :, :]  # (u w, v w)
    flux_hat = rfft2_k1(flux).mul_(flux_mult)  # (-d/dx F[u w], -d/dy F[v w])
    nonlin = flux_hat.select(-3, 0).add_(flux_hat.select(-3, 1))
    if f_mode != 0.0:
        nonlin.select(-2, 0).select(-1, kf).add_(f_mode)
    if spec.shape[-3] == 3:
        return nonlin, None
    uv = fields[..., 3:5, :, :]
    return nonlin, (uv * uv).sum(dim=[-3]).amax(dim=[-2, -1])


def cn_factors(half_viscous_c: torch.Tensor, dt: float, dts: Optional[torch.Tensor]
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The Crank–Nicolson factors of a step (integrator.py): e = 2q - 1 and g = dt q with q = 1/(1 - dt L/2); dt one
    float for all members, or dts (B, 1, 1) per member. Members sharing one dt share them (paper mode: every lane)."""
    # complex factors: a complex x real product casts its real factor, one more pass
    if dts is None:
        q = torch.reciprocal_(1 - half_viscous_c * dt)
    else:
        q = torch.reciprocal_(1 - half_viscous_c * dts)
    e = q.mul(2).sub_(1)
    if dts is None:
        g = q.mul_(dt)
    else:
        g = q.mul_(dts)
    return e, g


def heun_cn(w_hat: torch.Tensor, n1: torch.Tensor, e: torch.Tensor, g: torch.Tensor, tendency_mult: torch.Tensor,
            flux_mult: torch.Tensor, f_mode: float, kf: int, n: int) -> torch.Tensor:
    """One Heun/Crank–Nicolson step (integrator.py): w~ = e w_n + g N(w_n), w_{n+1} = e w_n + (g/2)(N(w_n) + N(w~)),
    with the step's factors e, g (`cn_factors`)."""
    ew = w_hat * e
    n2 = tendency_from_spectra(torch.addcmul(ew, g, n1).unsqueeze(-3) * tendency_mult, flux_mult, f_mode, kf, n)[0]
    return ew.addcmul_(g, n1.add_(n2), value=0.5)


def look(w_hat: torch.Tensor, look_mult: torch.Tensor, flux_mult: torch.Tensor, f_mode: float, kf: int, n: int
         ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(N(w_hat), max|u| per member) at a state, from one stacked inverse FFT (look_mult: the 5 multipliers to masked
    w, u, v and unmasked u, v); max|u| is None when look_mult stacks only the tendency's 3."""
    n1, s2 = tendency_from_spectra(w_hat.unsqueeze(-3) * look_mult, flux_mult, f_mode, kf, n)
    return n1, (s2.sqrt() if s2 is not None else None)


def lane_step(w_hat: torch.Tensor, n1: torch.Tensor, e: torch.Tensor, g: torch.Tensor, tendency_mult: torch.Tensor,
              look_mult: torch.Tensor, flux_mult: torch.Tensor, f_mode: float, kf: int, n: int
              ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """A lane's step by the factors e, g (`cn_factors`) and its look at the new state: (w_{n+1}, N(w_{n+1}), max|u|
    per member at w_{n+1} or None, the sum of each member's real and imaginary parts, for the finite check)."""
    w = heun_cn(w_hat, n1, e, g, tendency_mult, flux_mult, f_mode, kf, n)
    n1_next, speed = look(w, look_mult, flux_mult, f_mode, kf, n)
    return w, n1_next, speed, torch.view_as_real(w).sum(dim=[-3, -2, -1])


def use_script() -> bool:
    """Whether the solver runs its scripted kernels (ENKG_NS_SCRIPT, default on)."""
    return os.environ.get("ENKG_NS_SCRIPT", "1") != "0"


def scripted(fn):
    """fn compiled by TorchScript (once per process), or fn itself when TorchScript is off or cannot compile it.
    Not for inputs that require grad: TorchScript's autodiff runs the graph with requires_grad False inside, so
    irfft2_k1's out= branch would drop their gradients (solve() runs the eager kernels for them)."""
    return _compiled(fn) if use_script() else fn


@functools.cache
def _compiled(fn):
    with _compile_lock:
        return _compile(fn)


_compile_lock = threading.Lock()


def _compile(fn):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.x marks torch.jit deprecated; it still runs
            return torch.jit.script(fn)
    except Exception as e:  # noqa: BLE001 - a torch without TorchScript: the eager function is the same arithmetic
        first = (str(e).strip().splitlines() or [""])[0]
        warnings.warn(f"TorchScript could not compile {fn.__name__} ({type(e).__name__}: {first}); using the eager "
                      "kernel", RuntimeWarning, stacklevel=3)
        return fn

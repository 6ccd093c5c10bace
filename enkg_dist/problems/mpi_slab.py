"""The slab decomposition of the MPI Navier–Stokes solver (mpi_navier_stokes.py): 2D real FFTs of a field whose rows
are split over MPI ranks (`SlabFFT`, Alltoall transposes) and the right-hand side and Heun/Crank–Nicolson step on a
rank's spectral slab (`SlabNavierStokes`), with the serial solver's arithmetic: torch ops, or its fused C loops, or
the whole local work between Alltoalls in C (`c_step`, fused_source.py's slab functions), all with the same bits.
mpi4py is imported lazily, inside the calls that need it.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from enkg_dist.problems.navier_stokes import fused
from enkg_dist.problems.navier_stokes.equation import k1_contiguous
from enkg_dist.problems.navier_stokes.kernels import cn_factors

DEALIAS = ("disc", "two_thirds")


class SlabFFT:
    """2D real FFTs of a field whose rows are split over the ranks of `comm`; batched over leading axes (torch).

    forward: (B, Nl, N) real -> (B, N, Kl) complex (all k1, this rank's k2 block)
    inverse: (B, N, Kl) complex -> (B, Nl, N) real
    """

    def __init__(self, comm, n: int):
        self.comm, self.n = comm, int(n)
        self.size, self.rank = comm.Get_size(), comm.Get_rank()
        if self.n % self.size:
            raise ValueError(f"grid size {n} is not divisible by the number of ranks {self.size}")
        self.nl = self.n // self.size  # rows per rank
        self.nk = self.n // 2 + 1  # rfft columns
        self.kl = -(-self.nk // self.size)  # k2 columns per rank (padded)
        self.kp = self.kl * self.size
        self.k2_lo = self.rank * self.kl  # this rank's first k2 column
        self._row_types: dict = {}  # B -> the MPI datatype of `_rows`
        self.lib = None  # the fused C library (set by SlabNavierStokes where it is used): its transposing copies

    def _transposed(self, a: torch.Tensor) -> torch.Tensor:
        """a.transpose(-1, -2).contiguous() for contiguous a: by the C library's tiled copy where set."""
        return a.transpose(-1, -2).contiguous() if self.lib is None else fused.transposed(a)

    @staticmethod
    def layout(t: torch.Tensor) -> torch.Tensor:
        """t (..., N, Kl) in the memory layout of the spectra: k1 contiguous (the serial solver's, see
        NavierStokes2D.fft), so that the column FFTs read and write without strides."""
        return k1_contiguous(t)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        """rfft along y, transpose, fft along x."""
        a = torch.fft.rfft(f, dim=-1)  # (B, nl, nk)
        if self.size == 1:  # the serial solver's transform: a local transpose in place of the Alltoall
            return torch.fft.fft(self._transposed(a), dim=-1).transpose(-1, -2)
        B, R, nl, kl = f.shape[0], self.size, self.nl, self.kl
        send = a.new_zeros((R, B, kl, nl)) if self.kp > self.nk else a.new_empty((R, B, kl, nl))
        for r in range(R):  # send[r]: the columns of rank r, transposed (padding columns stay zero)
            lo, hi = r * kl, min((r + 1) * kl, self.nk)
            if self.lib is not None and hi - lo == kl:  # the C library's tiled copy, from the rows' stride
                self.lib.transpose_f64(B, nl, kl, a.data_ptr() + lo * a.element_size(), self.nk, send[r].data_ptr())
            else:
                send[r, :, : hi - lo, :] = a[..., lo:hi].transpose(-1, -2)
        return torch.fft.fft(self.exchange_forward(send), dim=-1).transpose(-1, -2)  # (B, N, kl), k1 contiguous

    def exchange_forward(self, send: torch.Tensor, spec: torch.Tensor | None = None) -> torch.Tensor:
        """The forward's Alltoall: send (R, B, kl, nl) (rank r's columns, transposed) -> (B, kl, N) (this rank's
        columns, all rows; into `spec` where given); with one rank, send[0] itself."""
        if self.size == 1:
            return send[0]
        B = send.shape[1]
        spec = send.new_empty((B, self.kl, self.n)) if spec is None else spec
        # rank s's rows land straight in columns s nl .. (s+1) nl of every (field, k2) row: no unpacking copy
        self.comm.Alltoall([send.numpy(), B * self.kl * self.nl, mpi_constant("C_DOUBLE_COMPLEX")],
                           [spec.numpy(), 1, self._rows(B)])
        return spec

    def exchange_inverse(self, a: torch.Tensor, recv: torch.Tensor | None = None) -> torch.Tensor:
        """The inverse's Alltoall: a (B, kl, N) contiguous -> recv (R, B, kl, nl) (rank s's columns, this rank's rows;
        into `recv` where given); with one rank, a itself as (1, B, kl, N)."""
        B = a.shape[0]
        if self.size == 1:
            return a[None]
        recv = a.new_empty((self.size, B, self.kl, self.nl)) if recv is None else recv
        # rank r's rows go straight from columns r nl .. (r+1) nl of every (field, k2) row: no packing copy
        self.comm.Alltoall([a.numpy(), 1, self._rows(B)],
                           [recv.numpy(), B * self.kl * self.nl, mpi_constant("C_DOUBLE_COMPLEX")])
        return recv

    def inverse(self, s: torch.Tensor) -> torch.Tensor:
        """ifft along x, transpose, irfft along y."""
        a = torch.fft.ifft(s.transpose(-1, -2), dim=-1)  # (B, kl, N): x contiguous
        if self.size == 1:
            return torch.fft.irfft(self._transposed(a), n=self.n, dim=-1)
        recv = self.exchange_inverse(a.contiguous())  # recv[s] = (B, columns of rank s, my rows)
        half = recv.permute(1, 3, 0, 2).reshape(s.shape[0], self.nl, self.kp)
        return torch.fft.irfft(half if self.kp == self.nk else half[..., : self.nk], n=self.n, dim=-1)

    def _rows(self, B: int):
        """MPI datatype of one rank's share of B kl rows of length N: nl values per row, consecutive ranks' shares
        nl values apart (a vector type resized to nl values), so that Alltoall reads or writes them in place."""
        if B not in self._row_types:
            base = mpi_constant("C_DOUBLE_COMPLEX")
            vec = base.Create_vector(B * self.kl, self.nl, self.n)
            self._row_types[B] = vec.Create_resized(0, self.nl * base.Get_extent()[1]).Commit()
            vec.Free()
        return self._row_types[B]


class SlabNavierStokes:
    """The right-hand side of NavierStokes2D (equation.py) on this rank's spectral slab (N, Kl), float64."""

    def __init__(self, fft: SlabFFT, Re: float = 200.0, forcing_amplitude: float = 4.0, forcing_wavenumber: int = 4,
                 dealias: str = "disc"):
        if dealias not in DEALIAS:
            raise ValueError(f"unknown dealiasing {dealias!r}; choose one of {DEALIAS}")
        n = fft.n
        if forcing_amplitude and not 0 < forcing_wavenumber < n / 2:
            raise ValueError(f"forcing wavenumber {forcing_wavenumber} is not resolved on a {n}^2 grid")
        self.fft, self.n, self.Re, self.dealias = fft, n, float(Re), dealias
        self.forcing_amplitude, self.forcing_wavenumber = float(forcing_amplitude), int(forcing_wavenumber)
        f64 = torch.float64
        cols = torch.arange(fft.k2_lo, fft.k2_lo + fft.kl)
        valid = cols < fft.nk  # padding columns carry zero everything
        k1 = fft.layout(torch.fft.fftfreq(n, d=1.0 / n, dtype=f64)[:, None].expand(n, fft.kl))
        k2 = fft.layout(torch.where(valid, cols, 0).to(f64)[None, :].expand(n, fft.kl))
        k2_abs = k1**2 + k2**2
        inv_lap = torch.where(k2_abs > 0, 1.0 / k2_abs.clamp_min(1.0), 0.0)
        zn1 = torch.where(k1.abs() == n // 2, 0.0, k1) if n % 2 == 0 else k1
        zn2 = torch.where(k2.abs() == n // 2, 0.0, k2) if n % 2 == 0 else k2
        ik1, ik2 = 1j * zn1, 1j * zn2
        if dealias == "two_thirds":
            keep = (3 * k1.abs() < n) & (3 * k2.abs() < n)
        else:
            keep = k1**2 + k2**2 <= 2 * (n / 3) ** 2
        mask = keep.to(f64) * valid[None, :]
        if fft.k2_lo == 0:
            mask[0, 0] = 0.0
        self.f_mode = -self.forcing_amplitude * n * n / 2
        c = self.forcing_wavenumber - fft.k2_lo
        self.f_col = c if self.forcing_amplitude and 0 <= c < fft.kl else None
        # as NavierStokes2D: masked (w, u, v) for the tendency and unmasked (u, v) for the step rule, complex
        to_u, to_v = mask * inv_lap * ik2, -mask * inv_lap * ik1
        stack = lambda *ts: fft.layout(torch.stack(ts))  # noqa: E731
        self._tendency_mult = stack(mask.to(torch.complex128), to_u, to_v)
        self._first_mult = stack(mask.to(torch.complex128), to_u, to_v, inv_lap * ik2, -inv_lap * ik1)
        out_mask = mask if dealias == "two_thirds" else torch.ones_like(mask)
        self._flux_mult = stack(-out_mask * ik1, -out_mask * ik2)
        self.half_viscous_c = fft.layout(0.5 * (-(1.0 / self.Re) * k2_abs)).to(torch.complex128)  # L/2, L = nu Lap
        # the serial solver's fused C passes (fused.py) where they give the torch ops' bits: slabs of 16k values
        self.fused = (n * fft.kl % 16 == 0 and fft.nl * n % 16 == 0 and os.environ.get("ENKG_MPI_FUSED", "1") != "0"
                      and fused.usable(n, torch.float64, torch.device("cpu")))
        if self.fused:
            fft.lib = fused.library()
        # and the transforms too (one C call between Alltoalls) where MKL binds: `c_step`
        self.c_kernels = self.fused and fused.mkl_bound()
        self.fidx = self.f_col * n if self.f_col is not None else -1  # (k1 = 0, k2 = f_col), k1-contiguous layout
        self._bufs: _Buffers | None = None

    @property
    def nu(self) -> float:
        return 1.0 / self.Re

    def step_viscosity(self) -> float:
        """mu = nu sqrt(max|f|) with forcing, nu without (solver.step_viscosity)."""
        return self.nu * (math.sqrt(abs(self.forcing_amplitude)) if self.forcing_amplitude else 1.0)

    def tendency(self, w_hat: torch.Tensor, speed: bool = False) -> tuple[torch.Tensor, float | None]:
        """(N(w_hat) = -F[div(u w)] + f_hat on this rank's slab (N, Kl), and with speed=True the max of u^2 + v^2 over
        this rank's rows, from the same transpose: NavierStokes2D.tendency_and_max_speed2)."""
        fields = self.fft.inverse(w_hat.unsqueeze(0) * (self._first_mult if speed else self._tendency_mult))
        flux_hat = self.fft.forward(fields[1:3] * fields[0:1]).mul_(self._flux_mult)
        nonlin = flux_hat[0].add_(flux_hat[1])
        if self.f_col is not None:
            nonlin[0, self.f_col] += self.f_mode
        if not speed:
            return nonlin, None
        uv = fields[3:5]
        return nonlin, float((uv * uv).sum(dim=0).max())

    def fused_step(self, w_hat: torch.Tensor, dt: float, n1: torch.Tensor, look: bool
                   ) -> tuple[torch.Tensor, torch.Tensor | None, float | None, bool]:
        """`heun_cn_step` and, with look=True, `tendency(..., speed=True)` at the new state, the elementwise passes in
        the fused C loops (the same operations, so the same bits): (w_{n+1}, N(w_{n+1}) or None, this rank's
        max|u|^2 or None, whether this rank's w_{n+1} is not finite)."""
        lib, M = fused.library(), self.n * self.fft.kl
        e, g = fused.cn_factors(self.half_viscous_c, dt, None)
        w_hat, n1, e, g = (k1_contiguous(t) for t in (w_hat, n1, e, g))  # copies only where not dense
        fidx = self.fidx
        ew, spec = _slab_spectra(1, self.fft), _slab_spectra(3, self.fft)
        lib.predict_f64(1, M, w_hat.data_ptr(), e.data_ptr(), 0, g.data_ptr(), 0, n1.data_ptr(), 0,
                        self._tendency_mult.data_ptr(), ew.data_ptr(), spec.data_ptr())
        fh = self._fused_flux(lib, spec, None)
        lm = self._first_mult if look else self._tendency_mult
        w, spec = _slab_spectra(1, self.fft)[0], _slab_spectra(lm.shape[0], self.fft)
        bad = torch.empty(1, dtype=torch.float64)
        lib.correct_f64(1, M, lm.shape[0], fh.data_ptr(), self._flux_mult.data_ptr(), fidx, self.f_mode,
                        ew.data_ptr(), g.data_ptr(), 0, n1.data_ptr(), 0, lm.data_ptr(), w.data_ptr(),
                        spec.data_ptr(), bad.data_ptr())
        if not look:
            return w, None, None, bool(bad.isnan())
        s2 = torch.empty(1, dtype=torch.float64)
        fh = self._fused_flux(lib, spec, s2)
        n1_next = _slab_spectra(1, self.fft)[0]
        lib.tendency_f64(1, M, fh.data_ptr(), self._flux_mult.data_ptr(), fidx, self.f_mode, n1_next.data_ptr())
        return w, n1_next, float(s2), bool(bad.isnan())

    def c_step(self, w_hat: torch.Tensor, dt: float, n1: torch.Tensor, K: int
               ) -> tuple[torch.Tensor, torch.Tensor | None, float | None, bool]:
        """`fused_step` with this rank's transforms in C as well (MKL, planned as torch plans them, so the same bits;
        `c_kernels`), in buffers kept from step to step. K: the look's fields (5: N(w_{n+1}) and max|u|^2; 3:
        N(w_{n+1}); 0: neither, for the last step): (w_{n+1}, N(w_{n+1}), max|u|^2, whether w_{n+1} is not finite).
        With a look, max|u|^2 (NaN counted as inf) and the flag are already the maxima over the ranks: their
        Iallreduce overlaps the look's last Alltoall, so the step has no collective of its own; without, this rank's."""
        lib, b = fused.library(), self._buffers()
        e, g = fused.cn_factors(self.half_viscous_c, dt, None)
        w_hat, n1, e, g = (k1_contiguous(t) for t in (w_hat, n1, e, g))  # copies only where not dense
        lib.slab_predict(b.plans, *(t.data_ptr() for t in (w_hat, e, g, n1, self._tendency_mult, b.ew, b.spec, b.out)))
        flux = self._c_flux(lib, b, 3, False)
        w, lm = _slab_spectra(1, self.fft)[0], self._first_mult if K == 5 else self._tendency_mult
        lib.slab_correct(b.plans, K or 3, flux.data_ptr(), b.fh.data_ptr(), self._flux_mult.data_ptr(), self.fidx,
                         self.f_mode, *(t.data_ptr() for t in (b.ew, g, n1, lm, w, b.spec, b.out, b.bad)))
        bad = bool(b.bad.isnan())
        if not K:
            return w, None, None, bad
        pending = []

        def reduce() -> None:  # this rank's (max|u|^2, flag), reduced while the flux rows move
            s2 = float(b.s2) if K == 5 else 0.0
            b.reduced[:] = (s2 if math.isfinite(s2) else math.inf, float(bad))
            if self.fft.size > 1:
                pending.append(self.fft.comm.Iallreduce(mpi_constant("IN_PLACE"), b.reduced, op=mpi_constant("MAX")))

        flux = self._c_flux(lib, b, K, K == 5, reduce)
        n1_next = _slab_spectra(1, self.fft)[0]
        lib.slab_tendency(b.plans, flux.data_ptr(), b.fh.data_ptr(), self._flux_mult.data_ptr(), self.fidx,
                          self.f_mode, n1_next.data_ptr())
        for request in pending:
            request.Wait()
        return w, n1_next, (float(b.reduced[0]) if K == 5 else None), bool(b.reduced[1])

    def _c_flux(self, lib, b: "_Buffers", K: int, speed: bool, before_exchange=None) -> torch.Tensor:
        """The rows of the flux spectra (2, kl, N), before their last transform, from the K fields' first inverse
        stage in b.out: Alltoall, the products (this rank's max|u|^2 into b.s2 with speed), `before_exchange()`,
        Alltoall."""
        R, kl, nl = self.fft.size, self.fft.kl, self.fft.nl
        recv = self.fft.exchange_inverse(b.out[:K], b.recv[: R * K * kl * nl].view(R, K, kl, nl) if R > 1 else None)
        lib.slab_flux(b.plans, K, recv.data_ptr(), *(t.data_ptr() for t in (b.half, b.fields, b.fl, b.a, b.send)),
                      b.s2.data_ptr() if speed else None)
        if before_exchange is not None:
            before_exchange()
        return self.fft.exchange_forward(b.send, b.flux)

    def _buffers(self) -> "_Buffers":
        if self._bufs is None:
            self._bufs = _Buffers(self.fft)
        return self._bufs

    def _fused_flux(self, lib, spec: torch.Tensor, s2: torch.Tensor | None) -> torch.Tensor:
        """The spectra of (u w, v w) from the stacked spectra of (w, u, v[, U, V]); max(U^2 + V^2) into s2."""
        fields = self.fft.inverse(spec).contiguous()
        flux = torch.empty(2, self.fft.nl, self.n, dtype=torch.float64)
        lib.product_f64(1, self.fft.nl * self.n, spec.shape[0], fields.data_ptr(), flux.data_ptr(),
                        s2.data_ptr() if s2 is not None else None)
        return k1_contiguous(self.fft.forward(flux))

    def heun_cn_step(self, w_hat: torch.Tensor, dt: float, n1: torch.Tensor | None = None) -> torch.Tensor:
        """integrator.heun_cn_step for one field (n1: N(w_hat) if already known)."""
        e, g = cn_factors(self.half_viscous_c, dt, None)
        if n1 is None:
            n1 = self.tendency(w_hat)[0]
        ew = w_hat * e
        n2 = self.tendency(torch.addcmul(ew, g, n1))[0]
        return ew.addcmul_(g, n1.add_(n2), value=0.5)


class _Buffers:
    """`SlabNavierStokes.c_step`'s scratch, kept from step to step, and its MKL plans."""

    def __init__(self, fft: SlabFFT):
        R, n, kl, nl, c, r = fft.size, fft.n, fft.kl, fft.nl, torch.complex128, torch.float64
        self.plans = fused.slab_plans(n, R)
        self.ew, self.fh = torch.empty(kl, n, dtype=c), torch.empty(2, kl, n, dtype=c)
        self.spec, self.out = torch.empty(5, kl, n, dtype=c), torch.empty(5, kl, n, dtype=c)
        self.recv = torch.empty(R * 5 * kl * nl if R > 1 else 0, dtype=c)
        # a smaller working set: slab_flux's scratch in buffers free while it runs (the look's spectra: spec; the
        # first inverse stage, once received: out; the flux spectra: fh), the same sizes (nl kp = kl n)
        self.half, self.fields = self.spec.view(5, nl, fft.kp), self.out.view(-1).view(torch.float64)[: 5 * nl * n]
        self.a = self.fh.view(-1)[: 2 * nl * fft.nk]
        self.fl = torch.empty(2, nl, n, dtype=r)
        self.send, self.flux = torch.empty(R, 2, kl, nl, dtype=c), torch.empty(2, kl, n, dtype=c)
        self.bad, self.s2 = torch.empty(1, dtype=r), torch.empty(1, dtype=r)
        self.reduced = np.empty(2)  # (max|u|^2, non-finite flag) of the step's look, reduced over the ranks


def _slab_spectra(K: int, fft: SlabFFT) -> torch.Tensor:
    """Uninitialised (K, N, Kl) complex spectra in the k1-contiguous layout."""
    return torch.empty(K, fft.kl, fft.n, dtype=torch.complex128).transpose(-1, -2)


def mpi_constant(name: str):
    """mpi4py.MPI.<name> (imported here, lazily)."""
    from mpi4py import MPI

    return getattr(MPI, name)

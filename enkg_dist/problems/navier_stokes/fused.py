"""A lane's step in C (`fused_source.py`): the same IEEE operations in the same order as `kernels.lane_step`, so
the same bits (tested), in fewer passes over memory.

Where the library binds MKL's DFTI from torch's CPU library (`mkl_bound`), the whole step is one C call (`step`): a
member at a time, its transforms planned as torch plans them (so torch's bits), the elementwise passes fused into
four loops, the transposing copies between each transform's stages in C, in one member's scratch (in cache), with
the GIL released throughout. Otherwise the transforms are torch calls between four C calls. The same library holds
the MPI slab solver's local work (`slab_plans`, the `slab_*` calls of mpi_slab.py), float64.

The C library is compiled at first use with the system's C compiler (`CC`, else `cc`; -O3 -march=native
-ffp-contract=off) into a per-user cache, keyed by the source, the flags, the compiler and the CPU's flags, and
loaded with ctypes (its calls release the GIL). Where there is no compiler, the build fails, ENKG_NS_FUSED=0, or the
grid's spectrum size is not a multiple of 16 (torch's vector loops then end in scalar tails that may contract to FMA:
other bits), the solver runs the scripted kernel instead. Pure: torch, ctypes and the standard library.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch

from enkg_dist.problems.navier_stokes import kernels
from enkg_dist.problems.navier_stokes.equation import k1_contiguous
from enkg_dist.problems.navier_stokes.fused_source import SOURCE

FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared"]
_SIGNATURES = {  # argument types after the leading (B, M) longs; p: pointer, l: long, t: the field's real type
    "predict": "pplplplppp", "correct": "lppltpplplpppp", "tendency": "ppltp", "product": "lppp", "transpose": "lplp",
}
_SLAB_SIGNATURES = {"slab_predict": "ppppppppp", "slab_flux": "plppppppp", "slab_correct": "plppplt" + "p" * 8,
                    "slab_tendency": "ppppltp"}
_build_lock = threading.Lock()


def enabled() -> bool:
    """Whether the solver may use the fused step (ENKG_NS_FUSED, default on)."""
    return os.environ.get("ENKG_NS_FUSED", "1") != "0"


def usable(n: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the fused step runs here for n x n fields of `dtype` (float32/64) on `device`, with the scripted
    kernel's bits: on CPU, spectra of a multiple of 16 complex values (every even n with n/2 = 0 or 7 mod 8, so
    every power of two from 16), and the library built."""
    if not enabled() or device.type != "cpu" or dtype not in (torch.float32, torch.float64):
        return False
    return n * (n // 2 + 1) % 16 == 0 and library() is not None


def cache_dir() -> Path:
    """Where built libraries are kept: ENKG_KERNEL_CACHE, else $XDG_CACHE_HOME/enkg-dist/kernels (~/.cache)."""
    root = os.environ.get("ENKG_KERNEL_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "enkg-dist" / "kernels"


@functools.cache
def library() -> Optional[ctypes.CDLL]:
    """The fused kernels' library, built or found in the cache once per process; None (with a warning) where it
    cannot be built."""
    with _build_lock:
        try:
            return _declare(ctypes.CDLL(str(_build())))
        except (OSError, subprocess.SubprocessError, RuntimeError) as e:
            first = (str(e).strip().splitlines() or [""])[0][:200]
            warnings.warn(f"the fused Navier-Stokes kernels could not be built ({type(e).__name__}: {first}); the "
                          "solver runs its scripted kernel (same bits, slower)", RuntimeWarning, stacklevel=3)
            return None


def _build() -> Path:
    """Compile SOURCE unless a library for this source, compiler and CPU is cached; the path of the library."""
    cc = os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler {cc!r} on PATH")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\0".join([SOURCE, " ".join(FLAGS), version, platform.machine(), _cpu_flags()]).encode())
    out = cache_dir() / f"ns_fused_{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src, lib = Path(tmp) / "ns_fused.c", Path(tmp) / "ns_fused.so"
        src.write_text(SOURCE)
        r = subprocess.run([cc, *FLAGS, str(src), "-o", str(lib), "-lm"], capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"{cc} failed: {(r.stderr or r.stdout).strip()}")
        os.replace(lib, out)  # atomic: concurrent builders (Ray workers on one node) leave one whole library
    return out


def _cpu_flags() -> str:
    """The CPU's feature flags (-march=native builds for them: a cache shared across nodes keeps one per CPU)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Argument types of the library's functions, for both real types."""
    for suffix, real in (("f32", ctypes.c_float), ("f64", ctypes.c_double)):
        types = {"p": ctypes.c_void_p, "l": ctypes.c_long, "t": real}
        for name, sig in _SIGNATURES.items():
            fn = getattr(lib, f"{name}_{suffix}")
            fn.argtypes = [ctypes.c_long, ctypes.c_long] + [types[c] for c in sig]
            fn.restype = None
        step = getattr(lib, f"step_{suffix}")
        step.argtypes = [types[c] for c in "pllpplpplpppltppppp"]
        step.restype = None
        factors = getattr(lib, f"cn_factors_{suffix}")
        factors.argtypes, factors.restype = [ctypes.c_long, ctypes.c_long] + [ctypes.c_void_p] * 4, ctypes.c_int
        floor = getattr(lib, f"transforms_{suffix}")
        floor.argtypes, floor.restype = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_long], ctypes.c_int
        getattr(lib, f"plans_{suffix}").argtypes = [ctypes.c_long]
        getattr(lib, f"plans_{suffix}").restype = ctypes.c_void_p
    for name, sig in _SLAB_SIGNATURES.items():  # the MPI slab solver's local work (mpi_slab.py): float64's types
        getattr(lib, name).argtypes = [types[c] for c in sig]
        getattr(lib, name).restype = None
    lib.slab_plans.argtypes, lib.slab_plans.restype = [ctypes.c_long, ctypes.c_long], ctypes.c_void_p
    lib.mkl_bind.argtypes = [ctypes.c_void_p] * 7
    lib.mkl_bind.restype = None
    return lib


_MKL = ("DftiCreateDescriptor_s_1d", "DftiCreateDescriptor_d_1d", "DftiSetValue", "DftiCommitDescriptor",
        "DftiComputeForward", "DftiComputeBackward", "DftiFreeDescriptor")


@functools.cache
def mkl_bound() -> bool:
    """Whether the library could bind MKL's DFTI from torch's CPU library (x86 builds of torch export it): the whole
    lane step then runs in one C call (`step`); else its transforms are torch calls between the C passes."""
    lib = library()
    if lib is None or os.environ.get("ENKG_NS_FUSED_MKL", "1") == "0":
        return False
    try:
        torch_cpu = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        lib.mkl_bind(*(ctypes.cast(getattr(torch_cpu, name), ctypes.c_void_p).value for name in _MKL))
    except (OSError, AttributeError):
        return False
    return True


_plans: dict = {}  # (thread, n, real type) -> the C library's transform plans, one set per lane thread
_plans_lock = threading.Lock()


def _member_plans(lib, s: str, n: int) -> int:
    """The MKL plans of one member's transforms at n x n for this thread (made once per thread, kept)."""
    key = (threading.get_ident(), n, s)
    p = _plans.get(key)
    if p is None:
        with _plans_lock:
            p = getattr(lib, f"plans_{s}")(n)
            if not p:
                raise RuntimeError(f"MKL could not plan the {n}^2 transforms")
            _plans[key] = p
    return p


@functools.cache
def slab_plans(n: int, R: int) -> int:
    """The MKL plans of an MPI rank's slab transforms (fused_source.py, `Slab`) at n x n over R ranks (`mkl_bound`)."""
    p = library().slab_plans(n, R)
    if not p:
        raise RuntimeError(f"MKL could not plan the {n}^2 slab transforms over {R} ranks")
    return p


_scratch = threading.local()  # per thread: (n, dtype), one member's scratch for `step`


def _step_scratch(n: int, dtype: torch.dtype) -> torch.Tensor:
    """One member's scratch for the C `step` at n x n (26 M + 7 P reals), kept by this thread for its next step (a
    fresh allocation each step cost 15 % of a 512^2 step) and freed with the thread."""
    kept = getattr(_scratch, "kept", None)
    if kept is None or kept[0] != (n, dtype):
        M, P = n * (n // 2 + 1), n * n
        _scratch.kept = kept = ((n, dtype), torch.empty(26 * M + 7 * P, dtype=dtype))
    return kept[1]


def transforms(n: int, dtype: torch.dtype, B: int, K: int, steps: int) -> None:
    """Only the transforms (with their transposing copies) of `steps` whole-C steps (`mkl_bound`) of B members with
    K-field looks, in this thread: the floor the FFTs set under `lane_step` (benchmarks/bench_ns_solver.py)."""
    lib, s = library(), "f32" if dtype == torch.float32 else "f64"
    if getattr(lib, f"transforms_{s}")(_member_plans(lib, s, n), B, K, steps):
        raise MemoryError("the transforms could not allocate their scratch")


def cn_factors(half_viscous_c: torch.Tensor, dt: float, dts: Optional[torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """`kernels.cn_factors` in one C pass (the same bits) for a k1-contiguous (N, Kl) L/2 with zero imaginary parts,
    as NavierStokes2D and the MPI slab make it (torch's five passes otherwise): one dt, or dts (B, 1, 1)."""
    n, kl = half_viscous_c.shape
    if half_viscous_c.stride() != (1, n) or half_viscous_c.dtype not in (torch.complex64, torch.complex128):
        return kernels.cn_factors(half_viscous_c, dt, dts)
    real = half_viscous_c.real.dtype
    steps = torch.tensor([dt], dtype=real) if dts is None else dts.reshape(-1).to(real).contiguous()
    B = steps.numel()
    e, g = (torch.empty(B, kl, n, dtype=half_viscous_c.dtype).transpose(-1, -2) for _ in range(2))
    fn = getattr(library(), f"cn_factors_{'f32' if real == torch.float32 else 'f64'}")
    if fn(B, n * kl, half_viscous_c.data_ptr(), steps.data_ptr(), e.data_ptr(), g.data_ptr()):
        return kernels.cn_factors(half_viscous_c, dt, dts)
    return (e[0], g[0]) if dts is None else (e, g)


def _spectra(B: int, K: int, n: int, cdtype: torch.dtype) -> torch.Tensor:
    """Uninitialised (B, K, n, n//2+1) spectra in the k1-contiguous layout."""
    return torch.empty(B, K, n // 2 + 1, n, dtype=cdtype).transpose(-1, -2)


def lane_step(w_hat: torch.Tensor, n1: torch.Tensor, e: torch.Tensor, g: torch.Tensor, tendency_mult: torch.Tensor,
              look_mult: torch.Tensor, flux_mult: torch.Tensor, f_mode: float, kf: int, n: int):
    """`kernels.lane_step`, fused: (w_{n+1}, N(w_{n+1}), max|u| per member or None, per member 0 if its field is
    finite else NaN)."""
    lib, B, M, cdtype = library(), w_hat.shape[0], n * (n // 2 + 1), w_hat.dtype
    s = "f32" if cdtype == torch.complex64 else "f64"
    w_hat, e, g = k1_contiguous(w_hat), k1_contiguous(e), k1_contiguous(g)  # copies only where they are not
    if n1.stride()[-2:] != (1, n):  # n1 may be strided between members (the look's), not within a field
        n1 = k1_contiguous(n1)
    es = 0 if e.dim() == 2 else M  # one field for all members, or one each
    fidx = kf * n if f_mode != 0.0 else -1  # the forcing's mode (k1 = 0, k2 = kf) in the k1-contiguous layout
    K = look_mult.shape[0]
    if mkl_bound():
        w, n1_next = _spectra(B, 1, n, cdtype)[:, 0], _spectra(B, 1, n, cdtype)[:, 0]
        bad, s2 = torch.empty(B, dtype=w.real.dtype), torch.empty(B, dtype=w.real.dtype)
        scratch = _step_scratch(n, w.real.dtype)
        getattr(lib, f"step_{s}")(_member_plans(lib, s, n), B, K, w_hat.data_ptr(), e.data_ptr(), es, g.data_ptr(),
                                  n1.data_ptr(), n1.stride(0), tendency_mult.data_ptr(), look_mult.data_ptr(),
                                  flux_mult.data_ptr(), fidx, f_mode, w.data_ptr(), n1_next.data_ptr(), s2.data_ptr(),
                                  bad.data_ptr(), scratch.data_ptr())
        return w, n1_next, (s2.sqrt() if K == 5 else None), bad
    ew, spec = _spectra(B, 1, n, cdtype)[:, 0], _spectra(B, 3, n, cdtype)
    getattr(lib, f"predict_{s}")(B, M, w_hat.data_ptr(), e.data_ptr(), es, g.data_ptr(), es, n1.data_ptr(),
                                 n1.stride(0), tendency_mult.data_ptr(), ew.data_ptr(), spec.data_ptr())
    fh = _flux_spectra(lib, s, spec, n, None)
    w, spec = _spectra(B, 1, n, cdtype)[:, 0], _spectra(B, K, n, cdtype)
    bad = torch.empty(B, dtype=w.real.dtype)
    getattr(lib, f"correct_{s}")(B, M, K, fh.data_ptr(), flux_mult.data_ptr(), fidx, f_mode, ew.data_ptr(),
                                 g.data_ptr(), es, n1.data_ptr(), n1.stride(0), look_mult.data_ptr(),
                                 w.data_ptr(), spec.data_ptr(), bad.data_ptr())
    s2 = torch.empty(B, dtype=bad.dtype) if K == 5 else None
    fh = _flux_spectra(lib, s, spec, n, s2)
    n1_next = _spectra(B, 1, n, cdtype)[:, 0]
    getattr(lib, f"tendency_{s}")(B, M, fh.data_ptr(), flux_mult.data_ptr(), fidx, f_mode, n1_next.data_ptr())
    return w, n1_next, (s2.sqrt() if s2 is not None else None), bad


def _flux_spectra(lib, s: str, spec: torch.Tensor, n: int, s2: Optional[torch.Tensor]) -> torch.Tensor:
    """The spectra of (u w, v w) from the stacked spectra of (w, u, v[, U, V]), and max(U^2 + V^2) into s2."""
    B, K = spec.shape[:2]
    fields = _irfft2_k1(spec, n)  # held here: a pointer to a temporary would outlive its tensor
    flux = torch.empty(B, 2, n, n, dtype=fields.dtype)
    getattr(lib, f"product_{s}")(B, n * n, K, fields.data_ptr(), flux.data_ptr(),
                                 s2.data_ptr() if s2 is not None else None)
    return _rfft2_k1(flux)


def transposed(a: torch.Tensor) -> torch.Tensor:
    """a.transpose(-1, -2).contiguous() for a contiguous complex64/128 tensor, by the library's tiled copy (torch's
    reads or writes along power-of-two strides at n = 128 and up: cache-set conflicts)."""
    rows, cols = a.shape[-2], a.shape[-1]
    out = torch.empty(a.shape[:-2] + (cols, rows), dtype=a.dtype)
    fn = getattr(library(), f"transpose_{'f32' if a.dtype == torch.complex64 else 'f64'}")
    fn(a.numel() // (rows * cols), rows, cols, a.data_ptr(), cols, out.data_ptr())
    return out


def _irfft2_k1(spec: torch.Tensor, n: int) -> torch.Tensor:
    """`kernels.irfft2_k1(spec, n, False)` (the same transforms, so the same bits) with the transposing copy in C."""
    z = torch.fft.ifft(spec.transpose(-1, -2), dim=-1, norm="forward")  # (B, K, m, n): k2 rows, x contiguous
    return torch.fft.irfft(transposed(z), n=n, dim=-1, norm="forward")


def _rfft2_k1(fields: torch.Tensor) -> torch.Tensor:
    """`kernels.rfft2_k1(fields)` (the same transforms, so the same bits) with the transposing copy in C."""
    a = torch.fft.rfft(fields, dim=-1)  # (B, K, n, m): x rows, k2 contiguous
    return torch.fft.fft(transposed(a), dim=-1).transpose(-1, -2)

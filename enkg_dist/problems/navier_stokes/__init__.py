"""2D Navier–Stokes: a batched pseudo-spectral solver in torch and the EnKG inverse problem built on it."""

from enkg_dist.problems.navier_stokes.equation import NavierStokes2D, dealias_mask, grid
from enkg_dist.problems.navier_stokes.integrator import heun_cn_step
from enkg_dist.problems.navier_stokes.problem import (
    NavierStokesForward,
    grf_vorticity,
    initial_vorticity,
    make_problem,
    metrics,
)
from enkg_dist.problems.navier_stokes.solver import SolveResult, cfl_step, solve

__all__ = ["NavierStokes2D", "NavierStokesForward", "SolveResult", "cfl_step", "dealias_mask", "grf_vorticity",
           "grid", "heun_cn_step", "initial_vorticity", "make_problem", "metrics", "solve"]

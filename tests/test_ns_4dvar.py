"""The 4D-Var baseline's L-BFGS direction (benchmarks/ns_4dvar.py): steepest descent without history, and the
secant equation H y = s for its newest curvature pair (Nocedal & Wright 2006, eq. 6.17), exactly."""

import importlib.util
import sys
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the script imports its sibling navier_stokes_table, as when it is run
_spec = importlib.util.spec_from_file_location("ns_4dvar", BENCHMARKS / "ns_4dvar.py")
ns_4dvar = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ns_4dvar)


def test_lbfgs_direction_is_steepest_descent_without_history():
    g = torch.randn(7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ns_4dvar.lbfgs_direction(g, [], []), -g)


def test_lbfgs_direction_satisfies_the_newest_secant_equation():
    gen = torch.Generator().manual_seed(1)
    A = torch.randn(6, 6, dtype=torch.float64, generator=gen)
    A = A @ A.T + 6 * torch.eye(6, dtype=torch.float64)  # a convex quadratic's Hessian
    S = [torch.randn(6, dtype=torch.float64, generator=gen) for _ in range(4)]
    Y = [A @ s for s in S]
    torch.testing.assert_close(ns_4dvar.lbfgs_direction(Y[-1], S, Y), -S[-1], rtol=1e-12, atol=1e-12)
    d = ns_4dvar.lbfgs_direction(torch.randn(6, dtype=torch.float64, generator=gen), S, Y)
    assert torch.isfinite(d).all()

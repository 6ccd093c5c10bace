"""The import rules of ARCHITECTURE.md, checked on the source: maths never imports Ray, Zarr, MPI or Dask."""

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "enkg_dist"
HEAVY = {"ray", "zarr", "mpi4py", "dask", "xarray"}
ALLOWED = {  # module path prefix -> heavy packages it may import
    "distributed/": {"ray"},
    "store/": {"zarr", "dask", "xarray"},
    "report.py": {"zarr", "dask", "xarray"},
    "data/": {"zarr"},
    "problems/mpi": {"mpi4py"},
    "problems/example_program.py": {"mpi4py"},
}
PURE = ["kalman.py", "schedules.py", "sampler.py", "noise.py", "rng.py"]


def imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0] if not node.module.startswith("enkg_dist") else node.module)
    return out


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_heavy_imports_stay_in_their_modules(path):
    rel = str(path.relative_to(PKG))
    allowed = set().union(*(v for k, v in ALLOWED.items() if rel.startswith(k)))
    bad = (imports(path) & HEAVY) - allowed
    assert not bad, f"{rel} imports {bad}"


@pytest.mark.parametrize("name", PURE)
def test_pure_maths_imports_no_orchestration(name):
    mods = imports(PKG / name)
    assert not (mods & HEAVY)
    assert not any(m.startswith(("enkg_dist.runner", "enkg_dist.distributed", "enkg_dist.store", "enkg_dist.cli",
                                 "enkg_dist.problems", "enkg_dist.priors")) for m in mods), mods


def test_distributed_never_imports_runner_or_store():
    for path in (PKG / "distributed").rglob("*.py"):
        mods = imports(path)
        assert not any(m.startswith(("enkg_dist.runner", "enkg_dist.store")) for m in mods), path

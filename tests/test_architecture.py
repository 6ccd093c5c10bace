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


MAX_LINES = 400
LONG = {  # modules allowed over MAX_LINES, each with the reason
    "runner.py": "builds problems, priors and localisers as well as running them; build() is to move out (issue 15)",
    "config.py": "every section of the job file in one schema, with its one-line error formatter",
    "priors/training.py": "the prior's training loop with DDP, EMA, validation and resumable checkpoints",
}


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_no_module_is_longer_than_400_lines_unless_listed_with_a_reason(path):
    rel = str(path.relative_to(PKG))
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES or rel in LONG, f"{rel} has {n} lines (> {MAX_LINES}): split it, or list it in LONG"


def test_listed_long_modules_exist():
    assert all((PKG / rel).is_file() for rel in LONG), [rel for rel in LONG if not (PKG / rel).is_file()]


@pytest.mark.parametrize("name", ["report.py", "table.py", "plots.py"])
def test_the_report_reads_the_run_directory_and_never_rebuilds_the_run(name):
    """report, its table and its figures: no runner, backends, problems, priors or simulators (issue 15)."""
    mods = imports(PKG / name)
    assert not any(m.startswith(("enkg_dist.runner", "enkg_dist.backends", "enkg_dist.problems",
                                 "enkg_dist.priors", "enkg_dist.distributed", "enkg_dist.recording")) for m in mods), mods


def test_the_store_knows_no_config_keys():
    """Which keys may change on resume is the config's knowledge (config.RESUME_MAY_CHANGE), not the store's."""
    for path in (PKG / "store").rglob("*.py"):
        assert not any(m.startswith(("enkg_dist.config", "enkg_dist.runner")) for m in imports(path)), path
        strings = {n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant)
                   and isinstance(n.value, str)}
        assert not any(s.startswith(("execution.", "store.checkpoint_every")) for s in strings), path

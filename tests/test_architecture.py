"""The import rules of ARCHITECTURE.md and docs/architecture.md, checked on the source: maths never imports Ray,
Zarr, MPI or Dask; pure modules import only pure modules; priors, problems and data are leaves; distributed never
imports the runner or the store; nobody probes a prior with hasattr; one module owns the non-finite rule."""

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
# Pure modules: torch/numpy (schema: pydantic/yaml) and other pure modules only; any package may import them.
PURE = ["kalman.py", "schedules.py", "sampler.py", "noise.py", "rng.py", "localisation.py", "inflation.py",
        "metrics.py", "devices.py", "fields.py", "evaluation.py", "schema.py", "threads.py", "factories.py",
        "heap.py", "hyperparameters.py", "failure.py"]
PURE_MODULES = {"enkg_dist." + name[:-3] for name in PURE}
LEAVES = ("priors", "problems", "data")
LEAF_MAY_IMPORT = {  # leaf package -> the other leaves' parts it may import (pure numerics, no orchestration)
    "priors": (),
    "problems": (),
    "data": ("enkg_dist.problems.navier_stokes",),  # the data set is the NS solver's output
}
# The orchestration: run, store, cluster, command line. It may import everything below it.
ORCHESTRATION = ["runner.py", "assembly.py", "backends.py", "recording.py", "cli.py", "config.py", "budget.py", "rundir.py",
                 "interrupt.py", "report.py", "table.py", "plots.py", "store/", "distributed/", "launch/", "plugins.py",
                 "plugin_config.py", "sweep.py", "api.py", "api_inputs.py"]


def imports(path: pathlib.Path) -> set[str]:
    """Top-level packages and enkg_dist modules imported anywhere in the file (lazy imports included); `from
    enkg_dist.x import y` counts as enkg_dist.x and enkg_dist.x.y (y may be a module)."""
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name if a.name.startswith("enkg_dist") else a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("enkg_dist"):
                out.add(node.module)
                out |= {f"{node.module}.{a.name}" for a in node.names}
            else:
                out.add(node.module.split(".")[0])
    return out


def project(mods: set[str]) -> set[str]:
    """The enkg_dist modules among `mods`, as modules (a name imported from a module counts as that module)."""
    out = set()
    for m in mods:
        if m.startswith("enkg_dist."):
            parts = m.split(".")
            while len(parts) > 1 and not ((PKG.joinpath(*parts[1:]).with_suffix(".py")).is_file()
                                          or PKG.joinpath(*parts[1:]).is_dir()):
                parts.pop()
            out.add(".".join(parts))
    return out


def within(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def files(prefixes) -> list[pathlib.Path]:
    return sorted(p for pre in prefixes for p in ([PKG / pre] if pre.endswith(".py") else (PKG / pre).rglob("*.py")))


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_heavy_imports_stay_in_their_modules(path):
    rel = str(path.relative_to(PKG))
    allowed = set().union(*(v for k, v in ALLOWED.items() if rel.startswith(k)))
    bad = (imports(path) & HEAVY) - allowed
    assert not bad, f"{rel} imports {bad}"


@pytest.mark.parametrize("name", PURE)
def test_pure_modules_import_only_pure_modules(name):
    mods = imports(PKG / name)
    assert not (mods & HEAVY)
    assert project(mods) <= PURE_MODULES, f"{name} imports {project(mods) - PURE_MODULES}"


@pytest.mark.parametrize("path", files([leaf + "/" for leaf in LEAVES]), ids=lambda p: str(p.relative_to(PKG)))
def test_leaves_import_nothing_above_them(path):
    """priors/, problems/, data/: pure modules, their own package and the listed pure parts of another leaf; never
    config, runner, store, distributed, backends, cli (or anything else of the orchestration)."""
    leaf = path.relative_to(PKG).parts[0]
    ok = PURE_MODULES | {f"enkg_dist.{leaf}"} | set(LEAF_MAY_IMPORT[leaf])
    bad = {m for m in project(imports(path)) if not within(m, ok)}
    assert not bad, f"{path.relative_to(PKG)} imports {bad} (upward or across the leaves)"


def test_distributed_never_imports_runner_or_store():
    """distributed/: Ray plus pure modules, priors and problems; never the runner, store, config or CLI."""
    ok = PURE_MODULES | {"enkg_dist.distributed", "enkg_dist.priors", "enkg_dist.problems"}
    for path in (PKG / "distributed").rglob("*.py"):
        bad = {m for m in project(imports(path)) if not within(m, ok)}
        assert not bad, f"{path.relative_to(PKG)} imports {bad}"


def _calls(path: pathlib.Path, name: str) -> list[ast.Call]:
    return [n for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == name]


@pytest.mark.parametrize("name", ["sampler.py", "runner.py", "backends.py", "distributed/prior.py"])
def test_no_hasattr_probing_of_priors(name):
    """What a prior offers is declared (priors.Prior, priors.GaussianPrior, sampler.DenoiserMaps), not probed."""
    path = PKG / name
    assert not _calls(path, "hasattr"), f"{name} probes with hasattr"
    probes = [ast.unparse(c) for c in _calls(path, "getattr") if len(c.args) == 3
              and any(w in ast.unparse(c.args[0]) for w in ("prior", "denoise"))]
    assert not probes, f"{name} probes a prior: {probes}"


# The forward-output path: the modules a member's output passes on its way to the update and the store. Only
# failure.py decides "a non-finite output is a failure" (evaluation.py applies it); these call them.
# Elsewhere isfinite means something else:
FINITE_CHECKS_ELSEWHERE = {
    "runner.py": "a job's observation and coordinates are checked once, before the run (not forward outputs)",
    "plugins.py": "a job's noise covariance and coordinates files are checked once, before the run",
    "report.py": "which stored values a summary can show (NaN marks what never ran)",
    "plots.py": "which values a figure can draw",
    "store/verify.py": "NaN is the misfit's fill value: it marks corrections never run",
    "problems/external.py": "the program's output file is checked as it is read, naming the file and the count "
                            "(a failure either way; judge would give the generic reason)",
}
OUTPUT_PATH = [*ORCHESTRATION, "sampler.py", "problems/base.py", "problems/chaos.py", "problems/linear_gaussian.py",
               "problems/navier_stokes/problem.py", "problems/external.py", "problems/plugin.py"]


@pytest.mark.parametrize("path", files(OUTPUT_PATH), ids=lambda p: str(p.relative_to(PKG)))
def test_one_module_owns_the_non_finite_rule(path):
    rel = str(path.relative_to(PKG))
    uses = "isfinite" in path.read_text()
    assert not uses or rel in FINITE_CHECKS_ELSEWHERE, (
        f"{rel} checks finiteness itself: use enkg_dist.failure (finite_rows, judged) or evaluation (judge, "
        "take_in), or list it in FINITE_CHECKS_ELSEWHERE with the reason")


def test_listed_finite_checks_still_exist():
    assert all("isfinite" in (PKG / rel).read_text() for rel in FINITE_CHECKS_ELSEWHERE)


def test_the_sampler_is_the_only_loop():
    """The runner drives sampler.enkg_sample / sampler.eki through hooks: it calls no step function itself."""
    called = {ast.unparse(c.func) for c in ast.walk(ast.parse((PKG / "runner.py").read_text()))
              if isinstance(c, ast.Call)}
    assert {"sampler.enkg_sample", "sampler.eki"} <= called
    assert not called & {"sampler.enkg_step", "sampler.eki_step", "sampler.corrector", "sampler.predictor"}


MAX_LINES = 400
LONG = {  # modules allowed over MAX_LINES, each with the reason
    "priors/training.py": "the prior's training loop with DDP, EMA, validation and resumable checkpoints",
}


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_no_module_is_longer_than_400_lines_unless_listed_with_a_reason(path):
    rel = str(path.relative_to(PKG))
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES or rel in LONG, f"{rel} has {n} lines (> {MAX_LINES}): split it, or list it in LONG"


def test_listed_long_modules_exist_and_are_long():
    for rel in LONG:
        assert (PKG / rel).is_file() and len((PKG / rel).read_text().splitlines()) > MAX_LINES, rel


@pytest.mark.parametrize("name", ["report.py", "table.py", "plots.py"])
def test_the_report_reads_the_run_directory_and_never_rebuilds_the_run(name):
    """report, its table and its figures: no runner, backends, problems, priors or simulators (issue 15)."""
    mods = imports(PKG / name)
    assert not any(m.startswith(("enkg_dist.runner", "enkg_dist.backends", "enkg_dist.problems",
                                 "enkg_dist.priors", "enkg_dist.distributed", "enkg_dist.recording"))
                   for m in mods), mods


def test_the_store_knows_no_config_keys():
    """Which keys may change on resume is the config's knowledge (config.RESUME_MAY_CHANGE), not the store's."""
    for path in (PKG / "store").rglob("*.py"):
        assert not any(m.startswith(("enkg_dist.config", "enkg_dist.runner")) for m in imports(path)), path
        strings = {n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant)
                   and isinstance(n.value, str)}
        assert not any(s.startswith(("execution.", "store.checkpoint_every")) for s in strings), path


def test_upward_imports_counted():
    """The count the renovation (issue 15) brought to zero: imports from a leaf or a pure module into anything
    above it. Kept as a number so that a new one shows up in review."""
    up = []
    for path in files([leaf + "/" for leaf in LEAVES]) + [PKG / n for n in PURE]:
        rel = path.relative_to(PKG)
        own = PURE_MODULES | (set() if len(rel.parts) == 1 else {f"enkg_dist.{rel.parts[0]}"})
        extra = set() if len(rel.parts) == 1 else set(LEAF_MAY_IMPORT[rel.parts[0]])
        up += [(str(rel), m) for m in project(imports(path)) if not within(m, own | extra)]
    assert up == [], up

"""Python plug-ins in job files (issue 16, item 1): `problem.kind: python` and `prior.kind: python` name factories
"package.module:factory" that each process imports and builds once; their errors are one line naming the factory;
a member fails by exception or non-finite output exactly as with the built-in problems; Gamma may be scalar,
diagonal or full, from files (the linear-Gaussian exact posterior computed with the full Gamma)."""

from __future__ import annotations

import json
import os
import textwrap

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from enkg_dist import config as cfgmod
from enkg_dist import runner
from enkg_dist.factories import FactoryError, FactorySpec
from enkg_dist.priors.plugin import PluginPrior
from enkg_dist.problems.base import safe_evaluate
from enkg_dist.problems.plugin import PluginForward

MODULE = '''
import os
import torch

BUILT = []


def make_forward(k=2, scale=1.0):
    BUILT.append(os.getpid())

    def G(x):
        out = scale * x[:, 0, ::k, ::k].reshape(x.shape[0], -1)
        out = out.clone()
        for i in range(x.shape[0]):
            if float(x[i, 0, 0, 1]) > 1e6:
                raise RuntimeError("member blew up")
            if float(x[i, 0, 0, 1]) < -1e6:
                out[i, 0] = float("nan")
        return out

    return G


def make_numpy_forward(k=2):
    def G(x):  # numpy in, numpy out
        return 2.0 * x[:, 0, ::k, ::k].reshape(x.shape[0], -1)

    return G


def make_denoiser(std=0.5):
    def D(x, sigma):
        s = sigma.reshape(-1, 1, 1, 1)
        return x * std**2 / (std**2 + s**2)

    return D


def make_eps_denoiser(std=0.5):
    def D(x, sigma):  # E[n | x] for x = x0 + sigma n, x0 ~ N(0, std^2)
        s = sigma.reshape(-1, 1, 1, 1)
        return x * s / (std**2 + s**2)

    return D


def make_score(std=0.5):
    def D(x, sigma):
        s = sigma.reshape(-1, 1, 1, 1)
        return -x / (std**2 + s**2)

    return D


def raising_factory(**kwargs):
    raise ValueError("no licence for the solver")
'''


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """A directory holding the plug-in module (plug_mod.py), a truth file, on sys.path (and PYTHONPATH)."""
    name = f"plug_mod_{os.getpid()}_{abs(hash(str(tmp_path))) % 10**8}"  # fresh per test: no stale import
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(MODULE))
    (tmp_path / "broken_mod.py").write_text("import this_module_does_not_exist_anywhere\n")
    np.save(tmp_path / "truth.npy", np.random.default_rng(0).normal(size=(1, 8, 8)) * 0.5)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return tmp_path, name


def _job(tmp_path, mod, **over) -> dict:
    job = {"name": "plug", "output_dir": str(tmp_path / "runs"), "seed": 3,
           "problem": {"kind": "python", "forward": f"{mod}:make_forward", "kwargs": {"k": 2}, "n": 8,
                       "obs_size": 16, "noise": 0.1, "truth": str(tmp_path / "truth.npy")},
           "prior": {"kind": "python", "denoiser": f"{mod}:make_denoiser", "kwargs": {"std": 0.5}},
           "enkg": {"ensemble_size": 12, "num_steps": 4},
           "execution": {"num_workers": 2, "worker_cpus": 1, "batch_size": 3}}
    for key, value in over.items():
        node, parts = job, key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return job


def _one_line(text: str, *names: str) -> None:
    assert "\n" not in text.strip() and "Traceback" not in text, text
    for n in names:
        assert n in text, (n, text)


def test_python_forward_and_prior_run_in_process(plugin_dir):
    tmp_path, mod = plugin_dir
    out, metrics = runner.run(cfgmod.validate(_job(tmp_path, mod)), progress=False)
    assert metrics["forward_evaluations"] > 0 and metrics["failed_evaluations"] == 0
    assert np.isfinite(metrics["rel_l2_mean"])
    assert (out / "store.zarr").is_dir() and json.loads((out / "metrics.json").read_text())["backend"] == "local"


def test_the_python_prior_reproduces_the_builtin_gaussian_prior(plugin_dir, tmp_path):
    """The same denoiser as a plug-in and built in (an iid Gaussian is the builtin field with a flat spectrum)."""
    _, mod = plugin_dir
    job = _job(tmp_path, mod)
    built = runner.build(cfgmod.validate(job))
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    want = x * 0.25 / (0.25 + 0.49)
    assert torch.allclose(built.prior.denoise(x, 0.7), want, atol=1e-14)
    for conv, fac in (("epsilon", "make_eps_denoiser"), ("score", "make_score")):
        job["prior"].update(convention=conv, denoiser=f"{mod}:{fac}")
        p = runner.build(cfgmod.validate(job)).prior
        assert torch.allclose(p.denoise(x, 0.7), want, atol=1e-12), conv


def test_members_fail_by_exception_or_non_finite_output_like_builtin_problems(plugin_dir):
    _, mod = plugin_dir
    G = PluginForward(FactorySpec(f"{mod}:make_forward", {"k": 2}, "problem.forward"), (1, 8, 8), 16)
    x = torch.zeros(4, 1, 8, 8, dtype=torch.float64)
    x[1, 0, 0, 1] = 1e7  # raises
    x[2, 0, 0, 1] = -1e7  # NaN output
    res = safe_evaluate(G, x, [10, 11, 12, 13])
    assert res.ok.tolist() == [True, False, False, True]
    assert res.reasons[1].startswith("simulator raised RuntimeError: member blew up")
    assert res.reasons[2] == "non-finite forward output" and res.reasons[0] is None
    assert torch.equal(res.psi[3], torch.zeros(16, dtype=torch.float64))


def test_a_factory_is_built_once_per_process_and_not_pickled(plugin_dir):
    import pickle
    import sys

    _, mod = plugin_dir
    spec = FactorySpec(f"{mod}:make_forward", {"k": 2}, "problem.forward")
    G = PluginForward(spec, (1, 8, 8), 16)
    for _ in range(3):
        G(torch.zeros(2, 1, 8, 8, dtype=torch.float64))
    assert sys.modules[mod].BUILT == [os.getpid()]
    copy = pickle.loads(pickle.dumps(G))
    assert copy.spec._built is None and copy.spec.name == spec.name  # each worker builds its own


def test_numpy_forward_and_observation_from_npy_and_zarr(plugin_dir):
    zarr = pytest.importorskip("zarr")
    tmp_path, mod = plugin_dir
    y = np.linspace(-1, 1, 16)
    np.save(tmp_path / "y.npy", y)
    z = zarr.open_group(str(tmp_path / "obs.zarr"), mode="w")
    z.create_array("y", shape=(16,), dtype="float64")[...] = y
    for where in ("y.npy", "obs.zarr/y"):
        job = _job(tmp_path, mod, **{"problem.forward": f"{mod}:make_numpy_forward", "problem.array": "numpy",
                                     "problem.observation": str(tmp_path / where)})
        built = runner.build(cfgmod.validate(job))
        assert torch.equal(built.problem.y, torch.from_numpy(y)), where
        psi = built.problem.forward(torch.ones(2, 1, 8, 8, dtype=torch.float64)).psi
        assert torch.equal(psi, torch.full((2, 16), 2.0, dtype=torch.float64))


@pytest.mark.parametrize("factory, words", [
    ("raising_factory", ["problem.forward", "raising_factory", "no licence for the solver"]),
    ("no_such_factory", ["problem.forward", "no_such_factory"]),
])
def test_a_factory_that_raises_or_is_missing_gives_one_line_naming_it(plugin_dir, factory, words):
    tmp_path, mod = plugin_dir
    with pytest.raises(cfgmod.ConfigError) as e:
        runner.build(cfgmod.validate(_job(tmp_path, mod, **{"problem.forward": f"{mod}:{factory}"})))
    _one_line(str(e.value), "config error:", mod, *words)
    with pytest.raises(cfgmod.ConfigError) as e:
        runner.build(cfgmod.validate(_job(tmp_path, mod, **{"prior.denoiser": f"{mod}:{factory}"})))
    _one_line(str(e.value), "config error: prior.denoiser", mod, factory)


@pytest.mark.parametrize("module", ["broken_mod", "no_such_module_anywhere"])
def test_a_module_that_does_not_import_gives_one_line_naming_it(plugin_dir, module):
    tmp_path, mod = plugin_dir
    with pytest.raises(cfgmod.ConfigError) as e:
        runner.build(cfgmod.validate(_job(tmp_path, mod, **{"problem.forward": f"{module}:make"})))
    _one_line(str(e.value), "config error: problem.forward", f"{module}:make", "cannot import", "PYTHONPATH")


def test_the_cli_prints_one_line_for_a_raising_factory(plugin_dir):
    from enkg_dist.cli import app

    tmp_path, mod = plugin_dir
    import yaml

    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(_job(tmp_path, mod, **{"prior.denoiser": f"{mod}:raising_factory"})))
    result = CliRunner().invoke(app, ["run", str(job), "--no-progress"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: config error: prior.denoiser"), lines
    assert f"{mod}:raising_factory" in lines[0] and "no licence" in lines[0]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # nothing left behind


def test_a_denoiser_that_raises_at_run_time_is_one_line_naming_it():
    spec = FactorySpec("builtins:dict", {}, "prior.denoiser")  # dict() is not callable on (x, sigma)
    prior = PluginPrior(spec, (1, 4, 4))
    with pytest.raises(FactoryError) as e:
        prior.denoise(torch.zeros(2, 1, 4, 4), 1.0)
    _one_line(str(e.value), "prior.denoiser", "builtins:dict")


@pytest.mark.parametrize("bad, key", [
    ({"problem.forward": "not a name"}, "problem.forward"),
    ({"problem.noise": {"std": 0.1, "variances": [1.0]}}, "problem.noise"),
    ({"problem.state_shape": [1, 8, 8]}, "problem"),
    ({"prior.convention": "v"}, "prior.convention"),
    ({"problem.kwargs": 3}, "problem.kwargs"),
])
def test_plugin_keys_are_validated_with_one_line_errors(tmp_path, bad, key):
    with pytest.raises(cfgmod.ConfigError) as e:
        cfgmod.validate(_job(tmp_path, "m", **bad))
    _one_line(str(e.value), f"config error: {key}")


def test_python_problem_with_state_shape_and_a_gaussian_prior_is_refused(plugin_dir):
    tmp_path, mod = plugin_dir
    job = _job(tmp_path, mod, **{"problem.state_shape": [64], "prior": {"kind": "gaussian"}})
    del job["problem"]["n"]
    with pytest.raises(cfgmod.ConfigError) as e:
        runner.build(cfgmod.validate(job))
    _one_line(str(e.value), "prior.kind", "(64,)")


# ---- Gamma from files: scalar, diagonal, full ----

def _spd(m: int, seed: int = 0) -> np.ndarray:
    """A full SPD covariance with correlated neighbours (std about 0.1)."""
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(m, m)) / np.sqrt(m)
    return 0.01 * (0.5 * np.eye(m) + A @ A.T * 0.5)


def _dense_posterior(built):
    """m_post, var_post by the dense formula with the problem's Gamma (d x d: small grids only)."""
    post, pb = built.posterior, built.problem
    prior, G = post.prior, post.G
    d = prior.d
    eye = torch.eye(d, dtype=torch.float64).reshape(d, 1, G.n, G.n)
    H = G.apply(eye).T
    C = prior.dense_covariance()
    S = H @ C @ H.T + pb.Gamma.dense()
    K = C @ H.T @ torch.linalg.inv(S)
    mu = prior.mean.reshape(-1)
    mean = mu + K @ (pb.y - H @ mu)
    return mean, torch.diag(C - K @ H @ C)


@pytest.mark.parametrize("kind", ["covariance", "variances_file", "variances_list"])
def test_gamma_from_files_gives_the_exact_linear_gaussian_posterior(tmp_path, kind):
    n, k = 8, 2
    m = (n // k) ** 2
    full = _spd(m)
    if kind == "covariance":
        np.save(tmp_path / "gamma.npy", full)
        noise = {"covariance": str(tmp_path / "gamma.npy")}
    elif kind == "variances_file":
        np.save(tmp_path / "var.npy", np.diag(full))
        noise = {"variances": str(tmp_path / "var.npy")}
    else:
        noise = {"variances": np.diag(full).tolist()}
    cfg = cfgmod.validate({"problem": {"n": n, "k": k, "blur": 0.2, "noise": noise}})
    built = runner.build(cfg)
    Gamma = built.problem.Gamma
    assert Gamma.kind == ("full" if kind == "covariance" else "diagonal")
    want = full if kind == "covariance" else np.diag(np.diag(full))
    assert torch.allclose(Gamma.dense(), torch.from_numpy(want), rtol=1e-12, atol=1e-15)
    mean, var = _dense_posterior(built)
    assert torch.allclose(built.posterior.mean(built.problem.y).reshape(-1), mean, atol=1e-10)
    assert torch.allclose(built.posterior.variance().reshape(-1), var, atol=1e-10)


def test_noise_std_in_the_noise_key_is_the_same_problem_as_noise_std():
    a = runner.build(cfgmod.validate({"problem": {"n": 8, "k": 2, "noise": 0.2}}))
    b = runner.build(cfgmod.validate({"problem": {"n": 8, "k": 2, "noise_std": 0.2}}))
    assert torch.equal(a.problem.y, b.problem.y) and a.problem.Gamma.kind == "scalar"
    assert torch.equal(a.posterior.mean(a.problem.y), b.posterior.mean(b.problem.y))


def test_a_run_with_full_gamma_from_a_file_is_near_the_exact_posterior(tmp_path):
    """The run's ratio to the Bayes error is computed against the exact posterior with the full Gamma."""
    n, k = 16, 2
    m = (n // k) ** 2
    np.save(tmp_path / "gamma.npy", _spd(m, seed=1))
    job = {"name": "full-gamma", "output_dir": str(tmp_path / "runs"),
           "problem": {"n": n, "k": k, "noise": {"covariance": str(tmp_path / "gamma.npy")}},
           "enkg": {"ensemble_size": 128, "num_steps": 12}}
    out, metrics = runner.run(cfgmod.validate(job), progress=False)
    built = runner.build(cfgmod.validate(job))
    mean, _ = _dense_posterior(built)
    truth = built.problem.x_true.reshape(-1)
    bayes = float((mean - truth).norm() / truth.norm())
    assert metrics["posterior_mean_rel_l2"] == pytest.approx(bayes, rel=1e-8)
    assert metrics["ratio_to_bayes"] < 1.6, metrics["ratio_to_bayes"]  # J = 128: about the sampling floor


@pytest.mark.parametrize("noise, words", [
    ({"variances": [0.1] * 3}, ["problem.noise.variances", "3 values"]),
    ({"variances": [0.1] * 15 + [-1.0]}, ["problem.noise.variances", "not positive definite"]),
    ({"covariance": "missing.npy"}, ["problem.noise.covariance", "missing.npy"]),
])
def test_bad_gamma_is_one_line_naming_the_key(tmp_path, noise, words):
    with pytest.raises(cfgmod.ConfigError) as e:
        runner.build(cfgmod.validate({"problem": {"n": 8, "k": 2, "noise": noise}}))
    _one_line(str(e.value), *words)


def test_a_non_spd_covariance_file_is_one_line(tmp_path):
    bad = -np.eye(16)
    np.save(tmp_path / "g.npy", bad)
    with pytest.raises(cfgmod.ConfigError) as e:
        runner.build(cfgmod.validate({"problem": {"n": 8, "k": 2, "noise": {"covariance": str(tmp_path / "g.npy")}}}))
    _one_line(str(e.value), "problem.noise.covariance", "positive definite")


def test_a_store_written_before_the_new_null_keys_still_resumes(tmp_path):
    """problem.noise, execution.threads and execution.runtime_env are new keys with null defaults: a store whose
    config lacks them is no different (a key set to a value still is)."""
    from enkg_dist.store import RunStore

    cfg = cfgmod.validate({"problem": {"n": 8, "k": 2}}).model_dump(mode="json")
    old = json.loads(json.dumps(cfg))
    del old["problem"]["noise"], old["execution"]["threads"], old["execution"]["runtime_env"]
    store = RunStore.create(tmp_path / "s.zarr", config=old, config_yaml="name: t\n", J=4, state_shape=(1, 8, 8),
                            obs_size=16, num_steps=2, num_corrections=1)
    try:
        assert store.config_diff(cfg) == []
        cfg["execution"]["threads"] = 2
        cfg["problem"]["noise"] = {"std": 0.1, "variances": None, "covariance": None}
        assert store.config_diff(cfg) == ["execution.threads", "problem.noise.std"]
    finally:
        store.close()


# ---- on Ray ----

def test_python_plugins_give_identical_results_in_process_and_on_ray(plugin_dir, ray_session):
    """Each worker and prior actor imports the module itself (found through `path`: Ray was started before the
    module existed) and builds it once; the ensemble equals the in-process one bit for bit."""
    tmp_path, mod = plugin_dir
    parts = {}
    for backend in ("local", "ray"):
        job = _job(tmp_path, mod, **{"execution.backend": backend, "problem.path": [str(tmp_path)],
                                     "prior.path": [str(tmp_path)], "name": backend})
        out, metrics = runner.run(cfgmod.validate(job), progress=False)
        parts[backend] = torch.load(out / "ensemble.pt")["particles"]
        assert metrics["backend"] == backend and metrics["failed_evaluations"] == 0
    assert torch.equal(parts["local"], parts["ray"])


def test_a_module_missing_on_the_workers_is_one_line_naming_it(plugin_dir, ray_session, monkeypatch):
    """The module imports on the driver but not on the workers (no runtime_env, no path): the run stops with one
    line naming the factory and saying where to put it."""
    tmp_path, mod = plugin_dir
    (tmp_path / "driver_only.py").write_text(textwrap.dedent(f'''
        import os
        if os.environ.get("ENKG_TEST_DRIVER_PID") != str(os.getpid()):
            raise ImportError("only on the driver")
        from {mod} import make_forward
    '''))
    monkeypatch.setenv("ENKG_TEST_DRIVER_PID", str(os.getpid()))
    job = _job(tmp_path, mod, **{"execution.backend": "ray", "problem.forward": "driver_only:make_forward",
                                 "prior.path": [str(tmp_path)], "name": "forward"})
    with pytest.raises(RuntimeError) as e:  # every member fails with the reason; the cap stops the run
        runner.run(cfgmod.validate(job), progress=False)
    _one_line(str(e.value), "problem.forward", "driver_only:make_forward", "cannot import")
    job = _job(tmp_path, mod, **{"execution.backend": "ray", "prior.denoiser": "driver_only:make_forward",
                                 "prior.kwargs": {},
                                 "problem.path": [str(tmp_path)], "name": "prior"})
    with pytest.raises(FactoryError) as e:
        runner.run(cfgmod.validate(job), progress=False)
    _one_line(str(e.value), "prior.denoiser", "driver_only:make_forward", "cannot import")

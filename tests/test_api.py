"""The library API (issue 16, item 2): a run from Python objects (forward model, denoiser, observation, noise,
config) equals the same problem run from a job file with `problem.kind: python` bit for bit; it resumes to the
uninterrupted ensemble; bad arguments are one line; on Ray the objects are pickled to the workers and give the same
particles. And the version (item 5): `enkg-dist --version`, the store's run info and metrics.json."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

import enkg_dist
from enkg_dist import api, cli, interrupt, runner
from enkg_dist import config as cfgmod
from enkg_dist.store import committed_step_of, root_attrs

MODULE = '''
import time
import torch


def make_forward(m=16, d=64, seed=0, delay=0.0):
    """A linear G(x) = A x on (B, 1, 8, 8) states."""
    A = torch.randn(m, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) / d**0.5

    def G(x):
        if delay:
            time.sleep(delay)
        return x.reshape(x.shape[0], -1) @ A.T.to(x.dtype)

    return G


def make_denoiser(std=0.5):
    """The exact denoiser E[x0 | x0 + sigma n] of x0 ~ N(0, std^2 I)."""
    def D(x, sigma):
        s = sigma.reshape(-1, 1, 1, 1)
        return x * std**2 / (std**2 + s**2)

    return D
'''

SETTINGS = {"seed": 3, "enkg": {"ensemble_size": 12, "num_steps": 4},
            "execution": {"num_workers": 2, "worker_cpus": 1, "batch_size": 3}}


@pytest.fixture
def mod(tmp_path, monkeypatch):
    """The plug-in module (a linear G and the exact Gaussian denoiser) on sys.path, with a truth and an observation."""
    name = f"api_mod_{os.getpid()}_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = __import__(name)
    truth = np.random.default_rng(0).normal(size=(1, 8, 8)) * 0.5
    y = module.make_forward()(torch.from_numpy(truth)[None])[0].numpy() + 0.1 * np.random.default_rng(1).normal(
        size=16)
    np.save(tmp_path / "truth.npy", truth)
    np.save(tmp_path / "y.npy", y)
    return module, name, truth, y


def _one_line(text: str, *words: str) -> None:
    assert "\n" not in text.strip() and "Traceback" not in text, text
    for w in words:
        assert w in text, (w, text)


def _particles(out) -> torch.Tensor:
    return torch.load(out / "ensemble.pt")["particles"]


SAME = ("rel_l2_particles", "rel_l2_mean", "spread_skill", "crps", "forward_evaluations", "failed_evaluations")


@pytest.mark.parametrize("noise", ["std", "covariance"])
def test_an_api_run_equals_the_same_job_file_bit_for_bit(mod, tmp_path, noise):
    module, name, truth, y = mod
    gamma = 0.01 * np.eye(16) + 0.002 * np.ones((16, 16))  # full and symmetric positive definite
    np.save(tmp_path / "gamma.npy", gamma)
    job = {**SETTINGS, "name": "job", "output_dir": str(tmp_path / "runs"),
           "problem": {"kind": "python", "forward": f"{name}:make_forward", "n": 8, "obs_size": 16,
                       "observation": str(tmp_path / "y.npy"), "truth": str(tmp_path / "truth.npy"),
                       "noise": 0.1 if noise == "std" else {"covariance": str(tmp_path / "gamma.npy")}},
           "prior": {"kind": "python", "denoiser": f"{name}:make_denoiser"}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    out_job, m_job = runner.run(cfgmod.load_config(tmp_path / "job.yaml"), progress=False)

    result = api.run(forward=module.make_forward(), denoiser=module.make_denoiser(), y=torch.from_numpy(y),
                     noise=0.1 if noise == "std" else gamma, state_shape=(1, 8, 8), truth=truth,
                     config={**SETTINGS, "name": "api", "output_dir": str(tmp_path / "runs")}, progress=False)
    assert torch.equal(result.particles, _particles(out_job))
    assert torch.equal(result.mean, result.particles.mean(0)) and result.std.shape == (1, 8, 8)
    assert {k: result.metrics[k] for k in SAME} == {k: m_job[k] for k in SAME}
    assert result.metrics == json.loads((result.run_dir / "metrics.json").read_text())
    assert len(result.history) == 4 and api.load(result.run_dir).metrics == result.metrics
    # the arrays were written beside the run (named by content) and config.yaml names them
    cfg = result.config
    assert cfg.problem.kind == "python" and cfg.problem.forward == api.OBJECT_FACTORY
    assert cfg.problem.kwargs == {"object": f"{name}.make_forward.<locals>.G"}
    assert np.array_equal(np.load(cfg.problem.observation), y)
    if noise == "covariance":
        assert np.array_equal(np.load(cfg.problem.noise.covariance), gamma)
    else:
        assert cfg.problem.noise.std == 0.1
    assert sorted(p.name.split("-")[0] for p in (result.run_dir / api.INPUTS).iterdir()) == \
        sorted(["observation", "truth"] + (["covariance"] if noise == "covariance" else []))
    # the report and summary of the command line
    assert api.summary(result.run_dir)["committed_steps"] == 4


def test_a_config_given_as_a_job_file_with_factory_names_and_the_prior_of_our_own(mod, tmp_path):
    """The API with names instead of objects is the job file's path; one of our priors may be given as an object."""
    from enkg_dist.priors.gaussian import GaussianFieldPrior

    module, name, truth, y = mod
    a = api.run(forward=f"{name}:make_forward", denoiser=f"{name}:make_denoiser", y=y, noise=0.1,
                state_shape=(1, 8, 8), config={**SETTINGS, "output_dir": str(tmp_path / "a")}, progress=False)
    b = api.run(forward=module.make_forward(), denoiser=module.make_denoiser(), y=y, noise=0.1,
                state_shape=(1, 8, 8), config={**SETTINGS, "output_dir": str(tmp_path / "b")}, progress=False)
    assert a.config.problem.forward == f"{name}:make_forward" and torch.equal(a.particles, b.particles)
    prior = GaussianFieldPrior.matern_like(8, 2.0, 3.0, 0.5)
    c = api.run(forward=module.make_forward(), denoiser=prior, y=y, noise=np.full(16, 0.01),
                config={**SETTINGS, "output_dir": str(tmp_path / "c")}, progress=False)  # state_shape: the prior's
    assert c.particles.shape == (12, 1, 8, 8) and np.array_equal(np.load(c.config.problem.noise.variances),
                                                                 np.full(16, 0.01))


def test_an_api_run_stopped_and_resumed_gives_the_uninterrupted_ensemble(mod, tmp_path):
    module, name, truth, y = mod
    settings = {**SETTINGS, "enkg": {"ensemble_size": 12, "num_steps": 10}}

    def go(run_dir, delay=0.0):
        return api.run(forward=module.make_forward(delay=delay), denoiser=module.make_denoiser(), y=y, noise=0.1,
                       state_shape=(1, 8, 8), config=settings, run_dir=run_dir, progress=False)

    reference = go(tmp_path / "whole").particles
    run_dir, ended = tmp_path / "stopped", threading.Event()

    def stop_after_step_2():
        while committed_step_of(run_dir / "store.zarr") < 2 and not ended.is_set():
            time.sleep(0.005)
        if not ended.is_set():  # never once the run's handler is gone (that SIGTERM would end pytest)
            os.kill(os.getpid(), signal.SIGTERM)

    watcher = threading.Thread(target=stop_after_step_2, daemon=True)
    watcher.start()
    try:  # api.run installs the stop-on-signal handlers itself (the main thread)
        with pytest.raises(interrupt.Interrupted) as stopped:
            go(run_dir, delay=0.01)
    finally:
        ended.set()
        watcher.join()
    assert 3 <= stopped.value.step < 10 and not interrupt.active()
    with pytest.raises(api.InputError) as e:  # the objects cannot be rebuilt from config.yaml
        api.resume(run_dir, progress=False)
    _one_line(str(e.value), "forward", "give it again")
    result = api.resume(run_dir, forward=module.make_forward(), denoiser=module.make_denoiser(), progress=False)
    assert result.metrics["resumed_from_step"] == stopped.value.step - 1
    assert torch.equal(result.particles, reference)
    # running the same arguments into the finished directory resumes it (nothing left to do), other data is refused
    again = go(run_dir)
    assert torch.equal(again.particles, reference)
    with pytest.raises(cfgmod.ConfigError) as e:
        api.run(forward=module.make_forward(), denoiser=module.make_denoiser(), y=y + 1.0, noise=0.1,
                state_shape=(1, 8, 8), config=settings, run_dir=run_dir, progress=False)
    _one_line(str(e.value), "problem.observation")
    assert len(list((run_dir / api.INPUTS).glob("observation-*.npy"))) == 1  # the refused one's file is gone
    # the command line's resume refuses it in one line
    res = CliRunner().invoke(cli.app, ["resume", str(run_dir), "--no-progress"])
    assert res.exit_code == 2
    _one_line(res.output, "api error: forward", "enkg_dist.api.resume")


def _bad(module):
    G, D = module.make_forward(), module.make_denoiser()
    ok = dict(forward=G, denoiser=D, y=np.zeros(16), noise=0.1, state_shape=(1, 8, 8))
    return [
        (dict(ok, obs_size=15), ["y", "16 values", "obs_size is 15"]),
        (dict(ok, noise=np.ones(15)), ["noise", "15 variances", "16 values"]),
        (dict(ok, noise=np.eye(4)), ["noise", "(4, 4)", "(16, 16)"]),
        (dict(ok, noise=None), ["noise", "give the observation noise"]),
        (dict(ok, noise=-1.0), ["problem.noise.std"]),
        (dict(ok, state_shape=None), ["state_shape", "(1, 32, 32)"]),
        (dict(ok, truth=np.zeros((1, 4, 4))), ["truth", "(1, 4, 4)", "(1, 8, 8)"]),
        (dict(ok, y=None), ["y", "synthetic twin"]),
        (dict(ok, forward=42), ["forward", "int"]),
        (dict(ok, y=np.array(["a"] * 16)), ["y", "not an array of numbers"]),
        (dict(ok, backend="slurm"), ["backend", "'slurm'"]),
        (dict(ok, config={"problem": {"kind": "linear_gaussian"}}), ["forward", "linear_gaussian"]),
        (dict(ok, config={"problem": {"obs_size": 16}}), ["y", "problem.obs_size"]),
        (dict(ok, forward=None), ["give forward="]),
        (dict(ok, y=np.full(16, np.nan)), ["problem.observation", "not finite"]),
        (dict(ok, forward="no_such_module_anywhere:f"), ["problem.forward", "cannot import"]),
        (dict(ok, config={"enkg": {"ensemble_size": 1}}), ["enkg.ensemble_size"]),
    ]


def test_bad_arguments_are_one_line_and_leave_no_run_directory(mod, tmp_path):
    module = mod[0]
    for kwargs, words in _bad(module):
        out = tmp_path / "runs"
        config = {**kwargs.pop("config", {}), "output_dir": str(out)}
        with pytest.raises(cfgmod.ConfigError) as e:
            api.run(**kwargs, config=config, progress=False)
        _one_line(str(e.value), *words)
        assert not out.exists() or not any(out.iterdir()), (words, list(out.iterdir()))


def test_a_forward_model_returning_the_wrong_size_stops_the_run_in_one_line(mod, tmp_path):
    module, name, truth, y = mod
    with pytest.raises(RuntimeError) as e:
        api.run(forward=lambda x: x.reshape(x.shape[0], -1)[:, :15], denoiser=module.make_denoiser(), y=y,
                noise=0.1, state_shape=(1, 8, 8), config={**SETTINGS, "output_dir": str(tmp_path)}, progress=False)
    _one_line(str(e.value), "members failed", "returned shape", "expected (1, 16)")


# ---- the version (issue 16, item 5) ----

def test_the_version_on_the_command_line_in_the_store_and_in_metrics(mod, tmp_path):
    res = CliRunner().invoke(cli.app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"enkg-dist {enkg_dist.package_version()}"
    assert enkg_dist.package_version() == enkg_dist.__version__  # this checkout is what is installed
    module, name, truth, y = mod
    result = api.run(forward=module.make_forward(), denoiser=module.make_denoiser(), y=y, noise=0.1,
                     state_shape=(1, 8, 8), config={**SETTINGS, "output_dir": str(tmp_path)}, progress=False)
    assert root_attrs(result.run_dir / "store.zarr")["meta"]["version"] == enkg_dist.package_version()
    assert result.metrics["version"] == enkg_dist.package_version()


@pytest.mark.subprocess
def test_import_enkg_dist_stays_light_and_the_api_is_reexported_lazily():
    code = ("import sys, enkg_dist; assert 'torch' not in sys.modules and 'enkg_dist.api' not in sys.modules; "
            "run = enkg_dist.run; import enkg_dist.api as a; assert run is a.run and enkg_dist.Result is a.Result; "
            "from enkg_dist import report; assert report.__name__ == 'enkg_dist.report'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---- on Ray ----

def _closures():
    """G and D as closures: Ray pickles them by value (cloudpickle), so the workers need no module of ours."""
    A = torch.randn(16, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64) / 8

    def G(x):
        return x.reshape(x.shape[0], -1) @ A.T.to(x.dtype)

    def D(x, sigma):
        s = sigma.reshape(-1, 1, 1, 1)
        return x * 0.25 / (0.25 + s**2)

    return G, D


def test_python_objects_on_ray_give_the_in_process_particles(tmp_path, ray_session):
    G, D = _closures()
    y = G(torch.ones(1, 1, 8, 8, dtype=torch.float64))[0]
    parts = {}
    for backend in ("local", "ray"):
        r = api.run(forward=G, denoiser=D, y=y, noise=0.1, state_shape=(1, 8, 8), backend=backend,
                    config={**SETTINGS, "output_dir": str(tmp_path / backend)}, progress=False)
        assert r.metrics["backend"] == backend and r.metrics["failed_evaluations"] == 0
        parts[backend] = r.particles
    assert torch.equal(parts["local"], parts["ray"])

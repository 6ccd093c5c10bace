"""EDM training: the loss falls, checkpoints reload exactly and fail clearly, resume is bit-identical, the
augmentation is a symmetry of the Navier–Stokes solver, the CLI and torchrun (DDP) paths work."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from enkg_dist import rng
from enkg_dist.cli import app
from enkg_dist.priors.checkpoint import CheckpointError, flatten, load_checkpoint, load_denoiser, save_checkpoint
from enkg_dist.priors.gaussian import GaussianFieldPrior
from enkg_dist.priors.learned import LearnedPrior
from enkg_dist.priors.training import (TrainConfig, kolmogorov_transform, load_train_config, resolve_model, train,
                                       validate, validation_errors, validation_mse, validation_set)
from enkg_dist.priors.unet import EDMDenoiser, UNetConfig

TINY = UNetConfig(model_channels=8, channel_mult=(1, 2), attn_resolutions=(8,))
SMALL_CLI = ["--set", "model.model_channels=8", "--set", "model.channel_mult=[1, 2]", "--set", "batch_size=4",
             "--set", "warmup_steps=1", "--no-progress"]


def tiny_config(**kw) -> TrainConfig:
    base = dict(model=TINY, batch_size=8, lr=3e-3, warmup_steps=5, steps=40, log_every=1, val_every=20,
                checkpoint_every=20, val_draws=1, device="cpu")
    return TrainConfig(**{**base, **kw})


def assert_same_state(a, b):
    """The checkpoints in run folders a and b hold the same bits: weights, EMA, optimizer, step."""
    flat_a, flat_b = {}, {}
    flatten(load_checkpoint(a / "checkpoint.pt")[1], "", flat_a)
    flatten(load_checkpoint(b / "checkpoint.pt")[1], "", flat_b)
    assert flat_a.keys() == flat_b.keys() and all(torch.equal(flat_a[k], flat_b[k]) for k in flat_a)


def read_log(path):
    return [json.loads(line) for line in (path / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def grf():
    """72 draws of a smooth Gaussian random field on 16^2 (std 0.5): 64 to train on, 8 to validate."""
    prior = GaussianFieldPrior.matern_like(16, 2.0, 3.0, 0.5, zero_mean_mode=True)
    x = prior.sample(rng.member_normal(0, rng.DATA, range(72), (1, 16, 16))).float()
    return x[:64], x[64:]


@pytest.fixture(scope="module")
def trained(grf, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    summary = train(tiny_config(), grf[0], out, grf[1], {"note": "grf"}, progress=False)
    return out, summary


@pytest.fixture(scope="module")
def ns_data(tmp_path_factory):
    """A tiny Navier-Stokes data set from the project's generator (16^2, short spin-up)."""
    from enkg_dist.data.generate import generate_dataset

    path = tmp_path_factory.mktemp("data") / "ns16.zarr"
    generate_dataset(path, n=16, splits={"train": 16, "val": 2, "test": 1}, spinup=0.1, progress=False, batch=16)
    return path


def test_training_lowers_the_loss(trained):
    out, summary = trained
    log = read_log(out)
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 40 and all(map(torch.isfinite, torch.tensor(losses)))
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.92 * first, (first, last)  # EDM loss starts at ~1 (F = 0); measured 0.963 -> 0.847
    vals = [r["val_mse"] for r in log if "val_mse" in r]
    assert [list(v) for v in vals] == [["0.01", "0.1", "1", "10"]] * 2
    assert summary["step"] == 40 and summary["sha256"]


def test_checkpoints_reload_to_identical_outputs(trained, grf):
    out, summary = trained
    meta, state = load_checkpoint(out / "checkpoint.pt")
    assert meta["step"] == 40 and meta["unet"]["resolution"] == 16 and meta["data"]["note"] == "grf"
    assert meta["unet"]["sigma_data"] == pytest.approx(float(grf[0].std()))
    assert set(state) == {"model", "ema", "optimizer", "step"}
    x = torch.randn(4, 1, 16, 16, dtype=torch.float64)
    from_training = LearnedPrior(load_denoiser(out / "checkpoint.pt")[0], device="cpu").denoise(x, 0.4)
    shipped = LearnedPrior.from_checkpoint(out / "prior.pt", device="cpu")
    assert torch.equal(shipped.denoise(x, 0.4), from_training)
    # a reloaded model saved again gives the same content hash
    meta2, state2 = load_checkpoint(out / "prior.pt")
    assert save_checkpoint(out / "again.pt", meta2, state2) == summary["sha256"]


def test_validation_error_is_that_of_the_identity_for_a_perfect_skip(grf):
    """F = 0 at initialisation: D = c_skip x, whose error is known in closed form per draw."""
    cfg = tiny_config(val_bands=(0.1, 1.0))
    model = EDMDenoiser(resolve_model(cfg, grf[0]))
    vset = validation_set(grf[1], cfg)
    got = validate(model.eval(), vset, cfg, torch.device("cpu"))
    for c, (x0, sigma, noise) in vset.items():
        cs = (model.config.sigma_data**2 / (sigma**2 + model.config.sigma_data**2))[:, None, None, None]
        ref = float(((cs * (x0 + sigma[:, None, None, None] * noise) - x0) ** 2).mean())
        assert got[f"{c:g}"] == pytest.approx(ref, rel=1e-5)


def test_validation_dealt_over_ranks_gives_one_process_bits(grf):
    """Batches dealt over 3 ranks, each rank's errors zero at the others' batches, add up to one process's errors bit
    for bit: every batch is computed by exactly one rank, and the per-band means are the same floats."""
    cfg = tiny_config(val_bands=(0.1, 1.0), val_draws=3, val_batch=5)
    model = EDMDenoiser(resolve_model(cfg, grf[0])).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():  # away from the closed-form initial state
            p.add_(0.02 * torch.randn_like(p))
    vset = validation_set(grf[1], cfg)
    one = validation_errors(model, vset, cfg, "cpu")
    parts = torch.stack([validation_errors(model, vset, cfg, "cpu", rank, 3) for rank in range(3)])
    assert one.shape == (2, 5)  # 8 fields x 3 draws in batches of 5
    assert torch.equal((parts != 0).sum(0), torch.ones_like(one, dtype=torch.long))
    assert torch.equal(parts.sum(0), one)
    assert validation_mse(parts.sum(0), vset) == validate(model, vset, cfg, "cpu")


def test_checkpoint_errors_are_one_clear_line(trained, tmp_path):
    out, _ = trained
    good = (out / "prior.pt").read_bytes()
    meta, state = load_checkpoint(out / "prior.pt")

    def error_of(path) -> str:
        with pytest.raises(CheckpointError) as e:
            load_denoiser(path)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "checkpoint not found" in error_of(tmp_path / "nope.pt")
    (tmp_path / "trunc.pt").write_bytes(good[: len(good) // 2])
    assert "corrupt or truncated" in error_of(tmp_path / "trunc.pt")
    flipped = bytearray(good)
    for i in range(len(good) // 2, len(good) // 2 + 64):
        flipped[i] ^= 0xFF
    (tmp_path / "flip.pt").write_bytes(bytes(flipped))
    assert "corrupt" in error_of(tmp_path / "flip.pt")
    raw = torch.load(out / "prior.pt", weights_only=True)
    next(iter(raw["tensors"].values())).add_(1.0)
    torch.save(raw, tmp_path / "edited.pt")
    assert "content hash mismatch" in error_of(tmp_path / "edited.pt")
    save_checkpoint(tmp_path / "wide.pt", {**meta, "unet": {**meta["unet"], "model_channels": 12}}, state)
    assert "has shape" in error_of(tmp_path / "wide.pt")
    save_checkpoint(tmp_path / "extra.pt", {**meta, "unet": {**meta["unet"], "colour": 1}}, state)
    assert "unet config: colour: Extra inputs are not permitted" in error_of(tmp_path / "extra.pt")
    (tmp_path / "text.pt").write_text("hello")
    assert "corrupt or truncated" in error_of(tmp_path / "text.pt")


def test_resume_is_bit_identical(grf, tmp_path):
    """6 steps straight vs 3, a 'crash' (a stale log line), then resume to 6: identical weights, EMA, optimizer."""
    cfg = tiny_config(steps=6, checkpoint_every=3, val_every=3, warmup_steps=2,
                      model=TINY.model_copy(update={"dropout": 0.2}))
    train(cfg, grf[0], tmp_path / "a", grf[1], progress=False)
    train(cfg.model_copy(update={"steps": 3}), grf[0], tmp_path / "b", grf[1], progress=False)
    with open(tmp_path / "b" / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "loss": 123.0}) + "\n")
    train(cfg, grf[0], tmp_path / "b", grf[1], resume=True, progress=False)
    assert_same_state(tmp_path / "a", tmp_path / "b")
    strip = lambda log: [{k: v for k, v in r.items() if k != "sec_per_step"} for r in log]  # noqa: E731
    assert strip(read_log(tmp_path / "a")) == strip(read_log(tmp_path / "b"))


def test_resume_and_restart_are_guarded(trained, grf, tmp_path):
    out, _ = trained
    with pytest.raises(ValueError, match="already holds a training checkpoint"):
        train(tiny_config(), grf[0], out, progress=False)
    with pytest.raises(ValueError, match=r"cannot resume with a different config in \['lr'\]"):
        train(tiny_config(lr=1e-3, steps=41), grf[0], out, resume=True, progress=False)


def test_config_errors_are_one_line(tmp_path, grf):
    with pytest.raises(ValueError, match="train config error: learning_rate: unknown key"):
        load_train_config(overrides=["learning_rate=1"])
    cfg = load_train_config(overrides=["model.model_channels=8", "steps=3"])
    assert cfg.model.model_channels == 8 and cfg.steps == 3
    with pytest.raises(ValueError, match="model config does not fit the data"):
        resolve_model(TrainConfig(model=UNetConfig(resolution=32)), grf[0])
    (tmp_path / "t.yaml").write_text("batch_size: 0\n")
    with pytest.raises(ValueError, match="train config error: batch_size"):
        load_train_config(tmp_path / "t.yaml")


@pytest.mark.parametrize("g", [(3, 0, 0), (0, 1, 0), (0, 2, 0), (0, 0, 1), (5, 3, 1)])
def test_kolmogorov_augmentation_commutes_with_the_solver(g):
    """solve(g·w0) = g·solve(w0) for the forced NS equation (to rounding), so g preserves the data distribution."""
    from enkg_dist.problems.navier_stokes import NavierStokes2D, solve

    n = 16
    eq = NavierStokes2D(n, Re=200.0, dealias="disc")
    w0 = GaussianFieldPrior.matern_like(n, 2.5, 3.0, 5.0, zero_mean_mode=True).sample(
        rng.member_normal(0, rng.DATA, [0], (n, n)))
    a, k, r = (torch.tensor([v]) for v in g)

    def act(w):
        return kolmogorov_transform(w[:, None], a, k, r, eq.forcing_wavenumber)[:, 0]

    def run(w):
        return solve(w, 0.3, mode="per_member", equation=eq).omega

    assert not torch.allclose(act(w0), w0)
    torch.testing.assert_close(run(act(w0)), act(run(w0)), rtol=0, atol=1e-12)
    # a quarter turn is not a symmetry (it turns the forcing): the same check fails for it
    turned = run(w0.transpose(-1, -2)) - run(w0).transpose(-1, -2)
    assert float(turned.abs().max()) > 0.1


def test_train_prior_command(ns_data, tmp_path):
    out = tmp_path / "cli"
    res = CliRunner().invoke(app, ["train-prior", str(ns_data), "--out", str(out), "--steps", "2", *SMALL_CLI])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["step"] == 2
    res = CliRunner().invoke(app, ["train-prior", str(ns_data), "--out", str(out), "--resume", "--steps", "3",
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    meta, _ = load_checkpoint(out / "prior.pt")
    assert meta["step"] == 3 and meta["data"]["attributes"]["n"] == 16 and meta["data"]["num_samples"] == 16
    res = CliRunner().invoke(app, ["train-prior", str(ns_data), "--out", str(out), "--set", "lr=1e-3",
                                   "--resume", "--no-progress"])
    assert res.exit_code == 2 and "error: " in res.output and "['lr']" in res.output


@pytest.mark.slow
def test_torchrun_two_processes(ns_data, tmp_path):
    """DDP on CPU (gloo), 2 ranks: finishes, finite loss, rank 0 alone writes (one log line per step), and the
    weights equal a single process's that averages the two ranks' gradients itself."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
           "enkg_dist.cli", "train-prior", str(ns_data), "--out", str(out), "--steps", "4",
           "--set", "log_every=1", "--set", "checkpoint_every=2", "--set", "val_every=2", "--set", "val_batch=3",
           *SMALL_CLI]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:  # the launcher and both ranks
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr[-3000:]
    log = read_log(out)
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log if "loss" in r)
    meta, _ = load_checkpoint(out / "checkpoint.pt")
    assert meta["world_size"] == 2 and meta["step"] == 4
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "log.jsonl", "prior.pt"]
    assert stdout.count('"step": 4') == 1  # one summary line: rank 0's

    # validation dealt over the two ranks (8 samples per band in batches of 3) logs what one process computes
    from enkg_dist.data.generate import open_dataset
    from enkg_dist.priors.training import Run, apply_gradients, rank_loss

    cfg, model_cfg = TrainConfig(**meta["train"]), UNetConfig(**meta["unet"])
    _, state = load_checkpoint(out / "checkpoint.pt")
    ema = EDMDenoiser(model_cfg)
    ema.load_state_dict(state["ema"])
    val = torch.as_tensor(open_dataset(ns_data, "val")[:], dtype=torch.float32)
    logged = [r for r in log if "val_mse" in r]
    assert [r["step"] for r in logged] == [2, 4]
    want = validate(ema.eval(), validation_set(val, cfg), cfg, "cpu")
    assert logged[-1]["val_mse"] == pytest.approx(want, rel=1e-6)

    # the same 4 steps in one process, averaging the two ranks' gradients by hand, give the same weights (one
    # rank's gradient alone does not; Adam cannot tell a mean from a sum, so this checks which gradients combine)
    data = torch.as_tensor(open_dataset(ns_data, "train")[:], dtype=torch.float32)
    run = Run(cfg, model_cfg, torch.device("cpu"))
    run.model.train()
    while run.step < 4:
        run.opt.zero_grad(set_to_none=True)
        for rank in (0, 1):
            (rank_loss(run, run.model, data, cfg, rank, 2, torch.device("cpu")) / 2).backward()
        apply_gradients(run, cfg)
    for name, value in run.model.state_dict().items():
        torch.testing.assert_close(value, state["model"][name], rtol=1e-4, atol=1e-6, msg=name)
    assert any(not torch.equal(v, Run(cfg, model_cfg, "cpu").model.state_dict()[k])
               for k, v in state["model"].items())  # the weights did move


def test_learning_rate_schedule_warms_up_then_follows_the_cosine():
    """Warm-up (step + 1)/W, then lr until the decay starts, the cosine's midpoint at half way, lr_final after."""
    from enkg_dist.priors.training import learning_rate

    cfg = tiny_config(lr=1e-3, warmup_steps=4, lr_decay_start=10, lr_decay_steps=20, lr_final=0.1)
    assert learning_rate(0, cfg) == pytest.approx(2.5e-4) and learning_rate(3, cfg) == pytest.approx(1e-3)
    assert learning_rate(10, cfg) == pytest.approx(1e-3)
    assert learning_rate(20, cfg) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert learning_rate(30, cfg) == pytest.approx(1e-4) and learning_rate(500, cfg) == pytest.approx(1e-4)
    lrs = [learning_rate(t, cfg) for t in range(10, 31)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert learning_rate(500, tiny_config(lr=1e-3, warmup_steps=4)) == 1e-3  # no decay by default


def test_a_decay_added_at_resume_equals_an_uninterrupted_run_with_it(grf, tmp_path):
    """Train 3 steps with no decay, resume to 6 with a decay from step 3: the bits of a run with the decay throughout;
    a decay that would have changed steps before the checkpoint is refused."""
    cfg = tiny_config(steps=6, checkpoint_every=3, val_every=3, warmup_steps=2, lr_decay_start=3, lr_decay_steps=2,
                      lr_final=0.2)
    train(cfg, grf[0], tmp_path / "a", grf[1], progress=False)
    plain = cfg.model_copy(update={"steps": 3, "lr_decay_start": None, "lr_decay_steps": 1000, "lr_final": 0.0})
    train(plain, grf[0], tmp_path / "b", grf[1], progress=False)
    changed = r"cannot resume with a different config in \['lr_decay_start', 'lr_decay_steps', 'lr_final'\]"
    with pytest.raises(ValueError, match=changed):
        train(cfg.model_copy(update={"lr_decay_start": 1}), grf[0], tmp_path / "b", resume=True, progress=False)
    train(cfg, grf[0], tmp_path / "b", grf[1], resume=True, progress=False)
    assert_same_state(tmp_path / "a", tmp_path / "b")
    lrs = [r["lr"] for r in read_log(tmp_path / "b") if "lr" in r]  # record t holds step t - 1's rate
    assert lrs == pytest.approx([1.5e-3, 3e-3, 3e-3, 3e-3, 3e-3 * 0.6, 3e-3 * 0.2])

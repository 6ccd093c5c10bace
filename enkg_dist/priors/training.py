"""EDM training of the UNet prior (Karras et al. 2022, §5 and Table 1): ln σ ~ N(P_mean, P_std²), loss
λ(σ) ‖D(x0 + σ n; σ) − x0‖² with λ(σ) = (σ² + σ_d²)/(σ σ_d)², Adam with linear warm-up and an optional cosine
decay, gradient clipping, an EMA of the weights (EDM's half-life in samples with ramp-up), validation denoising
error per σ band, periodic checkpoints and bit-identical resume.

Randomness is stateless: step t on rank r draws its batch, augmentation, σ, noise and dropout from a generator keyed
by (seed, rank, t), so a resumed run repeats an uninterrupted one bit for bit from model, EMA, optimizer and step
alone. Multi-process: launched by `torchrun --nproc-per-node=K` (gloo on CPU, nccl on GPU), the global batch is split
over ranks, DistributedDataParallel averages gradients, the validation batches are dealt over the ranks (the same
bits as one process's), and rank 0 alone writes logs and checkpoints.

Augmentation "kolmogorov" uses only symmetries of the data's distribution: the GRF initial fields are isotropic and
sign-symmetric, and the NS equation with forcing −A cos(k_f y) (y the last axis) commutes with shifts in x, with
the shift-reflection S: ω(x, y) → −ω(−x, y − π/k_f) and with the rotation by π: ω(x, y) → ω(−x, −y) (the forced
Kolmogorov flow's symmetry group); tests check that the solver commutes with each. Rotations by π/2 and y-reflections
alone are not symmetries (they change the forcing), so they are not used.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from enkg_dist import rng
from enkg_dist.devices import hardware_kind, repeatable, resolve_device
from enkg_dist.heap import retain_freed_memory
from enkg_dist.priors.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from enkg_dist.priors.unet import EDMDenoiser, UNetConfig
from enkg_dist.schema import apply_overrides, one_line_error

CHECKPOINT, PRIOR, LOG = "checkpoint.pt", "prior.pt", "log.jsonl"
# keys that may change on resume (they do not change the weights, or only their rounding)
RESUME_FREE = {"steps", "checkpoint_every", "val_every", "log_every", "val_bands", "val_draws", "val_batch", "device",
               "threads"}
# keys of the learning-rate schedule: they may change on resume when the schedule up to the checkpoint stays the same
SCHEDULE = ("lr_decay_start", "lr_decay_steps", "lr_final")


class TrainConfig(BaseModel):
    """Training hyper-parameters; `model` sizes the UNet (resolution and sigma_data default to the data's)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: UNetConfig = UNetConfig()
    batch_size: int = Field(32, ge=1, description="global batch (split over ranks)")
    lr: float = Field(5e-4, gt=0)
    warmup_steps: int = Field(200, ge=0, description="linear learning-rate warm-up")
    lr_decay_start: int | None = Field(None, ge=0, description="step where a cosine decay of the learning rate "
                                       "starts; null: constant after the warm-up")
    lr_decay_steps: int = Field(1000, ge=1, description="length of the cosine decay")
    lr_final: float = Field(0.0, ge=0, le=1, description="learning rate after the decay, as a fraction of lr")
    steps: int = Field(2000, ge=1, description="total optimizer steps")
    ema_halflife: float = Field(10_000, gt=0, description="EMA half-life in training samples")
    ema_rampup: float | None = Field(0.05, gt=0, description="half-life <= rampup x samples seen (EDM); null: off")
    grad_clip: float | None = Field(1.0, gt=0, description="max gradient norm; null: no clipping")
    p_mean: float = -1.2
    p_std: float = Field(1.2, gt=0)
    augment: Literal["none", "kolmogorov"] = "kolmogorov"
    forcing_wavenumber: int = Field(4, ge=1, description="k_f of the data's forcing, for the augmentation")
    seed: int = Field(0, ge=0)
    log_every: int = Field(10, ge=1)
    val_every: int = Field(250, ge=1)
    checkpoint_every: int = Field(500, ge=1)
    val_bands: tuple[float, ...] = Field((0.01, 0.1, 1.0, 10.0), description="centres of decade-wide σ bands")
    val_draws: int = Field(4, ge=1, description="fixed noise draws per validation sample and band")
    val_batch: int = Field(256, ge=1, description="validation batch; the batches are dealt over the ranks")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["float32", "bfloat16"] = Field("float32", description="bfloat16: autocast of the UNet")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (null: leave as is)")


def config_error(e: ValidationError) -> ValueError:
    """A one-line ValueError from a pydantic error of a TrainConfig."""
    return ValueError(one_line_error(e, TrainConfig, "train config error"))


def load_train_config(path=None, overrides: list[str] = (), base: dict | None = None) -> TrainConfig:
    """TrainConfig from `base` (e.g. a stored one), then a YAML file, then KEY=VALUE overrides."""
    data = dict(base or {})
    if path is not None:
        if not Path(path).is_file():
            raise ValueError(f"train config error: {path} not found")
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"train config error: {path}: expected a mapping of keys")
        data.update(loaded)
    try:
        return TrainConfig.model_validate(apply_overrides(data, list(overrides)))
    except ValidationError as e:
        raise config_error(e) from None


def resolve_model(cfg: TrainConfig, data: torch.Tensor) -> UNetConfig:
    """The UNet config for `data` (S, C, N, N): resolution, channels and sigma_data from the data unless set."""
    m, (c, n) = cfg.model, data.shape[1:3]
    given = m.model_fields_set
    fill = {"resolution": n, "in_channels": c, "out_channels": c, "sigma_data": float(data.std())}
    clash = {k: (getattr(m, k), v) for k, v in fill.items() if k in given and k != "sigma_data" and getattr(m, k) != v}
    if clash:
        raise ValueError(f"model config does not fit the data (config, data): {clash}")
    try:
        return UNetConfig.model_validate({**m.model_dump(), **{k: v for k, v in fill.items() if k not in given}})
    except ValidationError as e:
        raise config_error(e) from None


def kolmogorov_transform(x: torch.Tensor, a: torch.Tensor, k: torch.Tensor, r: torch.Tensor, forcing_wavenumber: int):
    """g·x for g = T_a S^k R^r per member: x'[i, j] = (−1)^k x[ex (i − a), ey (j − k q)] (indices mod n),
    q = n/(2 k_f), ey = (−1)^r, ex = (−1)^(k+r); i along x, j along y (the forcing's axis, the last one)."""
    b, c, n = x.shape[0], x.shape[1], x.shape[-1]
    q = n // (2 * forcing_wavenumber)
    ey, ex = 1 - 2 * r, 1 - 2 * ((k + r) % 2)
    ar = torch.arange(n, device=x.device)
    rows = (ex[:, None] * (ar[None, :] - a[:, None])) % n
    cols = (ey[:, None] * (ar[None, :] - k[:, None] * q)) % n
    x = torch.gather(x, 2, rows[:, None, :, None].expand(b, c, n, n))
    x = torch.gather(x, 3, cols[:, None, None, :].expand(b, c, n, n))
    return x * (1 - 2 * (k % 2)).to(x.dtype)[:, None, None, None]


def kolmogorov_augment(x: torch.Tensor, gen: torch.Generator, forcing_wavenumber: int) -> torch.Tensor:
    """A uniformly random symmetry g = T_a S^k R^r (a < n, k < 2 k_f, r < 2) applied to each member."""
    b, n, dev = x.shape[0], x.shape[-1], x.device
    a = torch.randint(n, (b,), generator=gen).to(dev)
    k = torch.randint(2 * forcing_wavenumber, (b,), generator=gen).to(dev)
    r = torch.randint(2, (b,), generator=gen).to(dev)
    return kolmogorov_transform(x, a, k, r, forcing_wavenumber)


def edm_loss(model, x0: torch.Tensor, gen: torch.Generator, cfg: TrainConfig, sigma_data: float) -> torch.Tensor:
    """Per-member EDM loss λ(σ) mean‖D(x0 + σ n; σ) − x0‖², ln σ ~ N(P_mean, P_std²), λ = (σ² + σ_d²)/(σ σ_d)²."""
    sigma = (torch.randn(x0.shape[0], generator=gen).to(x0.device) * cfg.p_std + cfg.p_mean).exp()
    noise = torch.randn(x0.shape, generator=gen).to(x0.device)
    d = model(x0 + sigma[:, None, None, None] * noise, sigma, amp_dtype(cfg))
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    return weight * ((d - x0) ** 2).mean(dim=(1, 2, 3))


def amp_dtype(cfg: TrainConfig) -> torch.dtype | None:
    return torch.bfloat16 if cfg.precision == "bfloat16" else None


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then constant, or a cosine decay from lr to
    lr_final·lr over lr_decay_steps from lr_decay_start (Loshchilov & Hutter 2017, no restarts)."""
    lr = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
    if cfg.lr_decay_start is None or step < cfg.lr_decay_start:
        return lr
    t = min(1.0, (step - cfg.lr_decay_start) / cfg.lr_decay_steps)
    return lr * (cfg.lr_final + (1.0 - cfg.lr_final) * 0.5 * (1.0 + math.cos(math.pi * t)))


def ema_beta(step: int, cfg: TrainConfig) -> float:
    """EDM's EMA decay after `step` steps: β = 0.5^(batch/h), h = min(half-life, rampup · samples seen)."""
    half = cfg.ema_halflife
    if cfg.ema_rampup is not None:
        half = min(half, step * cfg.batch_size * cfg.ema_rampup)
    return 0.5 ** (cfg.batch_size / max(half, 1e-8))


def validation_set(val: torch.Tensor, cfg: TrainConfig) -> dict[float, tuple]:
    """Per band centre c: (x0, σ, noise) with σ = c·10^u, u ~ U(−½, ½), fixed by the seed."""
    gen = torch.Generator().manual_seed(rng.torch_seeds(cfg.seed, rng.VALIDATE)[0])
    x0 = val.repeat_interleave(cfg.val_draws, dim=0)
    out = {}
    for c in cfg.val_bands:
        sigma = c * 10 ** (torch.rand(x0.shape[0], generator=gen) - 0.5)
        out[c] = (x0, sigma, torch.randn(x0.shape, generator=gen))
    return out


@torch.no_grad()
def validation_errors(model: EDMDenoiser, vset: dict, cfg: TrainConfig, device, rank: int = 0,
                      world: int = 1) -> torch.Tensor:
    """Sum of squared errors of D(x0 + σ n; σ) against x0 per (σ band, batch of cfg.val_batch) for rank `rank`'s
    batches (every `world`-th, from the rank-th); zero for the other ranks' batches, so a sum over ranks is exact."""
    starts = range(0, next(iter(vset.values()))[0].shape[0], cfg.val_batch)
    err = torch.zeros(len(vset), len(starts), dtype=torch.float64)
    for b, (x0, sigma, noise) in enumerate(vset.values()):
        for i in range(rank, len(starts), world):
            xb, sb, nb = (t[starts[i] : starts[i] + cfg.val_batch].to(device) for t in (x0, sigma, noise))
            d = model(xb + sb[:, None, None, None] * nb, sb, amp_dtype(cfg))
            err[b, i] = float(((d - xb) ** 2).sum())
    return err


def validation_mse(err: torch.Tensor, vset: dict) -> dict[str, float]:
    """Mean squared error per σ band (identity's error: σ²) from validation_errors summed over the ranks; the
    batches add in their order, so every world size gives the same bits."""
    return {f"{c:g}": sum(row.tolist()) / x0.numel() for row, (c, (x0, _, _)) in zip(err, vset.items())}


def validate(model: EDMDenoiser, vset: dict, cfg: TrainConfig, device) -> dict[str, float]:
    """Mean squared error of D(x0 + σ n; σ) against x0 per σ band, in one process."""
    return validation_mse(validation_errors(model, vset, cfg, device), vset)


class Run:
    """Model, EMA, optimizer and step of a training run, with its (de)serialisation."""

    def __init__(self, cfg: TrainConfig, model_cfg: UNetConfig, device):
        torch.manual_seed(cfg.seed)
        self.model = EDMDenoiser(model_cfg).to(device)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.step = 0

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict(),
                "step": self.step}

    def save(self, out_dir: Path, meta: dict) -> str:
        """Write checkpoint.pt (everything, for resuming) and prior.pt (EMA weights only); returns prior.pt's hash."""
        save_checkpoint(out_dir / CHECKPOINT, meta, self.state())
        return save_checkpoint(out_dir / PRIOR, {**meta, "kind": "prior"}, {"model": self.ema.state_dict()})

    def load(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        self.step = int(state["step"])


def _distributed(device: torch.device) -> tuple[int, int, torch.device, bool]:
    """(rank, world size, device, whether this call started the process group) under torchrun, or (0, 1, device,
    False) in a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
        torch.cuda.set_device(device)
    if world == 1:
        return 0, 1, device, False
    import torch.distributed as dist

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device, started


def _check_resume(stored: dict, cfg: TrainConfig, model_cfg: UNetConfig, path, step: int) -> None:
    """Refuse a resume whose config differs from the stored one in keys that change the result: a schedule key may
    change when the learning rate of every step before the checkpoint's `step` stays the same (a decay added later)."""
    now = {**cfg.model_dump(mode="json"), "model": model_cfg.model_dump(mode="json")}
    stored = {**{k: TrainConfig.model_fields[k].default for k in SCHEDULE}, **stored}  # saved before these keys
    same_past = all(learning_rate(t, cfg.model_copy(update={k: stored[k] for k in SCHEDULE})) == learning_rate(t, cfg)
                    for t in range(step))
    free = RESUME_FREE | (set(SCHEDULE) if same_past else set())
    diff = sorted(k for k in set(now) | set(stored) if k not in free and now.get(k) != stored.get(k))
    if diff:
        raise ValueError(f"{path}: cannot resume with a different config in {diff} (stored: "
                         f"{ {k: stored.get(k) for k in diff} })")


def _log(out_dir: Path, record: dict) -> None:
    with open(out_dir / LOG, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_log(out_dir: Path, step: int) -> None:
    """Keep the log records up to `step` (those after it are repeated by the resumed run)."""
    path = out_dir / LOG
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in lines))


def train(cfg: TrainConfig, data: torch.Tensor, out_dir, val: torch.Tensor | None = None,
          data_info: dict | None = None, resume: bool = False, progress: bool = True) -> dict:
    """Train on `data` (S, C, N, N) into `out_dir` (checkpoint.pt, prior.pt with the EMA weights, log.jsonl).

    resume: continue from out_dir/checkpoint.pt when it exists (refused if the config differs in keys that change the
    result; `steps` may grow). Returns a summary (step, last loss, seconds, paths, content hash of prior.pt).
    """
    data = torch.as_tensor(data, dtype=torch.float32)
    if data.ndim != 4 or data.shape[-1] != data.shape[-2] or not bool(torch.isfinite(data).all()):
        raise ValueError(f"training data must be finite fields (S, C, N, N), got shape {tuple(data.shape)}")
    model_cfg = resolve_model(cfg, data)
    if cfg.augment == "kolmogorov" and model_cfg.resolution % (2 * cfg.forcing_wavenumber):
        raise ValueError(f"augment 'kolmogorov' needs N divisible by 2 k_f = {2 * cfg.forcing_wavenumber}")
    out_dir = Path(out_dir)
    ckpt = out_dir / CHECKPOINT
    if ckpt.exists() and not resume:
        raise ValueError(f"{out_dir} already holds a training checkpoint; resume it or choose another output")
    rank, world, device, started = _distributed(resolve_device(cfg.device))
    repeatable(device, training=True)
    if device.type == "cpu":  # validation's batches of 256 fault in their activations at every layer otherwise
        retain_freed_memory()
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        if cfg.batch_size % world:
            raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {world} processes")
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            return _train(cfg, model_cfg, data, val, data_info or {}, out_dir, ckpt if ckpt.exists() else None,
                          rank, world, device, progress)
    finally:
        torch.set_num_threads(threads)
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train_step(run: Run, net, data: torch.Tensor, cfg: TrainConfig, rank: int, world: int, device):
    """One optimizer step on this rank's batch, from the (seed, rank, step) stream; returns (loss, grad norm)."""
    loss = rank_loss(run, net, data, cfg, rank, world, device)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()  # under DDP: the gradient averaged over the ranks
    return loss.detach(), apply_gradients(run, cfg)


def rank_loss(run: Run, net, data: torch.Tensor, cfg: TrainConfig, rank: int, world: int, device) -> torch.Tensor:
    """EDM loss (Karras et al. 2022 eq. 2) of rank `rank`'s share of step run.step's batch."""
    s_data, s_drop = rng.torch_seeds(cfg.seed, rng.TRAIN, rank, run.step)
    gen = torch.Generator().manual_seed(s_data)  # drawn on the CPU, moved: the same draws on any device
    torch.manual_seed(s_drop)  # dropout draws from the global generator
    x0 = data[torch.randint(data.shape[0], (cfg.batch_size // world,), generator=gen).to(device)]
    if cfg.augment == "kolmogorov":
        x0 = kolmogorov_augment(x0, gen, cfg.forcing_wavenumber)
    return edm_loss(net, x0, gen, cfg, run.model.config.sigma_data).mean()


def apply_gradients(run: Run, cfg: TrainConfig) -> torch.Tensor:
    """Adam step with warm-up and clipping from the gradients in run.model, then the EMA; returns the grad norm."""
    for p in run.model.parameters():  # as EDM: a non-finite gradient entry must not poison the weights
        torch.nan_to_num(p.grad, nan=0.0, posinf=1e5, neginf=-1e5, out=p.grad)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip or math.inf)
    for group in run.opt.param_groups:
        group["lr"] = learning_rate(run.step, cfg)
    run.opt.step()
    run.step += 1
    beta = ema_beta(run.step, cfg)
    with torch.no_grad():
        for pe, p in zip(run.ema.parameters(), run.model.parameters()):
            pe.lerp_(p, 1.0 - beta)
    return grad_norm


def _train(cfg, model_cfg, data, val, data_info, out_dir, ckpt, rank, world, device, progress) -> dict:
    run = Run(cfg, model_cfg, device)
    if ckpt is not None:
        meta, state = load_checkpoint(ckpt)
        _check_resume(meta["train"], cfg, model_cfg, ckpt, int(state["step"]))
        if meta.get("hardware", hardware_kind(device)) != hardware_kind(device):
            warnings.warn(f"{ckpt}: resuming on {hardware_kind(device)} a run trained on {meta['hardware']}: the "
                          "weights will not be bit-identical to an uninterrupted run", RuntimeWarning, stacklevel=2)
        run.load(state)
    meta = {"kind": "training", "world_size": world, "hardware": hardware_kind(device),
            "unet": model_cfg.model_dump(mode="json"),
            "train": {**cfg.model_dump(mode="json"), "model": model_cfg.model_dump(mode="json")},
            "data": {"num_samples": int(data.shape[0]), "mean": float(data.mean()), "std": float(data.std()),
                     **data_info}}
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        _truncate_log(out_dir, run.step)
    net = run.model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(run.model, device_ids=[device.index] if device.type == "cuda" else None)
    data = data.to(device)
    vset = validation_set(val, cfg) if val is not None and len(val) else None
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=run.step, unit="step", desc="train prior")
    loss_sum, n_sum, busy, start = torch.zeros((), device=device), 0, 0.0, time.perf_counter()
    last, digest = {}, None
    run.model.train()
    while run.step < cfg.steps:
        t0 = time.perf_counter()
        loss, grad_norm = _train_step(run, net, data, cfg, rank, world, device)
        loss_sum, n_sum = loss_sum + loss, n_sum + 1
        if bar is not None:
            bar.update(1)
        if run.step % cfg.log_every == 0 or run.step == cfg.steps:
            mean_loss = _all_mean(float(loss_sum) / n_sum, world, device)
            busy += time.perf_counter() - t0
            last = {"step": run.step, "loss": mean_loss, "grad_norm": float(grad_norm),
                    "lr": run.opt.param_groups[0]["lr"], "sec_per_step": busy / n_sum}
            if rank == 0:
                _log(out_dir, last)
            if bar is not None:
                bar.set_postfix(loss=f"{mean_loss:.4f}")
            loss_sum, n_sum, busy = torch.zeros((), device=device), 0, 0.0
        else:
            busy += time.perf_counter() - t0
        if vset is not None and (run.step % cfg.val_every == 0 or run.step == cfg.steps):
            err = _all_sum(validation_errors(run.ema, vset, cfg, device, rank, world), world, device)
            if rank == 0:
                _log(out_dir, {"step": run.step, "val_mse": validation_mse(err, vset)})
        if rank == 0 and (run.step % cfg.checkpoint_every == 0 or run.step == cfg.steps):
            digest = run.save(out_dir, {**meta, "step": run.step})
    if bar is not None:
        bar.close()
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # every rank returns once rank 0's last checkpoint is written
    return {"step": run.step, "loss": last.get("loss"), "seconds": time.perf_counter() - start, "rank": rank,
            "world_size": world, "checkpoint": str(out_dir / CHECKPOINT), "prior": str(out_dir / PRIOR),
            "sha256": digest}


def _all_sum(t: torch.Tensor, world: int, device) -> torch.Tensor:
    """Sum of a per-rank tensor over all ranks (float64, on the CPU)."""
    if world == 1:
        return t
    import torch.distributed as dist

    t = t.to(device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return t.cpu()


def _all_mean(value: float, world: int, device) -> float:
    """Mean of a per-rank scalar over all ranks."""
    return float(_all_sum(torch.tensor([value], dtype=torch.float64), world, device)) / world


def train_prior(train_x, val_x, attrs: dict, source: str, out_dir, cfg: TrainConfig, resume: bool = False,
                progress: bool = True) -> dict:
    """Train on a data set's train split, validating on its val split (None: no validation); `attrs` are the data
    set's attributes (its generator's parameters), checked against the augmentation. The caller reads the data set
    (`enkg_dist.data.training_splits`): training imports no data package."""
    kf = attrs.get("forcing_wavenumber")
    if cfg.augment == "kolmogorov" and kf is not None and int(kf) != cfg.forcing_wavenumber:
        raise ValueError(f"data forcing wavenumber {kf} differs from forcing_wavenumber {cfg.forcing_wavenumber}")
    train_x = torch.from_numpy(np.asarray(train_x))
    val_x = None if val_x is None else torch.from_numpy(np.asarray(val_x))
    return train(cfg, train_x, out_dir, val_x, {"source": source, "attributes": attrs}, resume, progress)


def stored_config(out_dir) -> dict | None:
    """The train config stored in out_dir/checkpoint.pt, or None when there is none."""
    path = Path(out_dir) / CHECKPOINT
    if not path.exists():
        return None
    meta, _ = load_checkpoint(path)
    if "train" not in meta:
        raise CheckpointError(f"{path}: holds no training config")
    return meta["train"]

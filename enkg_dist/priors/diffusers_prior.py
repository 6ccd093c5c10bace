"""A diffusers model as the EDM denoiser D(x, sigma) (`prior.kind: diffusers`).

A `UNet2DModel` and its scheduler saved with `save_pretrained` in a local directory (the model's `config.json` and
the scheduler's `scheduler_config.json` side by side, or a pipeline directory with `unet/` and `scheduler/`) are
loaded with `local_files_only=True`, never from a hub, and turned into D(x, sigma) ~ E[x0 | x0 + sigma n = x].

Discrete-time VP models (DDPM, DDIM, PNDM, Euler (also with use_karras_sigmas), Heun, LMS, DPM-Solver, UniPC, ...:
every scheduler with `alphas_cumprod`). The network was trained on x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps at
the discrete timesteps t = 0 .. T-1. With sigma_t = sqrt((1 - abar_t) / abar_t), x_t = sqrt(abar_t) (x0 + sigma_t eps)
(Karras et al. 2022, Table 1, "VP"; appendix C.3), so for an EDM input x = x0 + sigma n at the level sigma:
- the network sees x_vp = a x with a = 1 / sqrt(1 + sigma^2), at the timestep t(sigma) whose sigma_t is sigma;
- epsilon-prediction (out ~ E[n | x]):      D = x - sigma out;
- v-prediction (v = a n - sigma a x0):      D = a x_vp - sigma a out
                                              = x / (1 + sigma^2) - sigma / sqrt(1 + sigma^2) out;
- sample-prediction (out ~ E[x0 | x]):      D = out.
The same `alphas_cumprod` define sigma for Karras-style samplers of these models: the sampler's own sigma schedule
replaces the scheduler's timesteps, only the training noise levels are read from the scheduler.

t(sigma), `timesteps`:
- "interpolate" (default, as k-diffusion): linear in log sigma between the two neighbouring discrete timesteps, so
  the network gets a fractional timestep (its sinusoidal embedding is smooth in t);
- "nearest": the discrete timestep with the nearest log sigma_t (the only choice for a learned time embedding).
Either way the input scaling a and the output conversion use the requested sigma itself. Outside the model's range
[sigma_0, sigma_{T-1}] t is clamped to 0 or T-1.

EDM-native schedulers (`EDMEulerScheduler`, `EDMDPMSolverMultistepScheduler`: `sigma_data` in their config): the
network is preconditioned as in Karras et al. 2022 Table 1 "EDM": D = c_skip x + c_out F(c_in x, log(sigma) / 4)
with c_skip = sd^2 / (sigma^2 + sd^2), c_in = 1 / sqrt(sigma^2 + sd^2), c_out = +- sigma sd / sqrt(sigma^2 + sd^2)
(+ for epsilon, - for v_prediction, diffusers' convention).

Only torch and diffusers (imported when a model is loaded) are used here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEPS = ("interpolate", "nearest")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


class DiffusersError(ValueError):
    """A directory or setting that cannot give a denoiser; `key` is the job key under `prior.` it concerns."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def _flat(sigma, x: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])


def _col(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def vp_sigmas(alphas_cumprod) -> torch.Tensor:
    """sigma_t = sqrt((1 - abar_t) / abar_t) of each discrete timestep, in float64."""
    a = torch.as_tensor(alphas_cumprod, dtype=torch.float64).reshape(-1)
    a = a.clamp(min=2.0**-24)  # a zero-terminal-SNR schedule's abar_{T-1} = 0 (diffusers' Euler does the same)
    return ((1 - a) / a).sqrt()


class VPDenoiser(torch.nn.Module):
    """D(x, sigma) of a discrete-time VP network `net(x_vp, t)` (t: (B,) float timesteps) trained on the schedule
    `alphas_cumprod`, by its `prediction_type`; t(sigma) by `timesteps` (see the module docstring)."""

    def __init__(self, net, alphas_cumprod, prediction_type: str = "epsilon", timesteps: str = "interpolate"):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise DiffusersError("prediction_type", f"must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if timesteps not in TIMESTEPS:
            raise DiffusersError("timesteps", f"must be one of {TIMESTEPS}, got {timesteps!r}")
        sig = vp_sigmas(alphas_cumprod)
        if sig.numel() < 2 or not bool(torch.isfinite(sig).all()) or not bool((sig[1:] > sig[:-1]).all()):
            raise DiffusersError("path", "the scheduler's noise levels sigma_t must be finite and increase with t")
        self.net, self.prediction_type, self.timesteps = net, prediction_type, timesteps
        self.register_buffer("log_sigmas", sig.log())

    @property
    def sigma_range(self) -> tuple[float, float]:
        """(sigma_0, sigma_{T-1}): the noise levels the network was trained on."""
        return float(self.log_sigmas[0].exp()), float(self.log_sigmas[-1].exp())

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """The (fractional, or nearest discrete) timestep of each sigma, clamped to [0, T-1], in float64."""
        ls = self.log_sigmas
        s = torch.as_tensor(sigma, dtype=torch.float64, device=ls.device).reshape(-1)
        log_s = s.clamp(min=0).log().clamp(min=float(ls[0]), max=float(ls[-1]))
        if self.timesteps == "nearest":
            return (log_s[:, None] - ls[None, :]).abs().argmin(dim=1).to(torch.float64)
        low = (torch.searchsorted(ls, log_s, right=True) - 1).clamp(0, ls.numel() - 2)
        lo, hi = ls[low], ls[low + 1]
        return (low.to(torch.float64) + (log_s - lo) / (hi - lo)).clamp(0, ls.numel() - 1)

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        s = _flat(sigma, x)
        t = self.sigma_to_t(s).to(x.device)
        a = _col(1 / (1 + s**2).sqrt(), x)
        out = self.net(x * a, t)
        if self.prediction_type == "epsilon":
            return x - _col(s, x) * out
        if self.prediction_type == "v_prediction":
            return a**2 * x - _col(s, x) * a * out
        return out


class EDMPreconditioned(torch.nn.Module):
    """D(x, sigma) = c_skip x + c_out F(c_in x, log(sigma) / 4) of an EDM-trained network F (see the module
    docstring); `prediction_type` epsilon or v_prediction as diffusers' EDM schedulers define them."""

    def __init__(self, net, sigma_data: float = 0.5, prediction_type: str = "epsilon"):
        super().__init__()
        if prediction_type not in ("epsilon", "v_prediction"):
            raise DiffusersError("prediction_type", f"an EDM scheduler's model predicts epsilon or v_prediction, "
                                 f"got {prediction_type!r}")
        self.net, self.sigma_data, self.prediction_type = net, float(sigma_data), prediction_type

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        s = _flat(sigma, x)
        sd = self.sigma_data
        c = _col(s, x)
        c_skip = sd**2 / (c**2 + sd**2)
        c_out = c * sd / (c**2 + sd**2).sqrt() * (1 if self.prediction_type == "epsilon" else -1)
        c_in = 1 / (c**2 + sd**2).sqrt()
        return c_skip * x + c_out * self.net(c_in * x, s.clamp(min=1e-30).log() / 4)


class UNetCall(torch.nn.Module):
    """net(x, t) of a diffusers UNet2DModel: its output tensor, in x's dtype."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        dtype = next(self.unet.parameters()).dtype
        out = self.unet(x.to(dtype), t, return_dict=False)[0]
        return out.to(x.dtype)


def model_dirs(path) -> tuple[Path, Path]:
    """(the UNet's directory, the scheduler's) under a save_pretrained directory; a DiffusersError (key `path`)
    naming what is missing."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DiffusersError("path", f"{str(path)!r} is not a directory (a UNet2DModel saved with save_pretrained; "
                             "models are never fetched from a hub)")
    unet = root / "unet" if (root / "unet" / "config.json").is_file() else root
    sched = root / "scheduler" if (root / "scheduler" / "scheduler_config.json").is_file() else unet
    if not (unet / "config.json").is_file():
        raise DiffusersError("path", f"{str(path)!r} holds no config.json of a UNet2DModel (nor unet/config.json)")
    if not (sched / "scheduler_config.json").is_file():
        raise DiffusersError("path", f"{str(path)!r} holds no scheduler_config.json (nor scheduler/"
                             "scheduler_config.json): save the training scheduler next to the model")
    return unet, sched


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DiffusersError("path", f"{str(file)!r} is not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise DiffusersError("path", f"{str(file)!r} is not a JSON object")
    return data


def _first_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    return text[0] if text else type(e).__name__


def load(path, dtype: str = "float32", device="cpu"):
    """(unet, scheduler config dict, scheduler or None) from a local save_pretrained directory, the UNet in eval mode
    on `device` in `dtype`."""
    import diffusers

    if dtype not in DTYPES:
        raise DiffusersError("dtype", f"must be one of {tuple(DTYPES)}, got {dtype!r}")
    unet_dir, sched_dir = model_dirs(path)
    unet_cfg = _read_json(unet_dir / "config.json")
    if unet_cfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise DiffusersError("path", f"{str(unet_dir)!r} holds a {unet_cfg.get('_class_name')}, not a UNet2DModel")
    try:
        unet = diffusers.UNet2DModel.from_pretrained(str(unet_dir), local_files_only=True, low_cpu_mem_usage=False,
                                                     torch_dtype=DTYPES[dtype])
    except Exception as e:  # noqa: BLE001 - diffusers, safetensors and torch each raise their own kinds
        raise DiffusersError("path", f"cannot load the UNet2DModel in {str(unet_dir)!r} ({_first_line(e)})") from None
    sched_cfg = _read_json(sched_dir / "scheduler_config.json")
    name = sched_cfg.get("_class_name", "DDPMScheduler")
    cls = getattr(diffusers, str(name), None)
    scheduler = None
    if cls is not None and hasattr(cls, "from_pretrained"):
        try:
            scheduler = cls.from_pretrained(str(sched_dir), local_files_only=True)
        except Exception as e:  # noqa: BLE001
            raise DiffusersError("path", f"cannot load the {name} in {str(sched_dir)!r} ({_first_line(e)})") from None
    unet = unet.to(device=device).eval()
    return unet, sched_cfg, scheduler


def edm_denoiser(path, prediction_type: str | None = None, timesteps: str = "interpolate", dtype: str = "float32",
                 device="cpu") -> torch.nn.Module:
    """D(x, sigma) of the UNet2DModel and scheduler saved in the local directory `path` (the factory behind
    `prior.kind: diffusers`); `prediction_type` None: the scheduler config's (epsilon when it names none)."""
    unet, cfg, scheduler = load(path, dtype, device)
    ptype = prediction_type or cfg.get("prediction_type") or "epsilon"
    if ptype not in PREDICTION_TYPES:
        raise DiffusersError("prediction_type", f"{ptype!r} (from the scheduler config) is not one of "
                             f"{PREDICTION_TYPES}")
    net = UNetCall(unet)
    name = cfg.get("_class_name", "DDPMScheduler")
    if "sigma_data" in cfg:  # diffusers' EDM schedulers
        return EDMPreconditioned(net, cfg["sigma_data"], ptype).to(device)
    if scheduler is None or getattr(scheduler, "alphas_cumprod", None) is None:
        raise DiffusersError("path", f"the scheduler {name!r} defines no alphas_cumprod (a discrete-time VP schedule) "
                             "nor sigma_data (EDM); supported: DDPM, DDIM, Euler, Heun, DPM-Solver, ... and EDM "
                             "schedulers")
    if timesteps == "interpolate" and unet.config.get("time_embedding_type") == "learned":
        raise DiffusersError("timesteps", "this UNet's learned time embedding takes whole timesteps: use nearest")
    if unet.config.get("time_embedding_type") == "fourier":
        raise DiffusersError("path", "a UNet with a Fourier time embedding (score-SDE VE) is not supported")
    return VPDenoiser(net, scheduler.alphas_cumprod, ptype, timesteps).to(device)


def unet_shape(path) -> tuple[int, int]:
    """(channels, downsampling factor: the field's sides must be multiples of it) of the saved UNet, from its
    config, without loading it."""
    unet_dir, _ = model_dirs(path)
    cfg = _read_json(unet_dir / "config.json")
    c_in, c_out = int(cfg.get("in_channels", 3)), int(cfg.get("out_channels", 3))
    if c_in != c_out:
        raise DiffusersError("path", f"the UNet maps {c_in} channels to {c_out}: a denoiser needs in_channels == "
                             "out_channels")
    levels = len(cfg.get("block_out_channels", (224, 448, 672, 896)))
    return c_in, 2 ** max(0, levels - 1)


__all__ = ["DiffusersError", "EDMPreconditioned", "PREDICTION_TYPES", "TIMESTEPS", "UNetCall", "VPDenoiser",
           "edm_denoiser", "load", "model_dirs", "unet_shape", "vp_sigmas"]

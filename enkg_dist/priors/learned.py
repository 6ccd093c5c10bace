"""A trained EDM denoiser as a prior for the sampler: `denoise(x, sigma) ~ E[x0 | x0 + sigma n = x]`.

x arrives in the sampler's dtype and device (float64 on the CPU by default); it is cast to the model's dtype and
device, run in chunks of `max_batch` members under `torch.inference_mode`, and returned in x's dtype and device.
Precision: "float32" or "float64" set the parameters' dtype; "bfloat16" keeps float32 parameters and runs F under
bfloat16 autocast (meant for CUDA; the preconditioning c_skip x + c_out F stays in float32).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch

from enkg_dist.priors.checkpoint import load_denoiser
from enkg_dist.priors.unet import EDMDenoiser

PRECISIONS = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.float32}
BUILTIN = {"ns32": "ns32_prior.pt"}  # shipped checkpoints in enkg_dist/assets (README: how they were trained)


def checkpoint_path(spec: str) -> Path:
    """A checkpoint file from a path, or from builtin:NAME for a shipped one."""
    if not spec.startswith("builtin:"):
        return Path(spec).expanduser()
    name = spec.split(":", 1)[1]
    if name not in BUILTIN:
        raise ValueError(f"no builtin prior {name!r} (have: {', '.join(BUILTIN)})")
    return Path(__file__).resolve().parents[1] / "assets" / BUILTIN[name]


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' -> cuda when available, else cpu; ValueError when cuda is asked for and there is none."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("'cuda' was asked but no CUDA device is available")
    return device


class CompiledOrEager:
    """`torch.compile(module)` that falls back to the eager module, with a warning, when compiling fails."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.compiled = torch.compile(module)

    def __call__(self, *args, **kwargs):
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - any compiler failure: run eagerly
                warnings.warn(f"torch.compile failed, running eagerly: {(str(e).splitlines() or [''])[0]}",
                              RuntimeWarning, stacklevel=2)
                self.compiled = None
        return self.module(*args, **kwargs)


class LearnedPrior:
    """A learned denoiser D(x; σ) on fields of shape `state_shape` (C, N, N); puts `model` in eval mode."""

    def __init__(self, model: EDMDenoiser, device="cpu", precision: str = "float32", compile: bool = False,
                 max_batch: int = 256, meta: dict | None = None):
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r} not in {tuple(PRECISIONS)}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.device, self.precision, self.max_batch, self.meta = resolve_device(device), precision, max_batch, meta
        self.dtype = PRECISIONS[precision]
        first = next(model.parameters())
        if first.dtype != self.dtype or first.device != self.device:  # a converted copy: the caller's model stays
            model = copy.deepcopy(model).to(device=self.device, dtype=self.dtype)
        self.model = model.eval()
        self.compile = compile
        self._forward = CompiledOrEager(self.model) if compile else self.model
        self._amp = torch.bfloat16 if precision == "bfloat16" else None

    @classmethod
    def from_checkpoint(cls, path, device="auto", precision: str = "float32", compile: bool = False,
                        max_batch: int = 256, resolution: int | None = None) -> LearnedPrior:
        """Load a checkpoint (a path or builtin:NAME; EMA weights when present); `resolution` refuses one made for
        another grid."""
        model, meta = load_denoiser(checkpoint_path(str(path)), resolution)
        return cls(model, device, precision, compile, max_batch, meta)

    @property
    def config(self):
        return self.model.config

    @property
    def n(self) -> int:
        return self.config.resolution

    @property
    def state_shape(self) -> tuple[int, int, int]:
        return (self.config.in_channels, self.n, self.n)

    def to(self, device) -> LearnedPrior:
        """The same prior on another device."""
        return LearnedPrior(self.model, device, self.precision, self.compile, self.max_batch, self.meta)

    def denoise(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """D(x; σ) for x (B, C, N, N); σ a scalar or one per member; returned in x's dtype and device."""
        if x.ndim != 4 or tuple(x.shape[1:]) != self.state_shape:
            raise ValueError(f"field shape mismatch: got {tuple(x.shape)}, learned prior takes (B, "
                             f"{', '.join(map(str, self.state_shape))})")
        sigma = torch.as_tensor(sigma, dtype=self.dtype).reshape(-1).expand(x.shape[0])
        out = torch.empty_like(x)
        with torch.inference_mode():
            for start in range(0, x.shape[0], self.max_batch):
                part = slice(start, start + self.max_batch)
                xc = x[part].to(device=self.device, dtype=self.dtype)
                d = self._forward(xc, sigma[part].to(self.device), self._amp)
                out[part] = d.to(device=x.device, dtype=x.dtype)
        return out

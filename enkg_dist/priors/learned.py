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

from enkg_dist.devices import resolve_device
from enkg_dist.heap import retain_freed_memory
from enkg_dist.priors.checkpoint import load_denoiser
from enkg_dist.priors.unet import EDMDenoiser

PRECISIONS = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.float32}
# shipped checkpoints in enkg_dist/assets (README "The learned prior": how each was trained): ns32 on Re = 200 data,
# ns32_re100 (the default job's) on Re = 100 data, both 32x32
BUILTIN = {"ns32": "ns32_prior.pt", "ns32_re100": "ns32_re100_prior.pt", "ns64": "ns64_prior.pt"}


def checkpoint_path(spec: str) -> Path:
    """A checkpoint file from a path, or from builtin:NAME for a shipped one."""
    if not spec.startswith("builtin:"):
        return Path(spec).expanduser()
    name = spec.split(":", 1)[1]
    if name not in BUILTIN:
        raise ValueError(f"no builtin prior {name!r} (have: {', '.join(BUILTIN)})")
    return Path(__file__).resolve().parents[1] / "assets" / BUILTIN[name]


class CompiledOrEager:
    """`torch.compile(module)` that falls back to the eager module, with a warning, when compiling fails.

    A call that fails compiled is repeated eagerly: only when the eager call succeeds is the compiler blamed and
    compile switched off. An out-of-memory error, or an error the eager module raises too, propagates unchanged and
    leaves compile on.
    """

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.compiled = torch.compile(module)

    def __call__(self, *args, **kwargs):
        if self.compiled is None:
            return self.module(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - a compiler failure, or the module's own error (the eager call says)
            out = self.module(*args, **kwargs)
            warnings.warn(f"torch.compile failed, running eagerly: {(str(e).splitlines() or [''])[0]}",
                          RuntimeWarning, stacklevel=2)
            self.compiled = None
            return out


class LearnedPrior:
    """A learned denoiser D(x; σ) on fields of shape `state_shape` (C, N, N); puts `model` in eval mode."""

    def __init__(self, model: EDMDenoiser, device="cpu", precision: str = "float32", compile: bool = False,
                 max_batch: int = 256, meta: dict | None = None):
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r} not in {tuple(PRECISIONS)}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.device, self.precision, self.max_batch, self.meta = resolve_device(device), precision, max_batch, meta
        if self.device.type == "cpu":  # a batch's activations are fresh pages at every layer otherwise (enkg_dist.heap)
            retain_freed_memory()
        if precision == "bfloat16" and self.device.type != "cuda":
            warnings.warn("bfloat16 autocast on the CPU: slow and untuned; it is meant for CUDA", RuntimeWarning,
                          stacklevel=2)
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
        with torch.inference_mode():
            return self._denoise(x, sigma)

    def denoise_with_grad(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """D(x; σ) differentiable in x (autograd through the network), for gradient-based baselines such as DPS."""
        return self._denoise(x, sigma)

    def _denoise(self, x: torch.Tensor, sigma) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != self.state_shape:
            raise ValueError(f"field shape mismatch: got {tuple(x.shape)}, learned prior takes (B, "
                             f"{', '.join(map(str, self.state_shape))})")
        sigma = torch.as_tensor(sigma, dtype=self.dtype).reshape(-1).expand(x.shape[0])
        parts = []
        for start in range(0, x.shape[0], self.max_batch):
            part = slice(start, start + self.max_batch)
            xc = x[part].to(device=self.device, dtype=self.dtype)
            parts.append(self._forward(xc, sigma[part].to(self.device), self._amp).to(device=x.device, dtype=x.dtype))
        return torch.cat(parts)

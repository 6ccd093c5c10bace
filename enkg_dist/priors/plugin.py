"""A diffusion prior given as Python code (`prior.kind: python`): a factory "package.module:factory" returns D.

D(x, sigma) takes x (B, *state_shape) and sigma (B,) (one noise level per member, as in the EDM code) and returns,
for x = x0 + sigma n, by its `convention`:
- "edm": the denoiser E[x0 | x] (what the sampler uses);
- "epsilon": the noise prediction E[n | x], so that E[x0 | x] = x - sigma E[n | x];
- "score": the score grad log p_sigma(x), so that E[x0 | x] = x + sigma^2 score (Tweedie).
`PluginPrior` wraps it into the `priors.Prior` interface. What travels to a prior actor is the factory's name and
keyword arguments (`factories.FactorySpec`): each actor imports the module and builds D once, on its own device.
"""

from __future__ import annotations

import torch

from enkg_dist.devices import resolve_device
from enkg_dist.factories import FactoryError, FactorySpec

CONVENTIONS = ("edm", "epsilon", "score")
DTYPES = {None: None, "float32": torch.float32, "float64": torch.float64}


class PluginPrior:
    """`priors.Prior` around a user's D(x, sigma) built by `spec` (on `device`, in `dtype`, `max_batch` members per
    call; None: all at once)."""

    def __init__(self, spec: FactorySpec, state_shape, device="cpu", max_batch: int | None = None,
                 dtype: str | None = None, convention: str = "edm"):
        if convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be float32, float64 or None, got {dtype!r}")
        self.spec, self.convention, self.dtype_name = spec, convention, dtype
        self._state_shape = tuple(int(s) for s in state_shape)
        self._device = resolve_device(device)
        self._max_batch = max_batch

    @property
    def state_shape(self) -> tuple[int, ...]:
        return self._state_shape

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def max_batch(self) -> int | None:
        return self._max_batch

    def to(self, device) -> PluginPrior:
        """The same prior on another device (built there anew, at its first call)."""
        if resolve_device(device) == self._device:
            return self
        return PluginPrior(self.spec.fresh(), self._state_shape, device, self._max_batch, self.dtype_name,
                           self.convention)

    def model(self):
        """D, built once in this process (a factory taking `device` is given this prior's device; a torch module
        is moved there and put in eval mode)."""
        extra = {}
        if "device" not in self.spec.kwargs and self.spec.accepts("device"):
            extra["device"] = str(self._device)
        D = self.spec.build(**extra)
        if isinstance(D, torch.nn.Module):
            D = D.to(self._device).eval()
        if not callable(D):
            raise FactoryError(f"{self.spec.key}: the factory {self.spec.name!r} returned a "
                               f"{type(D).__name__}, not a callable D(x, sigma)")
        return D

    def build(self) -> PluginPrior:
        """Build D now (errors are one line naming the factory); returns self."""
        self.model()
        return self

    def denoise(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """E[x0 | x] for x (B, *state_shape), sigma a scalar or one per member; in x's dtype and device."""
        if tuple(x.shape[1:]) != self._state_shape:
            raise ValueError(f"state shape mismatch: got {tuple(x.shape[1:])}, the prior of {self.spec.name!r} "
                             f"takes {self._state_shape}")
        D = self.model()
        dtype = DTYPES[self.dtype_name] or x.dtype
        s = torch.as_tensor(sigma, dtype=dtype).reshape(-1).expand(x.shape[0])
        step = self._max_batch or max(1, x.shape[0])
        parts = []
        with torch.inference_mode():
            for start in range(0, x.shape[0], step):
                xc = x[start : start + step].to(device=self._device, dtype=dtype)
                sc = s[start : start + step].to(self._device)
                parts.append(self._x0(D, xc, sc).to(device=x.device, dtype=x.dtype))
        return torch.cat(parts) if parts else x.clone()

    def _x0(self, D, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        try:
            out = D(x, sigma)
        except Exception as e:  # noqa: BLE001 - the user's code: one line naming it
            text = f"{type(e).__name__}: {e}".strip().splitlines()
            raise FactoryError(f"{self.spec.key}: the denoiser of {self.spec.name!r} raised "
                               f"{text[0] if text else type(e).__name__}") from None
        out = torch.as_tensor(out)
        if tuple(out.shape) != tuple(x.shape):
            raise FactoryError(f"{self.spec.key}: the denoiser of {self.spec.name!r} returned shape "
                               f"{tuple(out.shape)} for input {tuple(x.shape)}")
        out = out.to(device=x.device, dtype=x.dtype)
        b = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        if self.convention == "epsilon":
            return x - b * out
        if self.convention == "score":
            return x + b**2 * out
        return out

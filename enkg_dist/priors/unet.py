"""EDM-preconditioned UNet denoiser (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models", eq. 7 and Table 1):

    D(x; σ) = c_skip(σ) x + c_out(σ) F(c_in(σ) x; c_noise(σ)),
    c_skip = σ_d² / (σ² + σ_d²),  c_out = σ σ_d / √(σ² + σ_d²),  c_in = 1 / √(σ² + σ_d²),  c_noise = ¼ ln σ.

F is an ADM-style UNet (Dhariwal & Nichol 2021, EDM's DhariwalUNet): residual blocks GroupNorm → SiLU → conv with the
noise embedding (sinusoidal positional embedding of c_noise, then an MLP) applied as an adaptive scale/shift, 2×2
average-pool down-sampling and nearest up-sampling inside residual blocks, skip connections from every encoder block,
self-attention at the chosen resolutions and always at the bottleneck, dropout before each block's second conv.

Padding: the Navier–Stokes fields live on the periodic torus [0, 2π]², so "circular" padding (the default) lets every
3×3 conv see the true neighbours across the boundary instead of zeros. With average pooling, nearest up-sampling,
per-sample GroupNorm and position-free attention, F then commutes with periodic shifts by multiples of the total
down-sampling factor 2^(levels-1): the network has the translation symmetry of the data (the GRF initial fields and
the NS dynamics are translation invariant in x, and in y by multiples of the forcing period) and no boundary
artefacts. "zeros" is offered for non-periodic data.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

SKIP_SCALE = math.sqrt(0.5)  # DDPM++: keeps the variance of residual sums at one


class UNetConfig(BaseModel):
    """Sizes of the UNet and the data scale σ_d of the preconditioning."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    resolution: int = Field(32, ge=4, description="field side N (N x N)")
    in_channels: int = Field(1, ge=1)
    out_channels: int = Field(1, ge=1)
    model_channels: int = Field(32, ge=4, description="channels at the first level; a multiple of 4")
    channel_mult: tuple[int, ...] = Field((1, 2, 2), min_length=1, description="channel multiplier per level")
    num_blocks: int = Field(1, ge=1, description="residual blocks per level (the decoder has one more)")
    attn_resolutions: tuple[int, ...] = Field((8,), description="resolutions with self-attention")
    dropout: float = Field(0.0, ge=0, lt=1)
    sigma_data: float = Field(0.5, gt=0, description="data std σ_d of the EDM preconditioning")
    padding: Literal["circular", "zeros"] = "circular"
    head_channels: int = Field(64, ge=1, description="channels per attention head")

    @model_validator(mode="after")
    def _sizes(self):
        factor = 2 ** (len(self.channel_mult) - 1)
        if self.resolution % factor:
            raise ValueError(f"resolution {self.resolution} is not divisible by the down-sampling factor {factor}")
        if self.model_channels % 4 or min(self.channel_mult) < 1:
            raise ValueError("model_channels must be a multiple of 4 and every channel_mult >= 1")
        return self

    @property
    def downsampling(self) -> int:
        """Total down-sampling factor: F commutes with periodic shifts by its multiples (circular padding)."""
        return 2 ** (len(self.channel_mult) - 1)


def _groups(channels: int) -> int:
    """GroupNorm groups: the largest divisor of `channels` that is <= 32 and leaves >= 4 channels per group."""
    return max(g for g in range(1, 33) if channels % g == 0 and channels // g >= 4)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(_groups(channels), channels, eps=1e-6)


def _conv(cin: int, cout: int, kernel: int, padding: str, zero: bool = False) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, padding_mode=padding)
    if zero:  # EDM's init_zero: residual branches start as the identity
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
    return conv


def positional_embedding(c_noise: torch.Tensor, channels: int, max_positions: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos(c f_i), sin(c f_i)], f_i = max_positions^(-i/(channels/2)) (Vaswani et al. 2017)."""
    half = channels // 2
    freqs = max_positions ** (-torch.arange(half, dtype=c_noise.dtype, device=c_noise.device) / half)
    arg = c_noise[:, None] * freqs[None, :]
    return torch.cat([arg.cos(), arg.sin()], dim=1)


class SelfAttention(nn.Module):
    """Multi-head self-attention over all positions, residual: x + proj(softmax(q kᵀ/√d) v)."""

    def __init__(self, channels: int, head_channels: int):
        super().__init__()
        self.heads = max(1, channels // head_channels)
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _conv(channels, channels, 1, "zeros", zero=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, c, h, w)
        return (x + self.proj(out)) * SKIP_SCALE


class ResBlock(nn.Module):
    """ADM residual block: h = conv1(drop(SiLU(GN(conv0(SiLU(GN(x)))) (1 + scale) + shift))), out = (skip(x) + h)/√2."""

    def __init__(self, cin: int, cout: int, emb_channels: int, cfg: UNetConfig, resample: str | None = None,
                 attention: bool = False):
        super().__init__()
        self.resample = resample
        self.norm0 = _norm(cin)
        self.conv0 = _conv(cin, cout, 3, cfg.padding)
        self.affine = nn.Linear(emb_channels, 2 * cout)
        self.norm1 = _norm(cout)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv1 = _conv(cout, cout, 3, cfg.padding, zero=True)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.attn = SelfAttention(cout, cfg.head_channels) if attention else None

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(self._resample(F.silu(self.norm0(x))))
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        h = self.conv1(self.dropout(h))
        x = (self.skip(self._resample(x)) + h) * SKIP_SCALE
        return self.attn(x) if self.attn is not None else x


class UNet(nn.Module):
    """The raw network F(x_in; c_noise) of shape (B, C, N, N) -> (B, C_out, N, N)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        mc, levels = cfg.model_channels, len(cfg.channel_mult)
        emb = 4 * mc
        self.embed_channels = mc
        self.map0, self.map1 = nn.Linear(mc, emb), nn.Linear(emb, emb)
        self.conv_in = _conv(cfg.in_channels, mc, 3, cfg.padding)
        self.enc, skips, c = nn.ModuleList(), [mc], mc
        for level, mult in enumerate(cfg.channel_mult):
            attn = (cfg.resolution >> level) in cfg.attn_resolutions
            if level > 0:
                self.enc.append(ResBlock(c, c, emb, cfg, resample="down"))
                skips.append(c)
            for _ in range(cfg.num_blocks):
                self.enc.append(ResBlock(c, mc * mult, emb, cfg, attention=attn))
                c = mc * mult
                skips.append(c)
        self.mid = nn.ModuleList([ResBlock(c, c, emb, cfg, attention=True), ResBlock(c, c, emb, cfg)])
        self.dec = nn.ModuleList()
        for level in reversed(range(levels)):
            attn = (cfg.resolution >> level) in cfg.attn_resolutions
            if level < levels - 1:
                self.dec.append(ResBlock(c, c, emb, cfg, resample="up"))
            for _ in range(cfg.num_blocks + 1):
                self.dec.append(ResBlock(c + skips.pop(), mc * cfg.channel_mult[level], emb, cfg, attention=attn))
                c = mc * cfg.channel_mult[level]
        self.out_norm = _norm(c)
        self.out_conv = _conv(c, cfg.out_channels, 3, cfg.padding, zero=True)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        emb = F.silu(self.map1(F.silu(self.map0(positional_embedding(c_noise, self.embed_channels)))))
        h = self.conv_in(x)
        hs = [h]
        for block in self.enc:
            h = block(h, emb)
            hs.append(h)
        for block in self.mid:
            h = block(h, emb)
        for block in self.dec:
            if block.resample != "up":
                h = torch.cat([h, hs.pop()], dim=1)
            h = block(h, emb)
        return self.out_conv(F.silu(self.out_norm(h)))


class EDMDenoiser(nn.Module):
    """D(x; σ) = c_skip x + c_out F(c_in x; ¼ ln σ) (EDM eq. 7); σ a scalar or one per batch member."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        self.net = UNet(cfg)

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_skip, c_out, c_in, c_noise) of EDM Table 1 for σ of any shape."""
        sd2 = self.config.sigma_data**2
        root = (sigma**2 + sd2).sqrt()
        return sd2 / (sigma**2 + sd2), sigma * self.config.sigma_data / root, 1.0 / root, sigma.log() / 4

    def forward(self, x: torch.Tensor, sigma, amp_dtype: torch.dtype | None = None) -> torch.Tensor:
        """x (B, C, N, N) in the parameters' dtype; F runs under autocast to `amp_dtype` when given."""
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        with torch.autocast(x.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            f = self.net(c_in * x, c_noise.reshape(-1).expand(x.shape[0]))
        return c_skip * x + c_out * f.to(x.dtype)

"""Figures of a reconstruction: truth, observation, ensemble mean, ensemble std, error."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _field(a) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 1:
        side = int(round(np.sqrt(a.size)))
        if side * side != a.size:
            raise ValueError(f"cannot show {a.size} values as a square image")
        return a.reshape(side, side)
    return a.reshape(a.shape[-2], a.shape[-1])


def reconstruction_figure(path: str | Path, truth, observation, mean, std, title: str = "") -> Path:
    """Five panels (truth, observation, mean, std, |mean - truth|) written as a PNG."""
    panels = [("ensemble mean", _field(mean), "RdBu_r"), ("ensemble std", _field(std), "viridis")]
    if observation is not None:
        panels.insert(0, ("observation", _field(observation), "RdBu_r"))
    if truth is not None:
        t = _field(truth)
        panels.insert(0, ("truth", t, "RdBu_r"))
        panels.append(("|mean - truth|", np.abs(_field(mean) - t), "magma"))
    vlim = max(np.abs(p[1]).max() for p in panels if p[2] == "RdBu_r")
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), constrained_layout=True)
    for ax, (name, img, cmap) in zip(np.atleast_1d(axes), panels):
        kw = {"vmin": -vlim, "vmax": vlim} if cmap == "RdBu_r" else {}
        im = ax.imshow(img.T, origin="lower", cmap=cmap, **kw)
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, shrink=0.8)
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path

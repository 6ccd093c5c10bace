"""Checkpoints that carry their own configuration and a content hash, loaded without unpickling any object.

A file is `torch.save` of a plain dict {"format", "version", "meta": JSON, "tree": JSON, "tensors": {name: tensor},
"sha256"}, read back with `torch.load(weights_only=True)`, which only rebuilds tensors and primitive containers.
`meta` holds the configurations (the UNet's under "unet") and data attributes; `tree` the layout of the nested state
(model, EMA, optimizer, step...) whose tensors are stored flat. sha256 covers meta, tree and every tensor (name, dtype,
shape, bytes) in sorted name order. Every failure is a one-line `CheckpointError`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from pydantic import ValidationError

from enkg_dist.priors.unet import EDMDenoiser, UNetConfig

FORMAT = "enkg-dist-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line."""


def flatten(obj, prefix: str, tensors: dict[str, torch.Tensor]):
    """JSON-able layout of a nested dict/list state; its tensors go into `tensors` under slash-joined names."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().to("cpu").clone()
        return {"t": prefix}
    if isinstance(obj, dict):
        return {"d": [[k, flatten(v, f"{prefix}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"l": [flatten(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"v": obj}
    raise TypeError(f"cannot store a {type(obj).__name__} at {prefix!r} in a checkpoint")


def unflatten(layout, tensors: dict[str, torch.Tensor]):
    """Inverse of `flatten` (dict keys keep their int/str type)."""
    (kind, value), = layout.items()
    if kind == "t":
        return tensors[value]
    if kind == "d":
        return {k: unflatten(v, tensors) for k, v in value}
    if kind == "l":
        return [unflatten(v, tensors) for v in value]
    return value


def content_hash(meta: str, tree: str, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over meta, tree and each tensor's name, dtype, shape and bytes, in sorted name order."""
    h = hashlib.sha256()
    h.update(meta.encode())
    h.update(tree.encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(path, meta: dict, state: dict) -> str:
    """Write meta (JSON-able) and state (nested tensors and scalars) atomically to `path`; returns the content hash."""
    tensors: dict[str, torch.Tensor] = {}
    tree = json.dumps(flatten(state, "", tensors))
    meta_json = json.dumps(meta, sort_keys=True)
    digest = content_hash(meta_json, tree, tensors)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save({"format": FORMAT, "version": VERSION, "meta": meta_json, "tree": tree, "tensors": tensors,
                    "sha256": digest}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return digest


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def load_checkpoint(path) -> tuple[dict, dict]:
    """(meta, state) of a checkpoint, after checking its format and content hash."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure means the same thing to the user
        raise CheckpointError(f"{path}: not a readable checkpoint (corrupt or truncated): {_first_line(e)}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an enkg-dist checkpoint")
    if raw.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {raw.get('version')} is not supported (expected {VERSION})")
    digest = content_hash(raw["meta"], raw["tree"], raw["tensors"])
    if digest != raw["sha256"]:
        raise CheckpointError(f"{path}: content hash mismatch (stored {raw['sha256'][:12]}, computed {digest[:12]}): "
                              "the file is corrupt or was modified")
    return json.loads(raw["meta"]), unflatten(json.loads(raw["tree"]), raw["tensors"])


def unet_config(meta: dict, path="checkpoint") -> UNetConfig:
    """The UNetConfig stored in a checkpoint's meta (one-line error on unknown keys or bad values)."""
    try:
        return UNetConfig.model_validate(meta.get("unet"))
    except ValidationError as e:
        err = e.errors()[0]
        raise CheckpointError(f"{path}: unet config: {'.'.join(map(str, err['loc'])) or '<root>'}: {err['msg']}") \
            from None


def check_state(model: torch.nn.Module, weights: dict[str, torch.Tensor], path="checkpoint") -> None:
    """One-line error when `weights` do not have exactly the model's tensor names and shapes."""
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors do not match the config (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    for name, t in expected.items():
        if tuple(weights[name].shape) != tuple(t.shape):
            raise CheckpointError(f"{path}: tensor {name} has shape {tuple(weights[name].shape)} but the config "
                                  f"gives {tuple(t.shape)}")


def load_denoiser(path, resolution: int | None = None) -> tuple[EDMDenoiser, dict]:
    """The EDM denoiser of a checkpoint (EMA weights when present), in eval mode on the CPU, and its meta."""
    meta, state = load_checkpoint(path)
    cfg = unet_config(meta, path)
    if resolution is not None and cfg.resolution != resolution:
        raise CheckpointError(f"{path}: checkpoint is for {cfg.resolution}x{cfg.resolution} fields, "
                              f"{resolution}x{resolution} requested")
    weights = state.get("ema", state.get("model"))
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path}: checkpoint holds no model weights")
    model = EDMDenoiser(cfg)
    check_state(model, weights, path)
    model.load_state_dict(weights)
    return model.eval(), meta

"""Checkpoints: a plain dict of tensors and primitives, loaded with
torch.load(weights_only=True) so that loading can never run code. A checkpoint
carries its config and a format version; anything else is refused with a
message that says why."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from . import build_model
from .config import X2PConfig
from .lifting import LiftingBaseline
from .x2pnet import X2PNet

FORMAT = "x2p_ros.checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing, corrupt, unsafe or mismatched."""


def save(path, model: X2PNet | LiftingBaseline, meta: dict | None = None, **training_state) -> Path:
    """Writes atomically (a half-written file never replaces a good one), and
    never weights that hold NaN or Inf."""
    path = Path(path)
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    broken = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise CheckpointError(f"{path}: not written: the weights hold NaN or Inf ({', '.join(broken[:5])}"
                              f"{', ...' if len(broken) > 5 else ''})")
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, "config": model.config.to_dict(),
               "model": weights, "meta": meta or {}}
    payload.update(training_state)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def read(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" in str(e).lower():  # the weights-only unpickler met a class or function
            raise CheckpointError(f"{path}: refused: the file holds objects other than tensors and plain data "
                                  f"(loading it could run code)") from None
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): {e}") from None
    except Exception as e:  # a damaged zip or pickle stream fails in many ways inside torch.load
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): "
                              f"{type(e).__name__}: {e}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an x2p_ros checkpoint (no format tag {FORMAT!r})")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {payload.get('version')} is not supported "
                              f"(this x2p_ros reads version {VERSION})")
    for key in ("config", "model"):
        if not isinstance(payload.get(key), dict):
            raise CheckpointError(f"{path}: checkpoint has no '{key}'")
    return payload


def saved_config(payload: dict, path) -> X2PConfig:
    """The config a checkpoint (read()'s payload) was saved with; fields added since take
    their defaults, which keep the architecture it was trained with."""
    try:
        return X2PConfig.from_dict(payload["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its config does not fit this x2p_ros: {e}") from None


def load_model(path, device="cpu") -> tuple[X2PNet | LiftingBaseline, dict]:
    """The model in eval mode and the checkpoint's meta data."""
    payload = read(path)
    model = build_model(saved_config(payload, path))
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match the config they came with: "
                              f"{str(e).splitlines()[0]}") from None
    return model.to(device).eval(), payload.get("meta", {})

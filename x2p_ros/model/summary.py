"""Parameters and GMACs of X2P-Net per unit, counted with torch's FLOP counter."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from ..geometry import carm_view
from . import build_model
from .config import X2PConfig

UNITS = ("vfe", "fe", "sce", "fusion", "lifting", "centre_head")


def example_inputs(config: X2PConfig, batch: int = 1):
    """A plausible AP/LAT pair geometry at the config's size, for counting and timing."""
    S = config.image_size
    Ps = np.stack([carm_view(view, 550.0, 1000.0, 200.0, S)[0] for view in ("ap", "lat")])
    P = torch.tensor(Ps, dtype=torch.float32)[None].expand(batch, -1, -1, -1)
    images = torch.randn(batch, 2, 1, S, S)
    prompt = torch.tensor([[S / 2, S / 5]] * 2, dtype=torch.float32)[None].expand(batch, -1, -1)
    return images, P, prompt


def model_summary(config: X2PConfig) -> dict:
    model = build_model(config).eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(*example_inputs(config))
    flops = counter.get_flop_counts()
    rows = {}
    for unit in UNITS:
        module = getattr(model, unit, None)
        if module is None:
            continue
        key = f"{type(model).__name__}.{unit}"
        rows[unit] = {"params": sum(p.numel() for p in module.parameters()),
                      "gmacs": sum(flops.get(key, {}).values()) / 2e9}
    total_flops = sum(flops.get("Global", {}).values())
    rows["total"] = {"params": sum(p.numel() for p in model.parameters()), "gmacs": total_flops / 2e9}
    return rows

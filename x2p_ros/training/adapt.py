"""`x2p adapt`: a patient-specific model from the preoperative CT.

The patient's own CT is the best training data there is for that patient. DRR
pairs of it are rendered at random C-arm poses around random runs of its
labelled levels, each after a random deformation of the kind a patient goes
through between the (supine) CT and the (prone) operating table
(data/deform.py); a shipped model (or another checkpoint) is fine-tuned on
them within a time budget. The work folder beside the output keeps the pairs
and the run: the same command again resumes it. The output is a normal
checkpoint whose provenance names the CT by its SHA-256, never by its data.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data import case_io
from ..data.ct_import import load_patient
from ..data.deform import DeformConfig
from ..data.patient_pairs import WINDOW, planned_pairs, render_pairs, sha256
from ..model import checkpoint
from ..models import baseline_checkpoint
from . import train as training


class AdaptError(ValueError):
    """Settings that cannot make a patient model."""


@dataclass
class AdaptConfig:
    minutes: float = 30.0  # the whole budget: rendering and fine-tuning
    render_share: float = 0.25  # of the budget for rendering training pairs (fewer if max_cases come first)
    max_cases: int = 600  # rendering stops here and leaves the time to training
    val_cases: int = 8  # held-out poses and deformations that choose the best epoch
    window: tuple[int, int] = WINDOW  # vertebrae a training field is centred on
    whole_field_share: float = 0.5  # training fields that show every labelled level, as the validation's half
    batch_size: int = 4
    lr: float = 3e-4
    seed: int = 0
    deform: DeformConfig = field(default_factory=DeformConfig)

    def __post_init__(self):
        if not (np.isfinite(self.minutes) and self.minutes > 0):
            raise AdaptError(f"the time budget must be more than 0 minutes, got {self.minutes}")
        if not 0 < self.render_share < 1:
            raise AdaptError(f"render_share must be between 0 and 1, got {self.render_share}")
        if not 0 <= self.whole_field_share <= 1:
            raise AdaptError(f"whole_field_share must be between 0 and 1, got {self.whole_field_share}")
        if self.max_cases < 1 or self.val_cases < 1 or self.batch_size < 1:
            raise AdaptError("max_cases, val_cases and batch_size must be at least 1")


def adapt(ct, out, centroids=None, mask=None, mask_style: str = "verse", init=None, device: str = "auto",
          config: AdaptConfig = AdaptConfig(), progress: bool = True) -> Path:
    """Fine-tunes `init` on this patient's CT; writes `out`. The default is the shipped lifting
    baseline: it adapts faster and further than the shipped X2P-Net (docs/BENCHMARKS.md)."""
    started = time.monotonic()
    out = Path(out)
    if out.is_dir():
        raise AdaptError(f"{out} is a folder; give the checkpoint file to write, e.g. patient.pt")
    init = Path(init or baseline_checkpoint())
    base_model, base_meta = checkpoint.load_model(init)
    config_name = base_meta.get("config_name")
    if not config_name:
        raise AdaptError(f"{init}: the checkpoint does not say its config (meta.config_name)")
    dev = training._device(device, 0)
    volume, vertebrae = load_patient(ct, centroids, mask, mask_style)  # every input error before any work
    size = base_model.config.image_size

    work = out.with_name(out.name + ".work")
    recipe = {"ct_sha256": sha256(ct), "labels_sha256": sha256(centroids or mask), "mask_style": mask_style,
              "init_sha256": sha256(init), "size": size, "config": json.loads(json.dumps(asdict(config)))}
    recipe_path = work / "recipe.json"
    if recipe_path.is_file():
        earlier = json.loads(recipe_path.read_text())
        if {k: v for k, v in earlier.items() if k not in ("epochs", "epoch_s")} != recipe:
            raise AdaptError(f"{work} holds an adaptation with other inputs or settings; "
                             f"delete it or choose another --out")
        recipe["epochs"], recipe["epoch_s"] = earlier.get("epochs"), earlier.get("epoch_s")
    work.mkdir(parents=True, exist_ok=True)
    recipe_path.write_text(json.dumps(recipe, indent=1))
    budget_s = 60 * config.minutes
    data = work / "data"

    # held-out poses and deformations first (they choose the best epoch), then training pairs
    val = render_pairs(volume, vertebrae, data,  # half around a few levels, half every level
                       planned_pairs("val", config.seed + 1, config.val_cases, config.window, 0.5), size,
                       config.deform, progress=False, device=dev.type)
    # the training pairs' share starts now: however long the validation pairs took, at least one is rendered
    render_deadline = time.monotonic() + config.render_share * budget_s
    train_names = render_pairs(volume, vertebrae, data,
                               planned_pairs("train", config.seed, config.max_cases, config.window,
                                             config.whole_field_share),
                               size, config.deform, deadline=render_deadline, progress=progress,
                               desc="training pairs", device=dev.type)
    case_io.write_splits(data, {"train": train_names, "val": val})

    left_s = budget_s - (time.monotonic() - started)
    if recipe.get("epochs") is None:
        recipe["epoch_s"] = _epoch_seconds(base_model, data, train_names, val, config)
        recipe["epochs"] = max(1, int(left_s // recipe["epoch_s"]))
        recipe_path.write_text(json.dumps(recipe, indent=1))
    print(f"adapting {init.name} to {Path(ct).name}: {len(train_names)} training pairs, {len(val)} validation "
          f"pairs, {recipe['epochs']} epochs in the {left_s / 60:.1f} minutes left")
    best = training.train(str(data), config_name, str(work / "run"), epochs=recipe["epochs"],
                          batch_size=config.batch_size, lr=config.lr, workers=0, device=device, seed=config.seed,
                          # the trainer stops after the epoch that passes its limit: one epoch early
                          time_limit_min=max(left_s - recipe["epoch_s"], 0.0) / 60, progress=progress,
                          init=str(init))
    if not (work / "run" / "best.pt").is_file():
        raise AdaptError(f"no epoch gave a finite validation; nothing written (see {work / 'run' / 'log.csv'})")
    model, _ = checkpoint.load_model(work / "run" / "best.pt")
    meta = {"config_name": config_name,
            "note": f"patient-specific: {init.name} adapted to one CT (sha256 {recipe['ct_sha256'][:12]}...)",
            "adaptation": {**{k: v for k, v in recipe.items() if k not in ("config", "epoch_s")}, "init": init.name,
                           "settings": recipe["config"], "training_pairs": len(train_names),
                           "validation": best, "minutes": round((time.monotonic() - started) / 60, 2),
                           "device": dev.type}}
    checkpoint.save(out, model, meta=meta)
    shutil.rmtree(work)  # the patient's pairs go with it: the checkpoint is all that stays
    return out


def _epoch_seconds(model, data: Path, train_names: list[str], val: list[str], config: AdaptConfig) -> float:
    """Seconds one epoch takes here, from two timed training steps and one validation batch."""
    from .data import BiplanarDataset
    from .losses import x2p_losses

    model = model.train()
    probe = BiplanarDataset(data, train_names[:config.batch_size], model.config.image_size,
                            model.config.n_vertebrae, train=True)
    batch = torch.utils.data.default_collate([probe[i] for i in range(len(probe))])
    seconds = []
    for _ in range(2):  # the first step warms up
        start = time.perf_counter()
        out = model(batch["images"], batch["P"], batch["prompt"])
        x2p_losses(out, batch, model.config)["total"].backward()
        seconds.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    steps = -(-len(train_names) // config.batch_size)
    return 1.15 * seconds[-1] * (steps + len(val) / config.batch_size / 3)  # loading and checkpoints: +15 %


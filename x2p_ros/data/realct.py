"""The real-anatomy validation set: DRR pairs of the two labelled patient CTs
in ../shared/realct (beside the project), rendered through the data engine at
a few C-arm poses each. Never trained on, nor used to choose a checkpoint or a
setting (`x2p adapt`'s benchmark is the one place that trains on them)."""
from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import asdict
from pathlib import Path

from .synth import ENGINE_VERSION, SynthConfig

ROOT = Path(__file__).resolve().parents[3] / "shared" / "realct"
CASES = {"verse-sub-verse012": dict(centroids="seg-subreg_ctd.json"),
         "totalseg-example": dict(mask="vertebrae_totalseg.nii.gz", mask_style="totalseg")}
POSES = 4  # C-arm poses (import seeds) per CT


def cache_folder(name: str, config: SynthConfig) -> Path:
    """A generated data set's folder in the temporary directory, named after the engine
    version and the synthesis recipe that made it (so a new engine never reuses it)."""
    recipe = hashlib.sha1(json.dumps([ENGINE_VERSION, asdict(config)]).encode()).hexdigest()[:8]
    return Path(tempfile.gettempdir()) / f"x2p-bench-{name}-{config.size}-{recipe}"


def available(root: Path = ROOT) -> bool:
    return all((Path(root) / name / "ct.nii.gz").is_file() for name in CASES)


def labels(root: Path, name: str) -> dict:
    """The ground-truth source of one real CT as import_ct / load_patient / adapt take it."""
    return {k: (v if k == "mask_style" else Path(root) / name / v) for k, v in CASES[name].items()}


def split(root: Path, size: int, poses: int = POSES) -> Path:
    """DRR pairs of the real CTs at `poses` random C-arm poses each (`x2p data import-ct
    --seed 0..poses-1`), made once, then reused; every pair is a test case."""
    from .ct_import import import_ct
    config = SynthConfig(size=size)
    data = cache_folder(f"realct-p{poses}", config)
    names = []
    for name in CASES:
        for seed in range(poses):
            folder = data / f"{name}_pose{seed}"
            if not (folder / "case.json").is_file():
                import_ct(Path(root) / name / "ct.nii.gz", folder, seed=seed, config=config, **labels(root, name))
            names.append(folder.name)
    (data / "test.txt").write_text("".join(f"{n}\n" for n in names))
    return data


def validation_errors(localizer, root: Path = ROOT, poses: int = POSES) -> dict:
    """evaluate_cases' errors of a model on each real CT's pairs: {CT name: errors}."""
    from ..training.evaluate import evaluate_cases
    data = split(root, localizer.config.image_size, poses)
    return {name: evaluate_cases(localizer, data, [f"{name}_pose{s}" for s in range(poses)]) for name in CASES}

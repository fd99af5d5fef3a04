"""DRR pairs of one patient's CT after random table deformations (deform.py),
at random C-arm poses around random runs of its labelled levels or showing
them all: the training data of `x2p adapt`, and real CTs added to a training
set by `x2p data add-ct`."""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np

from . import case_io
from .ct_import import field_of_view, load_patient
from .deform import DeformConfig, deform
from .synth import MAX_SIZE, MIN_SIZE, SynthConfig, case_seed, render_pair

WINDOW = (3, 7)  # levels a field around a run of levels shows


def sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def render_patient_pair(volume, vertebrae: list[dict], seed: int, size: int, deform_config: DeformConfig,
                        window: tuple[int, int] | None = None, device: str = "cpu"):
    """One DRR pair of the patient after a random deformation: (images, Ps, spacings,
    vertebrae visible in both views, looks). The field is centred on a random run of
    `window` levels, or shows every level when window is None."""
    rng = np.random.default_rng(seed)
    xyz = np.array([v["xyz_mm"] for v in vertebrae], dtype=np.float64)
    deformed, moved = deform(volume, xyz, rng, deform_config)
    if window is None:
        first, count = 0, len(moved)
    else:
        count = int(rng.integers(min(window[0], len(moved)), min(window[1], len(moved)) + 1))
        first = int(rng.integers(0, len(moved) - count + 1))
    shown = moved[first:first + count]
    moved_vertebrae = [{"label": v["label"], "xyz_mm": m.tolist()} for v, m in zip(vertebrae, moved)]
    return render_pair(deformed, moved_vertebrae, shown.mean(axis=0), field_of_view(shown), rng,
                       SynthConfig(size=size), device)


def planned_pairs(prefix: str, seed: int, count: int, window: tuple[int, int], whole_field_share: float):
    """(name, seed, window) of `count` pairs; window None (every level in the field) for an even
    spread of whole_field_share of them."""
    return [(f"{prefix}_{i:05d}", case_seed(seed, i),
             None if int((i + 1) * whole_field_share) > int(i * whole_field_share) else window)
            for i in range(count)]


def render_pairs(volume, vertebrae, folder: Path, pairs: list[tuple], size: int, deform_config: DeformConfig,
                 deadline: float | None = None, progress: bool = True, desc: str = "render", device: str = "cpu",
                 source: str = "patient-ct") -> list[str]:
    """Renders the (name, seed, window) pairs not yet in `folder` (an interrupted run resumes)
    until the deadline (time.monotonic()); returns the names of the complete ones."""
    from tqdm import tqdm

    done = []
    bar = tqdm(pairs, desc=desc, unit="pair", disable=not progress, leave=False)
    for name, seed, window in bar:
        if not (folder / name / "case.json").is_file():
            if deadline is not None and time.monotonic() > deadline:
                break
            images, Ps, spacings, kept, looks = render_patient_pair(volume, vertebrae, seed, size, deform_config,
                                                                    window, device)
            case_io.write_case(folder / name, images, Ps, spacings, kept, source, seed, {"looks": looks})
        done.append(name)
    bar.close()
    return done


def add_ct(ct, data, pairs: int, centroids=None, mask=None, mask_style: str = "verse", split: str = "train",
           size: int = 512, seed: int = 0, deform_config: DeformConfig = DeformConfig(), progress: bool = True,
           device: str = "cpu") -> list[str]:
    """Adds `pairs` DRR pairs of a real CT (random poses, random deformations, half of
    them showing every labelled level) to the data set `data` and to its split;
    returns their names. The same command again completes an interrupted one. A CT
    belongs to one split: adding it to another is refused (it would leak)."""
    if split not in case_io.SPLITS:
        raise case_io.DatasetError(f"unknown split {split!r}; expected one of {list(case_io.SPLITS)}")
    if pairs < 1:
        raise case_io.DatasetError(f"--pairs must be at least 1, got {pairs}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise case_io.DatasetError(f"image size must be {MIN_SIZE} to {MAX_SIZE} pixels, got {size}")
    data = Path(data)
    if data.exists() and not data.is_dir():
        raise case_io.DatasetError(f"{data}: not a folder")
    volume, vertebrae = load_patient(ct, centroids, mask, mask_style)  # every input error before any work
    ct_id = f"ct{sha256(ct)[:12]}"  # the CT by its hash: its pairs are found again, its file name is not kept
    splits = {s: case_io.read_split(data, s) if (data / f"{s}.txt").is_file() else [] for s in case_io.SPLITS}
    for other, names in splits.items():
        if other != split and any(n.startswith(f"{ct_id}_") for n in names):
            raise case_io.DatasetError(f"{data}: this CT is already in split '{other}'; a CT belongs to one split")
    planned = planned_pairs(f"{ct_id}_s{seed}", seed, pairs, WINDOW, 0.5)
    names = render_pairs(volume, vertebrae, data, planned, size, deform_config, progress=progress,
                         desc="CT pairs", device=device, source="ct")
    added = [n for n in names if n not in splits[split]]
    tmp = data / f".{split}.txt.tmp"  # the split is replaced whole: never half written
    tmp.write_text("".join(f"{n}\n" for n in splits[split] + added))
    os.replace(tmp, data / f"{split}.txt")
    return names

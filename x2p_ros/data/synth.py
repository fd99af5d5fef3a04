"""BiSpineX-like synthetic data: procedural phantoms rendered to AP/LAT C-arm
pairs with exact projection matrices, fully determined by a seed.

The reference frame is the C-arm's: origin at the isocentre, z up, the AP
source anterior of the patient (-y), the LAT source at the patient's right
(-x). The patient is placed with a random rotation (-15..15 degrees about the
vertical axis, -5..5 about the other two) and a small translation."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from .. import geometry
from ..allocator import keep_freed_memory
from . import carm, case_io, drr
from .phantom import CHAIN, PhantomSpec, make_phantom, spine_curve


MIN_SIZE, MAX_SIZE = 32, 4096  # below 32 px a vertebra is a pixel or two
MIN_FIELD_MM = 100.0  # the smallest field of view a case is framed with, at the isocentre
# Raised whenever the same seed and config would render other images, so that a data set is
# never completed, nor a cached one reused, with cases of another engine (2: the C-arm chain and context
# anatomy; 3: arms beside the chest only in fields that reach above T11; 4: fields framed with random margins;
# 5: vessels in the lungs, gas-filled colon with haustra; 6: costal cartilage; 7: the vertebral body's cortex as
# thin as measured, a one-voxel partial-volume rim; 8: body and disc heights that vary level by level;
# 9: fields with up to 1.6 gaps of room, so that they may show a vertebra beyond the framed ones; 10: a
# posterior arch that reaches down to the disc below; 11: end plates denser than the side walls and flat over
# their rim, discs down to half height; 12: a share of fields framed over the lumbosacral column; 13: every
# level a field may show painted, and the next one past it; 14: pedicles of measured oval section,
# articular processes as plates, flat transverse processes of cancellous bone, CT blur up to 2 mm).
ENGINE_VERSION = 14


@dataclass
class SynthConfig:
    size: int = 512
    sid_mm: tuple[float, float] = (500.0, 600.0)  # source to isocentre
    sdd_mm: tuple[float, float] = (950.0, 1050.0)  # source to detector (Arcadis Varic: 968)
    yaw_deg: float = 15.0  # about the vertical axis
    tilt_deg: float = 5.0  # about the two other axes
    shift_mm: float = 10.0
    # per pixel of a 512 x 512 detector behind the field's centre (automatic exposure control), log-uniform
    photons: tuple[float, float] = (300.0, 2e4)
    scatter: tuple[float, float] = (0.0, 0.3)  # scatter-to-primary ratio in air
    # a phantom's resolution as a CT would give it (Gaussian sigma, mm): CTs of 1-3 mm voxels soften
    # the cortex that a phantom paints sharp, and 3 mm voxels with a soft kernel (routine abdominal CTs)
    # more than engine 13's 1.2 mm did: its X2P-Net found 221 of 249 validation vertebrae within 10 mm
    # as rendered, 209 in the same cases at 2 mm
    ct_blur_mm: tuple[float, float] = (0.0, 2.0)
    short_field_share: float = 0.6  # C-arm-like fields (image intensifier) of short_field vertebrae
    short_field: tuple[int, int] = (3, 6)
    # the rest (flat panels, thoracic and cervical fields): framed on at most the model's N = 10 per patch
    # (docs/design.md, section 2); the room below may add one or two more, which the localizer reaches by
    # going on down the chain, as in tall films
    long_field: tuple[int, int] = (7, 10)
    # room between the field's edge and the top-most (bottom-most) vertebra, in gaps to the next one, drawn for
    # each edge: a C-arm is not framed on a vertebra count, and a field framed always alike teaches the model
    # the spine's scale in the image instead of reading it. Beyond one gap the next vertebra is in the field
    # too: fields that always ended within a gap of the last vertebra taught the models to spread the chain
    # over the field (X2P-Net trained on engine 7: its error five vertebrae below the prompt was 8.2 mm on 60
    # phantoms with 1.05-1.6 gaps of room, 6.9 mm on 60 framed within a gap); `x2p data import-ct` leaves
    # more than a gap, too.
    field_margin: tuple[float, float] = (0.3, 1.6)
    # Share of fields whose bottom-most framed vertebra is one of lumbosacral_ends: robotic pedicle screws go
    # mostly into the lumbar spine, and a field placed anywhere along C1-S1 with equal chance frames the
    # lumbar levels least of all (L5 in 1 field of 10, S1 in 1 of 20; with half of them lumbosacral: 3 and 6
    # times as often).
    lumbosacral_share: float = 0.5
    lumbosacral_ends: tuple[str, str] = ("L3", "S1")

    def __post_init__(self):
        if not MIN_SIZE <= self.size <= MAX_SIZE:
            raise case_io.DatasetError(f"image size must be {MIN_SIZE} to {MAX_SIZE} pixels, got {self.size}")
        if not 0.0 <= self.lumbosacral_share <= 1.0:
            raise case_io.DatasetError(f"lumbosacral_share must be 0 to 1, got {self.lumbosacral_share}")
        low, high = self.lumbosacral_ends
        if low not in CHAIN or high not in CHAIN or CHAIN.index(low) > CHAIN.index(high):
            raise case_io.DatasetError(f"lumbosacral_ends must be two levels of {CHAIN[0]}-{CHAIN[-1]}, the upper "
                                       f"first, got {self.lumbosacral_ends}")


def _rotation(yaw, pitch, roll) -> np.ndarray:
    cz, sz = np.cos(yaw), np.sin(yaw)
    cx, sx = np.cos(pitch), np.sin(pitch)
    cy, sy = np.cos(roll), np.sin(roll)
    Rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    Rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    Ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    return Rz @ Rx @ Ry


def case_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def render_pair(volume, vertebrae: list[dict], centre, fov: float, rng: np.random.Generator,
                config: SynthConfig = SynthConfig(), device: str = "cpu", blur_mm: float = 0.0):
    """Places a patient (volume and vertebrae in the patient frame: x left, y
    posterior, z superior, mm) with a random pose at the isocentre and renders
    the AP and LAT views through a random C-arm image chain (carm.Look). Returns
    (images, Ps, spacings, vertebrae in the C-arm frame whose centroids project
    inside both exposed fields, the looks as dicts). blur_mm: the volume's resolution
    (Gaussian sigma), applied to the projections: projecting a blurred volume is blurring its
    projection, scaled by the magnification."""
    R = _rotation(*np.deg2rad([rng.uniform(-config.yaw_deg, config.yaw_deg),
                               rng.uniform(-config.tilt_deg, config.tilt_deg),
                               rng.uniform(-config.tilt_deg, config.tilt_deg)]))
    T = np.eye(4)
    T[:3, :3] = R
    T[:3, 3] = rng.uniform(-config.shift_mm, config.shift_mm, size=3) - R @ np.asarray(centre, dtype=np.float64)
    volume = volume.transformed(T)
    density = drr.materials(torch.as_tensor(volume.hu, device=device, dtype=torch.float32))  # shared by both views
    xyz = np.array([v["xyz_mm"] for v in vertebrae], dtype=np.float64).reshape(-1, 3) @ R.T + T[:3, 3]
    images, Ps, spacings, looks = {}, {}, {}, {}
    inside = np.ones(len(xyz), dtype=bool)
    shape = (config.size, config.size)
    margin = 0.02 * config.size + 0.5  # from the edge pixels
    # every setting of both views is drawn before any noise, and each view's noise from its own stream:
    # quantum noise takes a varying count of random numbers, so that drawing it from the shared stream
    # made the LAT view's look depend on the AP image (engine 10 and before)
    views = {}
    for view in geometry.VIEWS:
        P, spacing = geometry.carm_view(view, rng.uniform(*config.sid_mm), rng.uniform(*config.sdd_mm), fov,
                                        config.size, rng.uniform(-5, 5, size=2))
        look = carm.Look.sample(rng, config.size, photons=config.photons, scatter=config.scatter)
        views[view] = P, spacing, look, np.random.default_rng(rng.integers(2 ** 63))
    for view, (P, spacing, look, noise) in views.items():
        lines = drr.line_integral(volume, P, shape, device=device, density=density)
        if blur_mm > 0:
            sigma_px = blur_mm / (fov / config.size)  # the field is fov mm wide at the isocentre
            lines = torch.stack([torch.as_tensor(cv2.GaussianBlur(channel.cpu().numpy(), (0, 0), sigma_px))
                                 for channel in lines]).to(device)
        images[view] = carm.image(lines, look, noise)
        Ps[view], spacings[view], looks[view] = P, spacing, look.as_dict()
        uv = geometry.project(P, xyz)
        inside &= geometry.inside_image(uv, shape, margin) & carm.inside_field(look, shape, uv, margin)
    kept = [{"label": v["label"], "xyz_mm": p.tolist()} for v, p, keep in zip(vertebrae, xyz, inside) if keep]
    return images, Ps, spacings, kept, looks


def field(curve: np.ndarray, first: int, n_visible: int, rng: np.random.Generator,
          config: SynthConfig = SynthConfig()) -> tuple[np.ndarray, float]:
    """The field of view of the vertebrae curve[first:first + n_visible] (centres of the whole
    CHAIN, mm, z up): its centre and its height (mm, at least MIN_FIELD_MM), with random room above and
    below of config.field_margin gaps to the next vertebra."""
    centres = curve[first:first + n_visible]
    gaps = np.linalg.norm(np.diff(curve, axis=0), axis=1)
    gap_above, gap_below = gaps[max(first - 1, 0)], gaps[min(first + n_visible - 1, len(gaps) - 1)]
    top = centres[0, 2] + rng.uniform(*config.field_margin) * gap_above
    bottom = centres[-1, 2] - rng.uniform(*config.field_margin) * gap_below
    return np.array([*centres[:, :2].mean(axis=0), (top + bottom) / 2]), float(max(top - bottom, MIN_FIELD_MM))


def first_framed(n_visible: int, rng: np.random.Generator, config: SynthConfig = SynthConfig()) -> int:
    """Index in CHAIN of a field's top-most framed vertebra: anywhere along the column, or, in
    config.lumbosacral_share of fields, such that the bottom-most one lies in config.lumbosacral_ends."""
    if rng.random() < config.lumbosacral_share:
        low, high = (CHAIN.index(name) for name in config.lumbosacral_ends)
        last = int(rng.integers(max(low, n_visible - 1), high + 1))
        return last - n_visible + 1
    return int(rng.integers(0, len(CHAIN) - n_visible + 1))


def make_case(seed: int, config: SynthConfig = SynthConfig(), device: str = "cpu"):
    """Everything of one case from its own seed: (images, Ps, spacings, vertebrae, info)."""
    rng = np.random.default_rng(seed)
    low, high = config.short_field if rng.random() < config.short_field_share else config.long_field
    n_visible = int(rng.integers(low, high + 1))
    first = first_framed(n_visible, rng, config)
    beyond = int(np.floor(config.field_margin[1])) + 1  # levels past each end that the widest room can show
    lo, hi = max(first - beyond, 0), min(first + n_visible + beyond, len(CHAIN))
    spec = PhantomSpec.sample(rng, CHAIN[lo:hi])
    curve = spine_curve(spec)[0]
    field_centre, fov = field(curve, first, n_visible, rng, config)
    # The patient's shift, a field widened to MIN_FIELD_MM (short cervical ones) and the magnification show
    # more than the room at a field's ends: paint the levels whose centres it may show (10 % to spare for the
    # magnification and the principal point's offset) and the next one past them, so that no column ends
    # inside an image (in 1 case of 100 with engine 12).
    seen = np.flatnonzero(np.abs(curve[:, 2] - field_centre[2]) <= 0.55 * fov + config.shift_mm)
    spec.levels = CHAIN[min(lo, max(seen.min() - 1, 0)):max(hi, seen.max() + 2)]
    spec.voxel_mm = float(max(1.0, fov / 400.0))
    phantom = make_phantom(spec, rng)
    blur_mm = float(rng.uniform(*config.ct_blur_mm))
    images, Ps, spacings, vertebrae, looks = render_pair(phantom.volume, phantom.vertebrae, field_centre, fov, rng,
                                                         config, device, blur_mm)
    info = {"phantom": {"levels_rendered": spec.levels, "scoliosis": bool(spec.scoliosis_mm != 0.0),
                        "fractures": sorted(spec.fractures), "implants": list(spec.implant_levels),
                        "voxel_mm": spec.voxel_mm, "ct_blur_mm": round(blur_mm, 3)},
            "looks": looks}
    return images, Ps, spacings, vertebrae, info


def _generate(job):
    out, name, seed, config, threads = job
    torch.set_num_threads(threads)
    folder = Path(out) / name
    if (folder / "case.json").is_file():  # done in an earlier, interrupted run
        meta = json.loads((folder / "case.json").read_text())
    else:
        images, Ps, spacings, vertebrae, info = make_case(seed, config)
        case_io.write_case(folder, images, Ps, spacings, vertebrae, "phantom", seed, info)
        meta = {"vertebrae": vertebrae, **info}
    return name, len(meta["vertebrae"]), meta["phantom"]


def split_names(names: list[str], seed: int) -> dict[str, list[str]]:
    """80 % train / 20 % test, 5 % of train for validation (the paper's split)."""
    order = np.random.default_rng(seed).permutation(len(names))
    n_test = max(1, round(0.2 * len(names))) if len(names) > 1 else 0
    n_val = max(1, round(0.05 * (len(names) - n_test))) if len(names) - n_test > 1 else 0
    test = sorted(names[i] for i in order[:n_test])
    val = sorted(names[i] for i in order[n_test:n_test + n_val])
    train = sorted(names[i] for i in order[n_test + n_val:])
    return {"train": train, "val": val, "test": test}


def _merged_splits(out: Path, fresh: dict[str, list[str]]) -> dict[str, list[str]]:
    """The splits of a data set made again or made larger: every case already in a split
    stays there (a test case never becomes a training one, and cases that `x2p data add-ct`
    put in are kept); only cases in no split yet take their place from `fresh`."""
    existing = {s: case_io.read_split(out, s) if (out / f"{s}.txt").is_file() else [] for s in case_io.SPLITS}
    assigned = {name for names in existing.values() for name in names}
    return {s: existing[s] + [n for n in fresh[s] if n not in assigned] for s in case_io.SPLITS}


def synthesize(out, cases: int, seed: int = 0, config: SynthConfig = SynthConfig(), workers: int | None = None,
               progress: bool = True, split: str | None = None) -> dict:
    """Generates (or completes) a data set of `cases` cases in `out`; returns its statistics. With `split`,
    only the cases that split of the whole data set holds (the same names, seeds and split), so that a
    validation or test split is had without rendering the training cases; the same command without it
    completes the data set later."""
    from tqdm import tqdm

    if cases < 1:
        raise case_io.DatasetError(f"--cases must be at least 1, got {cases}")
    if workers is not None and workers < 1:
        raise case_io.DatasetError(f"--workers must be at least 1, got {workers}")
    names = [f"case_{i:05d}" for i in range(cases)]
    recipe = split_names(names, seed)
    splits = recipe
    if split is not None:
        if split not in recipe:
            raise case_io.DatasetError(f"--split must be one of {', '.join(recipe)}, got {split!r}")
        if not recipe[split]:
            raise case_io.DatasetError(f"no case of {cases} falls in split '{split}'; give more --cases")
        splits = {s: names_in if s == split else [] for s, names_in in recipe.items()}
    out = Path(out)
    earlier = out / "dataset.json"
    if earlier.is_file():  # completing an earlier run: only with the same recipe, or the set would mix two
        made = json.loads(earlier.read_text())
        if made.get("seed") != seed or made.get("config") != json.loads(json.dumps(asdict(config))):
            raise case_io.DatasetError(f"{out} was made with another seed or synthesis config; "
                                       f"use a new folder (or delete this one)")
        if made.get("engine", 1) != ENGINE_VERSION:
            raise case_io.DatasetError(f"{out} was made by version {made.get('engine', 1)} of the data engine, "
                                       f"this is version {ENGINE_VERSION}; use a new folder (or delete this one)")
    out.mkdir(parents=True, exist_ok=True)
    workers = max(1, workers or os.cpu_count() or 1)
    threads = max(1, (os.cpu_count() or 1) // workers)
    # the cases asked for and those an earlier run rendered (read back, not rendered again): the statistics
    # describe every case there
    merged = _merged_splits(out, splits)
    wanted = {name for names_in in merged.values() for name in names_in}
    jobs = [(str(out), name, case_seed(seed, i), config, threads) for i, name in enumerate(names) if name in wanted]
    results = []
    bar = tqdm(total=len(jobs), desc="synth", unit="case", disable=not progress)
    if workers == 1:
        for job in jobs:
            results.append(_generate(job))
            bar.update()
    else:
        import multiprocessing as mp
        with mp.get_context("spawn").Pool(workers, initializer=keep_freed_memory) as pool:
            for result in pool.imap_unordered(_generate, jobs):
                results.append(result)
                bar.update()
    bar.close()
    case_io.write_splits(out, merged)  # after rendering: an interrupted run lists no case it did not finish
    counts = np.array([n for _, n, _ in results])
    rendered = {name for names_in in merged.values() for name in names_in}
    stats = {"cases": cases, "seed": seed, "engine": ENGINE_VERSION,
             # the splits whose cases are all there: every split, or those of x2p data synth --split so far
             "splits_rendered": [s for s in case_io.SPLITS if set(recipe[s]) <= rendered],
             "vertebrae_per_case": {"min": int(counts.min()), "median": float(np.median(counts)),
                                    "max": int(counts.max())},
             "share_scoliosis": float(np.mean([p["scoliosis"] for _, _, p in results])),
             "share_fracture": float(np.mean([bool(p["fractures"]) for _, _, p in results])),
             "share_implant": float(np.mean([bool(p["implants"]) for _, _, p in results])),
             "config": asdict(config)}
    (out / "dataset.json").write_text(json.dumps(stats, indent=1))
    return stats

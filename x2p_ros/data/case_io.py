"""The data set format (docs/design.md, section 3): one folder per case with ap.png,
lat.png (16-bit, bone bright) and case.json; splits in train/val/test.txt.

Reading validates everything and raises DatasetError naming the file and what
is wrong, so a bad case never reaches training or evaluation silently."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from .. import geometry
from ..geometry import VIEWS

SPLITS = ("train", "val", "test")


class DatasetError(ValueError):
    """A case or data set that does not follow the format."""


@dataclass
class CaseView:
    image: np.ndarray | None  # (H, W) uint16, None when not loaded
    P: np.ndarray  # 3x4, reference mm -> pixels
    size: tuple[int, int]  # (W, H)
    pixel_spacing_mm: float


@dataclass
class Case:
    folder: Path
    views: dict[str, CaseView]
    labels: list[str]
    xyz_mm: np.ndarray  # (N, 3), superior first
    source: str = ""
    seed: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.folder.name

    def pixels(self, view: str) -> np.ndarray:
        """2D ground truth: the projection of the 3D ground truth, (N, 2) px."""
        if len(self.xyz_mm) == 0:
            return np.zeros((0, 2))
        return geometry.project(self.views[view].P, self.xyz_mm)


def _number_array(value, shape, what: str, where: Path) -> np.ndarray:
    try:
        a = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise DatasetError(f"{where}: {what} must be numbers, got {value!r}") from None
    if a.shape != shape:
        raise DatasetError(f"{where}: {what} must have shape {list(shape)}, got {list(a.shape)}")
    if not np.all(np.isfinite(a)):
        raise DatasetError(f"{where}: {what} contains NaN or Inf")
    return a


def _read_view(meta: dict, view: str, where: Path) -> CaseView:
    if not isinstance(meta.get(view), dict):
        raise DatasetError(f"{where}: missing key '{view}' (an object with P, size, pixel_spacing_mm)")
    v = meta[view]
    for key in ("P", "size", "pixel_spacing_mm"):
        if key not in v:
            raise DatasetError(f"{where}: missing key '{view}.{key}'")
    P = _number_array(v["P"], (3, 4), f"{view}.P", where)
    try:
        geometry.validate_projection(P)
    except geometry.CalibrationError as e:
        raise DatasetError(f"{where}: {view}.P: {e}") from None
    size = _number_array(v["size"], (2,), f"{view}.size", where)
    if np.any(size < 1) or np.any(size != np.round(size)):
        raise DatasetError(f"{where}: {view}.size must be two positive integers [W, H], got {v['size']}")
    spacing = v["pixel_spacing_mm"]
    if not isinstance(spacing, (int, float)) or not math.isfinite(spacing) or spacing <= 0:
        raise DatasetError(f"{where}: {view}.pixel_spacing_mm must be a positive number, got {spacing!r}")
    return CaseView(None, P, (int(size[0]), int(size[1])), float(spacing))


def read_image16(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DatasetError(f"{path}: missing image")
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise DatasetError(f"{path}: not a readable image")
    if image.dtype != np.uint16 or image.ndim != 2:
        raise DatasetError(f"{path}: must be a 16-bit grayscale PNG, got {image.dtype} with shape {image.shape}")
    return image


def read_case(folder, load_images: bool = True) -> Case:
    folder = Path(folder)
    where = folder / "case.json"
    if not where.is_file():
        raise DatasetError(f"{where}: missing")
    try:
        meta = json.loads(where.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise DatasetError(f"{where}: must hold a JSON object")
    views = {view: _read_view(meta, view, where) for view in VIEWS}
    vertebrae = meta.get("vertebrae")
    if not isinstance(vertebrae, list):
        raise DatasetError(f"{where}: missing key 'vertebrae' (a list of {{label, xyz_mm}})")
    labels, xyz = [], []
    for i, vertebra in enumerate(vertebrae):
        if not isinstance(vertebra, dict) or "label" not in vertebra or "xyz_mm" not in vertebra:
            raise DatasetError(f"{where}: vertebrae[{i}] must have 'label' and 'xyz_mm'")
        labels.append(str(vertebra["label"]))
        xyz.append(_number_array(vertebra["xyz_mm"], (3,), f"vertebrae[{i}].xyz_mm", where))
    xyz_mm = np.array(xyz).reshape(-1, 3)
    if load_images:
        for view, v in views.items():
            v.image = read_image16(folder / f"{view}.png")
            if (v.image.shape[1], v.image.shape[0]) != v.size:
                raise DatasetError(f"{folder / (view + '.png')}: image is {v.image.shape[1]}x{v.image.shape[0]} "
                                   f"but case.json says {view}.size = {list(v.size)}")
    extra = {k: v for k, v in meta.items() if k not in (*VIEWS, "vertebrae", "source", "seed")}
    return Case(folder, views, labels, xyz_mm, str(meta.get("source", "")), meta.get("seed"), extra)


def write_case(folder, images: dict, Ps: dict, spacings: dict, vertebrae: list[dict], source: str,
               seed: int | None = None, extra: dict | None = None) -> Path:
    """Writes the images first and case.json last (atomically), so a folder with
    a case.json is always complete: interrupted generation resumes from there."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {}
    for view in VIEWS:
        image = np.asarray(images[view])
        if image.dtype != np.uint16 or image.ndim != 2:
            raise DatasetError(f"{view} image must be 2D uint16, got {image.dtype} {image.shape}")
        if not cv2.imwrite(str(folder / f"{view}.png"), image):
            raise DatasetError(f"{folder / (view + '.png')}: could not be written")
        meta[view] = {"P": np.asarray(Ps[view], dtype=float).tolist(), "size": [image.shape[1], image.shape[0]],
                      "pixel_spacing_mm": float(spacings[view])}
    meta["vertebrae"] = [{"label": v["label"], "xyz_mm": [float(c) for c in v["xyz_mm"]]} for v in vertebrae]
    meta["source"] = source
    meta["seed"] = seed
    meta.update(extra or {})
    tmp = folder / "case.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, folder / "case.json")
    return folder


def write_splits(root, splits: dict[str, list[str]]):
    for name, cases in splits.items():
        (Path(root) / f"{name}.txt").write_text("".join(f"{c}\n" for c in cases))


def read_split(root, name: str) -> list[str]:
    path = Path(root) / f"{name}.txt"
    if not path.is_file():
        raise DatasetError(f"{path}: missing split file")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def list_cases(root) -> list[str]:
    """Case folder names: those of the split files when there are any, else every
    sub-folder holding a case.json."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    names = [c for s in SPLITS if (root / f"{s}.txt").is_file() for c in read_split(root, s)]
    if names:
        return names
    return sorted(p.name for p in root.iterdir() if (p / "case.json").is_file())


def check_dataset(root, edge_margin_px: float = 0.0) -> tuple[list[str], dict]:
    """Problems found in a data set (empty when it is sound) and a summary."""
    root = Path(root)
    problems, counts = [], []
    names = list_cases(root)
    if not names:
        problems.append(f"{root}: no cases (no split files and no folder with a case.json)")
    seen = {}
    for split in SPLITS:
        if (root / f"{split}.txt").is_file():
            for name in read_split(root, split):
                if name in seen:
                    problems.append(f"{name}: listed in both {seen[name]}.txt and {split}.txt")
                seen[name] = split
    for name in dict.fromkeys(names):
        try:
            case = read_case(root / name)
        except DatasetError as e:
            problems.append(str(e))
            continue
        counts.append(len(case.labels))
        if not case.labels:
            problems.append(f"{name}: no vertebrae")
        for view, v in case.views.items():
            try:
                uv = case.pixels(view)
            except geometry.CalibrationError as e:
                problems.append(f"{name}: {view}: {e}")
                continue
            w, h = v.size
            outside = ~geometry.inside_image(uv, v.size, edge_margin_px)
            for i in np.flatnonzero(outside):
                problems.append(f"{name}: {view}: vertebra {case.labels[i]} projects outside the image at "
                                f"({uv[i, 0]:.1f}, {uv[i, 1]:.1f})")
    summary = {"cases": len(set(names)), "readable": len(counts),
               "vertebrae_min": int(min(counts)) if counts else 0,
               "vertebrae_median": float(np.median(counts)) if counts else 0.0,
               "vertebrae_max": int(max(counts)) if counts else 0}
    return problems, summary

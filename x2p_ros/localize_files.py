"""`x2p localize`: the node's computation on files. A case folder, or two
images (PNG, 16-bit TIFF, DICOM) with a calibration YAML and a prompt per view,
to JSON (mm, labels, confidence, 2D points) and an overlay PNG."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import cv2
import numpy as np
import yaml

from . import geometry
from .data import case_io
from .geometry import VIEWS
from .inference import InputError, Localizer
from .overlay import draw_overlay


def read_image(path) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: missing")
    if path.suffix.lower() in (".dcm", ".dicom"):
        try:
            import pydicom
        except ImportError:
            raise InputError("reading DICOM needs pydicom (pip install pydicom)") from None
        try:
            ds = pydicom.dcmread(str(path))
            image = ds.pixel_array.astype(np.float32)
        except Exception as e:  # pydicom raises many kinds for a bad file
            raise InputError(f"{path}: not a readable DICOM image ({e})") from None
        if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":  # bone dark: invert
            image = image.max() - image
        return image
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise InputError(f"{path}: not a readable image")
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    return image.astype(np.float32)


def read_calibration(path) -> dict:
    """{view: P} from YAML: per view either `P` (3x4, mm -> px) or `K` (9 or 3x3)
    with `translation_m` and `rotation_xyzw` (the view pose in the reference frame)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise InputError(f"{path}: not a readable calibration YAML ({e})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: not a calibration: expected 'ap' and 'lat' entries (P, or K with "
                         f"translation_m and rotation_xyzw)")
    Ps = {}
    for view in VIEWS:
        entry = data.get(view)
        if not isinstance(entry, dict):
            raise InputError(f"{path}: missing '{view}' (P, or K with translation_m and rotation_xyzw)")
        try:
            if "P" in entry:
                Ps[view] = geometry.validate_projection(np.asarray(entry["P"], dtype=np.float64))
            else:
                Ps[view] = geometry.projection_from_ros(np.ravel(entry["K"]), entry["translation_m"],
                                                        entry["rotation_xyzw"])
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{path}: {view}: {e}") from None
    return Ps


def _check_writable(folder: Path):
    """A results folder that cannot be made is found before the model runs; nothing is made here (refused
    input leaves no empty folder behind)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{folder}: cannot write the results there ({existing} is not a writable folder)")


def localize_files(checkpoint, out_json, case=None, images=None, calibration=None, prompts=None,
                   reference_level="", device="cpu", overlay=None) -> dict:
    out_json = Path(out_json)
    overlay = Path(overlay) if overlay else out_json.with_suffix(".png")
    _check_writable(out_json.parent)
    localizer = Localizer.from_checkpoint(checkpoint, device)
    if case is not None:
        c = case_io.read_case(case)
        imgs = {v: c.views[v].image for v in VIEWS}
        Ps = {v: c.views[v].P for v in VIEWS}
        if prompts is None:
            if not c.labels:
                raise InputError(f"{case}: no ground truth to take a prompt from; give --prompt-ap and --prompt-lat")
            prompts = {v: c.pixels(v)[0] for v in VIEWS}
            reference_level = reference_level or c.labels[0]
    else:
        imgs = {v: read_image(images[v]) for v in VIEWS}
        Ps = read_calibration(calibration)
    if prompts is None or any(v not in prompts for v in VIEWS):
        raise InputError("a prompt on each view is needed (--prompt-ap U V --prompt-lat U V)")
    start = time.perf_counter()
    found = localizer.localize(imgs, Ps, prompts, reference_level)
    seconds = time.perf_counter() - start
    result = {"checkpoint": str(checkpoint), "reference_level": reference_level, "seconds": seconds,
              "prompts": {v: [float(x) for x in prompts[v]] for v in VIEWS},
              "vertebrae": [{"index": f.index, "label": f.label, "present": f.present,
                             "confidence": f.confidence, "xyz_mm": [float(x) for x in f.xyz_mm],
                             **{f"{v}_px": [float(x) for x in f.pixels[v]] for v in VIEWS}} for f in found]}
    try:
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(result, indent=1))
    except OSError as e:
        raise InputError(f"{out_json}: cannot write the results ({e.strerror})") from None
    if not cv2.imwrite(str(overlay), np.hstack([draw_overlay(imgs[v], prompts[v], found, v) for v in VIEWS])):
        raise InputError(f"{overlay}: cannot write the overlay (the results are in {out_json})")
    return result

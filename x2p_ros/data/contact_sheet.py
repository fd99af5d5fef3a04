"""A contact sheet of cases: both views, windowed, with the projected ground truth."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .. import geometry
from ..geometry import VIEWS
from ..preprocess import to_display_8bit
from . import case_io


def draw_points(image_bgr: np.ndarray, points, labels, scale: float = 1.0, colour=(0, 0, 255)) -> None:
    for (u, v), label in zip(np.asarray(points).reshape(-1, 2) * scale, labels):
        centre = (int(round(u)), int(round(v)))
        cv2.circle(image_bgr, centre, 3, colour, -1, cv2.LINE_AA)
        cv2.putText(image_bgr, label, (centre[0] + 5, centre[1] + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.35,
                    (0, 255, 0), 1, cv2.LINE_AA)


def case_tile(case: case_io.Case, tile: int = 256) -> np.ndarray:
    panels = []
    for view in VIEWS:
        v = case.views[view]
        scale = tile / max(v.size)
        shown = (round(v.size[0] * scale), round(v.size[1] * scale))
        img = cv2.resize(to_display_8bit(v.image), shown, interpolation=cv2.INTER_AREA)
        bgr = cv2.cvtColor(np.pad(img, ((0, tile - img.shape[0]), (0, tile - img.shape[1]))), cv2.COLOR_GRAY2BGR)
        draw_points(bgr, geometry.transform_pixels(geometry.resize_transform(v.size, shown), case.pixels(view)),
                    case.labels)
        cv2.putText(bgr, f"{case.name} {view.upper()}", (4, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (255, 255, 0), 1,
                    cv2.LINE_AA)
        panels.append(bgr)
    return np.hstack(panels)


def contact_sheet(root, out_png, cases: int = 8, tile: int = 256, columns: int = 2) -> Path:
    names = case_io.list_cases(root)[:cases]
    if not names:
        raise case_io.DatasetError(f"{root}: no cases to show")
    return _write_sheet([case_tile(case_io.read_case(Path(root) / name), tile) for name in names], columns, out_png)


def side_by_side(left: list[Path], right: list[Path], out_png, tile: int = 256) -> Path:
    """Rows of a case of `left` (e.g. synthetic) beside a case of `right` (e.g. a real
    CT's), every view at the same tile size and the same percentile window."""
    if not left or len(left) != len(right):
        raise case_io.DatasetError(f"side by side needs as many cases on each side, got {len(left)} and "
                                   f"{len(right)}")
    tiles = [case_tile(case_io.read_case(folder), tile) for pair in zip(left, right) for folder in pair]
    return _write_sheet(tiles, 2, out_png)


def _write_sheet(tiles: list[np.ndarray], columns: int, out_png) -> Path:
    tiles = tiles + [np.zeros_like(tiles[0])] * (-len(tiles) % columns)
    rows = [np.hstack(tiles[i:i + columns]) for i in range(0, len(tiles), columns)]
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out_png), np.vstack(rows))
    return out_png

"""Radiographs with the prompt and the localised vertebrae drawn (bgr8), for
the demo, the offline command and the node's overlay topics."""
from __future__ import annotations

import cv2
import numpy as np

from .preprocess import to_display_8bit

PREDICTION, GROUND_TRUTH, PROMPT = (0, 200, 255), (0, 255, 0), (255, 0, 255)


def draw_overlay(image: np.ndarray, prompt=None, vertebrae=(), view: str = "ap", ground_truth=None) -> np.ndarray:
    """image: 2D radiograph (any dtype); vertebrae: inference.Vertebra list (present
    ones are drawn at their projection in `view`); ground_truth: optional (M, 2) px."""
    bgr = cv2.cvtColor(to_display_8bit(image), cv2.COLOR_GRAY2BGR)
    scale = max(image.shape) / 512.0
    thick = max(1, round(scale))
    if ground_truth is not None:
        for u, v in np.asarray(ground_truth).reshape(-1, 2):
            cv2.circle(bgr, (int(round(u)), int(round(v))), round(6 * scale), GROUND_TRUTH, thick, cv2.LINE_AA)
    points = [(vt.pixels[view], vt.label) for vt in vertebrae if vt.present]
    for (a, _), (b, _) in zip(points, points[1:]):
        cv2.line(bgr, tuple(int(round(c)) for c in a), tuple(int(round(c)) for c in b), PREDICTION, thick, cv2.LINE_AA)
    for (u, v), label in points:
        centre = (int(round(u)), int(round(v)))
        cv2.circle(bgr, centre, round(3 * scale) + 1, PREDICTION, -1, cv2.LINE_AA)
        cv2.putText(bgr, label, (centre[0] + round(8 * scale), centre[1] + round(4 * scale)),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.45 * scale, PREDICTION, thick, cv2.LINE_AA)
    if prompt is not None:
        u, v = (int(round(c)) for c in prompt)
        r = round(8 * scale)
        cv2.line(bgr, (u - r, v), (u + r, v), PROMPT, thick, cv2.LINE_AA)
        cv2.line(bgr, (u, v - r), (u, v + r), PROMPT, thick, cv2.LINE_AA)
    return bgr

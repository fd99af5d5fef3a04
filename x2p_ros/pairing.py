"""Pairs AP and LAT frames by stamp (approximate time sync, written for this
project) and decides which pairs are key frames. Plain Python, no ROS."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Frame:
    stamp: float  # seconds
    image: np.ndarray  # (H, W), as received (uint8, uint16 or float32)
    frame_id: str = ""


@dataclass
class Pair:
    stamp: float  # the later of the two stamps
    frames: dict = field(default_factory=dict)  # view -> Frame


class Pairer:
    """Keeps the newest frame of each view; a pair forms when the two newest
    frames are within `slop` seconds and neither is in a pair already (a
    stream faster than the slop would otherwise pair each frame with the other
    view's previous one before its own arrives). Older frames are dropped,
    never queued."""

    def __init__(self, slop: float):
        self.slop = slop
        self.latest: dict[str, Frame] = {}
        self.unpaired = 0  # frames replaced before they could pair
        self._paired: set[tuple[str, float]] = set()
        self._lock = threading.Lock()

    def add(self, view: str, frame: Frame) -> Pair | None:
        with self._lock:
            old = self.latest.get(view)
            if old is not None and (view, old.stamp) not in self._paired:
                self.unpaired += 1
            self.latest[view] = frame
            other = [v for v in self.latest if v != view]
            if other and (other[0], self.latest[other[0]].stamp) in self._paired:
                return None  # the other view's newest frame went into the last pair: wait for its next
            pair = self._pair_of_latest()
            if pair is not None:
                self._paired = {(v, f.stamp) for v, f in pair.frames.items()}
            return pair

    def newest_pair(self) -> Pair | None:
        """The newest synchronised pair, if the newest frames make one."""
        with self._lock:
            return self._pair_of_latest()

    def _pair_of_latest(self) -> Pair | None:
        if len(self.latest) < 2:
            return None
        ap, lat = self.latest["ap"], self.latest["lat"]
        if abs(ap.stamp - lat.stamp) > self.slop:
            return None
        return Pair(max(ap.stamp, lat.stamp), {"ap": ap, "lat": lat})


def thumbnail(image: np.ndarray, size: int = 32) -> np.ndarray:
    """A small normalised copy for cheap change detection."""
    import cv2
    small = cv2.resize(image.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    lo, hi = np.percentile(small, [1, 99])
    return (small - lo) / max(float(hi - lo), 1e-6)


class KeyframeGate:
    """A pair is a key frame when the prompt or the calibration changed, or the
    images changed by more than `threshold` (mean absolute difference of
    normalised thumbnails), and at least 1 / max_rate seconds passed since the
    last key frame (by the pairs' stamps)."""

    def __init__(self, max_rate_hz: float, threshold: float):
        self.max_rate_hz = max_rate_hz
        self.threshold = threshold
        self._last_stamp = None
        self._last_inputs = None
        self._last_thumbs = None

    def reset(self):
        self._last_stamp = self._last_inputs = self._last_thumbs = None

    def check(self, pair: Pair, inputs_version) -> tuple[bool, str]:
        """(is key frame, why). inputs_version changes whenever a prompt or calibration does."""
        if self._last_stamp is not None and pair.stamp - self._last_stamp < 1.0 / self.max_rate_hz:
            return False, "rate limit"
        thumbs = {v: thumbnail(f.image) for v, f in pair.frames.items()}
        if self._last_stamp is None:
            why = "first pair"
        elif inputs_version != self._last_inputs:
            why = "prompt or calibration changed"
        else:
            change = max(float(np.abs(thumbs[v] - self._last_thumbs[v]).mean()) for v in thumbs)
            if change <= self.threshold:
                return False, f"images unchanged ({change:.3f} <= {self.threshold})"
            why = f"images changed ({change:.3f})"
        self._last_stamp, self._last_inputs, self._last_thumbs = pair.stamp, inputs_version, thumbs
        return True, why

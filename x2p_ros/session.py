"""What the localizer node knows between messages, without ROS: the
calibration and the prompt of each view as short histories matched to images
by stamp (topics are not ordered: a C-arm's new calibration may arrive before
the last images of its old position, or after the first of the new one), the
automatic prompt from the last result, pairing and the key-frame decision,
the last result, and the health of every input.

The node converts messages to plain values and calls a Session; every input
that cannot be used comes back as a Refusal (the input it concerns and why),
every pair as a Job to run, a Refusal, or a Skip (not a key frame)."""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import numpy as np

from . import geometry
from .geometry import VIEWS
from .pairing import Frame, KeyframeGate, Pair, Pairer

HISTORY = 32  # calibration messages kept per view and kind: a few seconds of a streaming driver


@dataclass(frozen=True)
class Refusal:
    source: str  # the input concerned: "ap/image", "lat/pose", "calibration", "prompt", ...
    reason: str
    waiting: bool = False  # nothing is wrong, something has not arrived yet

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


@dataclass(frozen=True)
class Skip:
    """A good pair that is not a key frame (rate limit, unchanged images)."""
    reason: str


@dataclass
class Job:
    pair: Pair
    Ps: dict  # view -> 3x4 P matched to the pair's stamp
    prompts: dict  # view -> (2,) px
    reference_level: str
    prepared_s: float = 0.0  # the node's own work before the job was submitted: wall time
    prepared_cpu_s: float = 0.0  # and the CPU time of the thread that did it


@dataclass
class Settings:
    reference_frame: str = "carm"
    sync_slop_s: float = 0.05
    max_image_age_s: float = 0.0  # 0: no limit
    keyframe_max_rate_hz: float = 2.0
    keyframe_change_threshold: float = 0.02
    auto_prompt: bool = True
    reference_level: str = ""


@dataclass
class _Entry:
    stamp: float
    seq: int  # arrival order: breaks ties between equal stamps (unstamped messages are all 0)
    value: object  # None: an invalid message, which ends the validity of the one before it
    reason: str = ""


class _History:
    """Messages of one kind for one view, in stamp order; the one that applies
    at a time is the newest stamped at or before it."""

    def __init__(self):
        self.entries: deque[_Entry] = deque(maxlen=HISTORY)

    def add(self, entry: _Entry):
        self.entries.append(entry)
        if len(self.entries) > 1 and self.entries[-2].stamp > entry.stamp:  # out of order: keep them sorted
            self.entries = deque(sorted(self.entries, key=lambda e: (e.stamp, e.seq)), maxlen=HISTORY)

    def at(self, stamp: float) -> _Entry | None:
        found = None
        for e in self.entries:
            if e.stamp <= stamp:
                found = e
        return found

    def newest(self) -> _Entry | None:
        return self.entries[-1] if self.entries else None


class Health:
    """Each input's state ("ok" or what is wrong), safe to read from any thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self._state: dict[str, tuple[str, bool]] = {}  # source -> (text, waiting)

    def ok(self, source: str):
        with self._lock:
            self._state[source] = ("ok", False)

    def refused(self, refusal: Refusal):
        with self._lock:
            self._state[refusal.source] = (refusal.reason, refusal.waiting)

    def snapshot(self) -> dict[str, tuple[str, bool]]:
        with self._lock:
            return dict(self._state)


class Session:
    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings()
        self._lock = threading.Lock()
        self._seq = 0
        self._intrinsics = {v: _History() for v in VIEWS}  # value: (K, (W, H))
        self._poses = {v: _History() for v in VIEWS}  # value: (R, t_mm, child_frame)
        self._prompts = {v: _History() for v in VIEWS}  # value: (2,) px
        self._last_result = None  # vertebrae of the last key frame that found any
        self.pairer = Pairer(self.settings.sync_slop_s)
        self.gate = KeyframeGate(self.settings.keyframe_max_rate_hz, self.settings.keyframe_change_threshold)
        self.health = Health()
        self.last_image_time: float | None = None  # the node's clock when the last image was accepted

    def apply(self, **changes):
        """Changes settings (the node's runtime parameters)."""
        for k, v in changes.items():
            setattr(self.settings, k, v)
        self.pairer.slop = self.settings.sync_slop_s
        self.gate.max_rate_hz = self.settings.keyframe_max_rate_hz
        self.gate.threshold = self.settings.keyframe_change_threshold

    # calibration ------------------------------------------------------------------------------
    def _add(self, history: _History, stamp: float, value, reason: str = ""):
        with self._lock:
            self._seq += 1
            history.add(_Entry(stamp, self._seq, value, reason))

    def camera_info(self, view: str, stamp: float, k9, width: int, height: int) -> Refusal | None:
        source = f"{view}/camera_info"
        try:
            K = geometry.validate_intrinsics(np.asarray(k9, dtype=np.float64).reshape(3, 3))
            if width <= 0 or height <= 0:
                raise geometry.CalibrationError(f"camera_info size {width} x {height} is empty")
        except (geometry.CalibrationError, ValueError) as e:
            return self._refuse_calibration(self._intrinsics[view], stamp, Refusal(source, str(e)))
        self._add(self._intrinsics[view], stamp, (K, (int(width), int(height))))
        self.health.ok(source)
        return None

    def view_pose(self, view: str, stamp: float, frame_id: str, translation_m, rotation_xyzw,
                  child_frame: str) -> Refusal | None:
        source = f"{view}/pose"
        reference = self.settings.reference_frame
        try:
            if frame_id != reference:
                raise geometry.CalibrationError(f"pose is given in frame {frame_id!r}, not the reference frame "
                                                f"{reference!r}")
            R = geometry.quaternion_to_rotation(rotation_xyzw)
            translation = np.asarray(translation_m, dtype=np.float64)
            if not np.all(np.isfinite(translation)):
                raise geometry.CalibrationError(f"pose translation contains NaN or Inf: {translation.tolist()}")
        except geometry.CalibrationError as e:
            return self._refuse_calibration(self._poses[view], stamp, Refusal(source, str(e)))
        self._add(self._poses[view], stamp, (R, translation * geometry.MM_PER_M, child_frame))
        self.health.ok(source)
        return None

    def _refuse_calibration(self, history: _History, stamp: float, refusal: Refusal) -> Refusal:
        # never go on with the calibration before an invalid one: its sender meant a change
        self._add(history, stamp, None, str(refusal))
        self.health.refused(refusal)
        return refusal

    def calibration_at(self, stamp: float) -> tuple[dict, dict] | Refusal:
        """(P per view, image size per view) of the calibration that applies to images stamped `stamp`."""
        Ps, sizes, missing = {}, {}, []
        with self._lock:
            applying = {v: (self._intrinsics[v].at(stamp), self._poses[v].at(stamp)) for v in VIEWS}
        for v in VIEWS:
            info, pose = applying[v]
            for entry in (info, pose):
                if entry is not None and entry.value is None:
                    return Refusal("calibration", f"the last calibration of {v} before this pair was invalid "
                                                  f"({entry.reason})")
            if info is None or pose is None:
                missing.append(v)
                continue
            (K, size), (R, t, _) = info.value, pose.value
            Ps[v], sizes[v] = geometry.projection_matrix(K, R, t), size
        if missing:
            newest = [e.stamp for v in missing for e in (self._intrinsics[v].newest(), self._poses[v].newest()) if e]
            later = f" (the newest is stamped {max(newest):.3f}, after the images)" if newest else ""
            return Refusal("calibration", f"no valid camera_info and pose yet for {', '.join(missing)}{later}",
                           waiting=not newest)
        return Ps, sizes

    # prompts ------------------------------------------------------------------------------------
    def prompt(self, view: str, stamp: float, frame_id: str, u: float, v: float) -> Refusal | None:
        """A click on one view, for the images stamped `stamp` and later; a bad one removes that
        view's prompt from then on (which vertebra was meant is unknown)."""
        source = f"{view}/prompt"
        other = [o for o in VIEWS if o != view][0]
        newest_pose = self._poses[other].newest()
        other_frames = {f"{other}_optical"} | ({newest_pose.value[2]} if newest_pose and newest_pose.value else set())
        uv = np.array([u, v], dtype=np.float64)
        reason = ""
        if frame_id and frame_id in other_frames:
            reason = f"prompt is in the {other} view's frame {frame_id!r}"
        elif not np.all(np.isfinite(uv)):
            reason = "prompt contains NaN or Inf"
        else:
            info = self._intrinsics[view].newest()
            if info is not None and info.value is not None and not geometry.inside_image(uv, info.value[1]):
                size = info.value[1]
                reason = f"prompt ({uv[0]:.1f}, {uv[1]:.1f}) lies outside the {size[0]} x {size[1]} image"
        self._add(self._prompts[view], stamp, None if reason else uv, reason)
        if reason:
            refusal = Refusal(source, reason)
            self.health.refused(refusal)
            return refusal
        self.health.ok(source)
        return None

    def _prompts_for(self, stamp: float, Ps: dict, sizes: dict) -> tuple[dict, bytes] | Refusal:
        """The prompts for images stamped `stamp`, and what identifies them for the key-frame
        decision (the user's prompts; an automatic prompt follows the results and is no change)."""
        with self._lock:
            entries = {v: self._prompts[v].at(stamp) for v in VIEWS}
            last = self._last_result
        prompts = {v: e.value for v, e in entries.items() if e is not None and e.value is not None}
        for v, uv in list(prompts.items()):  # a prompt sent before the calibration said the image's size
            if not geometry.inside_image(uv, sizes[v]):
                self.prompt(v, entries[v].stamp, "", *uv)  # refused and dropped, with its reason
                prompts.pop(v)
        if len(prompts) == len(VIEWS):
            return prompts, b"".join(np.asarray(prompts[v], dtype=np.float64).tobytes() for v in VIEWS)
        if self.settings.auto_prompt and last is not None:
            reference = next(v for v in last if v.present).xyz_mm  # the last key frame's reference vertebra
            try:
                return {v: geometry.project(Ps[v], reference)[0] for v in VIEWS}, b"auto"
            except geometry.CalibrationError as e:
                return Refusal("prompt", f"cannot re-project the last reference vertebra: {e}")
        return Refusal("prompt", f"waiting for a prompt on {', '.join(v for v in VIEWS if v not in prompts)}",
                       waiting=True)

    # images and key frames -----------------------------------------------------------------------
    def image(self, view: str, stamp: float, image: np.ndarray, frame_id: str, now: float):
        """An image converted by the node: a Job (a key frame to run), a Skip, a
        Refusal, or None (no pair yet)."""
        source = f"{view}/image"
        if float(image.max() - image.min()) <= 0:
            return self._refused(Refusal(source, "image is constant (no X-ray content)"))
        max_age = self.settings.max_image_age_s
        if max_age > 0 and now - stamp > max_age:
            return self._refused(Refusal(source, f"image is {now - stamp:.1f} s old (max_image_age_s = {max_age})"))
        self.health.ok(source)
        self.last_image_time = now
        pair = self.pairer.add(view, Frame(stamp, image, frame_id))
        return None if pair is None else self.job(pair, forced=False)

    def job(self, pair: Pair, forced: bool):
        """The job of a pair with the calibration and prompts that apply to it;
        unless forced, only for a key frame."""
        calibration = self.calibration_at(pair.stamp)
        if isinstance(calibration, Refusal):
            return self._refused(calibration)
        Ps, sizes = calibration
        for v in VIEWS:
            h, w = pair.frames[v].image.shape
            if (w, h) != sizes[v]:
                return self._refused(Refusal(f"{v}/image", f"image is {w} x {h} but camera_info says "
                                                           f"{sizes[v][0]} x {sizes[v][1]}"))
        self.health.ok("calibration")
        found = self._prompts_for(pair.stamp, Ps, sizes)
        if isinstance(found, Refusal):
            return self._refused(found)
        prompts, prompt_id = found
        self.health.ok("prompt")
        if not forced:
            # contents, not messages: a driver may send the same calibration and prompt with every frame
            with self._lock:  # the executor's threads may complete two pairs at once
                key, why = self.gate.check(pair, (tuple(Ps[v].tobytes() for v in VIEWS), prompt_id))
            if not key:
                return Skip(why)
        return Job(pair, Ps, prompts, self.settings.reference_level)

    def localize_now(self):
        """The newest synchronised pair as a job, key frame or not (the localize service)."""
        pair = self.pairer.newest_pair()
        if pair is None:
            return Refusal("images", "no synchronised AP/LAT pair received yet", waiting=True)
        return self.job(pair, forced=True)

    def _refused(self, refusal: Refusal) -> Refusal:
        self.health.refused(refusal)
        return refusal

    # results -----------------------------------------------------------------------------------
    def result(self, vertebrae) -> None:
        """The vertebrae of a finished key frame: the automatic prompt follows the first present one."""
        if any(v.present for v in vertebrae):
            with self._lock:
                self._last_result = list(vertebrae)

    def reset(self):
        """Forget key-frame history (the node was re-activated)."""
        self.gate.reset()


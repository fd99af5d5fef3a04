"""carm_sim: a simulated C-arm. Publishes data-engine cases (a data set or case
folder, or phantoms rendered on start) as a live stream: both images at a set
rate, camera_info, view poses and prompts, with optional noise and small
motion between frames, and the ground truth on ground_truth/poses."""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import rclpy
from geometry_msgs.msg import PointStamped, PoseArray, TransformStamped
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException
from rclpy.node import Node
from sensor_msgs.msg import CameraInfo, Image

from .. import geometry
from ..data import case_io
from ..data.synth import SynthConfig, synthesize
from ..geometry import VIEWS
from ..inference import Vertebra
from ..levels import levels_below
from . import messages
from .parameters import ranged
from .qos import LATCHED, RELIABLE

PARAMETERS = {  # name: (default, descriptor); a value out of range stops the node with the reason
    "data": ("", ParameterDescriptor(description="a data set or case folder; empty: render `cases` phantoms")),
    "cases": (2, ranged(1, 1000, "phantoms to render when no data is given")),
    "seed": (7, ranged(0, 2 ** 31 - 1, "seed of the phantoms, the noise, the motion and the prompts")),
    "size": (256, ranged(32, 2048, "image size of rendered phantoms, pixels")),
    "case_period_s": (0.0, ranged(0.0, 3600.0, "switch to the next case this often, s (0: stay on the first)")),
    "repeat": (True, ParameterDescriptor(description="start over after the last case (false: stay on it)")),
    "rate_hz": (5.0, ranged(0.1, 200.0, "frames per second and view")),
    "noise": (0.0, ranged(0.0, 1.0, "Gaussian noise, share of the image range")),
    "motion_px": (0.0, ranged(0.0, 100.0, "random shift of the views every few frames, pixels")),
    "lat_delay_s": (0.0, ranged(-1.0, 1.0, "stamp LAT this much later than AP (to test synchronisation), s")),
    "reference_frame": ("carm", ParameterDescriptor(description="frame of the view poses and the ground truth")),
    "publish_prompts": (True, ParameterDescriptor(description="publish the top-most vertebra as the prompt")),
}


MOTION_EVERY = 4  # frames between two moves of the C-arm


class ParameterError(ValueError):
    """A carm_sim parameter out of its range."""


class CarmSim(Node):
    def __init__(self, **kwargs):
        super().__init__("carm_sim", **kwargs)
        for name, (default, descriptor) in PARAMETERS.items():
            try:
                self.declare_parameter(name, default, descriptor)
            except (InvalidParameterValueException, InvalidParameterTypeException) as e:
                raise ParameterError(f"parameter {name}: {e}") from None
        p = {name: self.get_parameter(name).value for name in PARAMETERS}
        if not p["reference_frame"]:
            raise ParameterError("parameter reference_frame must not be empty")
        if p["size"] % 8:
            raise ParameterError(f"parameter size must be a multiple of 8, got {p['size']}")
        self.p = p
        self.rng = np.random.default_rng(p["seed"])
        self.cases = self._load_cases(p)
        self.pub_image = {v: self.create_publisher(Image, f"{v}/image", RELIABLE) for v in VIEWS}
        self.pub_info = {v: self.create_publisher(CameraInfo, f"{v}/camera_info", LATCHED) for v in VIEWS}
        self.pub_pose = {v: self.create_publisher(TransformStamped, f"{v}/pose", LATCHED) for v in VIEWS}
        self.pub_prompt = {v: self.create_publisher(PointStamped, f"{v}/prompt", LATCHED) for v in VIEWS}
        self.pub_truth = self.create_publisher(PoseArray, "ground_truth/poses", LATCHED)
        self.case_index, self.shift = -1, {v: np.zeros(2) for v in VIEWS}
        self.frames, self.t0 = 0, None
        self.create_timer(1.0 / p["rate_hz"], self._tick)
        self.get_logger().info(f"simulating {len(self.cases)} case(s) at {p['rate_hz']} Hz")

    def _load_cases(self, p):
        root = Path(p["data"]) if p["data"] else None
        if root is None:
            root = Path(tempfile.mkdtemp(prefix="carm_sim_"))
            synthesize(root, p["cases"], seed=p["seed"], config=SynthConfig(size=p["size"]), workers=1, progress=False)
        if (root / "case.json").is_file():
            return [case_io.read_case(root)]
        return [case_io.read_case(root / name) for name in case_io.list_cases(root)]

    @property
    def case(self):
        return self.cases[self.case_index]

    def _now(self):
        return self.get_clock().now().nanoseconds * 1e-9

    def _P(self, view):
        """P of the current frame: the case's view moved by this frame's shift."""
        return geometry.apply_pixel_transform(geometry.crop_transform(*-self.shift[view]), self.case.views[view].P)

    def _publish_calibration(self, stamp):
        for v in VIEWS:
            header = messages.header(stamp, self.p["reference_frame"])
            info, pose = messages.calibration_messages(self._P(v), self.case.views[v].size, header, f"{v}_optical")
            self.pub_info[v].publish(info)
            self.pub_pose[v].publish(pose)

    def _publish_case(self, stamp):
        case = self.case
        header = messages.header(stamp, self.p["reference_frame"])
        labels = levels_below(case.labels[0], len(case.labels)) if case.labels else []
        truth = [Vertebra(i, label, True, 1.0, xyz) for i, (xyz, label) in enumerate(zip(case.xyz_mm, labels))]
        self.pub_truth.publish(messages.pose_array(header, truth))
        if self.p["publish_prompts"] and case.labels:
            for v in VIEWS:
                u, vv = geometry.project(self._P(v), case.xyz_mm[:1])[0] + self.rng.uniform(-3, 3, size=2)
                msg = PointStamped(header=messages.header(stamp, f"{v}_optical"))
                msg.point.x, msg.point.y = float(u), float(vv)
                self.pub_prompt[v].publish(msg)

    def _tick(self):
        """Frame k goes out stamped t0 + k / rate_hz. What changes at frame k + 1 (the next case,
        a move of the C-arm) goes out after it, stamped with frame k + 1: the localizer matches
        calibration and prompts to images by stamp, whatever order they arrive in."""
        if self.t0 is None:
            self.t0 = self._now()
            self._prepare(0)
        k = self.frames
        stamp = self._stamp(k)
        for v in VIEWS:
            image = self.case.views[v].image.astype(np.float32)
            if self.p["motion_px"] > 0:
                import cv2
                A = geometry.crop_transform(*-self.shift[v])
                image = cv2.warpAffine(image, A[:2], image.shape[::-1], borderMode=cv2.BORDER_REPLICATE)
            if self.p["noise"] > 0:
                image += self.rng.normal(0, self.p["noise"] * 65535, size=image.shape)
            view_stamp = stamp + (self.p["lat_delay_s"] if v == "lat" else 0.0)
            out = np.clip(image, 0, 65535).astype(np.uint16)
            self.pub_image[v].publish(messages.image_message(messages.header(view_stamp, f"{v}_optical"), out))
        self.frames += 1
        self._prepare(k + 1)

    def _stamp(self, frame: int) -> float:
        return self.t0 + frame / self.p["rate_hz"]

    def _prepare(self, frame: int):
        """The state of `frame`: a new case every case_period_s, a move every MOTION_EVERY frames."""
        per_case = max(1, round(self.p["case_period_s"] * self.p["rate_hz"])) if self.p["case_period_s"] > 0 else 0
        last = self.case_index == len(self.cases) - 1
        if frame == 0 or (per_case and frame % per_case == 0 and (self.p["repeat"] or not last)):
            self.case_index = (self.case_index + 1) % len(self.cases)
            self.shift = {v: np.zeros(2) for v in VIEWS}
            self._publish_calibration(self._stamp(frame))
            self._publish_case(self._stamp(frame))
        elif self.p["motion_px"] > 0 and frame % MOTION_EVERY == 0:
            self.shift = {v: self.rng.uniform(-1, 1, size=2) * self.p["motion_px"] for v in VIEWS}
            self._publish_calibration(self._stamp(frame))


def main(argv=None) -> int:
    """Runs until Ctrl-C (exit 0, also while it still renders) or a bad parameter (exit 2, with the reason)."""
    node = None
    try:
        rclpy.init(args=argv if argv is not None else sys.argv)
        node = CarmSim()
        rclpy.spin(node)
    except (KeyboardInterrupt, rclpy.executors.ExternalShutdownException):
        pass
    except ParameterError as e:
        rclpy.logging.get_logger("carm_sim").fatal(str(e))
        return 2
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

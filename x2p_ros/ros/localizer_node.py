"""The x2p_localizer node (docs/design.md, section 4): a thin lifecycle adapter around
pairing, key frames, the inference worker and Localizer.

Every input is checked where it enters; a bad one gives a log line and a
diagnostics entry, and no pose is computed from it. The model is loaded on
activate and released on deactivate; the node activates itself unless
`autostart` is false."""
from __future__ import annotations

import sys
import threading
import time
from collections import deque

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import Point, PointStamped, PoseArray, TransformStamped
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
from rclpy.lifecycle import Node as LifecycleNode
from rclpy.lifecycle import TransitionCallbackReturn
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Header
from std_srvs.srv import SetBool, Trigger
from visualization_msgs.msg import MarkerArray

from .. import geometry
from ..geometry import VIEWS
from ..inference import InputError, Localizer
from ..levels import level_order
from ..model import checkpoint
from ..models import default_checkpoint
from ..msg import VertebraArray
from ..overlay import draw_overlay
from ..pairing import Frame, KeyframeGate, Pairer
from ..worker import InferenceWorker
from . import messages
from .images import ImageError, image_to_array
from .qos import LATCHED, RELIABLE, SENSOR_DATA


def _float_range(lo, hi, text):
    return ParameterDescriptor(description=text, floating_point_range=[FloatingPointRange(from_value=lo, to_value=hi)])


PARAMETERS = {  # name: (default, descriptor)
    "checkpoint": ("", ParameterDescriptor(description="model checkpoint; empty: the shipped model")),
    "device": ("auto", ParameterDescriptor(description="auto, cuda or cpu (cuda without a GPU falls back to cpu)")),
    "precision": ("fp32", ParameterDescriptor(description="fp32, or bf16 (CUDA only)")),
    "reference_frame": ("carm", ParameterDescriptor(description="frame of the view poses and of the outputs")),
    "sync_slop_s": (0.05, _float_range(0.0, 1.0, "largest stamp difference of an AP/LAT pair, s")),
    "max_image_age_s": (0.0, _float_range(0.0, 3600.0, "refuse images older than this, s (0: no limit)")),
    "max_image_pixels": (4096 * 4096, ParameterDescriptor(
        description="refuse larger images (memory stays bounded)",
        integer_range=[IntegerRange(from_value=256, to_value=16384 * 16384)])),
    "keyframe_max_rate_hz": (2.0, _float_range(0.01, 100.0, "most key frames per second")),
    "keyframe_change_threshold": (0.02, _float_range(0.0, 1.0, "image change that makes a key frame")),
    "presence_threshold": (0.5, _float_range(0.0, 1.0, "tau: heatmap maximum above which a vertebra is present")),
    "reference_level": ("", ParameterDescriptor(description="level of the prompted vertebra, e.g. T12; empty: V0..")),
    "auto_prompt": (True, ParameterDescriptor(description="reuse the last reference vertebra when no new prompt")),
    "publish_overlays": (True, ParameterDescriptor(description="publish ap/overlay and lat/overlay")),
    "autostart": (True, ParameterDescriptor(description="configure and activate on start")),
}


class LocalizerNode(LifecycleNode):
    def __init__(self, **kwargs):
        super().__init__("x2p_localizer", **kwargs)
        for name, (default, descriptor) in PARAMETERS.items():
            self.declare_parameter(name, default, descriptor)
        self.add_on_set_parameters_callback(self._validate_parameters)
        self._lock = threading.Lock()
        self.active = False
        self.enabled = True
        self.localizer: Localizer | None = None
        self.device, self.model_path = "none", ""
        self._reload = False  # a model parameter changed while active: load again before the next run
        self.calib = {v: {} for v in VIEWS}  # view -> {"K", "size", "pose", "P"}
        self.prompts: dict[str, np.ndarray] = {}
        self.inputs_version = 0
        self.last_result = None  # (vertebrae, Ps) of the last published key frame
        self.health: dict[str, str] = {}  # input -> "ok" or what was wrong
        self.counts = {"key_frames": 0, "published": 0, "failed": 0, "refused": 0}
        self.last_latency = float("nan")
        self.latencies = deque(maxlen=500)  # model seconds per key frame
        self.overheads = deque(maxlen=500)  # the node's own work per key frame: input handling + outputs
        self.problem = ""
        self.pairer = Pairer(self.get_parameter("sync_slop_s").value)
        self.gate = KeyframeGate(self.get_parameter("keyframe_max_rate_hz").value,
                                 self.get_parameter("keyframe_change_threshold").value)
        self.worker = InferenceWorker(self._infer, self._done)

        self.pub_poses = self.create_publisher(PoseArray, "vertebrae/poses", RELIABLE)
        self.pub_markers = self.create_publisher(MarkerArray, "vertebrae/markers", RELIABLE)
        self.pub_vertebrae = self.create_publisher(VertebraArray, "vertebrae", RELIABLE)
        self.pub_overlay = {v: self.create_publisher(Image, f"{v}/overlay", SENSOR_DATA) for v in VIEWS}
        self.pub_diag = self.create_publisher(DiagnosticArray, "/diagnostics", RELIABLE)
        for v in VIEWS:
            self.create_subscription(Image, f"{v}/image", lambda m, v=v: self._on_image(v, m), SENSOR_DATA)
            self.create_subscription(CameraInfo, f"{v}/camera_info", lambda m, v=v: self._on_info(v, m), LATCHED)
            self.create_subscription(TransformStamped, f"{v}/pose", lambda m, v=v: self._on_pose(v, m), LATCHED)
            self.create_subscription(PointStamped, f"{v}/prompt", lambda m, v=v: self._on_prompt(v, m), LATCHED)
            self.create_subscription(Point, f"{v}/overlay_mouse_left", lambda m, v=v: self._on_click(v, m),
                                     RELIABLE)
        self.create_service(Trigger, "localize", self._srv_localize)
        self.create_service(SetBool, "enable", self._srv_enable)
        self.create_timer(1.0, self._publish_diagnostics)

    # lifecycle -------------------------------------------------------------------------------
    def on_configure(self, state):
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state):
        try:
            self._load_model()
        except (checkpoint.CheckpointError, RuntimeError) as e:
            self._report("model", f"cannot load the model: {e}")
            return TransitionCallbackReturn.FAILURE
        self.active = True
        self.gate.reset()
        return super().on_activate(state)

    def on_deactivate(self, state):
        self.active = False
        with self._lock:
            self.localizer = None  # released; loaded again on activate
        self.device = "none"
        return super().on_deactivate(state)

    def on_cleanup(self, state):
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state):
        self.active = False
        self.worker.stop()
        return TransitionCallbackReturn.SUCCESS

    def _load_model(self):
        import torch
        path = self.get_parameter("checkpoint").value or str(default_checkpoint())
        device = self.get_parameter("device").value
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif device == "cuda" and not torch.cuda.is_available():
            self.get_logger().warning("device cuda was asked for but no GPU is available: running on the CPU")
            device = "cpu"
        localizer = Localizer.from_checkpoint(path, device, self.get_parameter("presence_threshold").value,
                                              bf16=self.get_parameter("precision").value == "bf16")
        with self._lock:
            self.localizer, self.device, self.model_path = localizer, device, path
        self.get_logger().info(f"model {path} on {device}")

    # parameters ------------------------------------------------------------------------------
    def _validate_parameters(self, params):
        for p in params:
            v = p.value
            if p.name == "device" and v not in ("auto", "cuda", "cpu"):
                return SetParametersResult(successful=False, reason=f"device must be auto, cuda or cpu, not {v!r}")
            if p.name == "precision" and v not in ("fp32", "bf16"):
                return SetParametersResult(successful=False, reason=f"precision must be fp32 or bf16, not {v!r}")
            if p.name == "reference_level" and v:
                try:
                    level_order(v)
                except ValueError as e:
                    return SetParametersResult(successful=False, reason=str(e))
            if p.name == "checkpoint" and v:
                try:
                    checkpoint.read(v)
                except checkpoint.CheckpointError as e:
                    return SetParametersResult(successful=False, reason=str(e))
            if p.name == "reference_frame" and not v:
                return SetParametersResult(successful=False, reason="reference_frame must not be empty")
        for p in params:  # all valid: apply what needs more than a read at use
            if p.name == "sync_slop_s":
                self.pairer.slop = p.value
            elif p.name == "keyframe_max_rate_hz":
                self.gate.max_rate_hz = p.value
            elif p.name == "keyframe_change_threshold":
                self.gate.threshold = p.value
            elif p.name == "presence_threshold" and self.localizer is not None:
                self.localizer.threshold = p.value
            elif p.name in ("checkpoint", "device", "precision") and self.active:
                self._reload = True
        return SetParametersResult(successful=True)

    # inputs ----------------------------------------------------------------------------------
    def _drop_prompt(self, view):
        """A bad prompt replaces the last one: which vertebra was meant is unknown now."""
        with self._lock:
            if self.prompts.pop(view, None) is not None:
                self.inputs_version += 1

    def _report(self, source: str, problem: str):
        """A bad input or a failure: log it, count it, show it in diagnostics."""
        self.health[source] = problem
        self.problem = f"{source}: {problem}"
        self.counts["refused"] += 1
        self.get_logger().error(self.problem, throttle_duration_sec=1.0)

    def _ok(self, source: str):
        self.health[source] = "ok"

    def _on_info(self, view, msg: CameraInfo):
        try:
            K = geometry.validate_intrinsics(np.asarray(msg.k, dtype=np.float64).reshape(3, 3))
            if msg.width <= 0 or msg.height <= 0:
                raise geometry.CalibrationError(f"camera_info size {msg.width} x {msg.height} is empty")
        except (geometry.CalibrationError, ValueError) as e:
            self._report(f"{view}/camera_info", str(e))
            with self._lock:  # never keep using an old calibration once a new one was sent
                self.calib[view] = {}
                self.inputs_version += 1
            return
        with self._lock:
            self.calib[view].update(K=K, size=(int(msg.width), int(msg.height)))
            self._update_projection(view)
        self._ok(f"{view}/camera_info")

    def _on_pose(self, view, msg: TransformStamped):
        reference = self.get_parameter("reference_frame").value
        t, q = msg.transform.translation, msg.transform.rotation
        try:
            if msg.header.frame_id != reference:
                raise geometry.CalibrationError(f"pose is given in frame {msg.header.frame_id!r}, "
                                                f"not the reference frame {reference!r}")
            R = geometry.quaternion_to_rotation([q.x, q.y, q.z, q.w])
            translation = np.array([t.x, t.y, t.z], dtype=np.float64)
            if not np.all(np.isfinite(translation)):
                raise geometry.CalibrationError(f"pose translation contains NaN or Inf: {translation.tolist()}")
        except geometry.CalibrationError as e:
            self._report(f"{view}/pose", str(e))
            with self._lock:
                self.calib[view].pop("pose", None)
                self.calib[view].pop("P", None)
                self.inputs_version += 1
            return
        with self._lock:
            self.calib[view]["pose"] = (R, translation * geometry.MM_PER_M, msg.child_frame_id)
            self._update_projection(view)
        self._ok(f"{view}/pose")

    def _update_projection(self, view):
        c = self.calib[view]
        if "K" in c and "pose" in c:
            c["P"] = geometry.projection_matrix(c["K"], *c["pose"][:2])
        self.inputs_version += 1

    def _on_prompt(self, view, msg: PointStamped):
        other = [v for v in VIEWS if v != view][0]
        other_frames = {self.calib[other].get("pose", (None, None, f"{other}_optical"))[2], f"{other}_optical"}
        if msg.header.frame_id and msg.header.frame_id in other_frames:
            self._report(f"{view}/prompt", f"prompt is in the {other} view's frame {msg.header.frame_id!r}")
            self._drop_prompt(view)
            return
        self._set_prompt(view, msg.point)

    def _on_click(self, view, msg: Point):
        self._set_prompt(view, msg)

    def _set_prompt(self, view, point):
        uv = np.array([point.x, point.y], dtype=np.float64)
        if not np.all(np.isfinite(uv)):
            self._report(f"{view}/prompt", "prompt contains NaN or Inf")
            self._drop_prompt(view)
            return
        size = self.calib[view].get("size")
        if size is not None and not geometry.inside_image(uv, size):
            self._report(f"{view}/prompt", f"prompt ({uv[0]:.1f}, {uv[1]:.1f}) lies outside the "
                                           f"{size[0]} x {size[1]} image")
            self._drop_prompt(view)
            return
        with self._lock:
            self.prompts[view] = uv
            self.inputs_version += 1
        self._ok(f"{view}/prompt")

    def _on_image(self, view, msg: Image):
        if not self.active or not self.enabled:
            return
        received = time.perf_counter()
        source = f"{view}/image"
        try:
            image = image_to_array(msg, max_pixels=self.get_parameter("max_image_pixels").value).astype(np.float32)
            if float(image.max() - image.min()) <= 0:
                raise ImageError("image is constant (no X-ray content)")
        except ImageError as e:
            self._report(source, str(e))
            return
        stamp = messages.stamp_seconds(msg.header)
        max_age = self.get_parameter("max_image_age_s").value
        age = self.get_clock().now().nanoseconds * 1e-9 - stamp
        if max_age > 0 and age > max_age:
            self._report(source, f"image is {age:.1f} s old (max_image_age_s = {max_age})")
            return
        self._ok(source)
        pair = self.pairer.add(view, Frame(stamp, image, msg.header.frame_id))
        if pair is not None:
            self._consider(pair, forced=False, received=received)

    # key frames ------------------------------------------------------------------------------
    def _consider(self, pair, forced: bool, received: float | None = None) -> str:
        """Builds a job from a pair and the current calibration and prompts; submits it if it
        is a key frame. Returns what happened."""
        with self._lock:
            calib = {v: dict(self.calib[v]) for v in VIEWS}  # one consistent snapshot: never mix old and new
            prompts = dict(self.prompts)
            version = self.inputs_version
            last = self.last_result
        missing = [v for v in VIEWS if "P" not in calib[v]]
        if missing:
            self._report("calibration", f"no valid camera_info and pose yet for {', '.join(missing)}")
            return "incomplete calibration"
        for v in VIEWS:
            h, w = pair.frames[v].image.shape
            if (w, h) != calib[v]["size"]:
                self._report(f"{v}/image", f"image is {w} x {h} but camera_info says "
                                           f"{calib[v]['size'][0]} x {calib[v]['size'][1]}")
                return "size mismatch"
        self._ok("calibration")
        Ps = {v: calib[v]["P"] for v in VIEWS}
        if len(prompts) < 2:
            if self.get_parameter("auto_prompt").value and last is not None:
                reference = last[0][0].xyz_mm  # the last key frame's reference vertebra, re-projected
                try:
                    prompts = {v: geometry.project(Ps[v], reference)[0] for v in VIEWS}
                except geometry.CalibrationError as e:
                    self._report("prompt", f"cannot re-project the last reference vertebra: {e}")
                    return "no prompt"
            else:
                self._report("prompt", "waiting for a prompt on both views")
                return "no prompt"
        self._ok("prompt")
        if not forced:
            key, why = self.gate.check(pair, version)
            if not key:
                return why
        self.counts["key_frames"] += 1
        prepared = time.perf_counter() - received if received is not None else 0.0
        self.worker.submit({"pair": pair, "Ps": Ps, "prompts": prompts, "prepared_s": prepared,
                            "reference_level": self.get_parameter("reference_level").value})
        return "submitted"

    # inference (worker thread) ---------------------------------------------------------------
    def _infer(self, job):
        with self._lock:
            reload, self._reload = self._reload, False
            localizer = self.localizer
        if reload:
            self._load_model()
            localizer = self.localizer
        if localizer is None:
            raise RuntimeError("no model loaded (node not active)")
        images = {v: job["pair"].frames[v].image for v in VIEWS}
        try:
            return localizer.localize(images, job["Ps"], job["prompts"], job["reference_level"])
        except RuntimeError as e:
            if "out of memory" in str(e).lower():
                import torch
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            raise

    def _done(self, job, vertebrae, error, seconds):
        self.last_latency = seconds
        self.latencies.append(seconds)
        pair = job["pair"]
        if error is not None:
            self.counts["failed"] += 1
            what = "input refused" if isinstance(error, (InputError, geometry.CalibrationError)) else "inference failed"
            self._report("inference", f"{what} for the pair at {pair.stamp:.3f}: {error}")
            return
        if not self.active:
            return
        started = time.perf_counter()
        header = messages.header(pair.stamp, self.get_parameter("reference_frame").value)
        self.pub_poses.publish(messages.pose_array(header, vertebrae))
        self.pub_markers.publish(messages.marker_array(header, vertebrae))
        self.pub_vertebrae.publish(messages.vertebra_array(header, vertebrae, job["reference_level"]))
        if self.get_parameter("publish_overlays").value:
            for v in VIEWS:
                frame = pair.frames[v]
                overlay = draw_overlay(frame.image, job["prompts"][v], vertebrae, v)
                h = Header(frame_id=frame.frame_id, stamp=header.stamp)
                self.pub_overlay[v].publish(messages.image_message(h, overlay))
        with self._lock:
            if any(v.present for v in vertebrae):
                self.last_result = (vertebrae, job["Ps"])
        self.counts["published"] += 1
        # the node's own work: image conversion, checks, pairing, key frame (the image that
        # completed the pair) and building and publishing every output
        self.overheads.append(job["prepared_s"] + time.perf_counter() - started)
        self._ok("inference")

    # services and diagnostics ----------------------------------------------------------------
    def _srv_localize(self, request, response):
        if not self.active:
            response.success, response.message = False, "node is not active"
            return response
        pair = self.pairer.newest_pair()
        if pair is None:
            response.success, response.message = False, "no synchronised AP/LAT pair received yet"
            return response
        outcome = self._consider(pair, forced=True)
        response.success = outcome == "submitted"
        response.message = f"localising the pair at {pair.stamp:.3f}" if response.success else outcome
        return response

    def _srv_enable(self, request, response):
        self.enabled = bool(request.data)
        response.success, response.message = True, "enabled" if self.enabled else "disabled"
        return response

    def diagnostic_status(self) -> DiagnosticStatus:
        bad = {k: v for k, v in self.health.items() if v != "ok"}
        level = DiagnosticStatus.ERROR if bad and "inference" in bad else \
            DiagnosticStatus.WARN if bad or not self.active else DiagnosticStatus.OK
        message = "; ".join(f"{k}: {v}" for k, v in sorted(bad.items())) or \
            ("ok" if self.active else "inactive")
        values = {"state": "active" if self.active and self.enabled else "inactive" if not self.active else "disabled",
                  "model": self.model_path, "device": self.device,
                  "last_latency_ms": f"{1000 * self.last_latency:.1f}",
                  **_percentiles("latency_ms", self.latencies), **_percentiles("overhead_ms", self.overheads),
                  "skipped_frames": str(self.worker.skipped), "unpaired_frames": str(self.pairer.unpaired),
                  **{k: str(v) for k, v in self.counts.items()},
                  **{f"input {k}": v for k, v in sorted(self.health.items())}}
        return DiagnosticStatus(level=level, name="x2p_localizer: vertebra localisation", message=message,
                                hardware_id=self.device, values=[KeyValue(key=k, value=v) for k, v in values.items()])

    def _publish_diagnostics(self):
        msg = DiagnosticArray(status=[self.diagnostic_status()])
        msg.header.stamp = self.get_clock().now().to_msg()
        self.pub_diag.publish(msg)


def _percentiles(name, samples) -> dict:
    if not samples:
        return {}
    p50, p99 = np.percentile(np.array(samples) * 1000.0, [50, 99])
    return {f"{name}_p50": f"{p50:.1f}", f"{name}_p99": f"{p99:.1f}"}


def main(argv=None):
    rclpy.init(args=argv if argv is not None else sys.argv)
    node = LocalizerNode()
    if node.get_parameter("autostart").value:
        node.trigger_configure()
        node.trigger_activate()
    executor = rclpy.executors.MultiThreadedExecutor(num_threads=2)
    executor.add_node(node)
    try:
        executor.spin()
    except (KeyboardInterrupt, rclpy.executors.ExternalShutdownException):
        pass
    finally:
        node.active = False
        node.worker.stop()
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()

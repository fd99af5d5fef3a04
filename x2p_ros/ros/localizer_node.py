"""The x2p_localizer node (docs/design.md, section 4): a thin lifecycle adapter.
It converts messages to plain values for the Session (calibration, prompts,
pairing, key frames: x2p_ros/session.py), runs key frames on the inference
worker, and publishes what comes back.

Inputs are accepted from drivers of any QoS: images over a best-effort
subscription (which matches reliable and best-effort publishers);
calibration and prompts over two subscriptions, one that matches every
publisher and one that also receives what a latched publisher sent before the
node started, with duplicates dropped. Results are latched (a transient-local
subscriber gets the latest at once) and sent again with every pair that is
not a key frame, so a subscriber that joins while frames stream gets the
latest within a frame period."""
from __future__ import annotations

import copy
import hashlib
import sys
import threading
import time
from collections import deque

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import Point, PointStamped, PoseArray, TransformStamped
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy._rclpy_pybind11 import RCLError
from rclpy.lifecycle import Node as LifecycleNode
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.qos import QoSPolicyKind
from rclpy.qos_overriding_options import QoSOverridingOptions
from rclpy.serialization import serialize_message
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
from ..preprocess import MAX_EXTRA_LOOKS
from ..session import Job, Refusal, Session, Settings, Skip
from ..worker import InferenceWorker
from . import messages
from .images import ImageError, image_to_array
from .parameters import ranged
from .qos import ANY, LATCHED, RELIABLE, RESULTS, SENSOR_DATA

try:  # any ROS 2 installation has tf2_msgs; the PyPI wheels do not
    from tf2_msgs.msg import TFMessage
except ImportError:
    TFMessage = None


PARAMETERS = {  # name: (default, descriptor)
    "checkpoint": ("", ParameterDescriptor(description="model checkpoint; empty: the shipped model")),
    "device": ("auto", ParameterDescriptor(description="auto, cuda or cpu (cuda without a GPU falls back to cpu)")),
    "precision": ("fp32", ParameterDescriptor(description="fp32, or bf16 (CUDA only)")),
    "reference_frame": ("carm", ParameterDescriptor(description="frame of the view poses and of the outputs")),
    "sync_slop_s": (0.05, ranged(0.0, 1.0, "largest stamp difference of an AP/LAT pair, s")),
    "max_image_age_s": (0.0, ranged(0.0, 3600.0, "refuse images older than this, s (0: no limit)")),
    "max_image_pixels": (4096 * 4096, ranged(256, 16384 * 16384, "refuse larger images (memory stays bounded)")),
    "keyframe_max_rate_hz": (2.0, ranged(0.01, 100.0, "most key frames per second")),
    "keyframe_change_threshold": (0.02, ranged(0.0, 1.0, "image change that makes a key frame")),
    "presence_threshold": (-1.0, ranged(-1.0, 1.0, "tau: heatmap maximum above which a vertebra is present; "
                                                   "below 0: the checkpoint's own (x2p presence chose it)")),
    "chain_stride": (-1, ranged(-1, 10, "prompt again every s vertebrae down the chain (0: the whole view's "
                                         "estimates); below 0: the checkpoint's own")),
    "prompt_refinements": (-1, ranged(-1, 5, "prompt again R times at the estimate of the prompted vertebra "
                                              "(0: the prompt as given); below 0: the checkpoint's own")),
    "extra_looks": (-1, ranged(-1, MAX_EXTRA_LOOKS, "also run each window in L other looks (edge enhancement, "
                                                    "gamma, CLAHE) and take the median estimate (0: the image as "
                                                    "given); below 0: the checkpoint's own")),
    "centre_snap": (-1.0, ranged(-1.0, 1.0, "walk the chain onto the centre head's peaks within this share of the "
                                            "model's step (0: the model's own estimates; a checkpoint with a "
                                            "centre head); below 0: the checkpoint's own")),
    "centre_agree": (-1.0, ranged(-1.0, 1.0, "take a vertebra's snaps only where both views' snaps meet within this "
                                             "share of the step (0: no check); below 0: the checkpoint's own")),
    "reference_level": ("", ParameterDescriptor(description="level of the prompted vertebra, e.g. T12; empty: V0..")),
    "auto_prompt": (True, ParameterDescriptor(description="reuse the last reference vertebra when no new prompt")),
    "publish_overlays": (True, ParameterDescriptor(description="publish ap/overlay and lat/overlay")),
    "publish_tf": (True, ParameterDescriptor(description="vertebra frames on /tf (needs tf2_msgs)")),
    "input_timeout_s": (5.0, ranged(0.1, 3600.0, "diagnostics go stale after this long without images, s")),
    "autostart": (True, ParameterDescriptor(description="configure and activate on start")),
}
SESSION_PARAMETERS = ("reference_frame", "sync_slop_s", "max_image_age_s", "keyframe_max_rate_hz",
                      "keyframe_change_threshold", "auto_prompt", "reference_level")
DEDUP_WINDOW = 16  # messages remembered per topic: the two subscriptions deliver a latched message twice


def presence_threshold(value: float) -> float | None:
    """The presence_threshold parameter as Localizer takes it: None (the checkpoint's own) below 0."""
    return None if value < 0 else value


def inference_setting(name: str, value, localizer: Localizer):
    """The chain stride, prompt refinements, extra looks, centre snap or agreement that run: the parameter's, or the
    checkpoint's own below 0."""
    return getattr(localizer.config, name) if value < 0 else value


class LocalizerNode(LifecycleNode):
    def __init__(self, **kwargs):
        super().__init__("x2p_localizer", **kwargs)
        for name, (default, descriptor) in PARAMETERS.items():
            self.declare_parameter(name, default, descriptor)
        self._lock = threading.Lock()
        self._closing = threading.Event()  # set once at shutdown: nothing is published after it
        self.active = False
        self.enabled = True
        self.localizer: Localizer | None = None
        self.device, self.model_path = "none", ""
        self._reload = False  # a model parameter changed while active: load again before the next run
        self.session = Session(Settings(**{n: self.get_parameter(n).value for n in SESSION_PARAMETERS}))
        self.counts = {"key_frames": 0, "published": 0, "republished": 0, "failed": 0, "refused": 0}
        self.last_latency = float("nan")
        self.latencies = deque(maxlen=500)  # model seconds per key frame
        self.overheads = deque(maxlen=500)  # the node's own work per key frame: input handling + outputs
        # the same as CPU time of the threads doing it: on a saturated machine the wall time also
        # holds the waits for a core another process has
        self.overheads_cpu = deque(maxlen=500)
        self.problem = ""
        self._last_outputs = None  # (poses, markers, vertebrae) messages of the last result
        self._seen = {}  # topic -> recent message digests
        self.worker = InferenceWorker(self._infer, self._done)
        self.add_on_set_parameters_callback(self._validate_parameters)

        # rclpy applies a QoS override to the profile object it is given: each endpoint gets a copy
        overridable = QoSOverridingOptions(policy_kinds=(QoSPolicyKind.HISTORY, QoSPolicyKind.DEPTH,
                                                         QoSPolicyKind.RELIABILITY, QoSPolicyKind.DURABILITY))
        self.pub_poses = self.create_publisher(PoseArray, "vertebrae/poses", copy.copy(RESULTS),
                                               qos_overriding_options=overridable)
        self.pub_markers = self.create_publisher(MarkerArray, "vertebrae/markers", copy.copy(RESULTS),
                                                 qos_overriding_options=overridable)
        self.pub_vertebrae = self.create_publisher(VertebraArray, "vertebrae", copy.copy(RESULTS),
                                                   qos_overriding_options=overridable)
        self.pub_overlay = {v: self.create_publisher(Image, f"{v}/overlay", SENSOR_DATA) for v in VIEWS}
        self.pub_diag = self.create_publisher(DiagnosticArray, "/diagnostics", RELIABLE)
        self.pub_tf = self.create_publisher(TFMessage, "/tf", 100) if TFMessage is not None else None
        if self.pub_tf is None and self.get_parameter("publish_tf").value:
            self.get_logger().info("tf2_msgs is not installed: vertebra frames are not published on /tf")
        # the executor takes ready messages in the order their subscriptions were made: calibration
        # and prompts first, so that a busy node that finds a new calibration and the images it
        # belongs to waiting together applies it to them
        for v in VIEWS:
            for qos in (ANY, LATCHED):  # see the module's note
                self.create_subscription(CameraInfo, f"{v}/camera_info", lambda m, v=v: self._on_info(v, m), qos)
                self.create_subscription(TransformStamped, f"{v}/pose", lambda m, v=v: self._on_pose(v, m), qos)
                self.create_subscription(PointStamped, f"{v}/prompt", lambda m, v=v: self._on_prompt(v, m), qos)
            self.create_subscription(Point, f"{v}/overlay_mouse_left", lambda m, v=v: self._on_click(v, m), ANY)
        for v in VIEWS:
            self.create_subscription(Image, f"{v}/image", lambda m, v=v: self._on_image(v, m), copy.copy(SENSOR_DATA),
                                     qos_overriding_options=overridable)
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
            self._report(Refusal("model", f"cannot load the model: {e}"))
            return TransitionCallbackReturn.FAILURE
        self.active = True
        self.session.reset()
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
        self.close()
        return TransitionCallbackReturn.SUCCESS

    def close(self):
        """Stops inference and every publication (shutdown: the context goes away next)."""
        self._closing.set()
        self.active = False
        self.worker.stop()

    def _load_model(self):
        import torch
        path = self.get_parameter("checkpoint").value or str(default_checkpoint())
        device = self.get_parameter("device").value
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif device == "cuda" and not torch.cuda.is_available():
            self.get_logger().warning("device cuda was asked for but no GPU is available: running on the CPU")
            device = "cpu"
        localizer = Localizer.from_checkpoint(path, device, presence_threshold(self.get_parameter(
            "presence_threshold").value), bf16=self.get_parameter("precision").value == "bf16")
        for name in Localizer.SETTINGS:
            setattr(localizer, name, inference_setting(name, self.get_parameter(name).value, localizer))
        refused = localizer.centre_snap_refusal(localizer.centre_snap)
        if refused:  # a parameter set for another checkpoint: this one's own estimates, said
            self.get_logger().warning(f"{refused}; running without snapping")
            localizer.centre_snap = 0.0
        localizer.warm_up()
        with self._lock:
            self.localizer, self.device, self.model_path = localizer, device, path
        self.get_logger().info(f"model {path} on {device}, presence threshold {localizer.threshold:g}, chain "
                               f"stride {localizer.chain_stride}, prompt refinements {localizer.prompt_refinements}, "
                               f"centre snap {localizer.centre_snap:g} (agreement {localizer.centre_agree:g}), "
                               f"extra looks {localizer.extra_looks}")

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
            if p.name == "centre_snap" and v >= 0 and self.localizer is not None:  # below 0: the checkpoint's own
                refused = self.localizer.centre_snap_refusal(v)
                if refused:
                    return SetParametersResult(successful=False, reason=refused)
        for p in params:  # all valid: apply what needs more than a read at use
            if p.name in SESSION_PARAMETERS:
                self.session.apply(**{p.name: p.value})
            elif p.name == "presence_threshold" and self.localizer is not None:
                chosen = presence_threshold(p.value)
                self.localizer.threshold = self.localizer.config.presence_threshold if chosen is None else chosen
            elif p.name in Localizer.SETTINGS and self.localizer is not None:
                setattr(self.localizer, p.name, inference_setting(p.name, p.value, self.localizer))
            elif p.name in ("checkpoint", "device", "precision") and self.active:
                self._reload = True
        return SetParametersResult(successful=True)

    # inputs ----------------------------------------------------------------------------------
    def _report(self, refusal: Refusal):
        """A bad input or a failure: log it, count it, show it in diagnostics. Waiting for an
        input that has not come yet is not an error."""
        self.session.health.refused(refusal)
        self.problem = str(refusal)
        if refusal.waiting:
            self.get_logger().info(self.problem, throttle_duration_sec=5.0)
            return
        self.counts["refused"] += 1
        self.get_logger().error(self.problem, throttle_duration_sec=1.0)

    def _first_time(self, topic: str, msg) -> bool:
        """False for a message already taken from the other subscription of the topic."""
        digest = hashlib.blake2b(serialize_message(msg), digest_size=16).digest()
        with self._lock:
            seen = self._seen.setdefault(topic, deque(maxlen=DEDUP_WINDOW))
            if digest in seen:
                return False
            seen.append(digest)
        return True

    def _on_info(self, view, msg: CameraInfo):
        if self._first_time(f"{view}/camera_info", msg):
            self._handle(self.session.camera_info(view, messages.stamp_seconds(msg.header), msg.k, msg.width,
                                                  msg.height))

    def _on_pose(self, view, msg: TransformStamped):
        if self._first_time(f"{view}/pose", msg):
            t, q = msg.transform.translation, msg.transform.rotation
            self._handle(self.session.view_pose(view, messages.stamp_seconds(msg.header), msg.header.frame_id,
                                                [t.x, t.y, t.z], [q.x, q.y, q.z, q.w], msg.child_frame_id))

    def _on_prompt(self, view, msg: PointStamped):
        if self._first_time(f"{view}/prompt", msg):
            self._handle(self.session.prompt(view, messages.stamp_seconds(msg.header), msg.header.frame_id,
                                             msg.point.x, msg.point.y))

    def _on_click(self, view, msg: Point):  # a click has no stamp: it applies to the images from now on
        self._handle(self.session.prompt(view, self.get_clock().now().nanoseconds * 1e-9, "", msg.x, msg.y))

    def _on_image(self, view, msg: Image):
        if not self.active or not self.enabled:
            return
        received = (time.perf_counter(), time.thread_time())
        try:
            # as sent (mono8, mono16 or float32): the localizer converts the pairs it runs on
            image = image_to_array(msg, max_pixels=self.get_parameter("max_image_pixels").value)
        except ImageError as e:
            self._report(Refusal(f"{view}/image", str(e)))
            return
        now = self.get_clock().now().nanoseconds * 1e-9
        outcome = self.session.image(view, messages.stamp_seconds(msg.header), image, msg.header.frame_id, now)
        self._handle(outcome, received)

    def _handle(self, outcome, received: tuple[float, float] | None = None) -> str:
        """Acts on what the session made of an input; returns what happened."""
        if isinstance(outcome, Refusal):
            self._report(outcome)
            return str(outcome)
        if isinstance(outcome, Skip):
            self._republish()
            return outcome.reason
        if isinstance(outcome, Job):
            self.counts["key_frames"] += 1
            if received is not None:
                outcome.prepared_s = time.perf_counter() - received[0]
                outcome.prepared_cpu_s = time.thread_time() - received[1]
            self.worker.submit(outcome)
            return "submitted"
        return ""

    # inference (worker thread) ---------------------------------------------------------------
    def _infer(self, job: Job):
        with self._lock:
            reload, self._reload = self._reload, False
            localizer = self.localizer
        if reload:
            self._load_model()
            localizer = self.localizer
        if localizer is None:
            raise RuntimeError("no model loaded (node not active)")
        images = {v: job.pair.frames[v].image for v in VIEWS}
        try:
            return localizer.localize(images, job.Ps, job.prompts, job.reference_level)
        except RuntimeError as e:
            if "out of memory" in str(e).lower():
                import torch
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            raise

    def _done(self, job: Job, vertebrae, error, seconds):
        try:
            self._finish(job, vertebrae, error, seconds)
        except RCLError:  # Ctrl-C: rclpy shut the context down while this frame was running
            if self.context.ok():
                raise

    def _finish(self, job: Job, vertebrae, error, seconds):
        if self._closing.is_set() or not self.context.ok():
            return
        self.last_latency = seconds
        self.latencies.append(seconds)
        if error is not None:
            self.counts["failed"] += 1
            what = "input refused" if isinstance(error, (InputError, geometry.CalibrationError)) else "inference failed"
            self._report(Refusal("inference", f"{what} for the pair at {job.pair.stamp:.3f}: {error}"))
            return
        if not self.active:
            return
        started, started_cpu = time.perf_counter(), time.thread_time()
        header = messages.header(job.pair.stamp, self.get_parameter("reference_frame").value)
        outputs = (messages.pose_array(header, vertebrae), messages.marker_array(header, vertebrae),
                   messages.vertebra_array(header, vertebrae, job.reference_level))
        with self._lock:
            self._last_outputs = outputs
        self._publish(outputs)
        if self.pub_tf is not None and self.get_parameter("publish_tf").value:
            self.pub_tf.publish(TFMessage(transforms=messages.vertebra_transforms(header, vertebrae)))
        if self.get_parameter("publish_overlays").value:
            for v in VIEWS:
                frame = job.pair.frames[v]
                overlay = draw_overlay(frame.image, job.prompts[v], vertebrae, v)
                self.pub_overlay[v].publish(messages.image_message(Header(frame_id=frame.frame_id,
                                                                          stamp=header.stamp), overlay))
        self.session.result(vertebrae)
        self.counts["published"] += 1
        # the node's own work: image conversion, checks, pairing, key frame (the image that
        # completed the pair) and building and publishing every output
        self.overheads.append(job.prepared_s + time.perf_counter() - started)
        self.overheads_cpu.append(job.prepared_cpu_s + time.thread_time() - started_cpu)
        self.session.health.ok("inference")

    def _publish(self, outputs):
        if self._closing.is_set():
            return
        for pub, msg in zip((self.pub_poses, self.pub_markers, self.pub_vertebrae), outputs):
            pub.publish(msg)

    def _republish(self):
        """The last result again (with its own stamp), for subscribers that joined since."""
        with self._lock:
            outputs = self._last_outputs
        if outputs is not None:
            self._publish(outputs)
            self.counts["republished"] += 1

    # services and diagnostics ----------------------------------------------------------------
    def _srv_localize(self, request, response):
        if not self.active or not self.enabled:
            response.success = False
            response.message = "node is not active" if not self.active else "node is disabled (enable service)"
            return response
        outcome = self.session.localize_now()
        response.message = self._handle(outcome)
        response.success = response.message == "submitted"
        if response.success:
            response.message = f"localising the pair at {outcome.pair.stamp:.3f}"
        return response

    def _srv_enable(self, request, response):
        self.enabled = bool(request.data)
        response.success, response.message = True, "enabled" if self.enabled else "disabled"
        return response

    def diagnostic_status(self) -> DiagnosticStatus:
        health = self.session.health.snapshot()
        bad = {k: text for k, (text, waiting) in health.items() if text != "ok"}
        now = self.get_clock().now().nanoseconds * 1e-9
        last_image = self.session.last_image_time
        timeout = self.get_parameter("input_timeout_s").value
        stale = ""
        if self.active and self.enabled:
            if last_image is None:
                stale = "no images received yet"
            elif now - last_image > timeout:
                stale = f"no images for {now - last_image:.0f} s"
        if "inference" in bad and not health["inference"][1]:
            level = DiagnosticStatus.ERROR
        elif stale:
            level = DiagnosticStatus.STALE
        elif bad or not self.active or not self.enabled:
            level = DiagnosticStatus.WARN
        else:
            level = DiagnosticStatus.OK
        message = "; ".join([stale] * bool(stale) + [f"{k}: {v}" for k, v in sorted(bad.items())]) or \
            ("ok" if self.active and self.enabled else "inactive" if not self.active else "disabled")
        values = {"state": "active" if self.active and self.enabled else "inactive" if not self.active else "disabled",
                  "model": self.model_path, "device": self.device,
                  "presence_threshold": f"{self.localizer.threshold:g}" if self.localizer is not None else "",
                  **{name: str(getattr(self.localizer, name)) if self.localizer is not None else ""
                     for name in Localizer.SETTINGS},
                  "last_latency_ms": f"{1000 * self.last_latency:.1f}",
                  **_percentiles("latency_ms", self.latencies), **_percentiles("overhead_ms", self.overheads),
                  **_percentiles("overhead_cpu_ms", self.overheads_cpu),
                  "skipped_frames": str(self.worker.skipped), "unpaired_frames": str(self.session.pairer.unpaired),
                  **{k: str(v) for k, v in self.counts.items()},
                  **{f"input {k}": text for k, (text, _) in sorted(health.items())}}
        return DiagnosticStatus(level=level, name="x2p_localizer: vertebra localisation", message=message,
                                hardware_id=self.device, values=[KeyValue(key=k, value=v) for k, v in values.items()])

    def _publish_diagnostics(self):
        if self._closing.is_set():
            return
        msg = DiagnosticArray(status=[self.diagnostic_status()])
        msg.header.stamp = self.get_clock().now().to_msg()
        self.pub_diag.publish(msg)


def _percentiles(name, samples) -> dict:
    if not samples:
        return {}
    p50, p99 = np.percentile(np.array(samples) * 1000.0, [50, 99])
    return {f"{name}_p50": f"{p50:.1f}", f"{name}_p99": f"{p99:.1f}"}


def main(argv=None) -> int:
    """Runs until Ctrl-C or a shutdown request; exits 0 without a traceback either way."""
    node = None
    try:
        rclpy.init(args=argv if argv is not None else sys.argv)
        node = LocalizerNode()
        if node.get_parameter("autostart").value:
            node.trigger_configure()
            node.trigger_activate()
        executor = rclpy.executors.MultiThreadedExecutor(num_threads=2)
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, rclpy.executors.ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.close()
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

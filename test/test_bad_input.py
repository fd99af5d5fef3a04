"""The node under bad input: each kind gets a clear diagnostics entry, the
node stays alive, and no pose is published from that input. One x2p_localizer
process (tiny model, CPU) serves the suite; this process plays the C-arm."""
import time

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from geometry_msgs.msg import PointStamped, PoseArray, TransformStamped  # noqa: E402
from ros_helpers import Listener, ros_processes  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image  # noqa: E402

from x2p_ros.data import case_io  # noqa: E402
from x2p_ros.data.synth import SynthConfig, synthesize  # noqa: E402
from x2p_ros.geometry import VIEWS  # noqa: E402
from x2p_ros.model import X2PNet, checkpoint, preset  # noqa: E402
from x2p_ros.ros import messages  # noqa: E402
from x2p_ros.ros.messages import header, stamp_seconds  # noqa: E402
from x2p_ros.ros.qos import LATCHED, RELIABLE  # noqa: E402


class Rig:
    """Plays the C-arm: publishes calibration, prompts and images; records poses and diagnostics."""

    def __init__(self, case):
        self.case = case
        self.listener = Listener([("vertebrae/poses", PoseArray, RELIABLE),
                                  ("/diagnostics", DiagnosticArray, RELIABLE)],
                                 name="bad_input_rig")
        node = self.listener.node
        self.pub = {}
        for v in VIEWS:
            self.pub[f"{v}/image"] = node.create_publisher(Image, f"{v}/image", RELIABLE)
            self.pub[f"{v}/camera_info"] = node.create_publisher(CameraInfo, f"{v}/camera_info", LATCHED)
            self.pub[f"{v}/pose"] = node.create_publisher(TransformStamped, f"{v}/pose", LATCHED)
            self.pub[f"{v}/prompt"] = node.create_publisher(PointStamped, f"{v}/prompt", LATCHED)
        self.rng = np.random.default_rng(0)

    def now(self):
        return time.time()

    def calibration(self, view, P=None):
        return messages.calibration_messages(self.case.views[view].P if P is None else P, self.case.views[view].size,
                                             header(self.now(), "carm"), f"{view}_optical")

    def send_calibration(self):
        for v in VIEWS:
            info, pose = self.calibration(v)
            self.pub[f"{v}/camera_info"].publish(info)
            self.pub[f"{v}/pose"].publish(pose)

    def prompt(self, view, u=None, v=None, frame=None):
        msg = PointStamped(header=header(self.now(), frame if frame is not None else f"{view}_optical"))
        gt = self.case.pixels(view)[0]
        msg.point.x, msg.point.y = float(gt[0] if u is None else u), float(gt[1] if v is None else v)
        return msg

    def send_prompts(self):
        for v in VIEWS:
            self.pub[f"{v}/prompt"].publish(self.prompt(v))

    def image(self, view, stamp, array=None, encoding=None):
        if array is None:  # the case's image with fresh noise: every pair differs
            image = self.case.views[view].image
            array = image.astype(np.float32) + self.rng.normal(0, 300, image.shape)
            array = np.clip(array, 0, 65535).astype(np.uint16)
        msg = messages.image_message(header(stamp, f"{view}_optical"), array)
        if encoding:
            msg.encoding = encoding
        return msg

    def send_pair(self, stamp=None, ap=None, lat=None):
        stamp = self.now() if stamp is None else stamp
        self.pub["ap/image"].publish(ap if ap is not None else self.image("ap", stamp))
        self.pub["lat/image"].publish(lat if lat is not None else self.image("lat", stamp))
        return stamp

    def pose_stamps(self):
        return [stamp_seconds(p.header) for p in self.listener.received["vertebrae/poses"]]

    def diagnostics_text(self, since: int = 0):
        text = []
        for d in self.listener.received["/diagnostics"][since:]:
            for s in d.status:
                text.append(s.message)
                text += [f"{kv.key}: {kv.value}" for kv in s.values]
        return "\n".join(text)

    def spin(self, seconds):
        self.listener.spin_until(lambda: False, seconds)

    def good_pose(self, timeout=20.0):
        """Good input gives a pose: the node is alive and the rig is in a known good state.
        Pairs are sent again each second until one comes back (the node may still be starting)."""
        self.send_calibration()
        self.send_prompts()
        self.spin(0.3)
        deadline = time.monotonic() + timeout
        stamps = []
        while time.monotonic() < deadline:
            stamps.append(self.send_pair())
            if self.listener.spin_until(lambda: any(abs(s - t) < 1e-6 for s in self.pose_stamps() for t in stamps),
                                        1.0):
                return True
        return False

    def expect_refusal(self, text, stamp=None, timeout=4.0):
        """Diagnostics say `text`, and no pose carries the bad pair's stamp."""
        since = len(self.listener.received["/diagnostics"])
        found = self.listener.spin_until(lambda: text in self.diagnostics_text(since), timeout)
        self.spin(1.0)  # a pose computed from the bad pair would have arrived by now
        assert found, f"diagnostics never said {text!r}; they said:\n{self.diagnostics_text(since)[-1500:]}"
        if stamp is not None:
            assert not any(abs(s - stamp) < 1e-6 for s in self.pose_stamps()), "a pose was published from bad input"


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    import torch
    root = tmp_path_factory.mktemp("bad_input")
    synthesize(root / "data", 1, seed=5, config=SynthConfig(size=96), workers=1, progress=False)
    torch.manual_seed(0)
    ckpt = checkpoint.save(root / "tiny.pt", X2PNet(preset("tiny")))
    case = case_io.read_case(root / "data" / "case_00000")
    command = ["x2p_ros.ros.localizer_node", "--ros-args", "-p", f"checkpoint:={ckpt}", "-p", "presence_threshold:=0.0",
               "-p", "keyframe_max_rate_hz:=50.0", "-p", "keyframe_change_threshold:=0.0", "-p", "auto_prompt:=false",
               "-p", "max_image_age_s:=30.0", "-p", "sync_slop_s:=0.05", "-p", "max_image_pixels:=16384"]
    with ros_processes(command) as procs:
        r = Rig(case)
        r.procs = procs
        assert r.good_pose(timeout=60), "the node never published a pose for good input"
        yield r
        r.listener.close()


@pytest.fixture
def fresh(rig):
    assert rig.good_pose(), "good input no longer gives a pose"
    rig.spin(0.2)  # more than the slop: the good frames cannot pair with the bad ones
    yield rig
    assert rig.procs[0].poll() is None, "the node died"
    assert rig.good_pose(), "the node did not recover after the bad input"


def _bad_image(rig, view, **changes):
    stamp = rig.now()
    msg = rig.image(view, stamp)
    for k, v in changes.items():
        setattr(msg, k, v)
    return stamp, msg


@pytest.mark.parametrize("changes, text", [
    (dict(encoding="rgb8"), "unsupported encoding 'rgb8'"),
    (dict(data=b"\x00" * 100), "data has 100 bytes"),
    (dict(height=0, width=0, step=0, data=b""), "zero-size image"),
])
def test_malformed_image(fresh, changes, text):
    stamp, msg = _bad_image(fresh, "ap", **changes)
    fresh.send_pair(stamp, ap=msg)
    fresh.expect_refusal(f"ap/image: {text}", stamp)


def test_nan_pixels_in_float_image(fresh):
    stamp = fresh.now()
    image = fresh.case.views["lat"].image.astype(np.float32)
    image[10, 10] = np.nan
    fresh.send_pair(stamp, lat=messages.image_message(header(stamp, "lat_optical"), image))
    fresh.expect_refusal("lat/image: 32FC1 image contains NaN or Inf pixels", stamp)


def test_image_above_the_pixel_limit_is_refused(fresh):
    # the suite's node runs with max_image_pixels = 128 x 128 (default 4096 x 4096), so that
    # the refusal of an oversized image is shown without sending 8192 x 8192 over DDS
    stamp = fresh.now()
    big = np.random.default_rng(2).integers(0, 255, (200, 200), dtype=np.uint8)
    fresh.send_pair(stamp, ap=fresh.image("ap", stamp, big))
    fresh.expect_refusal("ap/image: image of 200 x 200 pixels exceeds the limit of 16384 pixels", stamp)


@pytest.mark.parametrize("K, text", [(np.zeros(9), "K focal lengths must be positive")])  # the rest: test_session
def test_bad_camera_info(fresh, K, text):
    info, _ = fresh.calibration("ap")
    info.k = [float(x) for x in K]
    fresh.pub["ap/camera_info"].publish(info)
    fresh.spin(0.3)
    stamp = fresh.send_pair()
    fresh.expect_refusal(f"ap/camera_info: {text}", stamp)


@pytest.mark.parametrize("change, text", [  # the rest: test_session
    (lambda p: setattr(p.transform.translation, "x", float("nan")), "pose translation contains NaN"),
])
def test_bad_view_pose(fresh, change, text):
    _, pose = fresh.calibration("lat")
    change(pose)
    fresh.pub["lat/pose"].publish(pose)
    fresh.spin(0.3)
    stamp = fresh.send_pair()
    fresh.expect_refusal(f"lat/pose: {text}", stamp)


@pytest.mark.parametrize("prompt, text", [  # the rest: test_session
    (dict(u=500.0, v=10.0), "prompt (500.0, 10.0) lies outside the 96 x 96 image"),
])
def test_bad_prompt(fresh, prompt, text):
    fresh.pub["ap/prompt"].publish(fresh.prompt("ap", **prompt))
    fresh.spin(0.3)
    stamp = fresh.send_pair()
    fresh.expect_refusal(f"ap/prompt: {text}", stamp)


@pytest.mark.parametrize("content, text", [
    (None, "checkpoint file not found"),
    (b"PK\x03\x04 truncated", "not a readable checkpoint"),
    (b"just text", "not a readable checkpoint"),
])
def test_bad_checkpoint_at_start_keeps_the_node_alive(tmp_path, content, text):
    path = tmp_path / "model.pt"
    if content is not None:
        path.write_bytes(content)
    listener = Listener([("/diagnostics", DiagnosticArray, RELIABLE)], name="ckpt_listener")
    try:
        with ros_processes(["x2p_ros.ros.localizer_node", "--ros-args", "-p", f"checkpoint:={path}",
                            "-r", "__node:=x2p_bad_ckpt"]) as procs:
            def said():
                return any(text in s.message for d in listener.received["/diagnostics"] for s in d.status
                           if s.name.startswith("x2p_localizer"))
            assert listener.spin_until(said, 30), \
                [s.message for d in listener.received["/diagnostics"] for s in d.status]
            assert procs[0].poll() is None
    finally:
        listener.close()


def test_checkpoint_that_would_run_code_is_refused_at_start(tmp_path):
    import torch

    class RunsCode:
        def __reduce__(self):
            return (print, ("code ran",))
    torch.save({"format": checkpoint.FORMAT, "version": 1, "x": RunsCode()}, tmp_path / "evil.pt")
    listener = Listener([("/diagnostics", DiagnosticArray, RELIABLE)], name="evil_listener")
    try:
        with ros_processes(["x2p_ros.ros.localizer_node", "--ros-args", "-p", f"checkpoint:={tmp_path / 'evil.pt'}",
                            "-r", "__node:=x2p_evil"]) as procs:
            diagnostics = listener.received["/diagnostics"]
            assert listener.spin_until(lambda: any("could run code" in s.message for d in diagnostics
                                                   for s in d.status), 30)
            assert procs[0].poll() is None
    finally:
        listener.close()


def test_cuda_without_a_gpu_falls_back_to_the_cpu(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    torch.manual_seed(0)
    ckpt = checkpoint.save(tmp_path / "tiny.pt", X2PNet(preset("tiny")))
    listener = Listener([("/diagnostics", DiagnosticArray, RELIABLE)], name="cuda_listener")
    try:
        with ros_processes(["x2p_ros.ros.localizer_node", "--ros-args", "-p", f"checkpoint:={ckpt}", "-p",
                            "device:=cuda", "-r", "__node:=x2p_cuda"]) as procs:
            def device():
                return [kv.value for d in listener.received["/diagnostics"] for s in d.status for kv in s.values
                        if kv.key == "device"]
            assert listener.spin_until(lambda: "cpu" in device(), 30)
            assert procs[0].poll() is None
    finally:
        listener.close()


def _out_of_memory(out):
    import torch
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def _not_finite(out):
    out["xyz"] = out["xyz"] * float("nan")
    return out


@pytest.mark.parametrize("fault, text", [(_out_of_memory, "out of memory"), (_not_finite, "are not finite")])
def test_a_failed_inference_is_reported_and_the_node_recovers(tmp_path, fault, text):
    """Fault injection in-process: the model runs out of memory, or returns NaN, once."""
    import torch
    from rclpy.parameter import Parameter

    from x2p_ros.ros.localizer_node import LocalizerNode
    torch.manual_seed(0)
    ckpt = checkpoint.save(tmp_path / "tiny.pt", X2PNet(preset("tiny")))
    synthesize(tmp_path / "d", 1, seed=5, config=SynthConfig(size=96), workers=1, progress=False)
    case = case_io.read_case(tmp_path / "d" / "case_00000")
    context = rclpy.Context()
    rclpy.init(context=context)
    node = LocalizerNode(context=context, parameter_overrides=[
        Parameter("checkpoint", value=str(ckpt)), Parameter("presence_threshold", value=0.0),
        Parameter("keyframe_change_threshold", value=0.0), Parameter("keyframe_max_rate_hz", value=100.0)])
    try:
        node.trigger_configure()
        node.trigger_activate()
        real, calls = node.localizer.model.forward, []

        def fails_once(*args, **kwargs):
            calls.append(1)
            out = real(*args, **kwargs)
            return fault(out) if len(calls) == 1 else out
        node.localizer.model.forward = fails_once
        published = []
        node.pub_poses.publish = published.append
        for v in VIEWS:
            info, pose = messages.calibration_messages(case.views[v].P, case.views[v].size, header(time.time(), "carm"),
                                                       f"{v}_optical")
            node._on_info(v, info)
            node._on_pose(v, pose)
            prompt = PointStamped(header=header(time.time(), f"{v}_optical"))
            prompt.point.x, prompt.point.y = (float(c) for c in case.pixels(v)[0])
            node._on_prompt(v, prompt)
        rng = np.random.default_rng(0)
        for k in range(2):
            stamp = time.time() + k
            for v in VIEWS:
                image = np.clip(case.views[v].image + rng.normal(0, 500, (96, 96)), 0, 65535).astype(np.uint16)
                node._on_image(v, messages.image_message(header(stamp, f"{v}_optical"), image))
            deadline = time.monotonic() + 20
            while node.counts["failed"] + node.counts["published"] < k + 1 and time.monotonic() < deadline:
                time.sleep(0.05)
        assert node.counts["failed"] == 1 and node.counts["published"] == 1  # failed once, then recovered
        assert "inference failed" in node.problem and text in node.problem
        assert len(published) == 1 and all(np.isfinite([p.position.x, p.position.y, p.position.z]).all()
                                           for p in published[0].poses)
        values = {kv.key: kv.value for kv in node.diagnostic_status().values}
        assert values["failed"] == "1" and values["input inference"] == "ok"
    finally:
        node.worker.stop()
        node.destroy_node()
        rclpy.try_shutdown(context=context)

"""`make demo`: the product end to end, as real ROS 2 processes.

Starts carm_sim (phantom cases rendered on start, a live image stream with
calibration, prompts and ground truth) and x2p_localizer with the parameter
file the launch file uses (config/localize.yaml), listens to what the
localizer publishes for a bounded time, prints per-vertebra 3D errors against
the ground truth and the latency, writes the last overlays as PNGs and the
session as an MCAP recording (the inputs: images, camera_info, view poses and
prompts; the outputs; the ground truth), and stops every process it started.

The table is the same on every run of a machine: the phantoms are seeded, a
still C-arm shows the same images through a case, and the localizer matches
calibration and prompts to the images by stamp, so each case gives one key
frame from the same input whatever the timing."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from .ros import processes

ROOT = Path(__file__).resolve().parents[1]
INPUTS = tuple(f"{v}/{kind}" for v in ("ap", "lat") for kind in ("image", "camera_info", "pose", "prompt"))
RECORDED = INPUTS + ("vertebrae/poses", "vertebrae/markers", "vertebrae", "ground_truth/poses", "/diagnostics",
                     "ap/overlay", "lat/overlay")


def _start(module: str, params: Path, overrides: dict, log: Path):
    args = ["--params-file", str(params)]
    for k, v in overrides.items():
        args += ["-p", f"{k}:={v}"]
    return processes.start(module, args, log)


def run(out: Path, cases: int, seconds: float, params: Path, checkpoint: str) -> int:
    import cv2
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import PointStamped, PoseArray, TransformStamped
    from sensor_msgs.msg import CameraInfo, Image
    from visualization_msgs.msg import MarkerArray

    from . import metrics
    from .geometry import MM_PER_M
    from .msg import VertebraArray
    from .ros.images import image_to_array
    from .ros.messages import stamp_seconds
    from .ros.qos import LATCHED, SENSOR_DATA, reliable
    from .ros.recording import McapRecorder

    out.mkdir(parents=True, exist_ok=True)
    results = reliable(depth=20)  # a whole demo's results, none dropped
    types = {"vertebrae/poses": (PoseArray, results), "vertebrae/markers": (MarkerArray, results),
             "vertebrae": (VertebraArray, results), "ground_truth/poses": (PoseArray, LATCHED),
             "/diagnostics": (DiagnosticArray, results), "ap/overlay": (Image, SENSOR_DATA),
             "lat/overlay": (Image, SENSOR_DATA)}
    for v in ("ap", "lat"):
        types.update({f"{v}/image": (Image, results), f"{v}/camera_info": (CameraInfo, LATCHED),
                      f"{v}/pose": (TransformStamped, LATCHED), f"{v}/prompt": (PointStamped, LATCHED)})
    period = seconds / cases
    # a still C-arm: the same images through a case; after the last case the sim stays on it, as
    # starting over would land on the moment the demo stops and make the table depend on timing
    sim_params = {"cases": cases, "case_period_s": period, "repeat": False}
    localizer_params = {"checkpoint": checkpoint} if checkpoint else {}
    print(f"starting carm_sim ({cases} phantom cases, {period:.0f} s each) and x2p_localizer with "
          f"{os.path.relpath(params)}")
    procs = [_start("x2p_ros.ros.carm_sim", params, sim_params, out / "carm_sim.log"),
             _start("x2p_ros.ros.localizer_node", params, localizer_params, out / "x2p_localizer.log")]
    rclpy.init()
    node = rclpy.create_node("x2p_demo")
    recorder = McapRecorder(out / "session.mcap")
    got = {t: [] for t in RECORDED}

    def on_message(topic, msg):
        now = time.time_ns()
        recorder.write(topic if topic.startswith("/") else "/" + topic, msg, now)
        if topic not in INPUTS:  # the inputs go to the recording only
            got[topic].append((now, msg))

    for topic, (msg_type, qos) in types.items():
        node.create_subscription(msg_type, topic, lambda m, t=topic: on_message(t, m), qos)
    try:
        # the sim renders its phantoms first; then run for `seconds` of stream
        deadline = time.monotonic() + seconds + 120
        started = None
        while time.monotonic() < deadline:
            rclpy.spin_once(node, timeout_sec=0.1)
            if started is None and got["ground_truth/poses"]:
                started = time.monotonic()
            if started is not None and time.monotonic() - started > seconds:
                break
            if any(p.poll() is not None for p in procs):
                print("a node stopped early; see its log in", out)
                break
    finally:
        recorder.close()
        node.destroy_node()
        rclpy.try_shutdown()
        processes.stop(*procs)

    # ground truth of each published pair: the newest truth stamped at or before the pair
    truths = [(stamp_seconds(m.header), m) for _, m in got["ground_truth/poses"]]
    # the localizer sends its latest result again with every frame that is not a key frame:
    # one result per pair stamp, as first received
    results = list({stamp_seconds(m.header): (t, m) for t, m in reversed(got["vertebrae"])}.values())[::-1]
    if not results or not truths:
        print(f"no localisation was published; logs: {out}/*.log")
        return 1
    errors_all, latencies = [], []
    last_per_case = {}
    for t_recv, va in results:
        truth_msgs = [m for t, m in truths if t <= stamp_seconds(va.header)]
        if not truth_msgs:
            continue
        truth = np.array([[p.position.x, p.position.y, p.position.z] for p in truth_msgs[-1].poses]) * MM_PER_M
        case = len(truth_msgs) - 1
        pred = np.array([[v.position.x, v.position.y, v.position.z] for v in va.vertebrae]) * MM_PER_M
        errors = metrics.match_errors(pred, [v.present for v in va.vertebrae], truth)
        errors_all.append(errors)
        latencies.append(t_recv * 1e-9 - stamp_seconds(va.header))
        last_per_case[case] = (va, errors)
    print(f"\n{len(results)} key frames localised; the last of each case:")
    print(f"   {'case':<6}{'label':<7}{'present':<9}{'conf':>6}{'3D error mm':>13}")
    for case, (va, errors) in sorted(last_per_case.items()):
        for v, e in zip(va.vertebrae, errors):
            print(f"   {case:<6}{v.label:<7}{str(v.present):<9}{v.confidence:>6.2f}{e:>13.2f}")
    summary = metrics.summary(np.concatenate(errors_all))
    model_latency = [float(kv.value) for _, d in got["/diagnostics"] for s in d.status for kv in s.values
                     if kv.key == "last_latency_ms" and kv.value != "nan"]
    print(f"\nall key frames: {summary['n']} vertebra estimates, MPE {summary['mpe']:.2f} mm, "
          f"PCL@10 {100 * summary['pcl@10']:.1f} %, PCL@20 {100 * summary['pcl@20']:.1f} %, missed {summary['missed']}")
    print(f"latency: model {np.median(model_latency) if model_latency else float('nan'):.0f} ms (median), "
          f"image stamp to result received {1000 * np.median(latencies):.0f} ms (median, CPU)")
    for view in ("ap", "lat"):
        if got[f"{view}/overlay"]:
            cv2.imwrite(str(out / f"overlay_{view}.png"), image_to_array(got[f"{view}/overlay"][-1][1], ("bgr8",)))
    print(f"written: {out}/overlay_ap.png, overlay_lat.png, session.mcap (open in Foxglove), *.log")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo_output", type=Path)
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=30.0, help="stream time after the sim is up")
    parser.add_argument("--params", type=Path, default=ROOT / "config" / "localize.yaml")
    parser.add_argument("--checkpoint", default="", help="default: the shipped model")
    args = parser.parse_args(argv)
    return run(args.out, args.cases, args.seconds, args.params, args.checkpoint)


if __name__ == "__main__":
    sys.exit(main())

"""Load and soak of x2p_localizer: carm_sim streams 512 x 512 mono16 images at
30 Hz per view (with small motion, so pairs keep changing) while inference runs
at its own pace; the image publisher is restarted half-way. Reports resident
memory growth after warm-up, skipped and unpaired frames, p50/p99 model latency
and the node's own per-key-frame work, and checks that every key frame ended in
a published result or a diagnostics entry.

  python -m x2p_ros.soak --minutes 10            # the full run (figures for docs/BENCHMARKS.md)
  python -m x2p_ros.soak --minutes 0.5 --json F  # the short mode used by the tests
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from .ros import processes


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def soak(minutes: float, rate_hz: float, size: int, checkpoint: str, out: Path) -> dict:
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import PoseArray

    from .ros.messages import stamp_seconds
    from .ros.qos import reliable

    out.mkdir(parents=True, exist_ok=True)
    sim_args = ["-p", f"rate_hz:={rate_hz}", "-p", f"size:={size}", "-p", "cases:=1", "-p", "motion_px:=1.0",
                "-p", "seed:=3"]
    loc_args = ["-p", "keyframe_max_rate_hz:=30.0", "-p", "presence_threshold:=0.0"] + \
        (["-p", f"checkpoint:={checkpoint}"] if checkpoint else [])
    localizer = processes.start("x2p_ros.ros.localizer_node", loc_args, out / "soak_localizer.log")
    sim = processes.start("x2p_ros.ros.carm_sim", sim_args, out / "soak_sim_1.log")
    rclpy.init()
    node = rclpy.create_node("x2p_soak_monitor")
    qos = reliable(depth=50)  # ten minutes of poses, none dropped
    poses, diags = [], []
    # results by their pair's stamp: the node also sends its latest result again with every frame
    node.create_subscription(PoseArray, "vertebrae/poses", lambda m: poses.append(stamp_seconds(m.header)), qos)
    node.create_subscription(DiagnosticArray, "/diagnostics", diags.append, qos)
    duration = 60.0 * minutes
    rss, restarted, poses_before_restart = [], None, 0
    start = None
    try:
        deadline = time.monotonic() + duration + 180
        while time.monotonic() < deadline:
            rclpy.spin_once(node, timeout_sec=0.05)
            if localizer.poll() is not None:
                raise RuntimeError(f"x2p_localizer exited with {localizer.returncode}; see {out}/soak_localizer.log")
            if start is None:
                if poses:  # the stream runs: warm-up starts now
                    start = time.monotonic()
                continue
            elapsed = time.monotonic() - start
            if not rss or time.monotonic() - rss[-1][0] >= 1.0:
                rss.append((time.monotonic(), _rss_mb(localizer.pid)))
            if restarted is None and elapsed > duration / 2:
                processes.stop(sim)  # the image publisher goes away and comes back
                poses_before_restart = len(set(poses))
                time.sleep(1.0)
                sim = processes.start("x2p_ros.ros.carm_sim", sim_args, out / "soak_sim_2.log")
                restarted = time.monotonic()
            if elapsed > duration:
                break
        processes.stop(sim)  # then let the last key frame finish and the counters reach the diagnostics
        end = time.monotonic() + 3
        while time.monotonic() < end:
            rclpy.spin_once(node, timeout_sec=0.05)
    finally:
        processes.stop(sim, localizer)
        node.destroy_node()
        rclpy.try_shutdown()
    values = {kv.key: kv.value for kv in diags[-1].status[0].values} if diags else {}
    samples = np.array([r for _, r in rss])
    warm = samples[len(samples) // 5:] if len(samples) >= 5 else samples  # after a fifth of the run
    result = {
        "minutes": minutes, "rate_hz_per_view": rate_hz, "size": size,
        "key_frames": int(values.get("key_frames", 0)), "published": int(values.get("published", 0)),
        "failed": int(values.get("failed", 0)), "skipped_frames": int(values.get("skipped_frames", 0)),
        "unpaired_frames": int(values.get("unpaired_frames", 0)),
        "latency_ms_p50": float(values.get("latency_ms_p50", "nan")),
        "latency_ms_p99": float(values.get("latency_ms_p99", "nan")),
        "overhead_ms_p50": float(values.get("overhead_ms_p50", "nan")),
        "overhead_ms_p99": float(values.get("overhead_ms_p99", "nan")),
        "overhead_cpu_ms_p50": float(values.get("overhead_cpu_ms_p50", "nan")),
        "overhead_cpu_ms_p99": float(values.get("overhead_cpu_ms_p99", "nan")),
        "rss_mb_after_warmup": float(warm[0]) if warm.size else float("nan"),
        "rss_mb_end": float(samples[-1]) if samples.size else float("nan"),
        "poses_after_restart": len(set(poses)) - poses_before_restart if restarted else 0,
        "republished": int(values.get("republished", 0)),
        "rss_mb_every_30s": [round(float(r), 1) for r in samples[::30]],
    }
    result["rss_growth_pct"] = 100.0 * (result["rss_mb_end"] / result["rss_mb_after_warmup"] - 1.0)
    # a key frame still in the worker at the end is neither published nor failed yet
    result["unaccounted_key_frames"] = result["key_frames"] - result["published"] - result["failed"] - \
        result["skipped_frames"]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=30.0, help="images per second per view")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--checkpoint", default="", help="default: the shipped model")
    parser.add_argument("--out", type=Path, default=Path("soak_output"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    result = soak(args.minutes, args.rate, args.size, args.checkpoint, args.out)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

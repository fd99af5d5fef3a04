"""x2p_ros/msg interfaces built from msg/ cross a real DDS link between two processes."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

rclpy = pytest.importorskip("rclpy")

from x2p_ros.msg import VertebraArray  # noqa: E402
from x2p_ros.ros.qos import LATCHED  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from publish_vertebra_array import known_message  # noqa: E402


def test_vertebra_array_crosses_processes_intact():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    publisher = subprocess.Popen([sys.executable, str(HERE / "publish_vertebra_array.py")], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    context = rclpy.Context()
    rclpy.init(context=context)
    received = []
    try:
        node = rclpy.create_node("vertebra_array_listener", context=context)
        node.create_subscription(VertebraArray, "vertebrae", received.append, LATCHED)
        executor = rclpy.executors.SingleThreadedExecutor(context=context)
        executor.add_node(node)
        deadline = time.monotonic() + 30.0
        while not received and time.monotonic() < deadline and publisher.poll() is None:
            executor.spin_once(timeout_sec=0.1)
    finally:
        rclpy.try_shutdown(context=context)
        publisher.send_signal(signal.SIGINT)
        try:
            out, _ = publisher.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            publisher.kill()
            out, _ = publisher.communicate()
    assert received, f"no VertebraArray received; publisher said:\n{out.decode(errors='replace')}"
    assert received[0] == known_message()
    got = received[0]
    assert [v.label for v in got.vertebrae] == ["T12", "L1", "L2"]
    assert got.header.frame_id == "carm_reference" and got.header.stamp.nanosec == 123456789
    assert got.vertebrae[2].present is False and got.vertebrae[1].position.z == 0.0

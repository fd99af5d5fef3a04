"""Every QoS profile of the package: the node, the simulated C-arm, the demo,
the soak benchmark and the tests take theirs from here."""
from __future__ import annotations

from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy


def reliable(depth: int = 10) -> QoSProfile:
    """Reliable, volatile, the last `depth` messages: ROS's default, what most
    drivers and tools publish and subscribe with (a listener that must not
    drop a burst asks for a deeper queue)."""
    return QoSProfile(depth=depth, reliability=ReliabilityPolicy.RELIABLE)


# images: only the newest matter, and a late or lost frame is replaced by the next one;
# best effort also takes images from reliable publishers
SENSOR_DATA = QoSProfile(depth=2, reliability=ReliabilityPolicy.BEST_EFFORT, history=HistoryPolicy.KEEP_LAST)
# calibration, prompts, ground truth: the last value reaches a subscriber that joins later
LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
# a subscription that every publisher matches (default, best effort, latched), without their history
ANY = QoSProfile(depth=10, reliability=ReliabilityPolicy.BEST_EFFORT)
# the node's results: every subscriber matches (a reliable, transient-local publisher offers the most),
# and one that asks for transient local gets the latest at once
RESULTS = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
RELIABLE = reliable()

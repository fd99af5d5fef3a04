"""Publishes one known x2p_ros/msg/VertebraArray (latched) until killed; used by
test_interfaces.py from another process."""
import rclpy
from geometry_msgs.msg import Point

from x2p_ros.msg import Vertebra, VertebraArray
from x2p_ros.ros.qos import LATCHED


def known_message() -> VertebraArray:
    msg = VertebraArray()
    msg.header.stamp.sec, msg.header.stamp.nanosec = 1700000000, 123456789
    msg.header.frame_id = "carm_reference"
    msg.reference_level = "T12"
    for i, (label, z) in enumerate([("T12", 0.031), ("L1", 0.0), ("L2", -0.0325)]):
        msg.vertebrae.append(Vertebra(
            label=label, index=i, present=i < 2, confidence=0.75 - 0.25 * i,  # float32-exact
            position=Point(x=0.001 * i, y=-0.002, z=z),
            ap_pixel=Point(x=250.5 + i, y=100.0 + 60.0 * i), lat_pixel=Point(x=240.0 - i, y=101.0 + 60.0 * i)))
    return msg


def main():
    rclpy.init()
    node = rclpy.create_node("vertebra_array_publisher")
    pub = node.create_publisher(VertebraArray, "vertebrae", LATCHED)
    msg = known_message()
    node.create_timer(0.2, lambda: pub.publish(msg))
    try:
        rclpy.spin(node)
    except KeyboardInterrupt:
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()

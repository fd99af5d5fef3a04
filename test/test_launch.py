"""launch_testing test of localize.launch.py with the simulated C-arm: poses
arrive. Runs on a ROS 2 machine (colcon test); skipped where launch_testing is
not installed (it does not come as a wheel)."""
import os
import time
import unittest

import pytest

pytest.importorskip(
    "launch_testing", reason="launch_testing is not importable here (ROS 2 from PyPI wheels has no launch); "
                             "this test runs on a ROS 2 machine with `colcon test --packages-select x2p_ros`")
import launch_testing.actions  # noqa: E402
import rclpy  # noqa: E402
from ament_index_python.packages import get_package_share_directory  # noqa: E402
from geometry_msgs.msg import PoseArray  # noqa: E402
from launch.actions import IncludeLaunchDescription  # noqa: E402
from launch.launch_description_sources import PythonLaunchDescriptionSource  # noqa: E402

import launch  # noqa: E402


@pytest.mark.launch_test
def generate_test_description():
    launch_file = os.path.join(get_package_share_directory("x2p_ros"), "launch", "localize.launch.py")
    return launch.LaunchDescription([
        IncludeLaunchDescription(PythonLaunchDescriptionSource(launch_file),
                                 launch_arguments={"use_sim": "true", "device": "cpu"}.items()),
        launch_testing.actions.ReadyToTest(),
    ])


class TestLocalizeLaunch(unittest.TestCase):
    def test_vertebra_poses_are_published(self):
        rclpy.init()
        node = rclpy.create_node("launch_test_listener")
        received = []
        node.create_subscription(PoseArray, "vertebrae/poses", received.append, 10)
        deadline = time.monotonic() + 120
        while not received and time.monotonic() < deadline:
            rclpy.spin_once(node, timeout_sec=0.2)
        node.destroy_node()
        rclpy.shutdown()
        self.assertTrue(received, "no PoseArray on vertebrae/poses within 120 s")
        self.assertEqual(received[0].header.frame_id, "carm")
        self.assertGreater(len(received[0].poses), 0)

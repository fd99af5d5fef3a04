"""ros2 launch x2p_ros localize.launch.py [use_sim:=true] [rviz:=true] ..."""
import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from launch import LaunchDescription


def generate_launch_description():
    share = get_package_share_directory("x2p_ros")
    arguments = [
        DeclareLaunchArgument("namespace", default_value="", description="namespace of the nodes"),
        DeclareLaunchArgument("params_file", default_value=os.path.join(share, "config", "localize.yaml"),
                              description="parameters of x2p_localizer and carm_sim"),
        DeclareLaunchArgument("checkpoint", default_value="",
                              description="model checkpoint (empty: the shipped model)"),
        DeclareLaunchArgument("device", default_value="auto", description="auto, cuda or cpu"),
        DeclareLaunchArgument("use_sim", default_value="false", description="also start the simulated C-arm"),
        DeclareLaunchArgument("rviz", default_value="false", description="start rviz2 with config/x2p.rviz"),
        DeclareLaunchArgument("log_level", default_value="info", description="ROS log level"),
    ]
    ns, params = LaunchConfiguration("namespace"), LaunchConfiguration("params_file")
    log = LaunchConfiguration("log_level")
    localizer = Node(
        package="x2p_ros", executable="x2p_localizer", name="x2p_localizer", namespace=ns, output="screen",
        parameters=[params, {"checkpoint": LaunchConfiguration("checkpoint"), "device": LaunchConfiguration("device")}],
        arguments=["--ros-args", "--log-level", log],
        additional_env={"MALLOC_ARENA_MAX": "2"})  # flat resident memory with several threads (docs/BENCHMARKS.md)
    sim = Node(
        package="x2p_ros", executable="carm_sim", name="carm_sim", namespace=ns, output="screen",
        parameters=[params], arguments=["--ros-args", "--log-level", log],
        condition=IfCondition(LaunchConfiguration("use_sim")))
    rviz = Node(
        package="rviz2", executable="rviz2", name="rviz2", namespace=ns,
        arguments=["-d", os.path.join(share, "config", "x2p.rviz")],
        condition=IfCondition(LaunchConfiguration("rviz")))
    return LaunchDescription(arguments + [localizer, sim, rviz])

"""ros2 launch x2p_ros localize.launch.py [use_sim:=true] [rviz:=true] [autostart:=false] ...

The launch ends when x2p_localizer or carm_sim ends (no node is left running
alone); rviz:=true without rviz2 installed starts the rest with a warning."""
import os

from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
from launch.actions import DeclareLaunchArgument, LogInfo, OpaqueFunction, Shutdown
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from launch import LaunchDescription


def _rviz(context, share, ns):
    if LaunchConfiguration("rviz").perform(context).lower() not in ("true", "1", "yes"):
        return []
    try:
        get_package_share_directory("rviz2")
    except PackageNotFoundError:
        return [LogInfo(msg="rviz:=true, but rviz2 is not installed: starting without RViz "
                            "(apt install ros-$ROS_DISTRO-rviz2)")]
    # the config's topics are relative: RViz in the nodes' namespace shows that namespace's C-arm
    return [Node(package="rviz2", executable="rviz2", name="rviz2", namespace=ns,
                 arguments=["-d", os.path.join(share, "config", "x2p.rviz")])]


def generate_launch_description():
    share = get_package_share_directory("x2p_ros")
    arguments = [
        DeclareLaunchArgument("namespace", default_value="", description="namespace of the nodes"),
        DeclareLaunchArgument("params_file", default_value=os.path.join(share, "config", "localize.yaml"),
                              description="parameters of x2p_localizer and carm_sim"),
        DeclareLaunchArgument("checkpoint", default_value="",
                              description="model checkpoint (empty: the shipped model)"),
        DeclareLaunchArgument("device", default_value="auto", description="auto, cuda or cpu"),
        DeclareLaunchArgument("autostart", default_value="true",
                              description="configure and activate x2p_localizer on start (false: a lifecycle "
                                          "manager or `ros2 lifecycle set` drives it)"),
        DeclareLaunchArgument("use_sim", default_value="false", description="also start the simulated C-arm"),
        DeclareLaunchArgument("rviz", default_value="false", description="start rviz2 with config/x2p.rviz"),
        DeclareLaunchArgument("log_level", default_value="info", description="ROS log level"),
    ]
    ns, params = LaunchConfiguration("namespace"), LaunchConfiguration("params_file")
    log = LaunchConfiguration("log_level")
    localizer = Node(
        package="x2p_ros", executable="x2p_localizer", name="x2p_localizer", namespace=ns, output="screen",
        parameters=[params, {"checkpoint": LaunchConfiguration("checkpoint"), "device": LaunchConfiguration("device"),
                             "autostart": LaunchConfiguration("autostart")}],
        arguments=["--ros-args", "--log-level", log],
        additional_env={"MALLOC_ARENA_MAX": "2"},  # flat resident memory with several threads (docs/BENCHMARKS.md)
        on_exit=Shutdown(reason="x2p_localizer ended"))
    sim = Node(
        package="x2p_ros", executable="carm_sim", name="carm_sim", namespace=ns, output="screen",
        parameters=[params], arguments=["--ros-args", "--log-level", log],
        condition=IfCondition(LaunchConfiguration("use_sim")), on_exit=Shutdown(reason="carm_sim ended"))
    return LaunchDescription(arguments + [localizer, sim, OpaqueFunction(function=_rviz, args=[share, ns])])

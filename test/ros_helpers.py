"""Helpers for the cross-process ROS tests: real rclpy, real processes."""
import time
from contextlib import contextmanager

from x2p_ros.ros import processes


@contextmanager
def ros_processes(*commands):
    """Starts [MODULE, "--ros-args", ...] processes; stops them all on exit and
    reports their output when the block fails."""
    procs = [processes.start(c[0], [a for a in c[1:] if a != "--ros-args"]) for c in commands]
    try:
        yield procs
    except BaseException:
        for p, out in zip(procs, processes.stop(*procs)):
            print(f"--- {p.args[2]} said:\n{out[-4000:]}")
        raise
    processes.stop(*procs)


class Listener:
    """A node in this process that records what it hears."""

    def __init__(self, subscriptions, name="x2p_test_listener"):
        import rclpy
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node(name, context=self.context)
        self.executor = rclpy.executors.SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.received = {topic: [] for topic, _, _ in subscriptions}
        for topic, msg_type, qos in subscriptions:
            self.node.create_subscription(msg_type, topic, self.received[topic].append, qos)

    def spin_until(self, condition, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.executor.spin_once(timeout_sec=0.1)
            if condition():
                return True
        return False

    def call(self, srv_type, name, request, timeout=10.0):
        client = self.node.create_client(srv_type, name)
        if not client.wait_for_service(timeout_sec=timeout):
            raise TimeoutError(f"service {name} did not appear")
        future = client.call_async(request)
        self.spin_until(future.done, timeout)
        return future.result()

    def close(self):
        import rclpy
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)

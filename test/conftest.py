import atexit
import os
import random
import shutil
import tempfile

# ROS writes logs under ~/.ros unless told otherwise; keep test runs self-contained
# (a log folder of this run's own, removed at its end), and keep DDS discovery on
# this machine on a domain of this run's own.
if "ROS_LOG_DIR" not in os.environ:
    os.environ["ROS_LOG_DIR"] = tempfile.mkdtemp(prefix="x2p_ros_log_")
    atexit.register(shutil.rmtree, os.environ["ROS_LOG_DIR"], ignore_errors=True)
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("ROS_DOMAIN_ID", str(random.Random(os.getpid()).randint(1, 100)))

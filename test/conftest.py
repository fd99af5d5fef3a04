import os
import random
import tempfile

# ROS writes logs under ~/.ros unless told otherwise; keep test runs self-contained,
# and keep DDS discovery on this machine on a domain of this run's own.
os.environ.setdefault("ROS_LOG_DIR", tempfile.mkdtemp(prefix="x2p_ros_log_"))
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("ROS_DOMAIN_ID", str(random.Random(os.getpid()).randint(1, 100)))

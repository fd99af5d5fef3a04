"""Starting and stopping the package's nodes as separate processes (the demo,
the soak benchmark and the tests): ros2 launch is not available everywhere."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


# The localizer's threads (executor, inference, torch) would each grow a glibc malloc arena;
# two arenas keep its resident memory flat over hours. The launch file sets the same.
NODE_ENV = {"MALLOC_ARENA_MAX": "2"}


def start(module: str, ros_args=(), log=None) -> subprocess.Popen:
    """`python -m module --ros-args ...`, with this checkout importable; output to `log` (a path) or a pipe."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **NODE_ENV,
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = open(log, "w") if log else subprocess.PIPE
    return subprocess.Popen([sys.executable, "-m", module, "--ros-args", *ros_args], stdout=out,
                            stderr=subprocess.STDOUT, env=env, text=True)


def stop(*procs, timeout: float = 10.0) -> list[str]:
    """SIGINT (a clean ROS shutdown), then SIGKILL after `timeout`; returns what piped ones printed."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    outputs = []
    for p in procs:
        try:
            out = p.communicate(timeout=timeout)[0]
        except subprocess.TimeoutExpired:
            p.kill()
            out = p.communicate()[0]
        outputs.append(out or "")
    return outputs

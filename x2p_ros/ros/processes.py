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
# A node that crashes, or that stop() finds still running after a Ctrl-C, prints every thread's Python
# stack on its way out (faulthandler on SIGSEGV and SIGABRT): where it hung is in its output.
DIAGNOSTIC_ENV = {"PYTHONFAULTHANDLER": "1"}


def start(module: str, ros_args=(), log=None) -> subprocess.Popen:
    """`python -m module --ros-args ...`, with this checkout importable; output to `log` (a path) or a pipe."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **NODE_ENV, **DIAGNOSTIC_ENV,
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = open(log, "w") if log else subprocess.PIPE
    return subprocess.Popen([sys.executable, "-m", module, "--ros-args", *ros_args], stdout=out,
                            stderr=subprocess.STDOUT, env=env, text=True)


def stop(*procs, timeout: float = 10.0) -> list[str]:
    """SIGINT (a clean ROS shutdown); a process still running `timeout` s later gets SIGABRT, which makes
    one started here print its threads' stacks and end (exit code -6), and SIGKILL if even that fails.
    Returns what piped ones printed."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    outputs = []
    for p in procs:
        try:
            out = p.communicate(timeout=timeout)[0]
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGABRT)
            try:
                out = p.communicate(timeout=10.0)[0]
            except subprocess.TimeoutExpired:
                p.kill()
                out = p.communicate()[0]
        outputs.append(out or "")
    return outputs

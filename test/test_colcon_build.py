"""The ROS user's build path: colcon builds the package, the install holds
the generated messages next to the Python sources, and `colcon test` runs the
suite (here a selection of it, through PYTEST_ADDOPTS)."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("colcon", path=str(Path(sys.executable).parent)) is None,
                    reason="colcon is not installed in this environment")
def test_colcon_build_installs_messages_and_sources_and_colcon_test_runs_the_suite(tmp_path):
    venv = Path(sys.prefix)
    env = dict(os.environ, PYTEST_ADDOPTS="-k 'pixel_convention_helpers or a_complete_pair_is_a_job'")
    result = subprocess.run([str(ROOT / "tools/colcon_build.sh"), str(venv), str(tmp_path), "--test"],
                            capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 passed" in result.stdout, result.stdout[-3000:]
    summary = re.search(r"Summary: (\d+) tests, (\d+) errors, (\d+) failures", result.stdout)
    assert summary and int(summary[1]) >= 2 and summary[2] == summary[3] == "0", result.stdout[-2000:]
    python = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = tmp_path / "install/x2p_ros/lib" / python / "site-packages"
    share = tmp_path / "install/x2p_ros/share/x2p_ros"
    assert (share / "package.xml").is_file()
    assert (share / "msg/VertebraArray.msg").is_file()
    env = dict(os.environ, PYTHONPATH=str(site),
               LD_LIBRARY_PATH=os.pathsep.join([str(tmp_path / "install/x2p_ros/lib"),
                                                os.environ.get("LD_LIBRARY_PATH", "")]))
    probe = ("import x2p_ros.geometry as g, x2p_ros.msg as m; "
             "print(g.__file__); print(type(m.VertebraArray()).__module__)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    geometry_file, msg_module = out.stdout.split()
    assert geometry_file.startswith(str(site))
    assert msg_module.startswith("x2p_ros.msg")

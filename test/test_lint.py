"""The project's lint rules (ruff.toml) hold for every Python file, the two
node entry scripts included."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_passes():
    ruff = Path(sys.executable).parent / "ruff"
    ruff = str(ruff) if ruff.is_file() else shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (make test installs it into .venv)")
    result = subprocess.run([ruff, "check", "--no-cache", ".", "scripts/carm_sim", "scripts/x2p_localizer"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def _sources(*folders):
    for folder in folders:
        yield from sorted((ROOT / folder).rglob("*.py"))


def test_each_convention_has_one_home():
    """The pixel-centre arithmetic lives in geometry.py's helpers, QoS profiles in
    ros/qos.py, and the model and the overlay do not reach into the data engine."""
    import re
    pixel_arithmetic = re.compile(r"\+ 0\.5\) \*|\(2 \* \w+(\[[^]]*\])? \+ 1\) /|-0\.5 <=|size - 1 - margin")
    for path in _sources("x2p_ros", "test", "tools", "launch"):
        text = path.read_text()
        name = path.relative_to(ROOT).as_posix()
        if name not in ("x2p_ros/geometry.py", "test/test_lint.py"):
            assert not pixel_arithmetic.search(text), f"{name}: pixel-centre arithmetic outside geometry's helpers"
        if name not in ("x2p_ros/ros/qos.py", "test/test_lint.py"):
            assert "QoSProfile(" not in text, f"{name}: declares a QoS profile outside x2p_ros/ros/qos.py"
        if name.startswith("x2p_ros/model/") or name == "x2p_ros/overlay.py":
            assert not re.search(r"from \.+data\b|x2p_ros\.data\b", text), f"{name}: imports from the data engine"

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

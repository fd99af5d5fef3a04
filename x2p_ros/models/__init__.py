"""The default model shipped with the package (see MODEL.md beside this file)."""
from pathlib import Path

HERE = Path(__file__).resolve().parent


def default_checkpoint() -> Path:
    return HERE / "default.pt"

"""The models shipped with the package, each with its provenance (config,
training data and seed, validation metrics, commit) in a JSON file beside it:
default.pt, the node's and the command line's model, and baseline.pt, the
lifting baseline that `make bench` compares it with."""
from pathlib import Path

HERE = Path(__file__).resolve().parent


def default_checkpoint() -> Path:
    return HERE / "default.pt"


def baseline_checkpoint() -> Path:
    return HERE / "baseline.pt"

"""X2P-Net (docs/design.md, section 2): VFE -> prompt-guided FE -> SCE (BrickFormer) -> 3D fusion,
and the lifting baseline on the same encoder."""
from torch import nn

from .config import PRESETS, X2PConfig, preset
from .lifting import LiftingBaseline
from .x2pnet import X2PNet


def build_model(config: X2PConfig) -> nn.Module:
    """X2P-Net, or the lifting baseline for a config with lifting=True."""
    return LiftingBaseline(config) if config.lifting else X2PNet(config)


__all__ = ["PRESETS", "LiftingBaseline", "X2PConfig", "X2PNet", "build_model", "preset"]

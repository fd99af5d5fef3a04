"""X2P-Net (DESIGN.md section 2): VFE -> prompt-guided FE -> SCE (BrickFormer) -> 3D fusion."""
from .config import PRESETS, X2PConfig, preset
from .x2pnet import X2PNet

__all__ = ["PRESETS", "X2PConfig", "X2PNet", "preset"]

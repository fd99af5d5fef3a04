"""All sizes of X2P-Net in one dataclass, with named presets."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

from ..preprocess import MAX_EXTRA_LOOKS


@dataclass(frozen=True)
class X2PConfig:
    image_size: int = 512  # square input patch, pixels
    # VFE: 4-level 2D U-Net + spatial pyramid pooling, shared by both views
    base_channels: int = 16
    hires_stride: int = 2  # the decoder stops at this stride: the high-resolution features
    # prompt-guided FE (features at stride 8)
    prompt_radius: int = 48  # half side of the square prompt mask, input pixels
    d_model: int = 64
    heads: int = 8
    fe_layers: int = 4
    # SCE with BrickFormer
    n_vertebrae: int = 10
    embed_size: int = 16  # each vertebral embedding is an embed_size x embed_size map; heatmaps too
    sce_layers: int = 2
    sce_ffn_dim: int = 128  # hidden size of each BrickFormer layer's feed-forward part
    pool_stride: int = 4  # s
    top_k: int = 8  # k
    # 3D fusion
    fusion_channels: int = 16
    volume_shape: tuple[int, int, int] = (64, 32, 32)  # voxels along (down the spine, AP, lateral)
    volume_width: float = 0.5  # lateral and AP extent as a share of the vertical extent
    # presence and losses
    presence_threshold: float = 0.5  # tau
    # inference: 0 = one window gives the whole chain (N vertebrae, then a continuation window); s > 0 = keep
    # the first s vertebrae of a window and prompt again at the s-th (inference.py): a model that finds the
    # prompted vertebra better than the ones below does not drift down the chain
    chain_stride: int = 0
    # inference: R > 0 = the first window runs R times more, each time prompted at the projections of its own
    # estimate of the prompted vertebra, before the chain is localised: where the click fell within the
    # vertebra moves the estimates less, but the model's own error on that vertebra grows (README)
    prompt_refinements: int = 0
    # inference: L > 0 = each window is also run in L other looks (preprocess.looks: edge enhancement, gamma,
    # CLAHE), and the estimates are the median over the looks, the presence their mean; 0 = the image as given
    extra_looks: int = 0
    heatmap_sigma: float = 1.0  # ground-truth Gaussian, heatmap cells
    loss_3d_scale_mm: float = 30.0  # 3D error is measured in units of this many mm in the loss
    # a peaked 3D target: KL divergence of the fusion volume's distribution from a Gaussian of this sigma
    # (mm) around each vertebra, with this weight; 0: none (the shipped cpu models). The squared error of
    # the soft-argmax alone is as low for a blob over three vertebrae as for a peak, if both are centred
    loss_3d_peak_sigma_mm: float = 0.0
    loss_3d_peak_weight: float = 0.1
    # weight of the cross-entropy of each BrickFormer layer's routing against the bricks under the vertebra
    # (brick attention only); 0: none (the shipped cpu models)
    loss_routing_weight: float = 0.0
    # weight of the difference between the outputs for two random looks of each training sample (its 3D error
    # in loss units and its heatmaps' squared difference): a model that gives the same estimates whatever the
    # look relies less on the look of our renders (AugMix's consistency, Hendrycks et al., ICLR 2020); each
    # step then runs every sample twice; 0: none (both shipped models)
    loss_look_consistency_weight: float = 0.0
    # ablations (paper, Table 3 and section 4.4)
    use_prompt: bool = True
    use_sce: bool = True
    use_fusion: bool = True  # False: the volume is built from the heatmaps alone
    # each vertebra's 3D logits plus the log of its own 2D heatmaps at the voxels' projections (fusion.py);
    # False in the cpu models shipped before it
    heatmap_prior: bool = False
    sce_attention: str = "brick"  # "brick" | "vanilla" | "sparse"
    # sine position codes: 0 = DETR's doubling frequencies on 0..1 (the shipped cpu models); > 0 =
    # cell centres and frequencies up to this many cycles per image side (position_encoding.py)
    position_max_cycles: float = 0.0
    # each input view minus its Gaussian blur of this sigma (a share of the input side) before the VFE, as a
    # C-arm's dynamic-range compression flattens soft tissue: the spine's local contrast without the body's
    # thickness gradient (encoder.py); 0: none (both shipped models; README: tried at 0.125, not shipped)
    background_sigma: float = 0.0
    # a U-Net of its own that marks every vertebral centre in a view, whatever its index (centres.py), trained
    # with this weight (its Gaussians' sigma: losses.CENTRE_SIGMA_CELLS); True in the shipped X2P-Net
    centre_head: bool = False
    loss_centre_weight: float = 1.0
    # inference with a centre head: the chain walked down and each vertebra moved onto the strongest centre
    # within this share of the model's step to it (centres.snap_chain); 0: the model's own estimates
    centre_snap: float = 0.0
    # a vertebra's snaps taken only where the two views meet: their triangulated point reprojects within this
    # share of the step of each view's snap (centres.snap_chain); 0: no check
    centre_agree: float = 0.0
    # the lifting baseline on the same VFE and prompt FE: per-view high-resolution
    # heatmaps, 2D soft-argmax, closed-form two-view triangulation
    lifting: bool = False

    def __post_init__(self):
        if self.image_size < 8 or self.image_size % 8:
            raise ValueError(f"image_size must be a positive multiple of 8, got {self.image_size}")
        low = self.image_size // 8
        if low % self.pool_stride:
            raise ValueError(f"image_size / 8 = {low} must be a multiple of pool_stride = {self.pool_stride}")
        if self.top_k > (low // self.pool_stride) ** 2:
            raise ValueError(f"top_k = {self.top_k} exceeds the {(low // self.pool_stride) ** 2} pooled cells")
        if self.d_model % self.heads:
            raise ValueError(f"d_model = {self.d_model} must be divisible by heads = {self.heads}")
        if self.sce_attention not in ("brick", "vanilla", "sparse"):
            raise ValueError(f"sce_attention must be brick, vanilla or sparse, got {self.sce_attention!r}")
        if not 0 <= self.position_max_cycles <= self.embed_size / 2:
            raise ValueError(f"position_max_cycles must be 0 to embed_size / 2 = {self.embed_size / 2} (the "
                             f"embedding grid's Nyquist), got {self.position_max_cycles}")
        if self.loss_3d_peak_sigma_mm < 0:
            raise ValueError(f"loss_3d_peak_sigma_mm must be 0 (none) or more, got {self.loss_3d_peak_sigma_mm}")
        if not 0 <= self.loss_look_consistency_weight <= 100 or not math.isfinite(self.loss_look_consistency_weight):
            raise ValueError(f"loss_look_consistency_weight must be 0 (none) to 100, got "
                             f"{self.loss_look_consistency_weight}")
        if self.heatmap_prior and not self.use_sce:
            raise ValueError("heatmap_prior needs the SCE's heatmaps (use_sce)")
        if self.chain_stride < 0:
            raise ValueError(f"chain_stride must be 0 (one window) or more, got {self.chain_stride}")
        if self.prompt_refinements < 0:
            raise ValueError(f"prompt_refinements must be 0 (the prompt as given) or more, got "
                             f"{self.prompt_refinements}")
        if not 0 <= self.extra_looks <= MAX_EXTRA_LOOKS:
            raise ValueError(f"extra_looks must be 0 (the image as given) to {MAX_EXTRA_LOOKS}, got "
                             f"{self.extra_looks}")
        if not 0 <= self.background_sigma <= 0.5:
            raise ValueError(f"background_sigma must be 0 (none) to 0.5 of the input side, got "
                             f"{self.background_sigma}")
        if not 0 <= self.centre_snap <= 1:
            raise ValueError(f"centre_snap must be 0 (the model's own estimates) to 1 (a whole step), got "
                             f"{self.centre_snap}")
        if self.centre_snap and not self.centre_head:
            raise ValueError("centre_snap needs the centre head (centre_head=true)")
        if not 0 <= self.centre_agree <= 1:
            raise ValueError(f"centre_agree must be 0 (no check) to 1 (a whole step), got {self.centre_agree}")
        if self.centre_agree and not self.centre_snap:
            raise ValueError("centre_agree needs snapping (centre_snap > 0)")
        if not 0 <= self.loss_centre_weight <= 100:
            raise ValueError(f"loss_centre_weight must be 0 to 100, got {self.loss_centre_weight}")
        if self.hires_stride not in (1, 2, 4, 8):
            raise ValueError(f"hires_stride must be 1, 2, 4 or 8, got {self.hires_stride}")

    @property
    def heatmap_sigma_px(self) -> float:
        """The ground-truth Gaussian's sigma in input pixels."""
        return self.heatmap_sigma * self.image_size / self.embed_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> X2PConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        d = dict(d)
        if "volume_shape" in d:
            d["volume_shape"] = tuple(d["volume_shape"])
        return cls(**d)


PRESETS = {
    # the paper's sizes (3.24 M parameters, 130.8 GMACs at 512 x 512; BrickFormer of 4 layers, 8 heads,
    # hidden size 512); the paper leaves the VFE's and the fusion's widths open: these reach its totals
    "paper": X2PConfig(base_channels=32, sce_layers=4, sce_ffn_dim=512, fusion_channels=24,
                       volume_shape=(96, 64, 64), position_max_cycles=4.0,  # the 16 x 16 embedding grid: Nyquist 8
                       heatmap_prior=True, loss_3d_peak_sigma_mm=6.0, loss_routing_weight=0.1,
                       # a 100 mm field's volume was 50 mm deep, and a short lordotic run left it: 2.2 % of the
                       # vertebrae of engine 4's training crops lay outside at 0.5, 0.4 % at 0.7
                       volume_width=0.7),
    # trains on a 2-core CPU: 256 px, the same architecture at a smaller width
    "cpu": X2PConfig(image_size=256, base_channels=16, prompt_radius=24, d_model=64, embed_size=16,
                     pool_stride=4, top_k=8, volume_shape=(48, 24, 24)),
    # unit tests
    "tiny": X2PConfig(image_size=64, base_channels=4, prompt_radius=8, d_model=16, heads=2, fe_layers=1,
                      n_vertebrae=4, embed_size=4, sce_layers=1, sce_ffn_dim=32, pool_stride=2, top_k=2,
                      fusion_channels=4, volume_shape=(8, 6, 6)),
}
PRESETS["baseline"] = replace(PRESETS["paper"], lifting=True, heatmap_prior=False, loss_3d_peak_sigma_mm=0.0,
                              loss_routing_weight=0.0)
PRESETS["cpu-baseline"] = replace(PRESETS["cpu"], lifting=True)
for _name, _changes in {"no-prompt": dict(use_prompt=False), "no-sce": dict(use_sce=False, heatmap_prior=False),
                        "no-fusion": dict(use_fusion=False), "vanilla": dict(sce_attention="vanilla"),
                        "sparse": dict(sce_attention="sparse")}.items():
    PRESETS[_name] = replace(PRESETS["paper"], **_changes)
    PRESETS[f"cpu-{_name}"] = replace(PRESETS["cpu"], **_changes)


def parse_overrides(items) -> dict:
    """{field: value} from "field=value" strings, each value read as its field's type
    (booleans true/false, volume_shape as D,H,W); ValueError says what is wrong."""
    defaults = asdict(X2PConfig())
    out = {}
    for item in items:
        name, sep, text = item.partition("=")
        name, text = name.strip(), text.strip()
        if not sep or name not in defaults:
            raise ValueError(f"{item!r}: expected FIELD=VALUE with FIELD one of {', '.join(defaults)}")
        kind = type(defaults[name])
        try:
            if kind is bool:
                if text.lower() not in ("true", "false"):
                    raise ValueError("expected true or false")
                value = text.lower() == "true"
            elif kind is tuple:
                value = tuple(int(v) for v in text.split(","))
                if len(value) != len(defaults[name]):
                    raise ValueError(f"expected {len(defaults[name])} integers separated by commas")
            else:
                value = kind(text)
                if kind is float and not math.isfinite(value):
                    raise ValueError("not a finite number")
        except ValueError as e:
            raise ValueError(f"{item!r}: not a valid {name} ({e})") from None
        out[name] = value
    return out


def preset(name: str, **overrides) -> X2PConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown config {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    return replace(PRESETS[name], **overrides)

"""Localisation of one AP/LAT pair: checks the input, windows each view, runs
X2P-Net, and maps the result back to the input's pixels. The offline command,
evaluation and the ROS node all go through Localizer.localize.

Long films: a view taller than it is wide goes through square windows down the
image; the lowest vertebra found in one window is the prompt of the next, and
the windows' results are merged without duplicates. A view that shows more
than the model's N vertebrae in one patch goes on the same way: when all N are
found, a smaller window (the share of the image that training crops cover)
from just above the last one found gives the next N.

With a chain stride s (X2PConfig.chain_stride), the chain found so is estimated
again: vertebra s is prompted in a continuation window, which gives vertebrae s
to 2s - 1, then vertebra 2s, and so on: each vertebra is found fewer than s
places below a prompt, where the model is at its most accurate, instead of up
to N places down."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from . import geometry, preprocess
from .cuda_graph import GraphedForward
from .geometry import VIEWS
from .levels import level_order, levels_below
from .model import X2PNet, checkpoint
from .model.centres import snapped_estimates

TALL = 1.25  # height / width above which a view is a long film
CONTINUATION_SIDE = 0.7  # the continuation window's side as a share of the image (training crops: 0.7-1)


class InputError(ValueError):
    """Input that cannot give a trustworthy localisation."""


class ModelOutputError(RuntimeError):
    """The model returned NaN or Inf: the frame failed, and no pose may come of it."""


@dataclass
class Vertebra:
    index: int  # 0: the prompted vertebra, i: the i-th below it
    label: str
    present: bool
    confidence: float
    xyz_mm: np.ndarray  # (3,) reference frame
    pixels: dict = field(default_factory=dict)  # view -> (2,) projection of xyz_mm
    heatmap_pixels: dict = field(default_factory=dict)  # view -> (2,) peak of the view's heatmap


def check_inputs(images: dict, Ps: dict, prompts: dict) -> tuple[dict, dict, dict]:
    """Validated float images, P matrices and prompts; InputError says what is wrong."""
    out_images, out_P, out_prompts = {}, {}, {}
    for view in VIEWS:
        if view not in images or view not in Ps or view not in prompts:
            raise InputError(f"{view}: image, calibration and prompt are all needed")
        image = np.asarray(images[view])
        if image.ndim != 2 or min(image.shape) < 16:
            raise InputError(f"{view}: image must be 2D and at least 16 x 16 pixels, got shape {image.shape}")
        image = image.astype(np.float32)
        if not np.all(np.isfinite(image)):
            raise InputError(f"{view}: image contains NaN or Inf pixels")
        if float(image.max() - image.min()) <= 0:
            raise InputError(f"{view}: image is constant (no X-ray content)")
        try:
            P = geometry.validate_projection(Ps[view])
        except geometry.CalibrationError as e:
            raise InputError(f"{view}: {e}") from None
        prompt = np.asarray(prompts[view], dtype=np.float64).reshape(-1)
        h, w = image.shape
        if prompt.shape != (2,) or not np.all(np.isfinite(prompt)):
            raise InputError(f"{view}: prompt must be two finite numbers (u, v), got {prompts[view]!r}")
        if not geometry.inside_image(prompt, (w, h)):
            raise InputError(f"{view}: prompt ({prompt[0]:.1f}, {prompt[1]:.1f}) lies outside the {w} x {h} image")
        out_images[view], out_P[view], out_prompts[view] = image, P, prompt
    return out_images, out_P, out_prompts


class Localizer:
    # settings of how a pair is localised, each the checkpoint's config unless the node or x2p evaluate sets it,
    # with what 0 means
    SETTINGS = {"chain_stride": "the whole view's estimates", "prompt_refinements": "the prompt as given",
                "extra_looks": "the image as given", "centre_snap": "the model's own estimates",
                "centre_agree": "no check of the two views' snaps"}

    def __init__(self, model: X2PNet, device="cpu", presence_threshold: float | None = None, bf16: bool = False,
                 cuda_graph: bool = True):
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.bf16 = bf16 and self.device.type == "cuda"  # bfloat16 autocast: CUDA only
        # on CUDA the forward runs as a CUDA graph (cuda_graph.py), captured by warm_up or at the first pair;
        # eagerly if the capture fails
        self.cuda_graph = cuda_graph and self.device.type == "cuda"
        self._graphed: GraphedForward | None = None
        self.config = model.config
        self.threshold = model.config.presence_threshold if presence_threshold is None else presence_threshold
        self.chain_stride = model.config.chain_stride  # 0: one window gives the chain
        self.prompt_refinements = model.config.prompt_refinements  # 0: the prompt as given
        self.extra_looks = model.config.extra_looks  # 0: the image as given
        self.centre_snap = model.config.centre_snap  # 0: the model's own estimates
        self.centre_agree = model.config.centre_agree  # 0: every snap taken
        self.windows_run = 0  # forwards so far: a pair costs one per window

    def centre_snap_refusal(self, value: float) -> str:
        """Why this model cannot snap its chain at `value` (a share of its step), or ''."""
        if not 0 <= value <= 1:
            return f"centre snap must be 0 (the model's own estimates) to 1 (a whole step), got {value:g}"
        if value and not self.config.centre_head:
            return f"centre snap {value:g} needs a checkpoint with a centre head, and this one has none"
        return ""

    @classmethod
    def from_checkpoint(cls, path, device="cpu", presence_threshold=None, bf16=False, cuda_graph=True) -> Localizer:
        model, _ = checkpoint.load_model(path, device)
        return cls(model, device, presence_threshold, bf16, cuda_graph)

    @torch.no_grad()
    def warm_up(self):
        """One forward of a plausible pair at the model's size: the kernels are chosen and, on CUDA, the
        graph captured now, so that the first real pair is not the slow one."""
        from .model.summary import example_inputs
        self.forward(*(t.to(self.device) for t in example_inputs(self.config)))

    @property
    def runs_as_graph(self) -> bool:
        """Whether the forward has been captured and runs as a CUDA graph."""
        return self._graphed is not None

    def forward(self, images, P, prompt) -> dict:
        """The model's outputs for a batch of windows, run as this localizer runs it (device, bf16, graph)."""
        if self.cuda_graph:
            if self._graphed is None or not self._graphed.fits(images, P, prompt):
                try:
                    self._graphed = GraphedForward(self.model, images, P, prompt, self.bf16)
                except RuntimeError as e:  # a CUDA or driver version that cannot capture: eager from now on
                    logging.getLogger(__name__).warning("CUDA graph capture failed (%s); running eagerly", e)
                    self.cuda_graph, self._graphed = False, None
            if self._graphed is not None:
                return self._graphed(images, P, prompt)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.model(images, P, prompt)

    def _boxes(self, images, prompts, first: bool, stride: bool = False):
        boxes = {}
        for view in VIEWS:
            h, w = images[view].shape
            (px, py) = prompts[view]
            if h > TALL * w:  # long film: a w x w window from just above the prompt
                boxes[view] = (0.0, float(np.clip(py - 0.1 * w, 0, h - w)), float(w))
            elif first:
                boxes[view] = preprocess.full_box(w, h)
            else:  # the chain goes on: a smaller window from just above the prompt
                side = CONTINUATION_SIDE * min(w, h)
                # past N the window stays inside the image; a stride's keeps the prompt near its top, as in
                # training, and may reach past the image's bottom (its edge replicated)
                top = py - 0.1 * side if stride else np.clip(py - 0.1 * side, 0, h - side)
                boxes[view] = (float(np.clip(px - side / 2, 0, w - side)), float(max(top, 0.0)), side)
        return boxes

    @torch.no_grad()
    def _run_window(self, images, Ps, prompts, boxes):
        self.windows_run += 1
        size, n_looks = self.config.image_size, self.extra_looks + 1
        tiles, Pw, pw, A = [], [], [], {}
        for view in VIEWS:
            tile, P, A[view] = preprocess.window(images[view], Ps[view], boxes[view], size)
            tiles.append(preprocess.looks(preprocess.normalize(tile), n_looks))
            Pw.append(P)
            pw.append(geometry.transform_pixels(A[view], prompts[view])[0])
        # one batch of the looks, each with the same P and prompt
        t = lambda a: torch.as_tensor(a, dtype=torch.float32, device=self.device)  # noqa: E731
        P_looks = t(np.stack(Pw)).expand(n_looks, -1, -1, -1)  # (L, V, 3, 4)
        out = self.forward(t(np.stack(tiles, axis=1)[:, :, None]),  # (L, V, 1, S, S)
                           P_looks, t(np.stack(pw)).expand(n_looks, -1, -1))
        xyz = out["xyz"]
        if self.centre_snap and "centres" in out:  # the chain walked down onto the centres the model sees
            xyz = snapped_estimates(out, P_looks, (size, size), self.centre_snap, self.centre_agree)
        # over the looks: the median estimate (one look's misreading does not move it) and the mean presence
        outputs = {"3D positions": np.median(xyz.double().cpu().numpy(), axis=0),
                   "presence": out["presence"].float().cpu().numpy().mean(axis=0)}
        if "pixels" in out:
            outputs["heatmap peaks"] = np.median(out["pixels"].double().cpu().numpy(), axis=0)
        bad = [name for name, value in outputs.items() if not np.all(np.isfinite(value))]
        if bad:
            raise ModelOutputError(f"the model's {' and '.join(bad)} are not finite (NaN or Inf) for this pair; "
                                   f"no pose is given for it")
        heat = {}
        if "pixels" in out:
            for k, view in enumerate(VIEWS):  # window pixels -> input pixels
                inv = np.linalg.inv(A[view])
                heat[view] = geometry.transform_pixels(inv, outputs["heatmap peaks"][k])
        xyz, presence = outputs["3D positions"], outputs["presence"]
        return xyz, presence, heat

    @staticmethod
    def _vertebra(index, present, confidence, xyz, heat, k, Ps) -> Vertebra:
        return Vertebra(index, "", bool(present), float(confidence), xyz,
                        {v: geometry.project(Ps[v], xyz)[0] for v in VIEWS}, {v: heat[v][k] for v in heat})

    def _estimate_again_down_the_chain(self, images, Ps, found: list[Vertebra], s: int):
        """Vertebrae s, 2s, ... of the chain prompted again, each window's estimates replacing those of the
        s vertebrae below its prompt that it finds present. The whole view decides how many vertebrae the
        chain has (what the presence output was trained on); a window zoomed in near the bottom edge finds
        vertebrae there that the labels do not count."""
        prompt_from = found[s] if s < len(found) else None
        for offset in range(s, len(found), s):
            prompts = {v: prompt_from.pixels[v] for v in VIEWS}
            xyz, presence, heat = self._run_window(images, Ps, prompts, self._boxes(images, prompts, False, True))
            present = presence > self.threshold
            n_chain = int(np.argmin(present)) if not present.all() else len(present)
            for k in range(min(n_chain, s, len(found) - offset)):
                found[offset + k] = self._vertebra(offset + k, True, presence[k], xyz[k], heat, k, Ps)
            # the next prompt: this window's estimate of the vertebra s below, else the one before
            prompt_from = (self._vertebra(offset + s, True, presence[s], xyz[s], heat, s, Ps) if n_chain > s
                           else found[min(offset + s, len(found) - 1)])

    def _refined_prompts(self, images, Ps, prompts, refinements: int) -> dict:
        """The prompts moved onto the first window's estimate of the prompted vertebra, `refinements` times
        (while it is present): a model that places the vertebra better than it follows the click converges
        on the same prompt from anywhere on the vertebra."""
        for _ in range(refinements):
            xyz, presence, _ = self._run_window(images, Ps, prompts, self._boxes(images, prompts, True))
            if presence[0] <= self.threshold:
                break
            prompts = {v: np.clip(geometry.project(Ps[v], xyz[0])[0], 0, np.array(images[v].shape[::-1]) - 1)
                       for v in VIEWS}
        return prompts

    def localize(self, images: dict, Ps: dict, prompts: dict, reference_level: str = "") -> list[Vertebra]:
        """Vertebrae from the prompted one down, superior first; absent ones are
        listed with present=False up to the model's N."""
        images, Ps, prompts = check_inputs(images, Ps, prompts)
        if reference_level:  # before the model runs, not when naming what it found
            try:
                level_order(reference_level)
            except ValueError as e:
                raise InputError(f"reference level: {e}") from None
        stride = self.chain_stride  # read once: the node may set another while this pair runs
        prompts = self._refined_prompts(images, Ps, prompts, self.prompt_refinements)
        found: list[Vertebra] = []
        first_window = None
        offset = 0
        tall = any(images[v].shape[0] > TALL * images[v].shape[1] for v in VIEWS)
        while True:
            first = first_window is None
            boxes = self._boxes(images, prompts, first)
            xyz, presence, heat = self._run_window(images, Ps, prompts, boxes)
            first_window = first_window or (xyz, presence, heat)
            present = presence > self.threshold
            n_chain = int(np.argmin(present)) if not present.all() else len(present)  # contiguous from the prompt
            for k in range(n_chain):
                if offset + k < len(found):
                    continue  # the window above found it already
                found.append(self._vertebra(offset + k, True, presence[k], xyz[k], heat, k, Ps))
            at_bottom = all(boxes[v][1] + boxes[v][2] >= images[v].shape[0] - 1 for v in VIEWS)
            # a long film goes on down to its bottom; a view that fits one patch goes on
            # only past a full chain of N, from the whole view (which reaches its bottom) into
            # smaller windows until one reaches the bottom
            go_on = not at_bottom if tall else n_chain == len(present) and (first or not at_bottom)
            if not go_on or n_chain < 2:
                break
            next_prompts = {v: found[-1].pixels[v] for v in VIEWS}
            if all(next_prompts[v][1] <= prompts[v][1] + 1 for v in VIEWS):
                break  # no progress down the film
            prompts, offset = next_prompts, len(found) - 1
        if stride:
            self._estimate_again_down_the_chain(images, Ps, found, stride)
        # the rest of the first window's N outputs, as absent
        xyz, presence, heat = first_window
        for k in range(len(found), len(xyz)):
            found.append(self._vertebra(k, False, presence[k], xyz[k], heat, k, Ps))
        for vertebra, label in zip(found, levels_below(reference_level, len(found))):
            vertebra.label = label
        return found

"""Training and evaluation samples: a case folder -> tensors for X2P-Net.

A sample is a square window per view (in training a random crop of the same
vertical band in both views, or a share of whole images; the whole image
otherwise) resampled to the model's size, with P updated to match; the
targets are the vertebrae visible in both windows from the top-most one down,
and the prompt is the top-most one's projection (jittered in training)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .. import geometry, preprocess
from ..data import case_io
from . import appearance

# half range of the training prompt's jitter (x, y) in pixels of a 512 x 512 window (scaled to the window's
# size): 1.5 times the prompt sweep's displacements (`x2p evaluate --sweep`: 20 px sideways, 10 px up or
# down at 512), so that the sweep's extremes lie inside what training shows rather than on its edge (issue
# 12: at the sweep's range the sweep moved X2P-Net's MPE by 1.6 mm); `x2p train --prompt-jitter` sets another
PROMPT_JITTER_PX = (30.0, 15.0)
MAX_CENTRES = 32  # every vertebra a case can label (C1-S1 are 25), for the centre head's targets


class BiplanarDataset(Dataset):
    def __init__(self, root, names: list[str], image_size: int, n_vertebrae: int, train: bool = False,
                 prompt_jitter_px=PROMPT_JITTER_PX, seed: int = 0, full_share: float = 0.2,
                 augment: str = "strong", paired_looks: bool = False):
        self.randomise = appearance.randomiser(augment)  # of training images' look (training/appearance.py)
        self.augment = augment
        self.root, self.names = Path(root), list(names)
        self.size, self.n, self.train = image_size, n_vertebrae, train
        self.jitter_px = tuple(prompt_jitter_px)  # half range of the prompt jitter (x, y), pixels at 512
        self.seed = seed
        self.full_share = full_share  # training samples that show the whole images, uncropped
        self.paired_looks = paired_looks  # training samples also in a second random look ("other_images")
        self.epoch = 0
        if not self.names:
            raise case_io.DatasetError(f"{root}: no cases in this split")

    def __len__(self):
        return len(self.names)

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __getitem__(self, i):
        rng = np.random.default_rng([self.seed, self.epoch, i]) if self.train else None
        case = case_io.read_case(self.root / self.names[i])
        images, others, Ps = [], [], []
        inside = np.ones(len(case.labels), dtype=bool)
        if len(case.labels) > MAX_CENTRES:
            raise case_io.DatasetError(f"{self.names[i]}: {len(case.labels)} vertebrae, more than {MAX_CENTRES}")
        centres = np.zeros((2, MAX_CENTRES, 2))  # every labelled vertebra inside each window, whatever its index
        centre_inside = np.zeros((2, MAX_CENTRES), dtype=bool)
        crop = _random_crop(rng, self.full_share) if rng is not None else None
        for k, view in enumerate(geometry.VIEWS):
            v = case.views[view]
            box = preprocess.full_box(*v.size)
            if crop is not None:
                side_share, vertical, horizontal = crop
                box = _crop_box(box, v.size, side_share, vertical, horizontal[k])
            image, P, _ = preprocess.window(v.image.astype(np.float32), v.P, box, self.size)
            image = preprocess.normalize(image)
            if rng is not None:
                if self.paired_looks:
                    others.append(self.randomise(image, rng))
                image = self.randomise(image, rng)
            images.append(image)
            Ps.append(P)
            if len(case.labels):
                uv = geometry.project(P, case.xyz_mm)
                margin = 0.02 * self.size + 0.5  # from the edge, 2 % of the side from the edge pixels' centres
                in_view = geometry.inside_image(uv, (self.size, self.size), margin)
                inside &= in_view
                centres[k, :len(uv)], centre_inside[k, :len(uv)] = uv, in_view
        # the vertebrae visible in both views, from the top-most one down, without gaps
        first = int(np.argmax(inside)) if inside.any() else len(inside)
        last = first
        while last < len(inside) and inside[last]:
            last += 1
        xyz = np.zeros((self.n, 3))
        present = np.zeros(self.n, dtype=bool)
        pixels = np.zeros((2, self.n, 2))
        count = min(last - first, self.n)
        xyz[:count] = case.xyz_mm[first:first + count]
        present[:count] = True
        for k, P in enumerate(Ps):
            if count:
                pixels[k, :count] = geometry.project(P, xyz[:count])
        if count:
            prompt = pixels[:, 0].copy()
        else:  # nothing visible: a prompt at the centre, every vertebra absent
            prompt = np.full((2, 2), (self.size - 1) / 2)
        if rng is not None:
            prompt += rng.uniform(-1, 1, size=(2, 2)) * np.array(self.jitter_px) * self.size / 512.0
        sample = {
            "images": torch.from_numpy(np.stack(images)[:, None].astype(np.float32)),  # (V, 1, S, S)
            "P": torch.from_numpy(np.stack(Ps).astype(np.float32)),  # (V, 3, 4)
            "prompt": torch.from_numpy(prompt.astype(np.float32)),  # (V, 2)
            "xyz": torch.from_numpy(xyz.astype(np.float32)),  # (N, 3)
            "present": torch.from_numpy(present),  # (N,)
            "pixels": torch.from_numpy(pixels.astype(np.float32)),  # (V, N, 2)
            "centres": torch.from_numpy(centres.astype(np.float32)),  # (V, MAX_CENTRES, 2)
            "centre_inside": torch.from_numpy(centre_inside),  # (V, MAX_CENTRES)
            "first": first,  # index of the prompted vertebra in the case's list
            "name": self.names[i],  # the case folder, named when its batch goes wrong
        }
        if others:
            sample["other_images"] = torch.from_numpy(np.stack(others)[:, None].astype(np.float32))  # (V, 1, S, S)
        return sample


def with_paired_looks(batch: dict) -> dict:
    """A batch of samples with "other_images" -> one batch of twice the size: the samples, then the same
    samples in their other looks, with the same geometry and targets; "paired_looks" marks it (losses.py)."""
    doubled = {k: torch.cat([v, v]) if torch.is_tensor(v) else v + v if isinstance(v, list) else v
               for k, v in batch.items() if k != "other_images"}
    doubled["images"] = torch.cat([batch["images"], batch["other_images"]])
    doubled["paired_looks"] = True
    return doubled


def _random_crop(rng: np.random.Generator, full_share: float):
    """One crop for both views, or None for the whole images: (side share,
    vertical place, horizontal place of each view), places in [0, 1]. Both views
    share the vertical axis, so one side and one vertical place keep the same
    vertebrae in both; independent crops showed the lower indices far less often
    in training than in whole images (issue 12)."""
    if rng.uniform() < full_share:
        return None
    # zoom in to 0.7 of the side, or out to 1.3: fields framed loosely show the spine smaller
    return rng.uniform(0.7, 1.3), rng.uniform(), rng.uniform(size=2)


def _crop_box(full_box, size, side_share: float, vertical: float, horizontal: float):
    """The crop of one view: a square of side_share of the full box's side, inside the image
    (zoomed in) or around it (zoomed out)."""
    side = full_box[2] * side_share
    # from one edge to the other: inside the image when smaller, around it when larger
    return horizontal * (size[0] - side), vertical * (size[1] - side), side

"""`make demo`: the end-to-end slice on the built-in default.

Renders a few synthetic C-arm pairs, checks them, localises the vertebrae with
the shipped model (the prompt: the top-most vertebra, as a surgeon would
click), prints per-vertebra 3D errors against the ground truth and the latency,
and writes overlays and a contact sheet."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from . import metrics
from .data import case_io
from .data.contact_sheet import contact_sheet
from .data.synth import SynthConfig, synthesize
from .inference import VIEWS, Localizer
from .models import default_checkpoint
from .overlay import draw_overlay


def run(out: Path, cases: int, seed: int, checkpoint=None) -> int:
    checkpoint = checkpoint or default_checkpoint()
    localizer = Localizer.from_checkpoint(checkpoint)
    size = localizer.config.image_size
    data = out / "data"
    print(f"1. rendering {cases} synthetic AP/LAT pairs at {size} x {size} (seed {seed}) into {data}")
    synthesize(data, cases, seed=seed, config=SynthConfig(size=size), workers=1, progress=False)
    problems, summary = case_io.check_dataset(data)
    print(f"2. data check: {summary['readable']} cases, {len(problems)} problems")
    for p in problems:
        print(f"   problem: {p}")
    sheet = contact_sheet(data, out / "contact_sheet.png", cases=cases)
    print(f"3. localising with {checkpoint}")
    all_errors, latencies = [], []
    print(f"   {'case':<11}{'level':<7}{'present':<9}{'conf':>6}{'3D error mm':>13}")
    for name in case_io.list_cases(data):
        case = case_io.read_case(data / name)
        prompts = {v: case.pixels(v)[0] for v in VIEWS}
        images = {v: case.views[v].image for v in VIEWS}
        Ps = {v: case.views[v].P for v in VIEWS}
        start = time.perf_counter()
        found = localizer.localize(images, Ps, prompts, reference_level=case.labels[0])
        latencies.append(time.perf_counter() - start)
        errors = metrics.match_errors([f.xyz_mm for f in found], [f.present for f in found], case.xyz_mm)
        all_errors.append(errors)
        for f, e, label in zip(found, errors, case.labels):
            print(f"   {name:<11}{label:<7}{str(f.present):<9}{f.confidence:>6.2f}{e:>13.2f}")
        tiles = [draw_overlay(images[v], prompts[v], found, v, case.pixels(v)) for v in VIEWS]
        cv2.imwrite(str(out / f"overlay_{name}.png"), np.hstack(tiles))
    summary3d = metrics.summary(np.concatenate(all_errors))
    print(f"4. {summary3d['n']} vertebrae: MPE {summary3d['mpe']:.2f} mm, PCL@10 {100 * summary3d['pcl@10']:.1f} %, "
          f"PCL@20 {100 * summary3d['pcl@20']:.1f} %, missed {summary3d['missed']}; latency per pair "
          f"median {1000 * np.median(latencies[1:] or latencies):.0f} ms (CPU)")
    print(f"   overlays: {out}/overlay_*.png (green rings: ground truth, orange: X2P-Net, magenta: prompt)")
    print(f"   contact sheet: {sheet}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo_output", type=Path)
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--seed", type=int, default=20261124)
    parser.add_argument("--checkpoint", default=None)
    args = parser.parse_args(argv)
    return run(args.out, args.cases, args.seed, args.checkpoint)


if __name__ == "__main__":
    sys.exit(main())

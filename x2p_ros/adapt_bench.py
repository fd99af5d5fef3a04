"""The adaptation benchmark (`make bench-adapt`): `x2p adapt` on each real CT of
`../shared/realct`, the adapted and the generic model measured on the same
held-out pairs of that CT: other C-arm poses and other deformations than the
adaptation saw (their own seeds), every labelled level in the field. The one
place where the real CTs are trained on; the shipped default never is. Writes
a JSON that `make bench` puts into docs/BENCHMARKS.md."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .allocator import keep_freed_memory

EVAL_SEED = 99  # the held-out poses and deformations (adaptation: seeds 0 and 1)
ADAPTED = "lifting baseline adapted (`x2p adapt`)"


def evaluation_pairs(volume, vertebrae, folder: Path, pairs: int, size: int) -> list[str]:
    from .data.patient_pairs import planned_pairs, render_pairs
    from .training.adapt import AdaptConfig
    config = AdaptConfig()  # the adaptation's deformation ranges, every level in the field
    return render_pairs(volume, vertebrae, folder, planned_pairs("eval", EVAL_SEED, pairs, config.window, 1.0),
                        size, config.deform, progress=False)


def measure(checkpoint, folder: Path, names: list[str]) -> dict:
    from . import metrics
    from .inference import Localizer
    from .training.evaluate import evaluate_cases
    errors = evaluate_cases(Localizer.from_checkpoint(checkpoint), folder, names)
    summary = metrics.summary(errors["3d"])
    return {k: float(summary[k]) for k in ("pcl@10", "pcl@20", "mpe", "auc")} | \
        {"n": int(summary["n"]), "missed": int(summary["missed"])}


def run(root: Path, minutes: float, pairs: int, device: str) -> dict:
    import torch

    from .bench import machine
    from .data import realct
    from .data.ct_import import load_patient
    from .data.patient_pairs import sha256
    from .data.synth import ENGINE_VERSION
    from .models import baseline_checkpoint, default_checkpoint
    from .training.adapt import AdaptConfig, adapt
    generic_models = {"X2P-Net (default.pt)": default_checkpoint(), "lifting baseline (baseline.pt)":
                      baseline_checkpoint()}
    size = torch.load(baseline_checkpoint(), weights_only=True)["config"]["image_size"]
    result = {"minutes_budget": minutes, "pairs_per_ct": pairs, "eval_seed": EVAL_SEED, "machine": machine(),
              "device": device, "engine": ENGINE_VERSION, "models": {label: sha256(path)[:12] for label, path in
                                                                    generic_models.items()}, "cts": {}}
    for name in realct.CASES:
        given = realct.labels(root, name)
        volume, vertebrae = load_patient(root / name / "ct.nii.gz", **given)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            names = evaluation_pairs(volume, vertebrae, tmp / "eval", pairs, size)
            generic = {label: measure(ckpt, tmp / "eval", names) for label, ckpt in generic_models.items()}
            start = time.monotonic()
            patient = adapt(root / name / "ct.nii.gz", tmp / "patient.pt", init=baseline_checkpoint(), device=device,
                            config=AdaptConfig(minutes=minutes), progress=False, **given)
            took = (time.monotonic() - start) / 60
            adapted = measure(patient, tmp / "eval", names)
            meta = torch.load(patient, weights_only=True)["meta"]["adaptation"]
        result["cts"][name] = {"levels": [v["label"] for v in vertebrae], "models": {**generic, ADAPTED: adapted},
                               "adaptation_minutes": round(took, 1), "training_pairs": meta["training_pairs"],
                               "epochs": meta["epochs"]}
        for label, m in result["cts"][name]["models"].items():
            print(f"{name}, {label}: PCL@10 {100 * m['pcl@10']:.1f} %, MPE {m['mpe']:.2f} mm, missed {m['missed']}",
                  flush=True)
    return result


def section(path: Path) -> list[str]:
    """The adaptation benchmark's part of docs/BENCHMARKS.md, from its JSON."""
    lines = ["## Patient-specific adaptation (`x2p adapt`)", ""]
    if not path.is_file():
        return lines + [f"Not run yet: `make bench-adapt` (writes {path}).", ""]
    r = json.loads(path.read_text())
    from .data.patient_pairs import sha256
    from .data.synth import ENGINE_VERSION
    from .models import baseline_checkpoint, default_checkpoint
    shipped = {"X2P-Net (default.pt)": sha256(default_checkpoint())[:12],
               "lifting baseline (baseline.pt)": sha256(baseline_checkpoint())[:12]}
    if r.get("engine", 1) != ENGINE_VERSION or r.get("models") != shipped:
        lines += [f"**Stale**: measured with version {r.get('engine', 1)} of the data engine and the models shipped "
                  f"then (now: version {ENGINE_VERSION}, other shipped models); `make bench-adapt` measures it again "
                  "(about 50 minutes on 2 cores).", ""]
    lines += [f"`python -m x2p_ros.adapt_bench --minutes {r['minutes_budget']:g} --json {path}` on {r['machine']}: "
              f"`x2p adapt --minutes {r['minutes_budget']:g}` fine-tunes the shipped lifting baseline on DRR "
              "pairs of each real CT (random C-arm poses around 3-7 levels, random table deformations: segmental "
              "rotations and shifts, moved soft tissue); it and the generic shipped models are then measured on "
              f"{r['pairs_per_ct']} other pairs of the same CT (other poses, other deformations, seed "
              f"{r['eval_seed']}, every level in the field, the top-most vertebra as the prompt). The only place "
              "where the real CTs are trained on.", "",
              "| CT | model | PCL@10mm | PCL@20mm | MPE mm | vertebrae (missed) | adaptation |",
              "|---|---|---|---|---|---|---|"]
    for name, ct in r["cts"].items():
        for label, m in ct["models"].items():
            how = (f"{ct['adaptation_minutes']:g} min, {ct['training_pairs']} pairs, {ct['epochs']} epochs"
                   if label == ADAPTED else "none (generic)")
            lines.append(f"| {name} ({ct['levels'][0]}-{ct['levels'][-1]}) | {label} | {100 * m['pcl@10']:.1f} | "
                         f"{100 * m['pcl@20']:.1f} | {m['mpe']:.2f} | {m['n']} ({m['missed']}) | {how} |")
    for label in next(iter(r["cts"].values()))["models"]:
        ms = [ct["models"][label] for ct in r["cts"].values()]
        n = sum(m["n"] for m in ms)
        found = [(m["mpe"], m["n"] - m["missed"]) for m in ms if np.isfinite(m["mpe"])]
        mpe = sum(a * b for a, b in found) / max(sum(b for _, b in found), 1)
        pcl = sum(m["pcl@10"] * m["n"] for m in ms) / n
        goal = "(goal: PCL@10 >= 95 %, MPE <= 3 mm: " + ("met" if pcl >= 0.95 and mpe <= 3 else "not met") + ")"
        lines.append(f"| both CTs | {label} | {100 * pcl:.1f} | | {mpe:.2f} | {n} ({sum(m['missed'] for m in ms)}) "
                     f"| {goal if label == ADAPTED else ''} |")
    return lines + [""]


def main(argv=None) -> int:
    keep_freed_memory()
    from .data.realct import ROOT as REALCT
    parser = argparse.ArgumentParser(prog="python -m x2p_ros.adapt_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="adaptation budget per CT")
    parser.add_argument("--pairs", type=int, default=8, help="held-out evaluation pairs per CT")
    parser.add_argument("--realct", type=Path, default=REALCT)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--json", type=Path, default=Path("docs/adapt_result.json"))
    args = parser.parse_args(argv)
    if not (args.realct / "README.md").is_file():
        print(f"the real CTs are not at {args.realct}: nothing to adapt to", file=sys.stderr)
        return 2
    result = run(args.realct, args.minutes, args.pairs, args.device)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

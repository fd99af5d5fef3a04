"""`x2p evaluate`: the paper's metrics on a data split, with the ground-truth
top-most vertebra as the prompt (optionally displaced, as Figure 9).

3D: PCL@10/20 mm, MPE, AUC(10-50 mm); 2D per view (heatmap peaks): PCL@10/20
px, MPE, AUC(10-50 px); 3D errors per level and per index below the prompt, and
identity swaps (a vertebra found nearer to another's ground truth),
spurious vertebrae (present predictions past the last ground-truth one), and
how the steps from one vertebra to the next follow the true ones; a
ground-truth vertebra without a present prediction is a miss."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .. import metrics, preprocess
from ..data import case_io
from ..data.synth import SynthConfig
from ..geometry import VIEWS
from ..inference import InputError, Localizer, ModelOutputError
from . import appearance

SHORT_FIELD = SynthConfig.short_field  # vertebrae in a C-arm-like field of the data engine
# presence thresholds tried: 0.02, 0.05, then 0.1 .. 0.9 in steps of 0.05 (the shipped X2P-Net scored best at
# 0.1, the lowest of 0.1 .. 0.9, where the grid began)
PRESENCE_GRID = (0.02, 0.05) + tuple(round(0.1 + 0.05 * i, 2) for i in range(17))


def field_kind(n_vertebrae: int) -> str:
    low, high = SHORT_FIELD
    return f"short field ({low}-{high})" if n_vertebrae <= high else f"long field ({high + 1}+)"


def evaluate_cases(localizer: Localizer, root, names, prompt_offset_px=(0.0, 0.0), look_seed=None) -> dict:
    """Errors concatenated over cases: {'3d', 'ap', 'lat'} arrays and, per 3D
    error, its level, its index below the prompt and its case's field kind
    ('levels', 'indices', 'fields'); 'swaps': present predictions nearer to
    another vertebra's ground truth; 'spurious': present predictions past the
    last ground-truth vertebra; 'steps': (true, predicted) distances between
    consecutive vertebrae found (metrics.steps), and 'steps_2d' {view: the same of the heatmap peaks, px};
    'pairs' localised and the model's 'windows' (forwards)
    for them. A case whose model output is not finite is a
    failed frame: every vertebra of it a miss, and its name and the reason in
    'failed'. look_seed: each view is first given a random look (appearance.strong, as training draws it, from
    this seed, the case's place in names and the view), so that the split shows how the estimates depend on
    how the images look."""
    errors = {"3d": [], "ap": [], "lat": [], "levels": [], "indices": [], "fields": [], "failed": [], "swaps": 0,
              "spurious": 0, "pairs": 0, "steps": [], "steps_2d": {v: [] for v in VIEWS}}
    windows_before = localizer.windows_run
    has_heatmaps = localizer.config.use_sce or localizer.config.lifting
    for i, name in enumerate(names):
        case = case_io.read_case(Path(root) / name)
        if not case.labels:
            continue
        gt_px = {v: case.pixels(v) for v in VIEWS}
        # displacements are given for 512 x 512 images (the paper's) and scaled to this one
        prompts = {v: gt_px[v][0] + np.asarray(prompt_offset_px) * case.views[v].size[0] / 512.0 for v in VIEWS}
        prompts = {v: np.clip(p, 0, np.array(case.views[v].size) - 1) for v, p in prompts.items()}
        errors["pairs"] += 1
        errors["levels"] += case.labels
        errors["indices"] += list(range(len(case.labels)))
        errors["fields"] += [field_kind(len(case.labels))] * len(case.labels)
        try:
            images = {v: case.views[v].image for v in VIEWS}
            if look_seed is not None:
                images = {v: appearance.strong(preprocess.normalize(images[v]),
                                               np.random.default_rng([look_seed, i, k])) for k, v in enumerate(VIEWS)}
            found = localizer.localize(images, {v: case.views[v].P for v in VIEWS}, prompts)
        except ModelOutputError as e:
            errors["failed"].append({"case": name, "error": str(e)})
            for key in ("3d",) + (VIEWS if has_heatmaps else ()):
                errors[key].append(np.full(len(case.labels), np.inf))
            continue
        present = [f.present for f in found]
        errors["3d"].append(metrics.match_errors([f.xyz_mm for f in found], present, case.xyz_mm))
        errors["swaps"] += metrics.identity_swaps([f.xyz_mm for f in found], present, case.xyz_mm)
        errors["spurious"] += metrics.spurious(present, len(case.labels))
        errors["steps"].append(metrics.steps([f.xyz_mm for f in found], present, case.xyz_mm))
        for v in VIEWS:
            if found and found[0].heatmap_pixels:
                peaks = [f.heatmap_pixels[v] for f in found]
                errors[v].append(metrics.match_errors(peaks, present, gt_px[v]))
                errors["steps_2d"][v].append(metrics.steps(peaks, present, gt_px[v]))
    errors["windows"] = localizer.windows_run - windows_before
    return {k: (np.concatenate(v) if k in ("3d",) + VIEWS and v else v) for k, v in errors.items()}


def report(errors: dict) -> dict:
    out = {"3d_mm": metrics.summary(errors["3d"])}
    for v in VIEWS:
        if len(errors[v]):
            out[f"2d_{v}_px"] = metrics.summary(errors[v])
    levels = {}
    for level, e in zip(errors["levels"], errors["3d"]):
        levels.setdefault(level, []).append(e)
    out["per_level_mpe_mm"] = {k: metrics.mpe(v) for k, v in levels.items()}
    out["per_level_missed"] = {k: int(np.sum(~np.isfinite(v))) for k, v in levels.items()}
    indices = np.asarray(errors["indices"])
    out["per_index_3d_mm"] = {int(k): metrics.summary(errors["3d"][indices == k]) for k in np.unique(indices)}
    out["identity_swaps"] = errors["swaps"]
    out["spurious"] = errors["spurious"]
    out["steps"] = step_report(errors)
    out["steps_2d"] = steps_2d(errors)
    out["windows_per_pair"] = errors["windows"] / max(errors["pairs"], 1)  # model forwards per AP/LAT pair
    fields = {}
    for kind, e in zip(errors["fields"], errors["3d"]):
        fields.setdefault(kind, []).append(e)
    out["by_field_3d_mm"] = {k: metrics.summary(np.array(v)) for k, v in sorted(fields.items(), reverse=True)}
    return out


def step_report(*errors: dict, view: str | None = None) -> dict:
    """metrics.step_summary over every case's steps of one or more evaluate_cases results: the 3D estimates'
    (mm), or with a view its heatmap peaks' (px)."""
    steps = [s for e in errors for s in (e["steps"] if view is None else e["steps_2d"][view])]
    unit = "mm" if view is None else "px"
    if not steps:
        return metrics.step_summary([], [], unit)
    return metrics.step_summary(np.concatenate([t for t, _ in steps]), np.concatenate([p for _, p in steps]), unit)


def steps_2d(*errors: dict) -> dict:
    """{view: step_report of its heatmap peaks} for the views that have them: whether the 2D branch reads the
    spacing where the 3D output does not."""
    return {v: step_report(*errors, view=v) for v in VIEWS if any(e["steps_2d"][v] for e in errors)}


def plot_pcl(errors: dict, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.linspace(0, 50, 201)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    axes[0].plot(t, [metrics.pcl(errors["3d"], x) for x in t])
    axes[0].set(xlabel="threshold (mm)", ylabel="PCL", title="3D", ylim=(0, 1.02))
    for v in VIEWS:
        if len(errors[v]):
            axes[1].plot(t, [metrics.pcl(errors[v], x) for x in t], label=v.upper())
    axes[1].set(xlabel="threshold (px)", title="2D", ylim=(0, 1.02))
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def plot_levels(result: dict, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..levels import level_order
    levels = sorted(result["per_level_mpe_mm"], key=level_order)
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * len(levels)), 3.5))
    ax.bar(levels, [result["per_level_mpe_mm"][k] for k in levels])
    ax.set(ylabel="3D MPE (mm)", title="per level")
    ax.tick_params(axis="x", rotation=90)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def plot_sweep(sweep: dict, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for axis in ("x", "y"):
        pts = sorted((d, r["mpe"]) for (a, d), r in sweep.items() if a == axis)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"displaced along {axis}")
    ax.set(xlabel="prompt displacement (px at 512 x 512)", ylabel="3D MPE (mm)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def split_names(data, split: str, limit: int | None = None) -> list[str]:
    """The case names of a split ('train', 'val', 'test') or of every case ('all'), the first limit of them."""
    return (case_io.list_cases(data) if split == "all" else case_io.read_split(data, split))[:limit]


def presence_table(model, root, names, device="cpu", grid=PRESENCE_GRID) -> list[dict]:
    """Per presence threshold, over the cases: vertebrae within 10 mm, missed, spurious, and the score,
    within 10 mm minus spurious: a pose of a vertebra that is not there costs as much as a good one gains."""
    rows = []
    for threshold in grid:
        errors = evaluate_cases(Localizer(model, device, presence_threshold=threshold), root, names)
        e = np.asarray(errors["3d"], dtype=np.float64)  # an empty list where no case has a labelled vertebra
        within = int(np.sum(e <= 10.0))
        rows.append({"threshold": threshold, "within_10mm": within, "vertebrae": int(e.size),
                     "missed": int(np.sum(~np.isfinite(e))), "spurious": errors["spurious"],
                     "score": within - errors["spurious"]})
    return rows


def best_presence_threshold(rows: list[dict]) -> float:
    """The threshold of the highest score; of equal ones the highest threshold (the fewest poses given)."""
    return max(rows, key=lambda r: (r["score"], r["threshold"]))["threshold"]


def real_anatomy(localizer: Localizer, root, poses: int | None = None) -> dict:
    """The real-anatomy validation row (x2p_ros/data/realct.py): 3D metrics over the real CTs' pairs, and per CT."""
    from ..data import realct
    poses = poses or realct.POSES
    per_ct = realct.validation_errors(localizer, root, poses)
    joined = np.concatenate([e["3d"] for e in per_ct.values()])
    return {"root": str(root), "pairs": poses * len(per_ct), "3d_mm": metrics.summary(joined),
            "steps": step_report(*per_ct.values()), "steps_2d": steps_2d(*per_ct.values()),
            "per_ct": {name: metrics.summary(e["3d"]) for name, e in per_ct.items()},
            "per_ct_steps": {name: step_report(e) for name, e in per_ct.items()},
            "per_ct_steps_2d": {name: steps_2d(e) for name, e in per_ct.items()}}


def evaluate(data, checkpoint_path, split="test", out=None, device="cpu", sweep=False, limit=None,
             realct_root=None, chain_stride: int | None = None, prompt_refinements: int | None = None,
             extra_looks: int | None = None, look_seed: int | None = None, centre_snap: float | None = None,
             centre_agree: float | None = None) -> dict:
    """Metrics of a split ('train', 'val', 'test') or of every case ('all'), and the real-anatomy
    validation row when realct_root holds the real CTs; chain_stride, prompt_refinements, extra_looks,
    centre_snap and centre_agree: the checkpoint's unless given; look_seed: the split's images in random looks
    (evaluate_cases)."""
    localizer = Localizer.from_checkpoint(checkpoint_path, device)
    if centre_snap is not None:
        refusal = localizer.centre_snap_refusal(centre_snap)
        if refusal:
            raise InputError(f"{checkpoint_path}: {refusal}")
        localizer.centre_snap = centre_snap
    if centre_agree is not None:
        if not 0 <= centre_agree <= 1:
            raise InputError(f"centre agree must be 0 (no check) to 1 (a whole step), got {centre_agree:g}")
        localizer.centre_agree = centre_agree
    for name, value in (("chain_stride", chain_stride), ("prompt_refinements", prompt_refinements),
                        ("extra_looks", extra_looks)):
        if value is not None:
            if value < 0:
                raise InputError(f"{name.replace('_', ' ')} must be 0 ({Localizer.SETTINGS[name]}) or more, "
                                 f"got {value}")
            if name == "extra_looks" and value > preprocess.MAX_EXTRA_LOOKS:
                raise InputError(f"extra looks must be at most {preprocess.MAX_EXTRA_LOOKS}, got {value}")
            setattr(localizer, name, value)
    names = split_names(data, split, limit)
    errors = evaluate_cases(localizer, data, names, look_seed=look_seed)
    result = {"data": str(data), "split": split, "cases": len(names), "checkpoint": str(checkpoint_path),
              "chain_stride": localizer.chain_stride, "prompt_refinements": localizer.prompt_refinements,
              "extra_looks": localizer.extra_looks, "centre_snap": localizer.centre_snap,
              "centre_agree": localizer.centre_agree, "look_seed": look_seed,
              **report(errors), "failed_cases": errors["failed"]}
    if realct_root is not None:
        result["real_anatomy"] = real_anatomy(localizer, realct_root)
    if sweep:
        table = {}
        for axis, values in (("x", (-20, -10, 10, 20)), ("y", (-10, -5, 5, 10))):
            for d in values:
                offset = (d, 0) if axis == "x" else (0, d)
                table[(axis, d)] = metrics.summary(evaluate_cases(localizer, data, names, offset, look_seed)["3d"])
        table[("x", 0)] = table[("y", 0)] = result["3d_mm"]
        result["prompt_sweep"] = {f"{a}{d:+d}": r for (a, d), r in sorted(table.items())}
        result["prompt_sweep_max_mpe_change_mm"] = max(abs(r["mpe"] - result["3d_mm"]["mpe"]) for r in table.values())
    if out:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(result, indent=1))
        plot_pcl(errors, out / "pcl.png")
        plot_levels(result, out / "per_level.png")
        if sweep:
            plot_sweep(table, out / "prompt_sweep.png")
    return result

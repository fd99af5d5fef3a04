"""`make bench`: the package's speed and accuracy figures, written to
docs/BENCHMARKS.md with the commands that made them.

- data engine: seconds per synthetic case at 512 x 512 (one process, and one
  worker per core), CPU and CUDA when present;
- model size: parameters and GMACs per unit against the paper's;
- the shipped X2P-Net and the shipped lifting baseline: 3D/2D metrics on a
  held-out synthetic test split made from a fixed seed (all, short and long
  fields), prompt-displacement robustness, latency per pair (median after
  warm-up) with peak memory, and the goals of issue 5 met or not."""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from . import ablation_bench, adapt_bench
from .allocator import keep_freed_memory
from .data import case_io, realct
from .data.synth import ENGINE_VERSION, SynthConfig, make_case, synthesize
from .geometry import VIEWS
from .model import preset
from .model.summary import example_inputs, model_summary

# the paper's BiSpineX figures at 512 x 512: PCL@10, PCL@20, MPE mm, AUC, 2D MPE LAT / AP px
PAPER_ROWS = {"X2P-Net (paper, BiSpineX, 512 px)": (96.9, 98.8, 2.99, 0.9923, "5.84 / 6.14"),
              "SCN-Net + triangulation (paper's lifting baseline, 512 px)": (90.5, 92.6, 8.94, 0.9274, "3.78 / 4.96")}
TEST_SEED = 777  # the held-out test split: never used for training (training seeds: 1000 and up)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return f"{os.cpu_count()} cores ({cpu}), GPU: {gpu}, torch {torch.__version__}, Python {platform.python_version()}"


def bench_synth(cases: int, size: int) -> tuple[list[str], float]:
    """The table's rows, and the seconds per case of one process on the CPU."""
    rows = []
    make_case(0, SynthConfig(size=size))  # warm-up
    start = time.perf_counter()
    for seed in range(cases):
        make_case(seed, SynthConfig(size=size))
    one_process = (time.perf_counter() - start) / cases
    rows.append(f"| CPU, one process | {size} | {one_process:.2f} |")
    tmp = Path(tempfile.mkdtemp())
    try:
        start = time.perf_counter()
        synthesize(tmp / "d", cases, seed=0, config=SynthConfig(size=size), workers=os.cpu_count(), progress=False)
        rows.append(f"| CPU, {os.cpu_count()} workers (`x2p data synth`) | {size} | "
                    f"{(time.perf_counter() - start) / cases:.2f} |")
    finally:
        shutil.rmtree(tmp)
    if torch.cuda.is_available():
        make_case(0, SynthConfig(size=size), device="cuda")
        start = time.perf_counter()
        for seed in range(cases):
            make_case(seed, SynthConfig(size=size), device="cuda")
        rows.append(f"| CUDA ({torch.cuda.get_device_name(0)}), one process | {size} | "
                    f"{(time.perf_counter() - start) / cases:.2f} |")
    return rows, one_process


def bench_latency(config: dict, device: str, repeats: int = 10, bf16: bool = False, graph: bool = False,
                  captured: list | None = None) -> tuple[float, float]:
    """Median seconds per pair after warm-up, and peak memory in MB (GPU: allocator
    peak; CPU: the resident peak of the fresh process that measures it). On CUDA, bf16
    and graph choose how the Localizer runs the forward (bfloat16 autocast, a CUDA graph);
    captured, if given, gets whether the forward ran as a graph (a failed capture runs eagerly)."""
    from .inference import Localizer
    from .model import build_model
    from .model.config import X2PConfig
    localizer = Localizer(build_model(X2PConfig.from_dict(config)), device, bf16=bf16, cuda_graph=graph)
    images, P, prompt = (t.to(device) for t in example_inputs(localizer.config))
    times = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        for i in range(repeats + 3):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            localizer.forward(images, P, prompt)
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= 3:  # the first calls choose kernels and capture the graph
                times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device == "cuda" else resident_peak_mb()
    if captured is not None:
        captured.append(localizer.runs_as_graph)
    return float(np.median(times)), peak


# how the Localizer can run the forward on a GPU: (bf16, CUDA graph); the node's default is fp32 with a graph
GPU_MODES = {"fp32, eager": (False, False), "bf16, eager": (True, False), "fp32, CUDA graph": (False, True),
             "bf16, CUDA graph": (True, True)}
GPU_LATENCY_GOAL_MS = 5.0  # issue 12: per 512 x 512 pair at the paper's sizes


def gpu_latency(out: Path) -> dict:
    """`python -m x2p_ros.bench --gpu-latency JSON` on a GPU machine: every GPU_MODES row for the
    `paper` and `baseline` configs (untrained weights: the time does not depend on them)."""
    rows = []
    for name in ("paper", "baseline"):
        for mode, (bf16, graph) in GPU_MODES.items():
            captured = []
            seconds, peak = bench_latency(preset(name).to_dict(), "cuda", repeats=100, bf16=bf16, graph=graph,
                                          captured=captured)
            rows.append({"config": name, "mode": mode, "ms": 1000 * seconds, "peak_mb": peak,
                         "graph_captured": captured[0]})
            print(f"{name:9s} {mode:17s} {1000 * seconds:7.2f} ms {peak:7.0f} MB", flush=True)
    result = {"command": f"python -m x2p_ros.bench --gpu-latency {out}", "machine": machine(),
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return result


def capture_failed(row: dict) -> bool:
    """A CUDA-graph row whose capture failed: it ran eagerly, so it is shown as such and never counts as
    the graph's figure."""
    return GPU_MODES[row["mode"]][1] and not row.get("graph_captured", True)


def gpu_latency_section(path: Path) -> list[str]:
    lines = ["## GPU latency (issue 12)", ""]
    if not path.is_file():
        return lines + [f"Not measured yet: `python -m x2p_ros.bench --gpu-latency {path}` on a GPU machine.", ""]
    r = json.loads(path.read_text())
    lines += [f"`{r['command']}` on {r['machine']} (torch {r['torch']}, {r['date']}). The Localizer's forward for one "
              "512 x 512 AP/LAT pair (batch 1), median of 100 after 3 warm-up calls; memory: the allocator's peak. "
              "The node runs fp32 with a CUDA graph unless its `precision` is bf16.", "",
              "| config | how | median latency | peak memory |", "|---|---|---|---|"]
    ran = [(row, capture_failed(row)) for row in r["rows"]]
    lines += [f"| `{row['config']}` | {row['mode']} | {'capture failed: ran eagerly in ' if failed else ''}"
              f"{row['ms']:.2f} ms | {row['peak_mb']:.0f} MB |" for row, failed in ran]
    paper = {row["mode"]: row["ms"] for row, failed in ran if row["config"] == "paper" and not failed}
    default = paper.get("fp32, CUDA graph")
    best = min(paper, key=paper.get)
    met = "yes" if default is not None and default <= GPU_LATENCY_GOAL_MS else (
        f"with `precision: bf16` ({best})" if paper[best] <= GPU_LATENCY_GOAL_MS and "bf16" in best else "no")
    node = f"{default:.2f} ms" if default is not None else "not measured (the capture failed)"
    lines += ["", f"Goal: at most {GPU_LATENCY_GOAL_MS:g} ms per pair at the paper's sizes. Node default (fp32, CUDA "
              f"graph): {node}; fastest measured ({best}): {paper[best]:.2f} ms. Met: {met}.", ""]
    return lines + ([r["note"], ""] if "note" in r else [])


def resident_peak_mb() -> float:
    """This process's resident peak. Linux's VmHWM belongs to the address space, so
    it starts afresh in a spawned process; ru_maxrss would carry the parent's
    peak over fork and exec."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def latency_in_fresh_process(config: dict, device: str) -> tuple[float, float]:
    import multiprocessing
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(bench_latency, (config, device))


def write_report(out: Path, sections: list[str]):
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(sections) + "\n")


def main(argv=None) -> int:
    keep_freed_memory()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="docs/BENCHMARKS.md", type=Path)
    parser.add_argument("--synth-cases", type=int, default=6)
    parser.add_argument("--test-cases", type=int, default=40)
    parser.add_argument("--checkpoint", default=None, help="X2P-Net; default: the shipped model")
    parser.add_argument("--baseline", default=None, help="the lifting baseline; default: the shipped one")
    parser.add_argument("--gpu-latency", type=Path, metavar="JSON",
                        help="only measure the GPU latency table (on a GPU machine) into this JSON")
    args = parser.parse_args(argv)
    if args.gpu_latency:
        if not torch.cuda.is_available():
            parser.exit(2, "bench: --gpu-latency needs a CUDA GPU, and this machine has none\n")
        gpu_latency(args.gpu_latency)
        return 0
    torch.manual_seed(0)
    sections = ["# Benchmarks", "",
                f"Made by `make bench` (`python -m x2p_ros.bench --out {args.out}`) on {time.strftime('%Y-%m-%d')}.",
                f"Machine: {machine()}.", ""]

    sections += ["## Data engine", "", "Seconds per synthetic case (phantom, two DRRs, PNGs), "
                 f"{args.synth_cases} cases. Goal: under 3 s per case at 512 x 512 on 2 cores.", "",
                 "| where | size | s / case |", "|---|---|---|"]
    synth_rows, synth_seconds = bench_synth(args.synth_cases, 512)
    sections += [*synth_rows, ""]

    sections += ["## Model size", "", "Counted with `torch.utils.flop_counter` for one AP/LAT pair "
                 "(`x2p model summary --config NAME`). Paper: 3.24 M parameters, 130.8 GMACs at 512 x 512.", "",
                 "| config | input | unit | parameters | GMACs |", "|---|---|---|---|---|"]
    for name in ("paper", "cpu", "vanilla", "baseline"):
        cfg = preset(name)
        for unit, row in model_summary(cfg).items():
            sections.append(f"| {name} | {cfg.image_size} | {unit} | {row['params']:,} | {row['gmacs']:.2f} |")
    sections += ["", "BrickFormer against vanilla attention in the SCE unit: compare the `sce` rows of "
                 "`paper` and `vanilla` (same input, same embeddings). `baseline` is the lifting approach "
                 "(per-view heatmaps and triangulation) on the same VFE and prompt FE.", ""]

    from .models import baseline_checkpoint, default_checkpoint
    checkpoints = {"X2P-Net": Path(args.checkpoint) if args.checkpoint else default_checkpoint(),
                   "lifting baseline": Path(args.baseline) if args.baseline else baseline_checkpoint()}
    missing = [str(p) for p in checkpoints.values() if not p.is_file()]
    if missing:
        sections += ["## Accuracy and latency", "", f"Not measured: no checkpoint at {', '.join(missing)}.", ""]
    else:
        sections += bench_models(checkpoints, args.test_cases, sheet=args.out.parent / "realism_sheet.png",
                                 gpu_json=args.out.parent / "gpu_latency.json",
                                 synth_seconds=synth_seconds)
    sections += gpu_latency_section(args.out.parent / "gpu_latency.json")
    sections += ablation_bench.section(args.out.parent / "ablation_result.json")
    sections += adapt_bench.section(args.out.parent / "adapt_result.json")
    sections += soak_section(args.out.parent / "soak_result.json")
    write_report(args.out, sections)
    print(args.out.read_text())
    return 0


def soak_section(path: Path) -> list[str]:
    lines = ["## The node under load (soak)", ""]
    if not path.is_file():
        return lines + [f"Not run yet: `python -m x2p_ros.soak --minutes 10 --json {path}`.", ""]
    r = json.loads(path.read_text())
    return lines + [
        f"`python -m x2p_ros.soak --minutes {r['minutes']:g} --json {path}`: carm_sim streams "
        f"{r['size']} x {r['size']} mono16 images at {r['rate_hz_per_view']:g} Hz per view (the C-arm moves a "
        f"little every fourth frame) into x2p_localizer with the shipped model on the CPU; the image publisher is "
        f"restarted half-way. On these 2 cores the publisher (60 images of 512 KB a second, written in Python) and "
        f"the node's image intake take most of the CPU, so the model runs several times slower than alone "
        f"(latency table above): the figures show behaviour under saturation.",
        "", "| figure | value | goal |", "|---|---|---|",
        f"| resident memory after warm-up / at the end | {r['rss_mb_after_warmup']:.0f} / {r['rss_mb_end']:.0f} MB "
        f"({r['rss_growth_pct']:+.1f} %) | under +5 % |",
        f"| key frames / published / failed / skipped (replaced while waiting) | {r['key_frames']} / "
        f"{r['published']} / {r['failed']} / {r['skipped_frames']} | every key frame accounted for |",
        f"| key frames not accounted for | {r['unaccounted_key_frames']} | 0 (1: one still running) |",
        f"| unpaired frames | {r['unpaired_frames']} | reported |",
        f"| model latency p50 / p99 | {r['latency_ms_p50']:.0f} / {r['latency_ms_p99']:.0f} ms | reported |",
        f"| node's own work per key frame (input handling + outputs), wall time p50 / p99 | "
        f"{r['overhead_ms_p50']:.1f} / {r['overhead_ms_p99']:.1f} ms | at most 10 ms |",
        f"| the same as CPU time of the node's threads p50 / p99 | {r.get('overhead_cpu_ms_p50', float('nan')):.1f} / "
        f"{r.get('overhead_cpu_ms_p99', float('nan')):.1f} ms | at most 10 ms |",
        f"| poses after the publisher restart | {r['poses_after_restart']} | resumes by itself |", "",
        f"Resident memory every 30 s (MB): {', '.join(f'{x:.0f}' for x in r.get('rss_mb_every_30s', []))}.", ""]


def test_split(size: int, cases: int) -> Path:
    """The held-out test split at this size (made once, then reused): every case is a test case."""
    config = SynthConfig(size=size)
    data = realct.cache_folder(f"test-s{TEST_SEED}-n{cases}", config)
    synthesize(data, cases, seed=TEST_SEED, config=config, progress=False)
    (data / "test.txt").write_text("".join(f"case_{i:05d}\n" for i in range(cases)))
    return data


def realism_sheet(root: Path, size: int, test_cases: int, out_png: Path, pairs_per_ct: int = 2,
                  poses: int = realct.POSES) -> list[str]:
    """Synthetic test pairs beside the real CTs' pairs at the same size and window
    (docs/realism_sheet.png), and the report's line about it, or why there is none."""
    if not realct.available(root):
        return [f"No realism contact sheet: the real CTs are not at {root}.", ""]
    from .data.contact_sheet import side_by_side
    real = realct.split(root, size, poses)
    real_cases = [real / f"{name}_pose{seed}" for name in realct.CASES for seed in range(pairs_per_ct)]
    synthetic = test_split(size, test_cases)
    side_by_side([synthetic / f"case_{i:05d}" for i in range(len(real_cases))], real_cases, out_png)
    return [f"Realism: synthetic test pairs (left) beside the real CTs' pairs (right) at {size} x {size}, "
            f"the same display window: [{out_png.name}]({out_png.name}).", "",
            *disc_contrast_rows({"synthetic test split": [synthetic / n for n in case_io.read_split(synthetic, "test")],
                                 "real CTs": [real / n for n in case_io.read_split(real, "test")]}), ""]


def disc_contrast_rows(sets: dict) -> list[str]:
    """The discs' brightness against the bodies along the spine (x2p_ros/data/realism.py), per view, in
    each set of case folders: median and 10th-90th percentile over its pairs."""
    from .data.realism import disc_contrast
    lines = ["Discs against vertebral bodies along the spine, in the model's normalised input (its window spans "
             "2; negative: darker discs), median [10th, 90th percentile] over the pairs:", "",
             "| pairs | AP | LAT |", "|---|---|---|"]
    for label, folders in sets.items():
        cases = [case_io.read_case(folder) for folder in folders]
        cells = []
        for view in VIEWS:
            values = [value for case in cases
                      if (value := disc_contrast(case.views[view].image, case.pixels(view))) is not None]
            if not values:  # no two vertebrae inside the view
                cells.append("-")
                continue
            lo, mid, hi = np.percentile(values, [10, 50, 90])
            cells.append(f"{mid:+.3f} [{lo:+.3f}, {hi:+.3f}]")
        lines.append(f"| {label} ({len(folders)}) | {' | '.join(cells)} |")
    return lines


def realct_rows(checkpoints: dict, root: Path, poses: int = realct.POSES) -> tuple[list[str], dict]:
    """The real-anatomy validation rows, or why there are none, and {method: 3D summary over both CTs}."""
    lines = ["", "### Real anatomy (validation only)", ""]
    if not realct.available(root):
        return lines + [f"Skipped: the real CTs are not at {root} (`../shared/realct` beside the project).", ""], {}
    from . import metrics
    from .inference import Localizer
    from .training.evaluate import step_report
    lines += [f"DRR pairs of the two labelled patient CTs in `{os.path.relpath(root)}` ({', '.join(realct.CASES)}), "
              f"{poses} random C-arm poses each (`x2p data import-ct --seed 0..{poses - 1}`, the data engine's "
              "physics), the ground-truth top-most vertebra as the prompt. They are the real-anatomy validation "
              "set: no model was trained on them, and no checkpoint or setting was chosen by them. A vertebra "
              "whose body is cut by a CT's edge is left out (T11 and T12 of the TotalSegmentator example).", "",
              "| method | PCL@10mm | PCL@20mm | MPE mm | AUC | 2D MPE LAT / AP px | vertebrae (missed) |",
              "|---|---|---|---|---|---|---|"]
    summaries, steps = {}, {}
    for label, ckpt in checkpoints.items():
        localizer = Localizer.from_checkpoint(ckpt)
        per_ct = realct.validation_errors(localizer, root, poses)
        steps[f"{label}, real CTs"] = step_report(*per_ct.values())
        steps.update({f"{label}, {name}": step_report(e) for name, e in per_ct.items()})
        joined = {k: np.concatenate([e[k] for e in per_ct.values()]) for k in ("3d", "ap", "lat")}
        two_d = " / ".join(f"{metrics.summary(joined[v])['mpe']:.2f}" if joined[v].size else "-"
                           for v in ("lat", "ap"))
        summaries[label] = metrics.summary(joined["3d"])
        lines.append(_metric_row(f"{label}, real CTs", summaries[label], two_d))
        for name, errors in per_ct.items():
            lines.append(_metric_row(f"{label}, {name}", metrics.summary(errors["3d"])))
    return lines + ["", *step_table(steps), ""], summaries


def step_table(steps: dict) -> list[str]:
    """{label: metrics.step_summary} as a table: do the steps from one vertebra to the next follow the true ones?"""
    lines = ["Distance from each vertebra found to the next one found below it, against the true distance "
             "(`metrics.steps`): a model that reads the spacing from the images has a slope and a correlation "
             "near 1; one that steps by a learnt spacing whatever the anatomy, a slope near 0.", "",
             "| method | steps | true mm | predicted mm | off by mm | slope | correlation |",
             "|---|---|---|---|---|---|---|"]
    for label, s in steps.items():
        lines.append(f"| {label} | {s['n']} | {s['true_mm']:.1f} | {s['predicted_mm']:.1f} | {s['error_mm']:.1f} | "
                     f"{s['slope']:.2f} | {s['correlation']:.2f} |")
    return lines


def _metric_row(label: str, m: dict, two_d: str = "") -> str:
    return (f"| {label} | {100 * m['pcl@10']:.1f} | {100 * m['pcl@20']:.1f} | {m['mpe']:.2f} | {m['auc']:.4f} | "
            f"{two_d} | {m['n']} ({m['missed']}) |")


PAPER_CONFIG_LATENCY = "X2P-Net, `paper` config"
REFERENCE_CONFIGS = {PAPER_CONFIG_LATENCY: "paper", "lifting baseline, `baseline` config": "baseline"}


def bench_models(checkpoints: dict, test_cases: int, reference_configs=REFERENCE_CONFIGS,
                 realct_root: Path = realct.ROOT, sheet: Path | None = None,
                 synth_seconds: float | None = None, gpu_json: Path | None = None) -> list[str]:
    """checkpoints: {method label: path}, the first the shipped X2P-Net, the second the baseline;
    reference_configs: {label: preset} timed at their own size beside them (untrained weights);
    realct_root: the real CTs of the real-anatomy validation rows; sheet: where the realism contact
    sheet goes (None: none); synth_seconds: the data engine's seconds per 512 x 512 case, for issue 11's goals."""
    from .model.checkpoint import load_model
    from .training.evaluate import evaluate

    results, looked, configs, lines = {}, {}, {}, ["## Accuracy on the held-out test split", ""]
    for label, ckpt in checkpoints.items():
        model, meta = load_model(ckpt)
        configs[label] = model.config
        data = test_split(model.config.image_size, test_cases)
        results[label] = evaluate(data, ckpt, split="test", out=None, sweep=True)
        looked[label] = evaluate(data, ckpt, split="test", out=None, look_seed=TEST_SEED)
        lines.append(f"- {label}: `{os.path.relpath(ckpt)}`, "
                     f"config {json.dumps(meta.get('config_name', '?'))}, {model.config.image_size} x "
                     f"{model.config.image_size}, presence threshold {model.config.presence_threshold:g}, chain "
                     f"stride {model.config.chain_stride}, prompt refinements {model.config.prompt_refinements}, "
                     f"extra looks {model.config.extra_looks}; "
                     f"{meta.get('note', '')}")
    sizes = sorted({c.image_size for c in configs.values()})
    lines += ["", f"Test split: {test_cases} phantom cases rendered by version {ENGINE_VERSION} of the data engine "
              f"with seed {TEST_SEED}, never used in training "
              f"(`x2p data synth --cases {test_cases} --size {'/'.join(map(str, sizes))} --seed {TEST_SEED}`), "
              "evaluated with `x2p evaluate --split test --sweep` and the ground-truth top-most vertebra as the "
              "prompt. MPE is over the vertebrae found; a vertebra not found counts as a miss in PCL and AUC. "
              "Fields are framed on {}-{} vertebrae (C-arm-like) or {}-{}, with {}-{} gaps of room at each "
              "edge that may show one more.".format(*SynthConfig.short_field, *SynthConfig.long_field,
                                                    *SynthConfig.field_margin),
              f"The rows \"random looks\" are the same pairs with each view given a random look first, drawn as "
              f"training draws it (`x2p evaluate --look-seed {TEST_SEED}`): how much a model relies on one look.", "",
              "| method | PCL@10mm | PCL@20mm | MPE mm | AUC | 2D MPE LAT / AP px | vertebrae (missed) |",
              "|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        two_d = " / ".join(f"{r[f'2d_{v}_px']['mpe']:.2f}" if f"2d_{v}_px" in r else "-" for v in ("lat", "ap"))
        lines.append(_metric_row(f"{label}, all", r["3d_mm"], two_d))
        for kind, m in r["by_field_3d_mm"].items():
            lines.append(_metric_row(f"{label}, {kind}", m))
        two_d = " / ".join(f"{looked[label][f'2d_{v}_px']['mpe']:.2f}" if f"2d_{v}_px" in r else "-"
                           for v in ("lat", "ap"))
        lines.append(_metric_row(f"{label}, random looks", looked[label]["3d_mm"], two_d))
    lines += [f"| {label} | {' | '.join(map(str, row))} | |" for label, row in PAPER_ROWS.items()]
    real_lines, real = realct_rows(checkpoints, realct_root)
    lines += real_lines
    if sheet is not None:
        lines += realism_sheet(realct_root, sizes[0], test_cases, sheet)
    lines += ["", "2D errors are the heatmap peaks' in the input image's pixels (256 x 256 here, 512 x 512 in the "
              "paper).", "", "Prompt displaced by up to 20 px along x and 10 px along y (at 512 px; scaled to the "
              "input size): largest change of the 3D MPE over the displacements (paper: under 0.06 mm).", "",
              "| method | largest MPE change mm | MPE at each displacement mm |", "|---|---|---|"]
    for label, r in results.items():
        each = ", ".join(f"{k}: {v['mpe']:.2f}" for k, v in r["prompt_sweep"].items())
        lines.append(f"| {label} | {r['prompt_sweep_max_mpe_change_mm']:.3f} | {each} |")
    lines += per_index_rows(results)
    lines += ["", *step_table({f"{label}, test split": r["steps"] for label, r in results.items()})]

    lines += ["", "## Latency and memory per pair", "", "Model forward for one AP/LAT pair, median of 10 after 3 "
              "warm-up runs, each configuration in a fresh process (so that the CPU's resident peak is its own; "
              "on the GPU the allocator's peak).", "",
              "| device | model | input | median latency | peak memory |", "|---|---|---|---|---|"]
    rows = []
    for label, cfg in configs.items():
        rows.append((f"{label} (shipped)", cfg))
        if cfg.image_size != 512:
            at_512 = replace(cfg, image_size=512, prompt_radius=cfg.prompt_radius * 512 // cfg.image_size)
            rows.append((f"{label}, same architecture", at_512))
    rows += [(label, preset(name)) for label, name in reference_configs.items()]
    latency = {}
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        for label, cfg in rows:
            seconds, peak = latency_in_fresh_process(cfg.to_dict(), device)
            latency[(device, label)] = (seconds, peak, cfg.image_size)
            what = "GPU allocator peak" if device == "cuda" else "process resident peak"
            lines.append(f"| {device} | {label} | {cfg.image_size} | {1000 * seconds:.0f} ms | "
                         f"{peak:.0f} MB ({what}) |")
    lines += ["", *goals_section(results, latency, gpu_json), ""]
    lines += [*realism_goals(results, real, synth_seconds), ""]
    return lines


# issue 11, "Real anatomy": the shipped X2P-Net on the real-anatomy validation set, with the phantom test
# split no worse than before the realistic data engine (X2P-Net shipped at commit a0584db, engine 1, the
# same 40 cases of seed 777 rendered by engine 1: PCL@10 60.3 %, MPE 7.49 mm)
REAL_GOAL_PCL10, REAL_GOAL_MPE = 0.80, 6.0
PHANTOM_BEFORE = {"pcl@10": 0.603, "mpe": 7.49}


def realism_goals(results: dict, real: dict, synth_seconds: float | None) -> list[str]:
    label = next(iter(results))  # the shipped X2P-Net
    lines = ["## The goals (issue 11, real anatomy)", "", "| goal | measured | met |", "|---|---|---|"]
    m = real.get(label)
    if m is None:
        lines.append("| real-anatomy validation: PCL@10 >= 80 %, MPE <= 6 mm | not measured: no real CTs | - |")
    else:
        met = m["pcl@10"] >= REAL_GOAL_PCL10 and m["mpe"] <= REAL_GOAL_MPE
        lines.append(f"| real-anatomy validation (X2P-Net): PCL@10 >= 80 %, MPE <= 6 mm | {100 * m['pcl@10']:.1f} %, "
                     f"{m['mpe']:.2f} mm ({m['missed']} of {m['n']} missed) | {'yes' if met else 'no'} |")
    t = results[label]["3d_mm"]
    no_worse = t["pcl@10"] >= PHANTOM_BEFORE["pcl@10"] and t["mpe"] <= PHANTOM_BEFORE["mpe"]
    lines.append(f"| phantom test split no worse than before (engine 1: {100 * PHANTOM_BEFORE['pcl@10']:.1f} %, "
                 f"{PHANTOM_BEFORE['mpe']:.2f} mm) | {100 * t['pcl@10']:.1f} %, {t['mpe']:.2f} mm on this engine's "
                 f"split | {'yes' if no_worse else 'no'} |")
    if synth_seconds is not None:
        lines.append(f"| synthesis under 3 s per 512 x 512 case on 2 cores | {synth_seconds:.2f} s | "
                     f"{'yes' if synth_seconds < 3 else 'no'} |")
    return lines


def per_index_rows(results: dict) -> list[str]:
    """3D MPE by index below the prompt (does the error grow down the chain?), identity swaps and spurious
    vertebrae."""
    indices = sorted({k for r in results.values() for k in r["per_index_3d_mm"]})
    lines = ["", "3D MPE in mm (vertebrae, missed) by index k below the prompt on the test split, identity "
             "swaps (a vertebra found nearer to another one's ground truth) and spurious vertebrae (found past "
             "the last one of the ground truth: poses of vertebrae that are not there), and the model's "
             "forwards per pair (windows; a chain stride adds some):", "",
             "| method | " + " | ".join(f"k = {k}" for k in indices) + " | swaps / found | spurious | windows |",
             "|---|" + "---|" * (len(indices) + 3)]
    for label, r in results.items():
        cells = []
        for k in indices:
            m = r["per_index_3d_mm"].get(k)
            cells.append(f"{m['mpe']:.1f} ({m['n']}, {m['missed']})" if m and np.isfinite(m["mpe"]) else
                         f"none found ({m['n']}, {m['missed']})" if m else "-")
        found = r["3d_mm"]["n"] - r["3d_mm"]["missed"]
        lines.append(f"| {label} | {' | '.join(cells)} | {r['identity_swaps']} / {found} | {r['spurious']} | "
                     f"{r['windows_per_pair']:.1f} |")
    return lines


def goals_section(results: dict, latency: dict, gpu_json: Path | None = None) -> list[str]:
    r, b = list(results.values())[:2]  # X2P-Net, the baseline
    m, mb = r["3d_mm"], b["3d_mm"]
    cpu = latency.get(("cpu", PAPER_CONFIG_LATENCY))
    lines = ["## The goals (issue 5)", "", "| goal | measured | met |", "|---|---|---|",
             f"| 3D MPE at most 3.0 mm | {m['mpe']:.2f} mm | {'yes' if m['mpe'] <= 3.0 else 'no'} |",
             f"| PCL@10mm at least 95 % | {100 * m['pcl@10']:.1f} % | {'yes' if m['pcl@10'] >= 0.95 else 'no'} |",
             f"| X2P-Net better than the baseline on MPE | {m['mpe']:.2f} vs {mb['mpe']:.2f} mm (PCL@10 "
             f"{100 * m['pcl@10']:.1f} vs {100 * mb['pcl@10']:.1f} %, missed {m['missed']} vs {mb['missed']}) | "
             f"{'yes' if m['mpe'] < mb['mpe'] else 'no'} |",
             f"| prompt displacement changes the MPE by under 0.2 mm | {r['prompt_sweep_max_mpe_change_mm']:.2f} mm | "
             f"{'yes' if r['prompt_sweep_max_mpe_change_mm'] < 0.2 else 'no'} |",
             "| at most 1.5 s per 512 x 512 pair on this CPU (`paper` config) | "
             + (f"{cpu[0]:.2f} s | {'yes' if cpu[0] <= 1.5 else 'no'} |" if cpu else "not measured | - |")]
    gpu = latency.get(("cuda", PAPER_CONFIG_LATENCY))
    # measured here, else (no GPU here) the figure recorded by a GPU machine's `--gpu-latency`
    figure = (1000 * gpu[0], gpu[1], "") if gpu else recorded_gpu_latency(gpu_json) if gpu_json else None
    if figure:
        ms, peak_mb, where = figure
        lines.append(f"| at most 20 ms and 1.5 GB per 512 x 512 pair on the GPU | {ms:.1f} ms, {peak_mb:.0f} MB"
                     f"{f' ({where})' if where else ''} | {'yes' if ms <= 20 and peak_mb < 1536 else 'no'} |")
    else:
        lines.append("| at most 20 ms and 1.5 GB per 512 x 512 pair on an H100 | not measured: no GPU here | - |")
    return lines


def recorded_gpu_latency(path: Path) -> tuple[float, float, str] | None:
    """The `paper` config's GPU figures in the JSON of `--gpu-latency` (ms, MB, where and how), for a machine
    without a GPU: the node's default (fp32, CUDA graph) if it was captured, else the fastest mode measured."""
    if not path.is_file():
        return None
    rows = [row for row in json.loads(path.read_text())["rows"] if row["config"] == "paper" and not capture_failed(row)]
    if not rows:
        return None
    row = next((r for r in rows if r["mode"] == "fp32, CUDA graph"), min(rows, key=lambda r: r["ms"]))
    return row["ms"], row["peak_mb"], f"{row['mode']}, {path.name}"


if __name__ == "__main__":
    sys.exit(main())

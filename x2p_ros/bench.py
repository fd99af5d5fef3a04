"""`make bench`: the package's speed and accuracy figures, written to
docs/BENCHMARKS.md with the commands that made them.

- data engine: seconds per synthetic case at 512 x 512 (one process, and one
  worker per core), CPU and CUDA when present;
- model size: parameters and GMACs per unit against the paper's;
- the shipped model: 3D/2D metrics on a held-out synthetic test split made
  from a fixed seed, prompt-displacement robustness, and latency per pair
  (median after warm-up) with peak memory."""
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
from pathlib import Path

import numpy as np
import torch

from .data.synth import SynthConfig, make_case, synthesize
from .model import preset
from .model.summary import example_inputs, model_summary

PAPER = {"params": 3.24e6, "gmacs": 130.8, "pcl10": 96.9, "pcl20": 98.8, "mpe": 2.99, "auc": 0.9923}
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


def bench_synth(cases: int, size: int) -> list[str]:
    rows = []
    make_case(0, SynthConfig(size=size))  # warm-up
    start = time.perf_counter()
    for seed in range(cases):
        make_case(seed, SynthConfig(size=size))
    rows.append(f"| CPU, one process | {size} | {(time.perf_counter() - start) / cases:.2f} |")
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
    return rows


def bench_latency(model, device: str, repeats: int = 10) -> tuple[float, float]:
    """Median seconds per pair after warm-up, and peak memory in MB (GPU: allocator peak; CPU: resident)."""
    images, P, prompt = (t.to(device) for t in example_inputs(model.config))
    model = model.to(device).eval()
    times = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        for i in range(repeats + 2):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(images, P, prompt)
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return float(np.median(times)), peak


def write_report(out: Path, sections: list[str]):
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(sections) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="docs/BENCHMARKS.md", type=Path)
    parser.add_argument("--synth-cases", type=int, default=6)
    parser.add_argument("--test-cases", type=int, default=40)
    parser.add_argument("--checkpoint", default=None, help="default: the shipped model")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    sections = ["# Benchmarks", "",
                f"Made by `make bench` (`python -m x2p_ros.bench --out {args.out}`) on {time.strftime('%Y-%m-%d')}.",
                f"Machine: {machine()}.", ""]

    sections += ["## Data engine", "", "Seconds per synthetic case (phantom, two DRRs, PNGs), "
                 f"{args.synth_cases} cases. Goal: under 3 s per case at 512 x 512 on 2 cores.", "",
                 "| where | size | s / case |", "|---|---|---|", *bench_synth(args.synth_cases, 512), ""]

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

    from .models import default_checkpoint
    ckpt = Path(args.checkpoint) if args.checkpoint else default_checkpoint()
    if ckpt.is_file():
        sections += bench_model(ckpt, args.test_cases)
    else:
        sections += ["## Shipped model", "", f"No checkpoint at {ckpt}: accuracy and latency not measured.", ""]
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
        f"| node's own work per key frame (input handling + outputs) p50 / p99 | {r['overhead_ms_p50']:.1f} / "
        f"{r['overhead_ms_p99']:.1f} ms | at most 10 ms |",
        f"| poses after the publisher restart | {r['poses_after_restart']} | resumes by itself |", "",
        f"Resident memory every 30 s (MB): {', '.join(f'{x:.0f}' for x in r.get('rss_mb_every_30s', []))}.", ""]


def bench_model(ckpt: Path, test_cases: int) -> list[str]:
    from .model.checkpoint import load_model
    from .training.evaluate import evaluate

    model, meta = load_model(ckpt)
    size = model.config.image_size
    data = Path(tempfile.gettempdir()) / f"x2p-bench-test-{size}-s{TEST_SEED}-n{test_cases}"
    synthesize(data, test_cases, seed=TEST_SEED, config=SynthConfig(size=size), progress=False)
    (data / "test.txt").write_text("".join(f"case_{i:05d}\n" for i in range(test_cases)))  # all held out
    result = evaluate(data, ckpt, split="test", out=None, sweep=True)
    m = result["3d_mm"]
    lines = ["## Shipped model", "",
             f"`{ckpt.name}`: config {json.dumps(meta.get('config_name', '?'))}, {size} x {size}; "
             f"{meta.get('note', '')}",
             "", f"Held-out synthetic test split: {test_cases} phantom cases rendered with seed {TEST_SEED} "
             f"(`x2p data synth --cases {test_cases} --size {size} --seed {TEST_SEED}`), evaluated with "
             f"`x2p evaluate --split test --sweep` and the ground-truth top-most vertebra as the prompt.", "",
             "| method | PCL@10mm | PCL@20mm | MPE mm | AUC | 2D MPE LAT / AP px | vertebrae (missed) |",
             "|---|---|---|---|---|---|---|"]
    lat, ap = result.get("2d_lat_px", {}).get("mpe", float("nan")), result.get("2d_ap_px", {}).get("mpe", float("nan"))
    lines.append(f"| X2P-Net (ours, {size} px) | {100 * m['pcl@10']:.1f} | {100 * m['pcl@20']:.1f} | {m['mpe']:.2f} | "
                 f"{m['auc']:.4f} | {lat:.2f} / {ap:.2f} | {m['n']} ({m['missed']}) |")
    lines.append(f"| X2P-Net (paper, BiSpineX, 512 px) | {PAPER['pcl10']} | {PAPER['pcl20']} | {PAPER['mpe']} | "
                 f"{PAPER['auc']} | 5.84 / 6.14 | |")
    lines += ["", f"Prompt displaced by up to 20 px along x and 10 px along y (at 512 px): largest 3D MPE change "
              f"{result['prompt_sweep_max_mpe_change_mm']:.3f} mm (goal: under 0.2 mm; paper: under 0.06 mm).", ""]
    lines += ["Latency per pair (model forward, median of 10 after 2 warm-up runs) and peak memory:", "",
              "| device | input | median latency | peak memory |", "|---|---|---|---|"]
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        for cfg_size in sorted({size, 512}):
            m2 = model if cfg_size == size else None
            if m2 is None:
                from .model import X2PNet
                from .model.config import X2PConfig
                m2 = X2PNet(X2PConfig.from_dict({**model.config.to_dict(), "image_size": cfg_size,
                                                 "prompt_radius": model.config.prompt_radius * cfg_size // size}))
            seconds, peak = bench_latency(m2, device)
            what = "GPU allocator peak" if device == "cuda" else "process resident peak"
            lines.append(f"| {device} | {cfg_size} | {1000 * seconds:.0f} ms | {peak:.0f} MB ({what}) |")
    lines.append("")
    return lines


if __name__ == "__main__":
    sys.exit(main())

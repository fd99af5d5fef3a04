"""The paper's Table 3 here: X2P-Net, its ablations and the lifting baseline,
trained by one recipe (the same data, epochs, batch, learning rate, seed and
device) and measured on the same test split and on the real-anatomy
validation CTs. Writes a JSON that `make bench` puts into docs/BENCHMARKS.md.

  python -m x2p_ros.ablation_bench --data DATA --sizes paper --epochs 60 --batch-size 8 \\
      --device cuda --runs runs/ablation --json docs/ablation_result.json [--only no-sce,sparse]

Each variant trains in its own folder under --runs and resumes there (a lost
machine loses at most an epoch); a variant whose training is complete is only
measured. Processes given different --only sets can share a GPU; each one
gathers every finished variant of the same recipe into the JSON."""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from .allocator import keep_freed_memory
from .data import case_io, realct

# key: (row label, preset at the paper's sizes, preset at the cpu sizes)
VARIANTS = {
    "x2p": ("X2P-Net", "paper", "cpu"),
    "no-prompt": ("no prompt", "no-prompt", "cpu-no-prompt"),
    "no-sce": ("no SCE", "no-sce", "cpu-no-sce"),
    "no-fusion": ("no fusion (heatmaps alone)", "no-fusion", "cpu-no-fusion"),
    "vanilla": ("vanilla attention", "vanilla", "cpu-vanilla"),
    "sparse": ("sparse attention", "sparse", "cpu-sparse"),
    "baseline": ("lifting baseline", "baseline", "cpu-baseline"),
}
# the sizes of a config (and the position codes' band, bounded by the embedding grid); `--sizes tiny`
# trains every variant at the `tiny` preset's (the tests)
SIZE_FIELDS = ("image_size", "base_channels", "prompt_radius", "d_model", "heads", "fe_layers", "n_vertebrae",
               "embed_size", "sce_layers", "sce_ffn_dim", "pool_stride", "top_k", "fusion_channels", "volume_shape",
               "position_max_cycles")


def variant_config(key: str, sizes: str) -> tuple[str, dict]:
    """The preset name and overrides that train variant `key` at `sizes` (paper, cpu or tiny)."""
    from .model import preset
    label, paper, cpu = VARIANTS[key]
    if sizes == "tiny":
        tiny = preset("tiny")
        return paper, {f: getattr(tiny, f) for f in SIZE_FIELDS}
    return {"paper": paper, "cpu": cpu}[sizes], {}


def measure(checkpoint: Path, data: Path, realct_root: Path | None, device: str = "cpu") -> dict:
    """Test-split and real-CT figures of one trained variant, as `x2p evaluate --sweep` gives them."""
    from .training.evaluate import evaluate
    r = evaluate(data, checkpoint, split="test", device=device, sweep=True, realct_root=realct_root)
    result = {"test": r["3d_mm"], "identity_swaps": r["identity_swaps"], "spurious": r["spurious"],
              "per_index_mpe_mm": {k: v["mpe"] for k, v in r["per_index_3d_mm"].items() if v["n"] > v["missed"]},
              "prompt_sweep_max_mpe_change_mm": r["prompt_sweep_max_mpe_change_mm"]}
    if "real_anatomy" in r:
        result["real_cts"] = r["real_anatomy"]["3d_mm"]
    return result


def recipe_of(args, data: Path) -> dict:
    dataset = json.loads((data / "dataset.json").read_text())
    return {"data": data.name, "engine": dataset.get("engine", 1), "cases": dataset["cases"],
            "seed": dataset["seed"], "sizes": args.sizes, "epochs": args.epochs, "batch_size": args.batch_size,
            "lr": args.lr, "train_seed": args.seed, "device": args.device}


def gather(runs: Path, recipe: dict) -> dict:
    """Every finished variant under runs trained by this recipe."""
    found = {}
    for key in VARIANTS:
        path = runs / key / "result.json"
        if path.is_file():
            r = json.loads(path.read_text())
            if r["recipe"] == recipe:
                found[key] = r
    return found


def section(path: Path) -> list[str]:
    """The ablation table of docs/BENCHMARKS.md, from the JSON."""
    lines = ["## Ablations (the paper's Table 3), one recipe", ""]
    if not path.is_file():
        return lines + [f"Not run yet: `python -m x2p_ros.ablation_bench` (writes {path}); on a GPU with "
                        "`--sizes paper`.", ""]
    r = json.loads(path.read_text())
    rec = r["recipe"]
    lines += [f"`{r['command']}` on {r['machine']}: every row trained from scratch on `{rec['data']}` (engine "
              f"{rec['engine']}, {rec['cases']} cases, seed {rec['seed']}) for {rec['epochs']} epochs at batch "
              f"{rec['batch_size']}, lr {rec['lr']:g}, seed {rec['train_seed']}, `{rec['sizes']}` sizes; best epoch "
              "by the validation split. Test split: every case. Prompt sweep: the largest change of the MPE when "
              "the prompt moves up to 20 px (at 512 px) sideways or 10 px up or down (`x2p evaluate --sweep`, "
              "the paper's Figure 9). Spurious: vertebrae found past the last one of the ground truth. k = 0 / last: "
              "the MPE of the prompted vertebra and of the last index with found vertebrae.", "",
              "| variant | parameters | PCL@10mm | MPE mm | missed | swaps | spurious | MPE k = 0 / last | "
              "prompt sweep | real CTs PCL@10 / MPE |", "|---|---|---|---|---|---|---|---|---|---|"]
    for key, v in r["variants"].items():
        t, idx = v["test"], v["per_index_mpe_mm"]
        last = max(idx, key=int) if idx else None
        k = f"{idx['0']:.2f} / {idx[last]:.2f} (k = {last})" if last is not None and "0" in idx else "-"
        real = v.get("real_cts")
        real = f"{100 * real['pcl@10']:.1f} % / {real['mpe']:.2f}" if real else "-"
        lines.append(f"| {VARIANTS[key][0]} | {v['parameters']:,} | {100 * t['pcl@10']:.1f} | {t['mpe']:.2f} | "
                     f"{t['missed']} of {t['n']} | {v['identity_swaps']} | {v['spurious']} | {k} | "
                     f"{v['prompt_sweep_max_mpe_change_mm']:.2f} | {real} |")
    return lines + [""]


def main(argv=None) -> int:
    keep_freed_memory()
    parser = argparse.ArgumentParser(prog="python -m x2p_ros.ablation_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--sizes", choices=("paper", "cpu", "tiny"), default="paper")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--workers", type=int, default=2, help="data loading processes per training")
    parser.add_argument("--runs", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--json", type=Path, default=Path("docs/ablation_result.json"))
    parser.add_argument("--only", default=",".join(VARIANTS), help=f"comma-separated of {', '.join(VARIANTS)}")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="minutes per variant; stops after the epoch that passes it (run again to resume)")
    parser.add_argument("--no-realct", action="store_true", help="leave out the real-anatomy validation")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    keys = [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = [k for k in keys if k not in VARIANTS]
    if unknown or not keys:
        parser.error(f"--only: unknown variant(s) {', '.join(unknown) or '(none)'}; known: {', '.join(VARIANTS)}")
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")
    try:
        case_io.read_split(args.data, "test")
        recipe = recipe_of(args, args.data)
    except (case_io.DatasetError, OSError, KeyError, ValueError) as e:
        parser.exit(2, f"ablation_bench: {args.data}: not a data set made by `x2p data synth` ({e})\n")
    realct_root = None if args.no_realct or not realct.available() else realct.ROOT

    import torch

    from .bench import machine
    from .model import checkpoint
    from .training.train import train
    measure_device = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    for key in keys:
        out = args.runs / key
        done = out / "result.json"
        if done.is_file() and json.loads(done.read_text())["recipe"] == recipe:
            continue
        marker = out / "recipe.json"  # a run folder trains one recipe: resuming another one would mix them
        if marker.is_file() and json.loads(marker.read_text()) != recipe:
            parser.exit(2, f"ablation_bench: {out} holds a run of another recipe; give another --runs\n")
        out.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(recipe))
        name, overrides = variant_config(key, args.sizes)
        train(str(args.data), name, str(out), epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
              workers=args.workers, device=args.device, seed=args.seed, time_limit_min=args.time_limit,
              progress=not args.quiet, **overrides)
        epochs_run = sum(1 for _ in (out / "log.csv").open()) - 1
        if epochs_run < args.epochs:
            print(f"{key}: {epochs_run} of {args.epochs} epochs; run the same command again to go on")
            continue
        model, _ = checkpoint.load_model(out / "best.pt")
        result = {"recipe": recipe, "epochs_run": epochs_run, "parameters": sum(p.numel() for p in model.parameters()),
                  "config": name, "overrides": overrides,
                  **measure(out / "best.pt", args.data, realct_root, measure_device)}
        tmp = done.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1, default=list))
        os.replace(tmp, done)
    variants = gather(args.runs, recipe)
    command = (f"python -m x2p_ros.ablation_bench --data {args.data} --sizes {args.sizes} --epochs {args.epochs} "
               f"--batch-size {args.batch_size} --lr {args.lr:g} --seed {args.seed} --device {args.device}")
    table = {"recipe": recipe, "command": command, "machine": machine(), "date": time.strftime("%Y-%m-%d"),
             "variants": {k: variants[k] for k in VARIANTS if k in variants}}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(table, indent=1, default=list))
    print("\n".join(section(args.json)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

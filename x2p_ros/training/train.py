"""`x2p train`: end-to-end training of X2P-Net (AdamW, weight decay 0.05), one
process or several through torchrun (DistributedDataParallel). Resumable: every
epoch writes RUN/last.pt, and a run that finds it continues from there. With
init, training starts from another run's weights (a fine-tune with a new
schedule; from a run of another config whose weights all fit, a warm start).

One bad batch cannot destroy a run: a step whose loss or gradient is not
finite makes no update (optimizer and schedule stay where they were), is
logged with the batch's cases and counted in the epoch's log; max_bad_steps of
them in a row stop the run. Checkpoints are only written with finite weights,
best.pt only from a finite validation."""
from __future__ import annotations

import csv
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from ..data import case_io
from ..model import X2PConfig, build_model, checkpoint, preset
from ..model.centres import snapped_estimates
from .data import PROMPT_JITTER_PX, BiplanarDataset, with_paired_looks
from .losses import x2p_losses

LOG_FIELDS = ["epoch", "step", "lr", "loss", "mse", "dice", "3d", "peak", "routing", "looks", "centres", "skipped",
              "val_mpe_mm", "val_pcl10", "seconds"]


class TrainingError(RuntimeError):
    """A run that cannot go on: its batches keep giving non-finite losses or gradients."""


def _distributed() -> tuple[int, int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError("--device cuda, but no CUDA device is available")
        return torch.device("cuda", local_rank)
    return torch.device(name)


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def validate(model, loader, device) -> dict:
    model.eval()
    errors = []
    for batch in loader:
        batch = to_device(batch, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(batch["images"], batch["P"], batch["prompt"])
        xyz = out["xyz"]
        if "centres" in out and model.config.centre_snap:  # the estimates as the localizer gives them
            xyz = snapped_estimates(out, batch["P"], batch["images"].shape[-2:], model.config.centre_snap,
                                    model.config.centre_agree)
        err = (xyz.float() - batch["xyz"]).norm(dim=-1)
        errors.append(err[batch["present"]].cpu())
    model.train()
    e = torch.cat(errors).numpy() if errors else np.zeros(0)
    # a non-finite output makes the MPE NaN: such a model is never the best one
    return {"val_mpe_mm": float(e.mean()) if e.size else float("nan"),
            "val_pcl10": float((e <= 10).mean()) if e.size else float("nan")}


@dataclass
class Run:
    """One training run: made by setup(), advanced an epoch at a time by train_one_epoch()."""
    config_name: str
    config: X2PConfig
    data: str
    out: Path
    init: str | None
    rank: int
    world: int
    device: torch.device
    model: torch.nn.Module
    net: torch.nn.Module  # the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_set: BiplanarDataset
    sampler: DistributedSampler | None
    loader: DataLoader
    val_loader: DataLoader
    max_bad_steps: int
    progress: bool
    start_epoch: int = 0
    step: int = 0
    best: dict = field(default_factory=lambda: {"val_mpe_mm": float("inf")})
    bad_in_row: int = 0  # steps skipped in a row, across epochs
    train_only: str | None = None  # the prefix of the weights that learn; None: all


def setup(data: str, config: str, out: str, epochs: int, batch_size: int, lr: float, workers: int, device: str,
          seed: int, init: str | None, max_bad_steps: int, progress: bool, augment: str = "strong",
          prompt_jitter_px=PROMPT_JITTER_PX, train_only: str | None = None, **config_overrides) -> Run:
    """Data, model, optimizer and schedule of a run; continues RUN/last.pt when there is one. train_only:
    only the weights whose names begin with it learn (e.g. "centre_head."); the rest stay as loaded."""
    if max_bad_steps < 1:
        raise TrainingError(f"max_bad_steps must be at least 1, got {max_bad_steps}")
    rank, world, local_rank = _distributed()
    dev = _device(device, local_rank)
    torch.manual_seed(seed)
    out = Path(out)
    cfg = preset(config, **config_overrides)
    names = {s: case_io.read_split(data, s) for s in ("train", "val")}
    if len(prompt_jitter_px) != 2 or not all(0 <= j <= 256 and math.isfinite(j) for j in prompt_jitter_px):
        raise TrainingError(f"the prompt jitter must be two numbers of 0-256 px (at 512), got {prompt_jitter_px}")
    train_set = BiplanarDataset(data, names["train"], cfg.image_size, cfg.n_vertebrae, train=True, seed=seed,
                                augment=augment, prompt_jitter_px=prompt_jitter_px,
                                paired_looks=cfg.loss_look_consistency_weight > 0)
    val_set = BiplanarDataset(data, names["val"] or names["train"][:2], cfg.image_size, cfg.n_vertebrae)
    sampler = DistributedSampler(train_set, world, rank, seed=seed) if world > 1 else None
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=sampler is None, sampler=sampler,
                        num_workers=workers, persistent_workers=workers > 0,
                        generator=torch.Generator().manual_seed(seed))
    val_loader = DataLoader(val_set, batch_size=batch_size, num_workers=0)

    model = build_model(cfg).to(dev)
    if init is not None:  # fine-tuning: another run's weights, a fresh optimizer and schedule
        _init_weights(model, init, config, announce=rank == 0)
    if train_only is not None:
        names = [name for name, _ in model.named_parameters() if name.startswith(train_only)]
        if not names:
            raise TrainingError(f"--train-only {train_only}: no weight of the {config} model's is named so")
        for name, weight in model.named_parameters():
            weight.requires_grad_(name.startswith(train_only))
    optimizer = torch.optim.AdamW([w for w in model.parameters() if w.requires_grad], lr=lr, weight_decay=0.05)
    total_steps = max(epochs * len(loader), 1)
    warmup = min(200, total_steps // 10 + 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s / total_steps, 1.0))))
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if dev.type == "cuda" else None) \
        if world > 1 else model
    run = Run(config, cfg, data, out, init, rank, world, dev, model, net, optimizer, scheduler, train_set, sampler,
              loader, val_loader, max_bad_steps, progress, train_only=train_only)
    if (out / "last.pt").is_file():  # resume
        state = _load_weights(model, out / "last.pt", config)
        started_with = state["meta"].get("augment", "mild")  # runs from before the choice trained with mild
        if started_with != augment:
            raise TrainingError(f"{out} was trained with --augment {started_with}; resume it with the same, "
                                f"or use a new --out for --augment {augment}")
        jittered = tuple(state["meta"].get("prompt_jitter_px512", PROMPT_JITTER_PX))
        if jittered != tuple(prompt_jitter_px):
            raise TrainingError(f"{out} was trained with --prompt-jitter {jittered[0]:g} {jittered[1]:g}; resume it "
                                f"with the same, or use a new --out")
        trained_only = state["meta"].get("train_only")
        if trained_only != train_only:
            raise TrainingError(f"{out} was trained with --train-only {trained_only or '(all weights)'}; resume it "
                                f"with the same, or use a new --out")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        run.start_epoch, run.step, run.best = state["epoch"] + 1, state["step"], state["best"]
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        print(f"training {config} on {dev} from epoch {run.start_epoch}: {len(train_set)} train / "
              f"{len(val_set)} val cases")
    return run


def train_one_epoch(run: Run, epoch: int) -> dict:
    """One pass over the training data: the mean of each loss term over the
    steps that updated the weights, and how many steps were skipped."""
    from tqdm import tqdm

    run.train_set.set_epoch(epoch)
    if run.sampler is not None:
        run.sampler.set_epoch(epoch)
    cfg = run.config
    sums, count, skipped = {}, 0, 0
    bar = tqdm(run.loader, desc=f"epoch {epoch}", disable=not run.progress or run.rank != 0, leave=False)
    for batch in bar:
        batch = to_device(batch, run.device)
        if "other_images" in batch:
            batch = with_paired_looks(batch)
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.device.type == "cuda"):
            out = run.net(batch["images"], batch["P"], batch["prompt"])
        losses = x2p_losses(out, batch, cfg)
        run.optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()  # every rank, always: DDP's gradient all-reduce waits for all
        grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), 1.0)
        if not _finite_everywhere(losses["total"].detach(), grad_norm, run.world, run.device):
            skipped += 1
            run.bad_in_row += 1
            rank = f" of rank {run.rank}" if run.world > 1 else ""
            tqdm.write(f"warning: epoch {epoch} step {run.step}: non-finite loss or gradient (loss "
                       f"{losses['total'].item():.4g}, gradient norm {grad_norm.item():.4g}); update skipped; "
                       f"cases in the batch{rank}: {', '.join(batch['name'])}")
            run.optimizer.zero_grad(set_to_none=True)
            if run.bad_in_row >= run.max_bad_steps:
                raise TrainingError(f"{run.bad_in_row} steps in a row had a non-finite loss or gradient "
                                    f"(max_bad_steps = {run.max_bad_steps}): check the cases named above; "
                                    f"{run.out / 'last.pt'} holds the last finite weights")
            continue
        run.bad_in_row = 0
        run.optimizer.step()
        run.scheduler.step()
        run.step += 1
        count += 1
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        bar.set_postfix(loss=f"{sums['total'] / count:.3f}")
    return {"losses": {k: v / count for k, v in sums.items()} if count else {}, "skipped": skipped}


def end_epoch(run: Run, epoch: int, stats: dict, seconds: float):
    """Rank 0: validation, the log row and plot, best.pt (from a finite validation) and last.pt."""
    mean = stats["losses"]
    row = {"epoch": epoch, "step": run.step, "lr": run.scheduler.get_last_lr()[0],
           "loss": mean.get("total", float("nan")), "mse": mean.get("mse", 0.0), "dice": mean.get("dice", 0.0),
           "3d": mean.get("3d", float("nan")), "peak": mean.get("peak", 0.0),
           "routing": mean.get("routing", 0.0), "looks": mean.get("looks", 0.0),
           "centres": mean.get("centres", 0.0), "skipped": stats["skipped"],
           **validate(run.model, run.val_loader, run.device), "seconds": round(seconds, 1)}
    _append_log(run.out / "log.csv", row)
    if math.isfinite(row["val_mpe_mm"]) and row["val_mpe_mm"] < run.best["val_mpe_mm"]:
        run.best = {"val_mpe_mm": row["val_mpe_mm"], "val_pcl10": row["val_pcl10"], "epoch": epoch}
        checkpoint.save(run.out / "best.pt", run.model, meta={"config_name": run.config_name, "data": str(run.data),
                                                              "init": run.init, "augment": run.train_set.augment,
                                                              "prompt_jitter_px512": run.train_set.jitter_px,
                                                              "train_only": run.train_only, **run.best})
    checkpoint.save(run.out / "last.pt", run.model,
                    meta={"config_name": run.config_name, "augment": run.train_set.augment,
                          "prompt_jitter_px512": run.train_set.jitter_px, "train_only": run.train_only},
                    optimizer=run.optimizer.state_dict(), scheduler=run.scheduler.state_dict(), epoch=epoch,
                    step=run.step, best=run.best)
    _plot_log(run.out / "log.csv", run.out / "loss.png")
    print(f"epoch {epoch}: loss {row['loss']:.4f} (3d {row['3d']:.4f}) val MPE {row['val_mpe_mm']:.2f} mm "
          f"PCL@10 {100 * row['val_pcl10']:.1f} %" + (f"; {stats['skipped']} step(s) skipped" if stats["skipped"]
                                                      else ""))


def train(data: str, config: str, out: str, epochs: int = 100, batch_size: int = 2, lr: float = 5e-4,
          workers: int = 2, device: str = "auto", seed: int = 0, time_limit_min: float | None = None,
          progress: bool = True, init: str | None = None, max_bad_steps: int = 20, augment: str = "strong",
          prompt_jitter_px=PROMPT_JITTER_PX, train_only: str | None = None, **config_overrides) -> dict:
    """Trains (or resumes) a run; returns its best validation."""
    run = setup(data, config, out, epochs, batch_size, lr, workers, device, seed, init, max_bad_steps, progress,
                augment, prompt_jitter_px, train_only, **config_overrides)
    started = time.monotonic()
    for epoch in range(run.start_epoch, epochs):
        stats = train_one_epoch(run, epoch)
        stop = False
        if run.rank == 0:
            end_epoch(run, epoch, stats, time.monotonic() - started)
            stop = (time_limit_min is not None and time.monotonic() - started > 60 * time_limit_min
                    and epoch < epochs - 1)  # after the last epoch there is nothing left to resume
            if stop:
                print(f"time limit reached after epoch {epoch}; run the same command again to resume")
        if run.world > 1:  # every rank waits for rank 0's validation and checkpoint, and stops with it
            flag = [stop]
            dist.broadcast_object_list(flag, src=0)
            stop = flag[0]
        if stop:
            break
    if run.world > 1:
        dist.destroy_process_group()
    return run.best


def _finite_everywhere(loss, grad_norm, world: int, device) -> bool:
    """True when the loss and the gradient are finite on every rank (all ranks
    must agree to skip a step, or their weights would part)."""
    ok = torch.isfinite(loss) & torch.isfinite(grad_norm)
    if world > 1:
        flag = ok.to(device=device, dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag)
    return bool(ok)


def _init_weights(model, path, config_name: str, announce: bool):
    """Loads a checkpoint's weights to fine-tune from. One of another config
    (e.g. the same sizes with the heatmap prior or another loss) is a warm
    start: every one of its weights must fit a weight of the model by name and
    shape, and the model's weights it lacks keep their initial values."""
    state = checkpoint.read(path)
    if checkpoint.saved_config(state, path) == model.config:
        model.load_state_dict(state["model"])
        return
    own = model.state_dict()
    unfit = [name for name, w in state["model"].items() if name not in own or own[name].shape != w.shape]
    if unfit:
        misfits = [f"{name} {tuple(state['model'][name].shape)}"
                   + (f" (here {tuple(own[name].shape)})" if name in own else " (not here)") for name in unfit]
        head_only = all(name.startswith("centre_head.") for name in unfit)
        raise checkpoint.CheckpointError(
            f"{path} was trained with another config than {config_name!r}, and {len(misfits)} of its weights do "
            f"not fit this one: {', '.join(misfits[:5])}{', ...' if len(misfits) > 5 else ''}"
            + ("; it has a centre head: --set centre_head=true keeps it" if head_only else ""))
    new = sorted(set(own) - set(state["model"]))
    model.load_state_dict(state["model"], strict=False)
    head_from_vfe = model.centre_head is not None and any(name.startswith("centre_head.vfe.") for name in new)
    if head_from_vfe:
        # a new centre head's U-Net starts as the model's VFE, whose features already tell the vertebrae apart:
        # from scratch, its maps had no peaks after 5 epochs (README, "Centre snapping")
        model.centre_head.vfe.load_state_dict(model.vfe.state_dict())
    if announce:
        # a new module's weights named by the module: a centre head's U-Net has 46
        modules = {}
        for name in new:
            modules.setdefault(name.split(".")[0], []).append(name)
        named = [names[0] if len(names) == 1 else f"{module}.* ({len(names)} weights)"
                 for module, names in modules.items()]
        print(f"warm start from {path} (another config): every weight loaded"
              + (f"; new, at their initial values: {', '.join(named)}" if new else "")
              + ("; the centre head's U-Net copied from the VFE" if head_from_vfe else ""))


def _load_weights(model, path, config_name: str) -> dict:
    """Loads a checkpoint's weights into model, refusing one of another config; returns the checkpoint."""
    state = checkpoint.read(path)
    if checkpoint.saved_config(state, path) != model.config:
        raise checkpoint.CheckpointError(f"{path} was trained with another config than {config_name!r}; "
                                         f"use a new --out or another checkpoint")
    model.load_state_dict(state["model"])
    return state


def _append_log(path: Path, row: dict):
    if path.is_file() and path.open().readline().strip().split(",") != LOG_FIELDS:
        earlier = list(csv.DictReader(path.open()))  # a run resumed from an older version: the new columns
        path.unlink()
        for r in earlier:
            _append_log(path, r)
    new = not path.is_file()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in LOG_FIELDS})


def _plot_log(csv_path: Path, png_path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(csv_path.open()))
    epochs = [int(r["epoch"]) for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    losses = {key: [float(r.get(key) or 0.0) for r in rows]
              for key in ("loss", "mse", "dice", "3d", "peak", "routing", "looks", "centres")}
    for key, values in losses.items():
        a.plot(epochs, values, label=key)
    if any(v > 0 for values in losses.values() for v in values):  # epochs whose every step was skipped are NaN
        a.set_yscale("log")
    a.set_xlabel("epoch")
    a.legend()
    b.plot(epochs, [float(r["val_mpe_mm"]) for r in rows], "o-")
    b.set_xlabel("epoch")
    b.set_ylabel("validation MPE (mm)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)

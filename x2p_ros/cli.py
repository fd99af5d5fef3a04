"""The `x2p` command line: data sets, training, evaluation and model summary."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from .allocator import keep_freed_memory
from .inference import InputError


def at_least(minimum, kind=int):
    """An argparse type: a finite `kind` of at least `minimum`. A value below it is a usage error that names
    the option, where it would otherwise end in a traceback (a negative seed, a batch size of 0) or do the
    wrong thing quietly (--limit -1 took every case but the last)."""
    def parse(text: str):
        value = kind(text)
        if not (math.isfinite(value) and value >= minimum):
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse's "invalid int value: 'x'" for a non-number, as with type=int
    return parse


def _data_synth(args):
    from .data.synth import SynthConfig, synthesize
    stats = synthesize(args.out, args.cases, seed=args.seed, config=SynthConfig(size=args.size),
                       workers=args.workers, progress=not args.quiet, split=args.split)
    v = stats["vertebrae_per_case"]
    rendered = "" if args.split is None else f" (split '{args.split}' of them)"
    print(f"{stats['cases']} cases{rendered} in {args.out}: vertebrae per case min {v['min']} / median "
          f"{v['median']:g} / max {v['max']}; scoliosis {100 * stats['share_scoliosis']:.0f} %, fracture "
          f"{100 * stats['share_fracture']:.0f} %, implant {100 * stats['share_implant']:.0f} %")
    return 0


def _data_import(args):
    from .data.ct_import import import_ct
    from .data.synth import SynthConfig
    folder = import_ct(args.ct, args.out, centroids=args.centroids, mask=args.mask, mask_style=args.mask_style,
                       seed=args.seed, config=SynthConfig(size=args.size))
    print(f"wrote {folder}")
    return 0


def _data_add_ct(args):
    from .data.patient_pairs import add_ct
    names = add_ct(args.ct, args.data, args.pairs, centroids=args.centroids, mask=args.mask,
                   mask_style=args.mask_style, split=args.split, size=args.size, seed=args.seed,
                   progress=not args.quiet)
    print(f"{args.data}: {len(names)} pairs of {Path(args.ct).name} in split '{args.split}'")
    return 0


def _data_mix(args):
    from .data.mix import mix_datasets
    made = mix_datasets(args.out, train=args.train, val=args.val, test=args.test)
    parts = ", ".join(f"{r['cases']} {r['split']} of {r['folder']}" for r in made["mix_of"])
    print(f"{made['cases']} cases in {args.out} (links): {parts}")
    return 0


def _data_show(args):
    from .data.contact_sheet import contact_sheet
    out = contact_sheet(args.dir, args.out or Path(args.dir) / "contact_sheet.png", cases=args.cases)
    print(f"wrote {out}")
    return 0


def _data_check(args):
    from .data.case_io import check_dataset
    problems, summary = check_dataset(args.dir)
    print(json.dumps(summary))
    for problem in problems:
        print(f"problem: {problem}")
    print(f"{len(problems)} problem(s) in {args.dir}")
    return 1 if problems else 0


def _train(args):
    import os

    from .model.config import parse_overrides, preset
    from .training.train import TrainingError, train
    try:
        overrides = parse_overrides(args.set)
        preset(args.config, **overrides)  # a combination the config refuses, before any work
    except ValueError as e:
        raise TrainingError(f"--set: {e}") from None
    best = train(args.data, args.config, args.out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                 workers=args.workers, device=args.device, seed=args.seed, time_limit_min=args.time_limit,
                 progress=not args.quiet, init=args.init, max_bad_steps=args.max_bad_steps, augment=args.augment,
                 prompt_jitter_px=tuple(args.prompt_jitter), train_only=args.train_only, **overrides)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 validates and writes
        print(f"best validation: {json.dumps(best)}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # DistributedDataParallel keeps the process group, and gloo's threads, alive after
        # destroy_process_group, and the interpreter's shutdown now and then destroys them while they run
        # (SIGABRT, "terminate called without an active exception", after a finished run; 1 in about 250
        # runs here). Everything is written and closed by now: leave without that shutdown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _steps_line(s: dict, unit: str = "mm") -> str:
    """metrics.step_summary in words."""
    if not s["n"]:
        return "none (no two consecutive vertebrae found)"
    return (f"{s['n']} steps, true {s[f'true_{unit}']:.1f} {unit}, predicted {s[f'predicted_{unit}']:.1f} {unit} "
            f"on average, off by {s[f'error_{unit}']:.1f} {unit}; slope {s['slope']:.2f}, correlation "
            f"{s['correlation']:.2f} (1 and 1: the spacing is read from the images)")


def _print_steps(result: dict, prefix: str = ""):
    """The 3D estimates' steps and each view's heatmap peaks' steps."""
    print(f"{prefix}steps to the next vertebra: {_steps_line(result['steps'])}")
    for view, s in result["steps_2d"].items():
        print(f"{prefix}steps of the heatmap peaks, {view.upper()}: {_steps_line(s, 'px')}")


def _adapt(args):
    from .models import baseline_checkpoint, default_checkpoint
    from .training.adapt import AdaptConfig, adapt
    init = {"baseline": baseline_checkpoint(), "default": default_checkpoint()}.get(args.init, args.init)
    out = adapt(args.ct, args.out, centroids=args.centroids, mask=args.mask, mask_style=args.mask_style,
                init=init, device=args.device, config=AdaptConfig(minutes=args.minutes, seed=args.seed),
                progress=not args.quiet)
    print(f"wrote {out}: start the node with checkpoint:={out}")
    return 0


def _evaluate(args):
    from .data import realct
    from .data.case_io import DatasetError
    from .training.evaluate import evaluate
    if args.realct is not None and not realct.available(args.realct):
        raise DatasetError(f"--realct {args.realct}: the real CTs ({', '.join(realct.CASES)}) are not there")
    root = args.realct or (None if args.no_realct or not realct.available() else realct.ROOT)
    result = evaluate(args.data, args.checkpoint, split=args.split, out=args.out, device=args.device,
                      sweep=args.sweep, limit=args.limit, realct_root=root, chain_stride=args.chain_stride,
                      prompt_refinements=args.prompt_refinements, extra_looks=args.extra_looks,
                      look_seed=args.look_seed, centre_snap=args.centre_snap,
                      centre_agree=args.centre_agree)
    for failed in result["failed_cases"]:
        print(f"x2p: error: case {failed['case']}: {failed['error']} (counted as missed)", file=sys.stderr)
    print(f"{result['cases']} cases of split '{result['split']}' in {result['data']}, chain stride "
          f"{result['chain_stride']}, prompt refinements {result['prompt_refinements']}, extra looks "
          f"{result['extra_looks']}" + (f", centre snap {result['centre_snap']:g}" if result["centre_snap"] else "")
          + (f", agreement {result['centre_agree']:g}" if result["centre_snap"] and result["centre_agree"] else "")
          + ("" if args.look_seed is None else f", random looks of seed {args.look_seed}"))
    m = result["3d_mm"]
    print(f"3D: PCL@10 {100 * m['pcl@10']:.1f} %  PCL@20 {100 * m['pcl@20']:.1f} %  MPE {m['mpe']:.2f} mm  "
          f"AUC {m['auc']:.4f}  ({m['n']} vertebrae, {m['missed']} missed)")
    for view in ("ap", "lat"):
        if f"2d_{view}_px" in result:
            m = result[f"2d_{view}_px"]
            print(f"2D {view.upper()}: PCL@10 {100 * m['pcl@10']:.1f} %  MPE {m['mpe']:.2f} px  AUC {m['auc']:.4f}")
    per_index = "  ".join(f"{k}: {m['mpe']:.1f} ({m['missed']}/{m['n']})" if math.isfinite(m["mpe"]) else
                          f"{k}: none found ({m['missed']}/{m['n']})" for k, m in result["per_index_3d_mm"].items())
    print(f"3D MPE mm by index below the prompt (missed/vertebrae): {per_index}")
    print(f"identity swaps: {result['identity_swaps']} (found nearer to another vertebra's ground truth)")
    print(f"spurious: {result['spurious']} (found past the last vertebra of the ground truth)")
    _print_steps(result)
    print(f"model forwards per pair: {result['windows_per_pair']:.1f} (windows; a chain stride adds some)")
    if "real_anatomy" in result:
        r = result["real_anatomy"]
        m = r["3d_mm"]
        print(f"real anatomy (validation only: {r['pairs']} pairs of the CTs in {r['root']}): PCL@10 "
              f"{100 * m['pcl@10']:.1f} %  MPE {m['mpe']:.2f} mm  ({m['n']} vertebrae, {m['missed']} missed)")
        _print_steps(r, "real anatomy, ")
    elif args.no_realct:
        print("real anatomy: not measured (--no-realct)")
    else:
        print("real anatomy: not measured (the real CTs are not at ../shared/realct; --realct DIR names them)")
    if args.sweep:
        print(f"prompt sweep: largest MPE change {result['prompt_sweep_max_mpe_change_mm']:.3f} mm")
    if args.out:
        print(f"wrote {args.out}/metrics.json and plots")
    return 0


def _presence(args):
    from dataclasses import replace

    from .data import case_io
    from .model import checkpoint
    from .training.evaluate import best_presence_threshold, presence_table, split_names
    if args.out and Path(args.out).resolve() == Path(args.checkpoint).resolve():
        raise InputError("--out must be another file than --checkpoint (the checkpoint as trained is kept)")
    names = split_names(args.data, args.split, args.limit)
    if not names:
        raise case_io.DatasetError(f"{args.data}: split '{args.split}' has no cases")
    model, meta = checkpoint.load_model(args.checkpoint, args.device)
    rows = presence_table(model, args.data, names, args.device)
    chosen = best_presence_threshold(rows)
    print(f"{len(names)} cases of split '{args.split}' in {args.data}; the checkpoint's threshold: "
          f"{model.config.presence_threshold:g}")
    print(f"{'threshold':>9} {'within 10 mm':>12} {'missed':>7} {'spurious':>8} {'score':>6}")
    for r in rows:
        mark = "  <- chosen" if r["threshold"] == chosen else ""
        print(f"{r['threshold']:>9.2f} {r['within_10mm']:>12} {r['missed']:>7} {r['spurious']:>8} "
              f"{r['score']:>6}{mark}")
    if args.out:
        model.config = replace(model.config, presence_threshold=chosen)
        meta = {**meta, "presence_calibration": {"data": str(args.data), "split": args.split, "cases": len(names),
                                                 "threshold": chosen, "table": rows}}
        checkpoint.save(args.out, model, meta=meta)
        print(f"wrote {args.out} with presence threshold {chosen:g}")
    return 0


def _model_summary(args):
    from .model import preset
    from .model.checkpoint import read, saved_config
    from .model.summary import model_summary
    if args.checkpoint:
        config = saved_config(read(args.checkpoint), args.checkpoint)
    else:
        try:
            config = preset(args.config, **({"image_size": args.size} if args.size else {}))
        except ValueError as e:  # a size the config cannot take
            raise InputError(f"--size {args.size}: {e}") from None
    rows = model_summary(config)
    print(f"X2P-Net ({args.checkpoint or args.config}) at {config.image_size} x {config.image_size}, per pair:")
    width = max(len(unit) for unit in rows) + 1
    print(f"{'unit':<{width}}{'parameters':>12}{'GMACs':>10}")
    for unit, row in rows.items():
        print(f"{unit:<{width}}{row['params']:>12,}{row['gmacs']:>10.2f}")
    return 0


def _localize(args):
    from .localize_files import localize_files
    from .models import default_checkpoint
    prompts = None
    if args.prompt_ap or args.prompt_lat:
        prompts = {v: p for v, p in (("ap", args.prompt_ap), ("lat", args.prompt_lat)) if p}
    if args.case is None and not (args.ap and args.lat and args.calibration):
        raise InputError("give a case folder, or --ap, --lat and --calibration")
    result = localize_files(args.checkpoint or default_checkpoint(), args.out, case=args.case,
                            images={"ap": args.ap, "lat": args.lat}, calibration=args.calibration,
                            prompts=prompts, reference_level=args.reference_level, device=args.device)
    found = [v for v in result["vertebrae"] if v["present"]]
    print(f"{len(found)} vertebrae in {1000 * result['seconds']:.0f} ms: "
          + ", ".join(f"{v['label']} ({', '.join(f'{c:.1f}' for c in v['xyz_mm'])}) mm" for v in found))
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.png')}")
    return 0


def _ct_arguments(p: argparse.ArgumentParser):
    """A CT and its one ground-truth source (import-ct, adapt)."""
    p.add_argument("--ct", required=True, help="CT volume (.nii / .nii.gz, HU)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--centroids", help="VerSe *_iso-ctd.json or *_ctd.json body centroids")
    source.add_argument("--mask", help="vertebra label mask on the CT's voxel grid (.nii.gz)")
    p.add_argument("--mask-style", choices=["verse", "totalseg"], default="verse", help="numbering of the mask")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="x2p", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data", help="make and inspect data sets").add_subparsers(dest="data_command",
                                                                                         required=True)

    p = data.add_parser("synth", help="render synthetic biplanar radiographs of spine phantoms")
    p.add_argument("--out", required=True, help="data set folder (an interrupted run resumes)")
    p.add_argument("--cases", type=int, required=True)
    p.add_argument("--size", type=int, default=512, help="image size in pixels (square)")
    p.add_argument("--seed", type=at_least(0), default=0)
    p.add_argument("--workers", type=int, default=None, help="parallel processes (default: one per core)")
    p.add_argument("--split", choices=("train", "val", "test"), default=None,
                   help="only the cases of this split of the data set (the same names and seeds); the same "
                        "command without it completes the data set")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_data_synth)

    p = data.add_parser("import-ct", help="render a real CT (NIfTI) with VerSe centroids or a label mask")
    _ct_arguments(p)
    p.add_argument("--out", required=True, help="case folder to write")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--seed", type=at_least(0), default=0)
    p.set_defaults(run=_data_import)

    p = data.add_parser("add-ct", help="add DRR pairs of a real CT (random poses and table deformations) "
                                       "to a data set")
    _ct_arguments(p)
    p.add_argument("--data", required=True, help="data set folder (made when missing; an interrupted run resumes)")
    p.add_argument("--pairs", type=int, required=True, help="pairs to render")
    p.add_argument("--split", default="train", choices=["train", "val", "test"])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--seed", type=at_least(0), default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_data_add_ct)

    p = data.add_parser("mix", help="a data set linking other data sets' splits (e.g. two engine versions)")
    p.add_argument("--out", required=True, help="data set folder to make (must not exist)")
    p.add_argument("--train", nargs="+", required=True, metavar="DATA", help="data sets whose train split it takes")
    p.add_argument("--val", nargs="+", default=[], metavar="DATA", help="data sets whose val split it takes")
    p.add_argument("--test", nargs="+", default=[], metavar="DATA", help="data sets whose test split it takes")
    p.set_defaults(run=_data_mix)

    p = data.add_parser("show", help="write a contact sheet PNG with the projected ground truth")
    p.add_argument("dir")
    p.add_argument("--out", help="PNG path (default: DIR/contact_sheet.png)")
    p.add_argument("--cases", type=at_least(1), default=8)
    p.set_defaults(run=_data_show)

    p = data.add_parser("check", help="validate a data set and list its problems")
    p.add_argument("dir")
    p.set_defaults(run=_data_check)

    from .model.config import PRESETS
    from .training import appearance
    from .training.data import PROMPT_JITTER_PX
    p = commands.add_parser("train", help="train X2P-Net (resumes from OUT/last.pt; torchrun for several GPUs)")
    p.add_argument("--data", required=True)
    p.add_argument("--config", default="cpu", choices=sorted(PRESETS))
    p.add_argument("--out", required=True, help="run folder: checkpoints, log.csv, loss.png")
    p.add_argument("--epochs", type=at_least(1), default=100)
    p.add_argument("--batch-size", type=at_least(1), default=2)
    p.add_argument("--lr", type=at_least(0.0, float), default=5e-4)
    p.add_argument("--workers", type=at_least(0), default=2, help="data loading processes (0: in the training process)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=at_least(0), default=0)
    p.add_argument("--time-limit", type=at_least(0.0, float), default=None,
                   help="minutes; stop after the epoch that passes it")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="change one field of the config (x2p_ros/model/config.py), e.g. heatmap_prior=true")
    p.add_argument("--init", help="checkpoint to start from (fine-tune, new schedule); one of another config "
                                  "whose weights all fit this one is a warm start")
    p.add_argument("--max-bad-steps", type=at_least(1), default=20,
                   help="stop after this many steps in a row with a non-finite loss or gradient (each is skipped)")
    p.add_argument("--prompt-jitter", type=float, nargs=2, default=PROMPT_JITTER_PX, metavar=("X", "Y"),
                   help="half range of the training prompt's random displacement, px at 512 (scaled to the size)")
    p.add_argument("--augment", default="strong", choices=list(appearance.KINDS),
                   help="appearance randomisation of the training images (x2p_ros/training/appearance.py)")
    p.add_argument("--train-only", metavar="PREFIX",
                   help="only the weights whose names begin with PREFIX learn, e.g. centre_head. (a new head on "
                        "--init's weights, which stay as they are)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=_train)

    p = commands.add_parser("adapt", help="fine-tune a patient-specific model on DRRs of the patient's CT "
                                          "(resumes an interrupted run)")
    _ct_arguments(p)
    p.add_argument("--out", required=True, help="checkpoint to write, e.g. patient.pt (work folder: OUT.work)")
    p.add_argument("--minutes", type=float, default=30.0, help="time budget: rendering and fine-tuning")
    p.add_argument("--init", default="baseline",
                   help="checkpoint to adapt: baseline (default) or default, the shipped models, or a file")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=at_least(0), default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_adapt)

    p = commands.add_parser("evaluate", help="the paper's metrics on a data split")
    p.add_argument("--data", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    p.add_argument("--out", help="folder for metrics.json and the plots")
    p.add_argument("--device", default="cpu")
    p.add_argument("--sweep", action="store_true", help="also displace the prompt (paper, Figure 9)")
    p.add_argument("--limit", type=at_least(1), default=None, help="only the first N cases")
    p.add_argument("--realct", type=Path, default=None,
                   help="the labelled real CTs for the real-anatomy validation row (default: ../shared/realct "
                        "beside the project, when there)")
    p.add_argument("--no-realct", action="store_true", help="no real-anatomy validation row")
    p.add_argument("--chain-stride", type=int, default=None,
                   help="prompt again every S vertebrae (0: the whole view's estimates; default: the checkpoint's)")
    p.add_argument("--prompt-refinements", type=int, default=None,
                   help="prompt again R times at the estimate of the prompted vertebra (0: the prompt as given; "
                        "default: the checkpoint's)")
    p.add_argument("--extra-looks", type=int, default=None,
                   help="also run each window in L other looks (edge enhancement, gamma, CLAHE) and take the median "
                        "estimate (0: the image as given; at most 4; default: the checkpoint's)")
    p.add_argument("--look-seed", type=at_least(0), default=None,
                   help="give each view of the split a random look first, drawn as training draws it from this "
                        "seed: how the estimates depend on the images' look (the real CTs stay as they are)")
    p.add_argument("--centre-snap", type=float, default=None,
                   help="walk the chain onto the centre head's peaks within this share of the model's step (0: the "
                        "model's own estimates; at most 1; a checkpoint with a centre head; default: the checkpoint's)")
    p.add_argument("--centre-agree", type=float, default=None,
                   help="take a vertebra's snaps only where the two views meet: their triangulated point "
                        "reprojects within this share of the step of each view's snap (0: no check; at most 1; "
                        "default: the checkpoint's)")
    p.set_defaults(run=_evaluate)

    p = commands.add_parser("presence", help="choose the presence threshold on a data split (vertebrae within "
                                             "10 mm minus spurious ones) and write it into a copy of the checkpoint")
    p.add_argument("--data", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--split", default="val", choices=["train", "val", "test", "all"])
    p.add_argument("--limit", type=at_least(1), default=None, help="only the first N cases")
    p.add_argument("--out", help="checkpoint to write with the chosen threshold (default: only print the table)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(run=_presence)

    p = commands.add_parser("localize", help="localise the vertebrae of one AP/LAT pair from files")
    p.add_argument("case", nargs="?", help="a case folder (prompt: its top-most vertebra unless given)")
    p.add_argument("--ap", help="AP image (PNG, 16-bit TIFF, DICOM)")
    p.add_argument("--lat", help="LAT image")
    p.add_argument("--calibration", help="YAML with ap and lat: P, or K + translation_m + rotation_xyzw")
    p.add_argument("--prompt-ap", type=float, nargs=2, metavar=("U", "V"))
    p.add_argument("--prompt-lat", type=float, nargs=2, metavar=("U", "V"))
    p.add_argument("--reference-level", default="", help="level of the prompted vertebra, e.g. T12")
    p.add_argument("--checkpoint", default=None, help="default: the shipped model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="localization.json", help="JSON; the overlay goes beside it as .png")
    p.set_defaults(run=_localize)

    model = commands.add_parser("model", help="model information").add_subparsers(dest="model_command", required=True)
    p = model.add_parser("summary", help="parameters and GMACs per unit")
    p.add_argument("--config", default="paper", choices=sorted(PRESETS))
    p.add_argument("--checkpoint", help="summarise the config of this checkpoint instead")
    p.add_argument("--size", type=int, default=None, help="input size (default: the config's)")
    p.set_defaults(run=_model_summary)
    return parser


def main(argv=None) -> int:
    keep_freed_memory()
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse has printed the usage error (2) or the help (0)
        return e.code
    from .data.case_io import DatasetError
    from .geometry import CalibrationError
    from .model.checkpoint import CheckpointError
    from .training.adapt import AdaptError
    from .training.train import TrainingError
    try:
        return args.run(args)
    except (DatasetError, CalibrationError, CheckpointError, InputError, TrainingError, AdaptError) as e:
        print(f"x2p: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

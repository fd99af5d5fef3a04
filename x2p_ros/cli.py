"""The `x2p` command line: data generation and inspection (training,
evaluation and localisation join as they land)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _data_synth(args):
    from .data.synth import SynthConfig, synthesize
    stats = synthesize(args.out, args.cases, seed=args.seed, config=SynthConfig(size=args.size),
                       workers=args.workers, progress=not args.quiet)
    v = stats["vertebrae_per_case"]
    print(f"{stats['cases']} cases in {args.out}: vertebrae per case min {v['min']} / median {v['median']:g} / "
          f"max {v['max']}; scoliosis {100 * stats['share_scoliosis']:.0f} %, fracture "
          f"{100 * stats['share_fracture']:.0f} %, implant {100 * stats['share_implant']:.0f} %")
    return 0


def _data_import(args):
    from .data.ct_import import import_ct
    from .data.synth import SynthConfig
    folder = import_ct(args.ct, args.out, centroids=args.centroids, mask=args.mask, mask_style=args.mask_style,
                       seed=args.seed, config=SynthConfig(size=args.size))
    print(f"wrote {folder}")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="x2p", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data", help="make and inspect data sets").add_subparsers(dest="data_command", required=True)

    p = data.add_parser("synth", help="render synthetic biplanar radiographs of spine phantoms")
    p.add_argument("--out", required=True, help="data set folder (an interrupted run resumes)")
    p.add_argument("--cases", type=int, required=True)
    p.add_argument("--size", type=int, default=512, help="image size in pixels (square)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="parallel processes (default: one per core)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_data_synth)

    p = data.add_parser("import-ct", help="render a real CT (NIfTI) with VerSe centroids or a label mask")
    p.add_argument("--ct", required=True, help="CT volume (.nii / .nii.gz, HU)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--centroids", help="VerSe *_iso-ctd.json or *_ctd.json")
    source.add_argument("--mask", help="vertebra label mask (.nii.gz)")
    p.add_argument("--mask-style", choices=["verse", "totalseg"], default="verse")
    p.add_argument("--out", required=True, help="case folder to write")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_data_import)

    p = data.add_parser("show", help="write a contact sheet PNG with the projected ground truth")
    p.add_argument("dir")
    p.add_argument("--out", help="PNG path (default: DIR/contact_sheet.png)")
    p.add_argument("--cases", type=int, default=8)
    p.set_defaults(run=_data_show)

    p = data.add_parser("check", help="validate a data set and list its problems")
    p.add_argument("dir")
    p.set_defaults(run=_data_check)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .data.case_io import DatasetError
    from .geometry import CalibrationError
    try:
        return args.run(args)
    except (DatasetError, CalibrationError) as e:
        print(f"x2p: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

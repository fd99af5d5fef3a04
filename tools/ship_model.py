"""Copies a run's best checkpoint to x2p_ros/models/NAME.pt (default.pt: the
package's model; baseline.pt: the lifting baseline for `make bench`) and
records its provenance beside it (NAME.json): config, training data and seed,
the run it was fine-tuned from, validation metrics, the commit, the machine.

  python tools/ship_model.py runs/default-cpu data/bispinex-256-s1000 [default|baseline] [CHECKPOINT]

CHECKPOINT (default: the run's best.pt) is that checkpoint after `x2p presence --out`: the
presence threshold chosen on a split, recorded with its table.

  python tools/ship_model.py --recalibrated COPY [default|baseline]

ships COPY, the shipped model after `x2p presence --out COPY`: the same weights with another
presence threshold; its JSON keeps the training record and gets the new threshold and table.

  python tools/ship_model.py --chain-stride S NAME MEASURED.json
  python tools/ship_model.py --prompt-refinements R NAME MEASURED.json
  python tools/ship_model.py --extra-looks L NAME MEASURED.json

  python tools/ship_model.py --centre-head RUN DATA SNAP NAME MEASURED.json [AGREE]

puts the centre head of RUN/best.pt (trained on DATA with `x2p train --train-only centre_head.`) into the
shipped model, snapping at SNAP of its step (X2PConfig.centre_snap) where the two views agree within AGREE of
it (X2PConfig.centre_agree; default 0, no check), its other weights unchanged; MEASURED.json, the figures it was
chosen by, goes into its JSON.

The last three set the shipped model's chain stride (X2PConfig.chain_stride: prompt again every S vertebrae),
prompt refinements (X2PConfig.prompt_refinements: prompt again R times at the prompted vertebra's
estimate) or extra looks (X2PConfig.extra_looks: the median over L more looks of each window), its
weights unchanged; MEASURED.json, the figures it was chosen by (`x2p evaluate --chain-stride`,
`--prompt-refinements` or `--extra-looks` on phantom data), goes into its JSON."""
import csv
import json
import platform
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from x2p_ros.data import case_io, realct  # noqa: E402
from x2p_ros.data.patient_pairs import sha256  # noqa: E402
from x2p_ros.model import build_model, checkpoint, preset  # noqa: E402
from x2p_ros.models import baseline_checkpoint, default_checkpoint  # noqa: E402

TARGETS = {"default": default_checkpoint, "baseline": baseline_checkpoint}


def refuse_validation_cts(data: Path, splits, use: str) -> list[str]:
    """The patient-CT cases of those splits; SystemExit if any is a real-anatomy validation CT's: they are never
    trained on nor used to choose a setting. `x2p data add-ct` names its cases ct<sha256[:12]>_..."""
    seen = {n for split in splits for n in case_io.read_split(data, split)}
    patient_cases = sorted(n for n in seen if n.startswith("ct"))
    validation_cts = {sha256(realct.ROOT / name / "ct.nii.gz")[:12]: name for name in realct.CASES
                      if realct.available(realct.ROOT)}
    leaked = sorted({validation_cts[n[2:14]] for n in patient_cases if n[2:14] in validation_cts})
    if leaked:
        raise SystemExit(f"ship_model: {data} {use} the real-anatomy validation CT(s) {', '.join(leaked)}: "
                         "never ship such a model")
    return patient_cases


def checked_calibration(meta: dict) -> dict | None:
    """The checkpoint's presence calibration, its data checked like training data, and the record saying so."""
    calibration = meta.get("presence_calibration")
    if calibration is not None:
        splits = ("train", "val", "test") if calibration["split"] == "all" else (calibration["split"],)
        refuse_validation_cts(Path(calibration["data"]), splits, "chose the presence threshold on")
        calibration = {**calibration, "real_anatomy_validation_cts": False}
    return calibration


def refuse_chosen_on_validation_cts(figures: dict, words: str) -> list[str]:
    """The data sets a setting was chosen on (MEASURED.json's rows); SystemExit if any holds a validation CT's
    pairs: a setting is chosen on phantom data, never on the validation CTs."""
    measured_on = sorted({row["data"] for row in figures["rows"]})
    for data in measured_on:
        refuse_validation_cts(Path(data), ("train", "val", "test"), f"chose the {words} on")
    return measured_on


def head_runs(run: Path, data: Path) -> list[dict]:
    """Every run a centre head was trained in, newest first, followed back through --init while it is a run's
    checkpoint (its folder has log.csv): the run, its training data (checked: no validation CT's pairs) and its
    epochs. RUN's data is DATA; an earlier run's, its best.pt's record."""
    runs = []
    while True:
        patient_cases = refuse_validation_cts(data, ("train", "val"), "trains on")
        dataset = json.loads((data / "dataset.json").read_text())
        init = checkpoint.read(run / "best.pt")["meta"].get("init")
        runs.append({"run": run.name, "epochs": len(list(csv.DictReader((run / "log.csv").open()))), "init": init,
                     "training_data": {"folder": data.name, "engine": dataset.get("engine", 1),
                                       "cases": dataset["cases"], "seed": dataset["seed"],
                                       "patient_ct_cases": len(patient_cases), "real_anatomy_validation_cts": False}})
        if not init or not (Path(init).parent / "log.csv").is_file():
            return runs
        run = Path(init).parent
        recorded = checkpoint.read(run / "best.pt")["meta"].get("data")
        if not recorded:
            raise SystemExit(f"ship_model: {run / 'best.pt'} does not say what it was trained on: its head's "
                             "provenance cannot be checked")
        data = Path(recorded)


def with_note_part(note: str, words: str, part: str) -> str:
    """The checkpoint's note with its part on `words` (a setting's name) replaced by `part`. Parts are separated
    by '; ' outside parentheses: a rule's reference may hold '; ' in its own parentheses."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(note):
        depth = max(depth + {"(": 1, ")": -1}.get(c, 0), 0)  # an unmatched ')' of an older note closes nothing
        if depth == 0 and note.startswith("; ", i):
            parts.append(note[start:i])
            start = i + 2
    parts.append(note[start:])
    return "; ".join([p for p in parts if p and not p.startswith(words)] + [part])


def config_changes(config_name: str | None, model) -> dict:
    """The fields that differ from the named preset (x2p train --set, x2p presence): the name alone would not say
    what was shipped."""
    named = preset(config_name).to_dict() if config_name else {}
    return {k: v for k, v in model.config.to_dict().items() if named and named[k] != v}


def main(run: str, data: str, name: str = "default", checkpoint_file: str | None = None) -> int:
    if name not in TARGETS:
        raise SystemExit(f"ship_model: NAME must be one of {', '.join(TARGETS)}, got {name!r}")
    run, data = Path(run), Path(data)
    shipping = Path(checkpoint_file or run / "best.pt")
    model, meta = checkpoint.load_model(shipping)
    dataset = json.loads((data / "dataset.json").read_text())
    patient_cases = refuse_validation_cts(data, ("train", "val"), "trains on")
    calibration = checked_calibration(meta)
    log = list(csv.DictReader((run / "log.csv").open()))
    init = meta.get("init")  # a fine-tune: count the epochs of the run (or the shipped model) it started from
    init_log = Path(init).parent / "log.csv" if init else None
    init_record = Path(init).with_suffix(".json") if init else None
    parent = json.loads(init_record.read_text()) if init_record and init_record.is_file() else None
    checkpoint_sha256 = sha256(shipping)
    if parent and parent.get("checkpoint_sha256") == checkpoint_sha256:
        # this run shipped again over the model it started from: the record there is its own, its parent
        # the one that record names
        parent = parent["training"]["fine_tuned_from_record"]
    if init_log and init_log.is_file():
        prior = len(list(csv.DictReader(init_log.open())))
    elif parent:  # a shipped model: its provenance says how it was trained
        prior = parent["training"].get("epochs_before_fine_tune", 0) + parent["training"]["epochs_run"]
    else:
        prior = 0
    epochs = f"{prior} + {len(log)} epochs (fine-tuned from {init})" if init else f"{len(log)} epochs"
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    record = {
        "config": meta.get("config_name"), "config_changes": config_changes(meta.get("config_name"), model),
        "config_values": model.config.to_dict(),
        "training_data": {"generator": "x2p data synth", "engine": dataset.get("engine", 1),
                          "patient_ct_cases": len(patient_cases), "real_anatomy_validation_cts": False,
                          "cases": dataset["cases"], "seed": dataset["seed"],
                          "size": dataset["config"]["size"], "folder": data.name,
                          "vertebrae_per_case": dataset["vertebrae_per_case"], "synth_config": dataset["config"],
                          **({"mix_of": dataset["mix_of"]} if "mix_of" in dataset else {})},  # x2p data mix
        "training": {"epochs_run": len(log), "best_epoch": meta.get("epoch"), "fine_tuned_from": init,
                     "epochs_before_fine_tune": prior,
                     "fine_tuned_from_record": parent,
                     "optimizer": "AdamW wd 0.05", "augment": meta.get("augment", "mild"),
                     "seconds": float(log[-1]["seconds"]) if log else None, "device": "cpu",
                     "machine": f"{platform.machine()}, torch {torch.__version__}"},
        "validation": {"mpe_mm": meta.get("val_mpe_mm"), "pcl10": meta.get("val_pcl10")},
        "presence_calibration": calibration,
        "checkpoint_sha256": checkpoint_sha256,  # the run's file shipped, by which a second shipping knows it
        "commit": commit,
    }
    target = TARGETS[name]()
    checkpoint.save(target, model, meta={"config_name": meta.get("config_name"),
                                         "note": f"trained on the CPU, {epochs}, best at epoch "
                                                 f"{meta.get('epoch')}, commit {commit[:10]}",
                                         **record["validation"]})
    target.with_suffix(".json").write_text(json.dumps(record, indent=1))
    print(f"shipped {target} ({target.stat().st_size / 1e6:.1f} MB): {json.dumps(record['validation'])}")
    return 0


def recalibrated(copy: str, name: str = "default") -> int:
    if name not in TARGETS:
        raise SystemExit(f"ship_model: NAME must be one of {', '.join(TARGETS)}, got {name!r}")
    target = TARGETS[name]()
    shipped, new = checkpoint.read(target), checkpoint.read(copy)
    calibration = checked_calibration(new["meta"])
    if calibration is None:
        raise SystemExit(f"ship_model: {copy} has no presence calibration (make it with x2p presence --out)")
    same = shipped["model"].keys() == new["model"].keys() and all(
        torch.equal(shipped["model"][k], new["model"][k]) for k in shipped["model"])
    if not same:
        raise SystemExit(f"ship_model: {copy} does not hold the weights of {target}: ship a new model from its run")
    model, meta = checkpoint.load_model(copy)
    record = json.loads(target.with_suffix(".json").read_text())
    record["config_values"] = model.config.to_dict()
    record["config_changes"] = config_changes(record.get("config"), model)
    record["presence_calibration"] = calibration
    note = shipped["meta"].get("note", "")
    meta = {**shipped["meta"], "presence_calibration": calibration,
            "note": f"{note.split('; presence threshold')[0]}; presence threshold {calibration['threshold']:g} chosen "
                    f"on {calibration['cases']} cases of split '{calibration['split']}' (x2p presence)"}
    checkpoint.save(target, model, meta=meta)
    target.with_suffix(".json").write_text(json.dumps(record, indent=1))
    print(f"shipped {target} with presence threshold {calibration['threshold']:g} (weights unchanged)")
    return 0


INFERENCE_SETTINGS = {"--chain-stride": ("chain_stride", "chain stride"),
                      "--prompt-refinements": ("prompt_refinements", "prompt refinements"),
                      "--extra-looks": ("extra_looks", "extra looks")}


def with_inference_setting(option: str, value: str, name: str, measured: str) -> int:
    """The shipped model with another chain stride, number of prompt refinements or of extra looks, its weights
    unchanged."""
    if name not in TARGETS:
        raise SystemExit(f"ship_model: NAME must be one of {', '.join(TARGETS)}, got {name!r}")
    field, words = INFERENCE_SETTINGS[option]
    target = TARGETS[name]()
    model, meta = checkpoint.load_model(target)
    figures = json.loads(Path(measured).read_text())
    figures = {**figures, "measured_on": refuse_chosen_on_validation_cts(figures, words),
               "real_anatomy_validation_cts": False}
    model.config = replace(model.config, **{field: int(value)})
    record = json.loads(target.with_suffix(".json").read_text())
    record["config_values"] = model.config.to_dict()
    record["config_changes"] = config_changes(record.get("config"), model)
    record[field] = figures
    # the note's other parts (training, threshold, the other setting) stay; this setting's part is replaced
    note = with_note_part(meta.get("note", ""), words, f"{words} {value} chosen by {figures['rule']}")
    checkpoint.save(target, model, meta={**meta, "note": note})
    target.with_suffix(".json").write_text(json.dumps(record, indent=1))
    print(f"shipped {target} with {words} {getattr(model.config, field)} (weights unchanged)")
    return 0


def with_centre_head(run: str, data: str, snap: str, name: str, measured: str, agree: str = "0") -> int:
    """The shipped model with the centre head of a run (its own U-Net: the model's other weights stay), snapping
    at snap of its step where the views agree within agree of it."""
    if name not in TARGETS:
        raise SystemExit(f"ship_model: NAME must be one of {', '.join(TARGETS)}, got {name!r}")
    run, data = Path(run), Path(data)
    head = checkpoint.read(run / "best.pt")
    weights = {k: v for k, v in head["model"].items() if k.startswith("centre_head.")}
    if not weights:
        raise SystemExit(f"ship_model: {run / 'best.pt'} has no centre head")
    runs = head_runs(run, data)
    figures = json.loads(Path(measured).read_text())
    refuse_chosen_on_validation_cts(figures, "centre snapping")
    target = TARGETS[name]()
    model, meta = checkpoint.load_model(target)
    with_head = build_model(replace(model.config, centre_head=True, centre_snap=float(snap),
                                    centre_agree=float(agree)))
    with_head.load_state_dict({**model.state_dict(), **weights})
    record = json.loads(target.with_suffix(".json").read_text())
    record["config_values"] = with_head.config.to_dict()
    record["config_changes"] = config_changes(record.get("config"), with_head)
    record["centre_head"] = {
        "run": run.name, "trained_beside": runs[-1]["init"], "epochs_run": runs[0]["epochs"],
        "epochs_in_all": sum(r["epochs"] for r in runs), "runs": runs,
        "best_epoch": head["meta"].get("epoch"), "validation_snapped": {"mpe_mm": head["meta"].get("val_mpe_mm"),
                                                                       "pcl10": head["meta"].get("val_pcl10")},
        "training_data": runs[0]["training_data"],
        "snap": float(snap), "agree": float(agree), "measured": {**figures, "real_anatomy_validation_cts": False}}
    note = with_note_part(meta.get("note", ""), "centre snap",
                          f"centre snap {float(snap):g} (agreement {float(agree):g}) chosen by {figures['rule']}")
    checkpoint.save(target, with_head, meta={**meta, "note": note})
    target.with_suffix(".json").write_text(json.dumps(record, indent=1))
    print(f"shipped {target} with the centre head of {run} snapping at {float(snap):g}, agreement {float(agree):g} "
          f"(other weights unchanged)")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--centre-head"]:
        sys.exit(with_centre_head(*sys.argv[2:]))
    if sys.argv[1:2] == ["--recalibrated"]:
        sys.exit(recalibrated(*sys.argv[2:]))
    if sys.argv[1:2] and sys.argv[1] in INFERENCE_SETTINGS:
        sys.exit(with_inference_setting(*sys.argv[1:]))
    sys.exit(main(*sys.argv[1:]))

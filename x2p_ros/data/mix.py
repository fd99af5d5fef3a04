"""A data set made of other data sets' splits (`x2p data mix`): links to their case folders, so that a model is
fine-tuned on several versions of the data engine at once (and keeps what it learnt on the earlier one) without
copying an image. Each source gives the split of the same name: `train=[a, b]` takes the training cases of a and
of b. A linked case keeps its own name first (`case_00012-from-engine10-256-s6100`), so patient-CT cases stay
recognisable by their `ct<sha256>` prefix."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from . import case_io


def _source_record(source: Path, split: str, names: list[str]) -> dict:
    made = json.loads((source / "dataset.json").read_text()) if (source / "dataset.json").is_file() else {}
    return {"folder": str(source), "split": split, "cases": len(names), "engine": made.get("engine"),
            "seed": made.get("seed"), "synth_config": made.get("config")}


def mix_datasets(out, train=(), val=(), test=()) -> dict:
    """Writes the data set `out` whose split s lists the cases of split s of each folder given for s; returns its
    dataset.json. Refuses, before writing anything, a folder that exists, a source without that split or with a
    case not rendered, two sources of one name, and images of different sizes."""
    out = Path(out)
    if out.exists():
        raise case_io.DatasetError(f"{out} already exists; give a new folder")
    sources = {split: [Path(s) for s in given] for split, given in zip(case_io.SPLITS, (train, val, test))}
    if not sources["train"]:
        raise case_io.DatasetError("give at least one data set for the training split")
    links, records, counts, sizes = {s: {} for s in case_io.SPLITS}, [], [], set()
    for split, folders in sources.items():
        if len({f.name for f in folders}) != len(folders):
            raise case_io.DatasetError(f"two {split} sources have the same folder name: {[str(f) for f in folders]}")
        for source in folders:
            names = case_io.read_split(source, split)
            if not names:
                raise case_io.DatasetError(f"{source}: split '{split}' lists no case")
            for name in names:
                case = case_io.read_case(source / name, load_images=False)  # a case not rendered: its error
                sizes.update(view.size for view in case.views.values())
                counts.append(len(case.labels))
                linked = f"{name}-from-{source.name}"
                if any(linked in split_links for split_links in links.values()):
                    raise case_io.DatasetError(f"{source / name} would be listed twice in the mix")
                links[split][linked] = source / name
            records.append(_source_record(source, split, names))
    if len(sizes) > 1:
        raise case_io.DatasetError(f"the sources' images differ in size ({sorted(sizes)}); mix data sets of one size")
    configs = [r["synth_config"] for r in records]
    dataset = {"mix_of": records, "cases": len(counts), "seed": None,
               "engine": sorted({r["engine"] for r in records if r["engine"] is not None}),
               # one synthesis config when the sources share it; else only what they share, the size
               "config": configs[0] if all(c == configs[0] for c in configs) and configs[0] else
               {"size": next(iter(sizes))[0]},
               "vertebrae_per_case": {"min": int(min(counts)), "median": float(np.median(counts)),
                                      "max": int(max(counts))}}
    partial = out.with_name(f".{out.name}.partial")  # renamed at the end: an error leaves no half-made folder
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for split_links in links.values():
        for name, target in split_links.items():
            os.symlink(os.path.relpath(target.resolve(), out.resolve()), partial / name)
    case_io.write_splits(partial, {s: list(split_links) for s, split_links in links.items()})
    (partial / "dataset.json").write_text(json.dumps(dataset, indent=1))
    os.replace(partial, out)
    return dataset

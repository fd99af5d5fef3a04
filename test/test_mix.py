"""x2p data mix: a data set of links to other data sets' splits."""
import json
import shutil

import numpy as np
import pytest

from x2p_ros import cli
from x2p_ros.data import case_io
from x2p_ros.data.mix import mix_datasets
from x2p_ros.data.synth import SynthConfig, synthesize
from x2p_ros.training.data import BiplanarDataset


@pytest.fixture(scope="module")
def second_data(tmp_path_factory):
    """Three cases of another seed at the size of small_data (96 x 96)."""
    root = tmp_path_factory.mktemp("second")
    synthesize(root, 3, seed=3, config=SynthConfig(size=96), workers=1, progress=False)
    return root


def test_a_mix_lists_each_sources_split_as_links_that_read_and_train_like_the_cases(small_data, second_data,
                                                                                     tmp_path, capsys):
    out = tmp_path / "mix"
    assert cli.main(["data", "mix", "--out", str(out), "--train", str(small_data), str(second_data),
                     "--val", str(second_data)]) == 0
    assert "cases in" in capsys.readouterr().out
    wanted = {"train": [(small_data, n) for n in case_io.read_split(small_data, "train")]
              + [(second_data, n) for n in case_io.read_split(second_data, "train")],
              "val": [(second_data, n) for n in case_io.read_split(second_data, "val")], "test": []}
    for split, cases in wanted.items():
        listed = case_io.read_split(out, split)
        assert listed == [f"{n}-from-{source.name}" for source, n in cases]
        for name, (source, original) in zip(listed, cases):
            linked, real = case_io.read_case(out / name), case_io.read_case(source / original)
            assert linked.name == name and linked.labels == real.labels
            np.testing.assert_array_equal(linked.xyz_mm, real.xyz_mm)
            np.testing.assert_array_equal(linked.views["lat"].image, real.views["lat"].image)
    problems, _ = case_io.check_dataset(out)
    assert problems == []
    made = json.loads((out / "dataset.json").read_text())
    assert [(r["folder"], r["split"], r["cases"]) for r in made["mix_of"]] == [
        (str(source), split, len(case_io.read_split(source, split)))
        for source, split in ((small_data, "train"), (second_data, "train"), (second_data, "val"))]
    assert made["engine"] == [json.loads((small_data / "dataset.json").read_text())["engine"]]
    assert made["cases"] == len(wanted["train"]) + len(wanted["val"]) and made["config"]["size"] == 96
    sample = BiplanarDataset(out, case_io.read_split(out, "train"), 64, 10, train=True)[0]
    assert sample["images"].shape[-2:] == (64, 64)


def _fails_and_leaves_nothing(out, capsys, args, message):
    assert cli.main(["data", "mix", "--out", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def test_a_bad_mix_is_refused_with_a_clear_error_before_any_folder_is_made(small_data, second_data, tmp_path,
                                                                           capsys):
    out = tmp_path / "mix"
    _fails_and_leaves_nothing(out, capsys, ["--train", str(tmp_path / "nowhere")], "missing split file")
    unrendered = tmp_path / "unrendered"
    shutil.copytree(second_data, unrendered)
    shutil.rmtree(unrendered / case_io.read_split(unrendered, "train")[0])
    _fails_and_leaves_nothing(out, capsys, ["--train", str(small_data), str(unrendered)], "case.json: missing")
    other_size = tmp_path / "other_size"
    synthesize(other_size, 2, seed=4, config=SynthConfig(size=64), workers=1, progress=False)
    _fails_and_leaves_nothing(out, capsys, ["--train", str(small_data), str(other_size)], "differ in size")
    twin = tmp_path / "twin" / small_data.name
    shutil.copytree(small_data, twin)
    _fails_and_leaves_nothing(out, capsys, ["--train", str(small_data), str(twin)], "same folder name")
    out.mkdir()
    assert cli.main(["data", "mix", "--out", str(out), "--train", str(small_data)]) == 2
    assert "already exists" in capsys.readouterr().err and not any(out.iterdir())


def test_ship_model_records_a_mix_by_its_sources_and_still_refuses_the_validation_cts_in_it(
        small_data, second_data, tmp_path, monkeypatch):
    import torch
    from test_shipped_model import _ship_to

    from x2p_ros.data import realct
    from x2p_ros.data.patient_pairs import sha256
    from x2p_ros.model import build_model, checkpoint, preset
    for k, name in enumerate(realct.CASES):
        (tmp_path / "realct" / name).mkdir(parents=True)
        (tmp_path / "realct" / name / "ct.nii.gz").write_bytes(bytes([k]) * 100)
    monkeypatch.setattr(realct, "ROOT", tmp_path / "realct")
    leaky = tmp_path / "leaky"
    leaky.mkdir()
    pair = f"ct{sha256(tmp_path / 'realct' / next(iter(realct.CASES)) / 'ct.nii.gz')[:12]}_pair0000"
    shutil.copytree(small_data / case_io.read_split(small_data, "train")[0], leaky / pair)
    case_io.write_splits(leaky, {"train": [pair], "val": [], "test": []})
    tool, shipped = _ship_to(tmp_path, monkeypatch)
    torch.manual_seed(0)
    run = tmp_path / "run"
    checkpoint.save(run / "best.pt", build_model(preset("tiny")), meta={"config_name": "tiny", "epoch": 1})
    (run / "log.csv").write_text("epoch,seconds\n1,2.0\n")
    mix_datasets(tmp_path / "leaky_mix", train=[small_data, leaky])  # the pair's name stays first in the link's
    with pytest.raises(SystemExit, match="trains on the real-anatomy validation CT"):
        tool.main(str(run), str(tmp_path / "leaky_mix"))
    assert not shipped.exists()
    made = mix_datasets(tmp_path / "mix", train=[small_data, second_data], val=[second_data])
    assert tool.main(str(run), str(tmp_path / "mix")) == 0
    record = json.loads(shipped.with_suffix(".json").read_text())["training_data"]
    assert record["mix_of"] == made["mix_of"] and record["engine"] == made["engine"]
    assert record["patient_ct_cases"] == 0

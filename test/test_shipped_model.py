"""The model shipped in x2p_ros/models/default.pt loads and localises a freshly
rendered C-arm-like case (3-6 vertebrae in the field) within 10 mm, offline and
through the ROS node; a broken checkpoint or preprocessing change fails here."""
import json

import numpy as np
import pytest

from x2p_ros import geometry, metrics
from x2p_ros.data import case_io
from x2p_ros.data.synth import SynthConfig, synthesize
from x2p_ros.geometry import VIEWS
from x2p_ros.inference import Localizer
from x2p_ros.model import X2PConfig
from x2p_ros.models import baseline_checkpoint, default_checkpoint


def carm_like_seed(tmp_path, size, first=3000):
    """The first seed from `first` on whose case shows 3 to 6 vertebrae, as a C-arm field
    does (chosen by field size alone). Training used seeds 1000+, the benchmark 777."""
    for seed in range(first, first + 20):
        root = tmp_path / f"s{seed}"
        synthesize(root, 1, seed=seed, config=SynthConfig(size=size), workers=1, progress=False)
        if 3 <= len(case_io.read_case(root / "case_00000").labels) <= 6:
            return seed, root / "case_00000"
    raise AssertionError("no C-arm-like case in 20 seeds")


@pytest.mark.parametrize("path, lifting", [(default_checkpoint(), False), (baseline_checkpoint(), True)])
def test_the_shipped_models_load_and_have_their_provenance_beside_them(path, lifting):
    meta = json.loads(path.with_suffix(".json").read_text())
    assert {"config", "training_data", "validation", "commit"} <= set(meta)
    localizer = Localizer.from_checkpoint(path)
    # the recorded values describe the loaded model (fields added since take their defaults, which keep the
    # architecture the model was trained with)
    assert localizer.config == X2PConfig.from_dict(meta["config_values"])
    assert localizer.config.lifting is lifting  # default.pt is X2P-Net, baseline.pt the lifting baseline


@pytest.mark.parametrize("path", [default_checkpoint(), baseline_checkpoint()])
def test_the_shipped_models_record_that_no_real_anatomy_validation_ct_trained_them_or_chose_a_setting(path):
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["training_data"]["generator"] == "x2p data synth"
    assert meta["training_data"]["real_anatomy_validation_cts"] is False
    # every choice made after training (threshold, inference settings) names its data, checked the same way
    choices = [meta[key] for key in ("presence_calibration", "chain_stride", "prompt_refinements", "extra_looks")
               if meta.get(key) is not None]
    if meta.get("centre_head") is not None:  # its training data and the figures its radius was chosen by
        choices += [meta["centre_head"]["training_data"], meta["centre_head"]["measured"]]
    assert choices, "a shipped model records at least how its presence threshold was chosen"
    assert all(choice["real_anatomy_validation_cts"] is False for choice in choices)
    assert meta["presence_calibration"]["threshold"] == meta["config_values"]["presence_threshold"]


def test_the_shipped_model_localises_a_fresh_case_within_10mm(tmp_path):
    localizer = Localizer.from_checkpoint(default_checkpoint())
    seed, folder = carm_like_seed(tmp_path, localizer.config.image_size)
    case = case_io.read_case(folder)
    found = localizer.localize({v: case.views[v].image for v in VIEWS}, {v: case.views[v].P for v in VIEWS},
                               {v: case.pixels(v)[0] for v in VIEWS}, reference_level=case.labels[0])
    errors = metrics.match_errors([f.xyz_mm for f in found], [f.present for f in found], case.xyz_mm)
    detected = errors[np.isfinite(errors)]
    assert len(detected) >= 2, f"seed {seed}: only {len(detected)} of {len(errors)} vertebrae found"
    assert detected.mean() < 10.0, f"seed {seed}: 3D errors {np.round(errors, 1)} mm"
    assert [f.label for f in found[:len(case.labels)]] == case.labels


def test_the_shipped_model_through_the_node_within_10mm(tmp_path):
    pytest.importorskip("rclpy")
    from geometry_msgs.msg import PoseArray
    from ros_helpers import Listener, ros_processes

    from x2p_ros.msg import VertebraArray
    from x2p_ros.ros.qos import LATCHED, RELIABLE
    size = Localizer.from_checkpoint(default_checkpoint()).config.image_size
    seed, _ = carm_like_seed(tmp_path, size)
    listener = Listener([("vertebrae", VertebraArray, RELIABLE), ("ground_truth/poses", PoseArray, LATCHED)])
    r = listener.received
    try:
        # small motion makes every pair a key frame: results keep coming while the listener connects
        with ros_processes(["x2p_ros.ros.carm_sim", "--ros-args", "-p", f"seed:={seed}", "-p", "cases:=1",
                            "-p", f"size:={size}", "-p", "rate_hz:=2.0", "-p", "motion_px:=1.0"],
                           ["x2p_ros.ros.localizer_node"]):
            assert listener.spin_until(lambda: r["vertebrae"] and r["ground_truth/poses"], 90), \
                {k: len(v) for k, v in r.items()}
    finally:
        listener.close()
    truth = np.array([[p.position.x, p.position.y, p.position.z] for p in r["ground_truth/poses"][0].poses])
    va = r["vertebrae"][0]
    assert va.header.frame_id == "carm"
    pred = np.array([[v.position.x, v.position.y, v.position.z] for v in va.vertebrae])
    errors_mm = geometry.MM_PER_M * metrics.match_errors(pred, [v.present for v in va.vertebrae], truth)
    detected = errors_mm[np.isfinite(errors_mm)]
    assert len(detected) >= 2 and detected.mean() < 10.0, f"3D errors {np.round(errors_mm, 1)} mm"


def _ship_model_tool():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "tools" / "ship_model.py"
    spec = importlib.util.spec_from_file_location("ship_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ship_to(tmp_path, monkeypatch):
    """ship_model, writing its default.pt under tmp_path/models."""
    tool = _ship_model_tool()
    shipped = tmp_path / "models" / "default.pt"
    monkeypatch.setitem(tool.TARGETS, "default", lambda: shipped)
    return tool, shipped


def _data_set(folder, train):
    """A data set's dataset.json and splits, without cases."""
    folder.mkdir()
    (folder / "dataset.json").write_text(json.dumps({"cases": 3, "seed": 1, "engine": 6, "config": {"size": 64},
                                                     "vertebrae_per_case": {"min": 3, "median": 4, "max": 5}}))
    for split, names in {"train": train, "val": ["case_00001"], "test": ["case_00002"]}.items():
        (folder / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    return folder


def _leaky_data_set(tmp_path, monkeypatch):
    """Stand-ins for the validation CTs (ship_model knows them by their files' SHA-256) and a data set with a
    pair of the first."""
    from x2p_ros.data import realct
    from x2p_ros.data.patient_pairs import sha256
    for k, name in enumerate(realct.CASES):
        (tmp_path / "realct" / name).mkdir(parents=True)
        (tmp_path / "realct" / name / "ct.nii.gz").write_bytes(bytes([k]) * 100)
    monkeypatch.setattr(realct, "ROOT", tmp_path / "realct")
    validation_ct = sha256(tmp_path / "realct" / next(iter(realct.CASES)) / "ct.nii.gz")[:12]
    return _data_set(tmp_path / "leaky", [f"ct{validation_ct}_pair0000"])


def test_ship_model_refuses_a_data_set_with_pairs_of_the_validation_cts(tmp_path, monkeypatch):
    import torch

    from x2p_ros.data import realct
    from x2p_ros.data.patient_pairs import sha256
    from x2p_ros.model import build_model, checkpoint, preset
    tool, shipped = _ship_to(tmp_path, monkeypatch)
    # stand-ins for the validation CTs: ship_model knows them by their files' SHA-256
    for k, name in enumerate(realct.CASES):
        (tmp_path / "realct" / name).mkdir(parents=True)
        (tmp_path / "realct" / name / "ct.nii.gz").write_bytes(bytes([k]) * 100)
    monkeypatch.setattr(realct, "ROOT", tmp_path / "realct")
    torch.manual_seed(0)
    run = tmp_path / "run"
    checkpoint.save(run / "best.pt", build_model(preset("tiny")), meta={"config_name": "tiny", "epoch": 1,
                                                                                   "augment": "strong"})
    (run / "log.csv").write_text("epoch,seconds\n1,2.0\n")
    validation_ct = sha256(tmp_path / "realct" / next(iter(realct.CASES)) / "ct.nii.gz")[:12]
    other_ct = sha256(tmp_path / "run" / "log.csv")[:12]

    leaky = _data_set(tmp_path / "leaky", ["case_00000", f"ct{validation_ct}_pair0003"])
    with pytest.raises(SystemExit, match=f"trains on the real-anatomy validation CT.*{next(iter(realct.CASES))}"):
        tool.main(str(run), str(leaky))
    assert not shipped.exists()
    # another patient's CT may train a model: shipped, and counted in its provenance
    fine = _data_set(tmp_path / "fine", ["case_00000", f"ct{other_ct}_pair0000", f"ct{other_ct}_pair0001"])
    assert tool.main(str(run), str(fine)) == 0
    record = json.loads(shipped.with_suffix(".json").read_text())
    assert record["training_data"]["patient_ct_cases"] == 2
    assert record["training_data"]["real_anatomy_validation_cts"] is False
    assert record["training"]["augment"] == "strong"


def test_ship_model_records_the_fields_changed_from_the_named_preset(tmp_path, monkeypatch):
    import torch

    from x2p_ros.model import build_model, checkpoint, preset
    tool, shipped = _ship_to(tmp_path, monkeypatch)
    data = _data_set(tmp_path / "data", ["case_00000"])
    torch.manual_seed(0)
    for overrides in ({}, {"heatmap_prior": True, "loss_3d_peak_sigma_mm": 6.0}):
        run = tmp_path / f"run{len(overrides)}"
        checkpoint.save(run / "best.pt", build_model(preset("tiny", **overrides)),
                        meta={"config_name": "tiny", "epoch": 1, "augment": "strong"})
        (run / "log.csv").write_text("epoch,seconds\n1,2.0\n")
        assert tool.main(str(run), str(data)) == 0
        record = json.loads(shipped.with_suffix(".json").read_text())
        assert record["config"] == "tiny" and record["config_changes"] == overrides
        assert record["config_values"]["heatmap_prior"] is overrides.get("heatmap_prior", False)


def test_ship_model_ships_a_calibrated_checkpoint_with_its_threshold_and_table(tmp_path, monkeypatch):
    import torch

    from x2p_ros.model import build_model, checkpoint, preset
    tool, shipped = _ship_to(tmp_path, monkeypatch)
    data = _data_set(tmp_path / "data", ["case_00000"])
    torch.manual_seed(0)
    run = tmp_path / "run"
    meta = {"config_name": "tiny", "epoch": 1, "augment": "strong"}
    checkpoint.save(run / "best.pt", build_model(preset("tiny")), meta=meta)
    calibration = {"data": str(data), "split": "train", "cases": 1, "threshold": 0.35, "table": []}
    checkpoint.save(run / "calibrated.pt", build_model(preset("tiny", presence_threshold=0.35)),
                    meta={**meta, "presence_calibration": calibration})
    (run / "log.csv").write_text("epoch,seconds\n1,2.0\n")
    assert tool.main(str(run), str(data), "default", str(run / "calibrated.pt")) == 0
    record = json.loads(shipped.with_suffix(".json").read_text())
    assert record["config_changes"] == {"presence_threshold": 0.35}
    assert record["presence_calibration"] == {**calibration, "real_anatomy_validation_cts": False}
    assert checkpoint.load_model(shipped)[0].config.presence_threshold == 0.35
    assert tool.main(str(run), str(data)) == 0  # the run's best.pt as trained: no calibration
    assert json.loads(shipped.with_suffix(".json").read_text())["presence_calibration"] is None


def test_shipping_a_fine_tuned_run_again_keeps_the_model_it_started_from_as_its_parent(tmp_path, monkeypatch):
    import torch

    from x2p_ros.model import build_model, checkpoint, preset
    tool, shipped = _ship_to(tmp_path, monkeypatch)
    data = _data_set(tmp_path / "data", ["case_00000"])
    torch.manual_seed(0)
    checkpoint.save(shipped, build_model(preset("tiny")), meta={"config_name": "tiny"})
    parent = {"training": {"epochs_run": 7, "epochs_before_fine_tune": 90, "fine_tuned_from_record": None},
              "commit": "parent"}
    shipped.with_suffix(".json").write_text(json.dumps(parent))
    run = tmp_path / "run"  # fine-tuned from the shipped model, then shipped over it: twice
    checkpoint.save(run / "best.pt", build_model(preset("tiny")), meta={"config_name": "tiny", "epoch": 2,
                                                                        "init": str(shipped)})
    (run / "log.csv").write_text("epoch,seconds\n1,2.0\n2,4.0\n")
    for _ in range(2):
        assert tool.main(str(run), str(data)) == 0
        training = json.loads(shipped.with_suffix(".json").read_text())["training"]
        assert training["fine_tuned_from_record"] == parent and training["epochs_before_fine_tune"] == 97
    # another run started from this one names it, not its parent
    checkpoint.save(run / "best.pt", build_model(preset("tiny")), meta={"config_name": "tiny", "epoch": 1,
                                                                        "init": str(shipped)})
    assert tool.main(str(run), str(data)) == 0
    training = json.loads(shipped.with_suffix(".json").read_text())["training"]
    assert training["fine_tuned_from_record"]["training"]["fine_tuned_from_record"] == parent


def test_ship_model_recalibrated_changes_only_the_threshold_of_the_shipped_weights(tmp_path, monkeypatch):
    import pytest
    import torch

    from x2p_ros.model import build_model, checkpoint, preset
    tool, shipped = _ship_to(tmp_path, monkeypatch)
    torch.manual_seed(0)
    model = build_model(preset("tiny"))
    checkpoint.save(shipped, model, meta={"config_name": "tiny", "note": "trained on the CPU, 3 epochs"})
    training = {"epochs_run": 3, "augment": "strong"}
    shipped.with_suffix(".json").write_text(json.dumps({"config": "tiny", "config_changes": {}, "training": training,
                                                        "presence_calibration": None}))
    data = _data_set(tmp_path / "data", ["case_00000"])
    calibration = {"data": str(data), "split": "train", "cases": 80, "threshold": 0.25, "table": []}
    copy = tmp_path / "copy.pt"
    model.config = preset("tiny", presence_threshold=0.25)
    checkpoint.save(copy, model, meta={"config_name": "tiny", "presence_calibration": calibration})
    weights = checkpoint.read(shipped)["model"]
    assert tool.recalibrated(str(copy)) == 0
    record = json.loads(shipped.with_suffix(".json").read_text())
    assert record["config_changes"] == {"presence_threshold": 0.25} and record["training"] == training
    assert record["presence_calibration"] == {**calibration, "real_anatomy_validation_cts": False}
    after = checkpoint.read(shipped)
    assert after["config"]["presence_threshold"] == 0.25 and after["meta"]["note"].startswith("trained on the CPU")
    assert "presence threshold 0.25 chosen on 80 cases of split 'train'" in after["meta"]["note"]
    for name, w in weights.items():
        assert torch.equal(after["model"][name], w)
    other = build_model(preset("tiny"))  # other weights: a new model, which must come from its run
    checkpoint.save(tmp_path / "other.pt", other, meta={"presence_calibration": calibration})
    with pytest.raises(SystemExit, match="does not hold the weights"):
        tool.recalibrated(str(tmp_path / "other.pt"))
    checkpoint.save(tmp_path / "plain.pt", model, meta={})
    with pytest.raises(SystemExit, match="has no presence calibration"):
        tool.recalibrated(str(tmp_path / "plain.pt"))


def test_ship_model_refuses_a_threshold_chosen_on_a_validation_ct(tmp_path, monkeypatch):
    import torch

    from x2p_ros.model import build_model, checkpoint, preset
    tool, shipped = _ship_to(tmp_path, monkeypatch)
    leaky = _leaky_data_set(tmp_path, monkeypatch)
    torch.manual_seed(0)
    model = build_model(preset("tiny"))
    checkpoint.save(shipped, model, meta={"config_name": "tiny"})
    shipped.with_suffix(".json").write_text(json.dumps({"config": "tiny", "training": {}}))
    before = shipped.read_bytes()
    calibration = {"data": str(leaky), "split": "train", "cases": 1, "threshold": 0.3, "table": []}
    checkpoint.save(tmp_path / "copy.pt", model, meta={"presence_calibration": calibration})
    with pytest.raises(SystemExit, match="chose the presence threshold on the real-anatomy validation CT"):
        tool.recalibrated(str(tmp_path / "copy.pt"))
    assert shipped.read_bytes() == before


def test_ship_model_sets_a_chain_stride_and_prompt_refinements_keeping_the_weights_and_refuses_them_chosen_on_a_validation_ct(  # noqa: E501
        tmp_path, monkeypatch):
    import torch

    from x2p_ros.model import build_model, checkpoint, preset
    tool, shipped = _ship_to(tmp_path, monkeypatch)
    torch.manual_seed(0)
    model = build_model(preset("tiny", presence_threshold=0.3))
    checkpoint.save(shipped, model, meta={"config_name": "tiny", "note": "trained on the CPU, 3 epochs"})
    training = {"epochs_run": 3}
    shipped.with_suffix(".json").write_text(json.dumps({"config": "tiny", "training": training}))
    weights = checkpoint.read(shipped)["model"]
    data = _data_set(tmp_path / "data", ["case_00000"])
    figures = {"rule": "commit 0000000", "rows": [{"data": str(data), "split": "val", "chain_stride": s,
                                                   "within_10mm": 10 + s} for s in range(4)]}
    (tmp_path / "measured.json").write_text(json.dumps(figures))
    assert tool.with_inference_setting("--chain-stride", "2", "default", str(tmp_path / "measured.json")) == 0
    after = checkpoint.read(shipped)
    assert after["config"]["chain_stride"] == 2 and after["config"]["presence_threshold"] == 0.3
    assert all(torch.equal(after["model"][k], w) for k, w in weights.items())
    assert after["meta"]["note"] == "trained on the CPU, 3 epochs; chain stride 2 chosen by commit 0000000"
    record = json.loads(shipped.with_suffix(".json").read_text())
    assert record["chain_stride"] == {**figures, "measured_on": [str(data)], "real_anatomy_validation_cts": False}
    assert record["training"] == training
    assert record["config_changes"] == {"presence_threshold": 0.3, "chain_stride": 2}
    assert checkpoint.load_model(shipped)[0].config.chain_stride == 2
    refinements = {"rule": "commit 1111111", "rows": [{"data": str(data), "split": "val", "prompt_refinements": r}
                                                      for r in range(4)]}
    (tmp_path / "refinements.json").write_text(json.dumps(refinements))
    assert tool.with_inference_setting("--prompt-refinements", "1", "default", str(tmp_path / "refinements.json")) == 0
    after = checkpoint.read(shipped)
    assert after["config"]["prompt_refinements"] == 1 and after["config"]["chain_stride"] == 2
    assert all(torch.equal(after["model"][k], w) for k, w in weights.items())
    assert after["meta"]["note"] == ("trained on the CPU, 3 epochs; chain stride 2 chosen by commit 0000000; "
                                     "prompt refinements 1 chosen by commit 1111111")
    record = json.loads(shipped.with_suffix(".json").read_text())
    assert record["chain_stride"]["rule"] == "commit 0000000"  # the stride's record stays
    assert record["prompt_refinements"] == {**refinements, "measured_on": [str(data)],
                                            "real_anatomy_validation_cts": False}
    assert record["config_changes"] == {"presence_threshold": 0.3, "chain_stride": 2, "prompt_refinements": 1}
    assert tool.with_inference_setting("--chain-stride", "3", "default", str(tmp_path / "measured.json")) == 0
    assert checkpoint.read(shipped)["meta"]["note"] == ("trained on the CPU, 3 epochs; prompt refinements 1 chosen "
                                                       "by commit 1111111; chain stride 3 chosen by commit 0000000")
    # a rule whose reference holds '; ' in parentheses is one part of the note, replaced whole
    (tmp_path / "outcome.json").write_text(json.dumps({**figures, "rule": "commit 2222222 (outcome 3333333; kept)"}))
    assert tool.with_inference_setting("--chain-stride", "1", "default", str(tmp_path / "outcome.json")) == 0
    assert tool.with_inference_setting("--chain-stride", "0", "default", str(tmp_path / "measured.json")) == 0
    assert checkpoint.read(shipped)["meta"]["note"] == ("trained on the CPU, 3 epochs; prompt refinements 1 chosen "
                                                       "by commit 1111111; chain stride 0 chosen by commit 0000000")

    figures["rows"][0]["data"] = str(_leaky_data_set(tmp_path, monkeypatch))
    (tmp_path / "measured.json").write_text(json.dumps(figures))
    before = shipped.read_bytes()
    with pytest.raises(SystemExit, match="chose the chain stride on the real-anatomy validation CT"):
        tool.with_inference_setting("--chain-stride", "1", "default", str(tmp_path / "measured.json"))
    assert shipped.read_bytes() == before


def test_ship_model_puts_a_centre_head_into_the_shipped_model_keeping_its_weights_and_refuses_one_chosen_on_a_validation_ct(  # noqa: E501
        tmp_path, monkeypatch):
    import csv

    import torch

    from x2p_ros.model import build_model, checkpoint, preset
    tool, shipped = _ship_to(tmp_path, monkeypatch)
    torch.manual_seed(0)
    checkpoint.save(shipped, build_model(preset("tiny", presence_threshold=0.3)),
                    meta={"config_name": "tiny", "note": "trained on the CPU, 3 epochs"})
    shipped.with_suffix(".json").write_text(json.dumps({"config": "tiny", "training": {"epochs_run": 3}}))
    weights = checkpoint.read(shipped)["model"]
    run = tmp_path / "run"
    head = build_model(preset("tiny", centre_head=True, centre_snap=0.3))  # beside other weights
    checkpoint.save(run / "best.pt", head, meta={"init": "baseline.pt", "epoch": 1, "val_mpe_mm": 4.0})
    with (run / "log.csv").open("w") as f:
        csv.writer(f).writerows([["epoch"], [0], [1]])
    data = _data_set(tmp_path / "data", ["case_00000"])
    figures = {"rule": "commit 2222222", "rows": [{"data": str(data), "split": "val", "centre_snap": 0.2}]}
    (tmp_path / "measured.json").write_text(json.dumps(figures))
    assert tool.with_centre_head(str(run), str(data), "0.2", "default", str(tmp_path / "measured.json"), "0.1") == 0
    after = checkpoint.read(shipped)
    assert after["config"]["centre_head"] is True and after["config"]["centre_snap"] == 0.2
    assert after["config"]["centre_agree"] == 0.1
    assert after["config"]["presence_threshold"] == 0.3
    assert all(torch.equal(after["model"][k], w) for k, w in weights.items())
    own = {k: w for k, w in head.state_dict().items() if k.startswith("centre_head.")}
    assert own and all(torch.equal(after["model"][k], w) for k, w in own.items())
    assert after["meta"]["note"] == "trained on the CPU, 3 epochs; centre snap 0.2 (agreement 0.1) chosen by commit " \
                                    "2222222"
    record = json.loads(shipped.with_suffix(".json").read_text())
    assert record["centre_head"]["training_data"]["real_anatomy_validation_cts"] is False
    assert record["centre_head"]["measured"] == {**figures, "real_anatomy_validation_cts": False}
    assert record["centre_head"]["epochs_run"] == 2 and record["centre_head"]["trained_beside"] == "baseline.pt"
    assert checkpoint.load_model(shipped)[0].config.centre_snap == 0.2
    assert record["centre_head"]["agree"] == 0.1

    before = shipped.read_bytes()
    with pytest.raises(SystemExit, match="trains on the real-anatomy validation CT"):
        tool.with_centre_head(str(run), str(_leaky_data_set(tmp_path, monkeypatch)), "0.2", "default",
                              str(tmp_path / "measured.json"))
    assert shipped.read_bytes() == before

    # a head trained on in a second run: the record holds both runs, and the first run's data is checked too
    later = tmp_path / "later"
    checkpoint.save(later / "best.pt", head, meta={"init": str(run / "last.pt"), "epoch": 0})
    with (later / "log.csv").open("w") as f:
        csv.writer(f).writerows([["epoch"], [0], [1], [2]])
    checkpoint.save(run / "best.pt", head, meta={"init": "baseline.pt", "data": str(data), "epoch": 1})
    assert tool.with_centre_head(str(later), str(data), "0.2", "default", str(tmp_path / "measured.json"), "0.1") == 0
    record = json.loads(shipped.with_suffix(".json").read_text())["centre_head"]
    assert [(r["run"], r["epochs"], r["init"]) for r in record["runs"]] == [
        ("later", 3, str(run / "last.pt")), ("run", 2, "baseline.pt")]
    assert record["epochs_in_all"] == 5 and record["trained_beside"] == "baseline.pt"
    assert all(r["training_data"]["real_anatomy_validation_cts"] is False for r in record["runs"])
    before = shipped.read_bytes()
    checkpoint.save(run / "best.pt", head, meta={"init": "baseline.pt", "data": str(tmp_path / "leaky"), "epoch": 1})
    with pytest.raises(SystemExit, match="trains on the real-anatomy validation CT"):
        tool.with_centre_head(str(later), str(data), "0.2", "default", str(tmp_path / "measured.json"), "0.1")
    checkpoint.save(run / "best.pt", head, meta={"init": "baseline.pt", "epoch": 1})
    with pytest.raises(SystemExit, match="does not say what it was trained on"):
        tool.with_centre_head(str(later), str(data), "0.2", "default", str(tmp_path / "measured.json"), "0.1")
    assert shipped.read_bytes() == before

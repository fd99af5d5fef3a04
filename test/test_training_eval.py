"""Metrics against hand-computed values, safe checkpoints, resumable training,
evaluation output, and the long-film sliding window."""
import csv
import json

import numpy as np
import pytest
import torch
from torch import nn

from x2p_ros import geometry, metrics
from x2p_ros.cli import main
from x2p_ros.data import case_io
from x2p_ros.inference import InputError, Localizer
from x2p_ros.model import X2PNet, build_model, checkpoint, preset


def test_metrics_match_hand_computed_values():
    errors = np.array([2.0, 12.0, 30.0, np.inf])  # the last ground truth has no prediction
    assert metrics.pcl(errors, 10) == 0.25
    assert metrics.pcl(errors, 20) == 0.5
    assert metrics.mpe(errors) == pytest.approx(44.0 / 3)
    # AUC over [10, 50]: each error contributes the length of [max(e, 10), 50] / 40
    assert metrics.auc(errors) == pytest.approx((40 + 38 + 20 + 0) / 40 / 4)
    s = metrics.summary(errors)
    assert s["missed"] == 1 and s["n"] == 4


def test_match_errors_pairs_by_index_and_counts_absent_predictions_as_misses():
    gt = np.array([[0.0, 0, 0], [0, 0, 10], [0, 0, 20]])
    pred = np.array([[3.0, 4, 0], [0, 0, 10], [0, 0, 25], [9, 9, 9]])
    e = metrics.match_errors(pred, [True, False, True, True], gt)
    np.testing.assert_allclose(e, [5.0, np.inf, 5.0])
    assert np.isinf(metrics.match_errors(pred[:1], [True], gt)[1:]).all()  # fewer predictions than ground truth


def test_identity_swaps_count_found_vertebrae_nearer_to_another_ones_truth():
    gt = np.array([[0.0, 0, 0], [0, 0, 30], [0, 0, 60]])
    pred = np.array([[0.0, 0, 2], [0, 0, 50], [0, 0, 58], [0, 0, 0]])  # index 1 drifted onto index 2
    assert metrics.identity_swaps(pred, [True, True, True, True], gt) == 1
    assert metrics.identity_swaps(pred, [True, False, True, True], gt) == 0  # not found: a miss, not a swap
    assert metrics.identity_swaps(pred[:0], [], gt) == 0


def test_spurious_counts_present_predictions_past_the_last_ground_truth_vertebra():
    assert metrics.spurious([True, True, True, False], 2) == 1
    assert metrics.spurious([True, False, True, True], 2) == 2  # past the truth's end, present: not there
    assert metrics.spurious([True, True], 3) == 0 and metrics.spurious([], 0) == 0


def test_steps_pair_consecutive_vertebrae_found_and_say_whether_the_spacing_is_read():
    gt = np.array([[0.0, 0, 0], [0, 0, -30], [0, 0, -65], [0, 0, -105]])  # true steps 30, 35, 40
    read = gt * 0.9 + 1.0  # the spacing read, 10 % short: every step 0.9 times the true one
    true, predicted = metrics.steps(read, [True] * 4, gt)
    assert true == pytest.approx([30, 35, 40]) and predicted == pytest.approx([27, 31.5, 36])
    s = metrics.step_summary(true, predicted)
    assert s["n"] == 3 and s["true_mm"] == pytest.approx(35) and s["predicted_mm"] == pytest.approx(31.5)
    assert s["error_mm"] == pytest.approx(3.5) and s["slope"] == pytest.approx(0.9)
    assert s["correlation"] == pytest.approx(1.0)
    learnt = np.array([[0.0, 0, 0], [0, 0, -33], [0, 0, -66], [0, 0, -99], [0, 0, -132]])  # 33 mm whatever the truth
    s = metrics.step_summary(*metrics.steps(learnt, [True] * 5, gt))
    assert s["n"] == 3 and s["slope"] == pytest.approx(0.0) and np.isnan(s["correlation"])  # a constant step
    assert s["error_mm"] == pytest.approx((3 + 2 + 7) / 3)
    # a vertebra not found breaks the two steps beside it; predictions past the truth's end are no steps
    true, predicted = metrics.steps(learnt, [True, False, True, True, True], gt)
    assert true == pytest.approx([40]) and predicted == pytest.approx([33])
    assert metrics.steps(learnt[:1], [True], gt)[0].size == 0
    empty = metrics.step_summary([], [])
    assert empty["n"] == 0 and all(np.isnan(empty[k]) for k in ("true_mm", "error_mm", "slope", "correlation"))


def test_report_groups_3d_errors_by_level_index_and_field_kind():
    from x2p_ros.training.evaluate import field_kind, report
    short, long = field_kind(4), field_kind(8)
    assert short != long and field_kind(6) == short and field_kind(7) == long
    errors = {"3d": np.array([1.0, 3.0, np.inf, 10.0, 30.0]), "ap": [], "lat": [],
              "levels": ["L1", "L2", "L3", "L1", "L2"], "indices": [0, 1, 2, 0, 1],
              "fields": [short] * 3 + [long] * 2, "swaps": 2, "spurious": 3, "pairs": 2, "windows": 5,
              "steps": [(np.array([30.0, 40.0]), np.array([33.0, 33.0])), (np.zeros(0), np.zeros(0))],
              "steps_2d": {"ap": [(np.array([20.0, 30.0, 40.0]), np.array([22.0, 30.0, 38.0]))], "lat": []}}
    result = report(errors)
    assert result["spurious"] == 3 and result["windows_per_pair"] == 2.5
    assert result["steps"]["n"] == 2 and result["steps"]["error_mm"] == 5.0 and result["steps"]["slope"] == 0.0
    ap = result["steps_2d"]["ap"]  # the heatmap peaks' steps, in pixels; a view without peaks has none
    assert list(result["steps_2d"]) == ["ap"] and ap["n"] == 3 and ap["true_px"] == 30.0
    assert ap["error_px"] == pytest.approx(4 / 3) and ap["slope"] == pytest.approx(0.8) and "true_mm" not in ap
    by_index = result["per_index_3d_mm"]
    assert list(by_index) == [0, 1, 2] and by_index[0]["mpe"] == 5.5 and by_index[1]["mpe"] == 16.5
    assert by_index[2]["missed"] == 1 and result["identity_swaps"] == 2
    assert result["by_field_3d_mm"][short]["mpe"] == 2.0 and result["by_field_3d_mm"][short]["missed"] == 1
    assert result["by_field_3d_mm"][long]["mpe"] == 20.0 and result["by_field_3d_mm"][long]["pcl@10"] == 0.5
    levels = result["per_level_mpe_mm"]
    assert levels["L1"] == 5.5 and levels["L2"] == 16.5 and np.isnan(levels["L3"])  # L3: never found


def test_checkpoint_round_trip_and_refusals(tmp_path):
    torch.manual_seed(0)
    model = X2PNet(preset("tiny"))
    path = checkpoint.save(tmp_path / "m.pt", model, meta={"note": "test"})
    loaded, meta = checkpoint.load_model(path)
    assert meta == {"note": "test"}
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b)

    with pytest.raises(checkpoint.CheckpointError, match="not found"):
        checkpoint.load_model(tmp_path / "missing.pt")
    (tmp_path / "trunc.pt").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(checkpoint.CheckpointError, match="truncated or corrupt"):
        checkpoint.load_model(tmp_path / "trunc.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(checkpoint.CheckpointError, match="not a readable checkpoint"):
        checkpoint.load_model(tmp_path / "text.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(checkpoint.CheckpointError, match="not an x2p_ros checkpoint"):
        checkpoint.load_model(tmp_path / "other.pt")
    payload = checkpoint.read(path)
    payload["config"]["n_vertebrae"] = 6  # weights of a 4-vertebra model under a 6-vertebra config
    torch.save(payload, tmp_path / "mismatch.pt")
    with pytest.raises(checkpoint.CheckpointError, match="do not match"):
        checkpoint.load_model(tmp_path / "mismatch.pt")
    payload["config"]["bogus"] = 1
    torch.save(payload, tmp_path / "bogus.pt")
    with pytest.raises(checkpoint.CheckpointError, match="config does not fit"):
        checkpoint.load_model(tmp_path / "bogus.pt")


class RunsCode:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_checkpoint_that_would_run_code_is_refused(tmp_path, capsys):
    torch.save({"format": checkpoint.FORMAT, "version": 1, "payload": RunsCode()}, tmp_path / "evil.pt")
    with pytest.raises(checkpoint.CheckpointError, match="could run code"):
        checkpoint.load_model(tmp_path / "evil.pt")
    assert "this must never run" not in capsys.readouterr().out


def test_training_crops_train_every_index_the_whole_images_show(small_data):
    """Crops keep the same vertical band in both views and a share of samples is
    uncropped: each index is present in training at least a third as often as in
    the whole images (independent crops in each view: a tenth for the last one)."""
    from x2p_ros.training.data import BiplanarDataset
    names = case_io.list_cases(small_data)
    whole = np.mean([s["present"].numpy() for s in BiplanarDataset(small_data, names, 64, 10)], axis=0)
    train = BiplanarDataset(small_data, names, 64, 10, train=True)
    samples = []
    for epoch in range(40):
        train.set_epoch(epoch)
        samples += [train[i]["present"].numpy() for i in range(len(train))]
    trained = np.mean(samples, axis=0)
    assert whole[-1] == 0 and whole.max() == 1
    for k in np.flatnonzero(whole):
        assert trained[k] >= whole[k] / 3, f"index {k}: {trained[k]:.2f} of samples, whole images {whole[k]:.2f}"


def test_training_samples_show_the_whole_images_in_the_given_share(small_data):
    from x2p_ros.training.data import BiplanarDataset
    names = case_io.list_cases(small_data)
    whole = [s["P"] for s in BiplanarDataset(small_data, names, 64, 10)]
    for share, expected in ((1.0, True), (0.0, False)):
        train = BiplanarDataset(small_data, names, 64, 10, train=True, full_share=share)
        for epoch in range(3):
            train.set_epoch(epoch)
            for i in range(len(train)):
                assert torch.allclose(train[i]["P"], whole[i]) == expected


def test_training_resumes_from_its_last_checkpoint_and_evaluates(small_data, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--data", str(small_data), "--config", "tiny", "--out", str(run), "--workers", "0", "--quiet"]
    assert main(args + ["--epochs", "2"]) == 0
    assert checkpoint.read(run / "last.pt")["epoch"] == 1
    assert main(args + ["--epochs", "3"]) == 0
    out = capsys.readouterr().out
    assert "from epoch 2" in out
    rows = (run / "log.csv").read_text().strip().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["0", "1", "2"]
    assert (run / "loss.png").stat().st_size > 1000 and (run / "best.pt").is_file()
    assert checkpoint.read(run / "best.pt")["meta"]["augment"] == "strong"  # the default, recorded for shipping
    capsys.readouterr()
    assert main(args + ["--epochs", "4", "--augment", "mild"]) == 2  # a run keeps the look it started with
    assert "was trained with --augment strong; resume it with the same" in capsys.readouterr().err
    assert main(args + ["--epochs", "4", "--prompt-jitter", "60", "30"]) == 2  # and the prompt jitter
    assert "was trained with --prompt-jitter 30 15; resume it with the same" in capsys.readouterr().err
    assert checkpoint.read(run / "last.pt")["epoch"] == 2
    assert tuple(checkpoint.read(run / "best.pt")["meta"]["prompt_jitter_px512"]) == (30.0, 15.0)
    assert main(["train", "--data", str(small_data), "--config", "tiny", "--out", str(tmp_path / "bad"),
                 "--workers", "0", "--quiet", "--epochs", "1", "--prompt-jitter", "-1", "5"]) == 2
    assert "the prompt jitter must be two numbers of 0-256 px" in capsys.readouterr().err

    capsys.readouterr()
    assert main(["evaluate", "--data", str(small_data), "--checkpoint", str(run / "best.pt"), "--realct",
                 str(tmp_path / "nowhere")]) == 2
    assert "the real CTs (verse-sub-verse012, totalseg-example) are not there" in capsys.readouterr().err
    assert main(["evaluate", "--data", str(small_data), "--checkpoint", str(run / "best.pt"), "--no-realct",
                 "--out", str(tmp_path / "eval")]) == 0
    result = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(result["3d_mm"]) >= {"pcl@10", "pcl@20", "mpe", "auc", "missed"}
    assert {"2d_ap_px", "2d_lat_px", "per_level_mpe_mm", "identity_swaps"} <= set(result)
    assert set(result["steps"]) == {"n", "true_mm", "predicted_mm", "error_mm", "slope", "correlation"}
    assert set(result["steps_2d"]) == {"ap", "lat"}
    assert set(result["steps_2d"]["lat"]) == {"n", "true_px", "predicted_px", "error_px", "slope", "correlation"}
    test_names = case_io.read_split(small_data, "test")
    assert result["split"] == "test" and result["cases"] == len(test_names)
    out = capsys.readouterr().out
    assert f"{len(test_names)} cases of split 'test'" in out and "real anatomy: not measured (--no-realct)" in out
    assert "steps to the next vertebra: " in out and "steps of the heatmap peaks, LAT: " in out
    assert "real_anatomy" not in result and result["chain_stride"] == 0  # the checkpoint's
    assert result["prompt_refinements"] == 0
    assert main(["evaluate", "--data", str(small_data), "--checkpoint", str(run / "best.pt"), "--no-realct",
                 "--chain-stride", "1", "--prompt-refinements", "2", "--out", str(tmp_path / "stride")]) == 0
    result = json.loads((tmp_path / "stride" / "metrics.json").read_text())
    assert result["chain_stride"] == 1 and result["prompt_refinements"] == 2
    assert "chain stride 1, prompt refinements 2" in capsys.readouterr().out
    assert main(["evaluate", "--data", str(small_data), "--checkpoint", str(run / "best.pt"), "--no-realct",
                 "--chain-stride", "-1"]) == 2
    assert "chain stride must be 0" in capsys.readouterr().err
    assert main(["evaluate", "--data", str(small_data), "--checkpoint", str(run / "best.pt"), "--no-realct",
                 "--prompt-refinements", "-1"]) == 2
    assert "prompt refinements must be 0" in capsys.readouterr().err
    assert main(["evaluate", "--data", str(small_data), "--checkpoint", str(run / "best.pt"), "--no-realct",
                 "--extra-looks", "5"]) == 2
    assert "extra looks must be at most 4" in capsys.readouterr().err
    looked = []
    for name in ("looks", "looks-again"):  # the random looks are drawn from the seed: the same twice
        assert main(["evaluate", "--data", str(small_data), "--checkpoint", str(run / "best.pt"), "--no-realct",
                     "--extra-looks", "2", "--look-seed", "3", "--out", str(tmp_path / name)]) == 0
        looked.append(json.loads((tmp_path / name / "metrics.json").read_text()))
    assert looked[0]["extra_looks"] == 2 and looked[0]["look_seed"] == 3 and result["look_seed"] is None
    assert looked[0]["3d_mm"] == looked[1]["3d_mm"] and looked[0]["2d_ap_px"] == looked[1]["2d_ap_px"]
    assert "extra looks 2, random looks of seed 3" in capsys.readouterr().out
    # the split's images in other looks: the heatmaps (and their peaks) of a model that reads the images move
    assert main(["evaluate", "--data", str(small_data), "--checkpoint", str(run / "best.pt"), "--no-realct",
                 "--look-seed", "3", "--out", str(tmp_path / "looked")]) == 0
    assert json.loads((tmp_path / "looked" / "metrics.json").read_text())["2d_ap_px"] != result["2d_ap_px"]
    capsys.readouterr()
    assert main(["evaluate", "--data", str(small_data), "--checkpoint", str(run / "best.pt"), "--split", "all",
                 "--no-realct", "--out", str(tmp_path / "all")]) == 0
    every = json.loads((tmp_path / "all" / "metrics.json").read_text())
    assert every["cases"] == len(case_io.list_cases(small_data)) == 5
    assert sum(m["n"] for m in every["per_index_3d_mm"].values()) == every["3d_mm"]["n"]
    by_index = [line for line in capsys.readouterr().out.splitlines() if "by index below the prompt" in line]
    assert len(by_index) == 1 and "nan" not in by_index[0]  # an index never found says so
    assert (tmp_path / "eval" / "pcl.png").is_file() and (tmp_path / "eval" / "per_level.png").is_file()

    assert main(["model", "summary", "--checkpoint", str(run / "best.pt")]) == 0
    assert "total" in capsys.readouterr().out


def test_best_presence_threshold_scores_good_poses_against_spurious_ones():
    from x2p_ros.training.evaluate import best_presence_threshold
    rows = [{"threshold": 0.3, "score": 50}, {"threshold": 0.4, "score": 52}, {"threshold": 0.5, "score": 52},
            {"threshold": 0.6, "score": 49}]
    assert best_presence_threshold(rows) == 0.5  # of equal scores, the one that gives the fewest poses


def test_presence_command_tabulates_thresholds_and_writes_the_chosen_one_into_a_copy(small_data, tmp_path, capsys):
    from x2p_ros.training.evaluate import PRESENCE_GRID, evaluate_cases
    torch.manual_seed(0)
    source = checkpoint.save(tmp_path / "model.pt", build_model(preset("tiny")), meta={"config_name": "tiny"})
    before = source.read_bytes()
    out = tmp_path / "calibrated.pt"
    args = ["presence", "--data", str(small_data), "--checkpoint", str(source), "--split", "all"]
    assert main(args + ["--out", str(out)]) == 0
    calibration = checkpoint.read(out)["meta"]["presence_calibration"]
    rows = calibration["table"]
    assert [r["threshold"] for r in rows] == list(PRESENCE_GRID) and calibration["cases"] == 5
    # a higher threshold can only shorten each chain: never fewer misses, never more spurious vertebrae
    assert all(a["missed"] <= b["missed"] and a["spurious"] >= b["spurious"] for a, b in zip(rows, rows[1:]))
    assert all(r["score"] == r["within_10mm"] - r["spurious"] for r in rows)
    best = max(r["score"] for r in rows)
    assert calibration["threshold"] == max(r["threshold"] for r in rows if r["score"] == best)
    model, meta = checkpoint.load_model(out)
    assert model.config.presence_threshold == calibration["threshold"] and meta["config_name"] == "tiny"
    for name, weights in checkpoint.read(source)["model"].items():
        torch.testing.assert_close(checkpoint.read(out)["model"][name], weights)
    assert source.read_bytes() == before  # the checkpoint as trained is kept
    # the table's figures are the evaluation's at that threshold
    row = rows[len(rows) // 2]
    errors = evaluate_cases(Localizer.from_checkpoint(source, presence_threshold=row["threshold"]), small_data,
                            case_io.list_cases(small_data))
    assert row["missed"] == int(np.sum(~np.isfinite(errors["3d"]))) and row["spurious"] == errors["spurious"]
    assert "<- chosen" in capsys.readouterr().out

    assert main(args + ["--out", str(source)]) == 2
    assert "--out must be another file than --checkpoint" in capsys.readouterr().err
    assert main(args[:-1] + ["val", "--limit", "0", "--out", str(tmp_path / "none.pt")]) == 2
    assert "argument --limit: must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "none.pt").exists()
    assert source.read_bytes() == before


def test_fine_tuning_starts_from_the_given_weights_and_refuses_another_config(small_data, tmp_path, capsys):
    args = ["train", "--data", str(small_data), "--workers", "0", "--quiet", "--epochs", "1"]
    assert main(args + ["--config", "tiny", "--out", str(tmp_path / "a")]) == 0
    start = checkpoint.read(tmp_path / "a" / "best.pt")["model"]
    # another seed (other initial weights) and a learning rate of zero: the
    # fine-tuned weights are exactly the ones it started from
    assert main(args + ["--config", "tiny", "--out", str(tmp_path / "b"), "--lr", "0", "--seed", "1",
                        "--init", str(tmp_path / "a" / "best.pt")]) == 0
    tuned = checkpoint.read(tmp_path / "b" / "best.pt")
    assert tuned["meta"]["init"] == str(tmp_path / "a" / "best.pt")
    for name, weights in start.items():
        torch.testing.assert_close(tuned["model"][name], weights)
    capsys.readouterr()
    init = ["--init", str(tmp_path / "a" / "best.pt")]
    assert main(args + ["--config", "cpu", "--out", str(tmp_path / "c")] + init) == 2
    err = capsys.readouterr().err
    assert "trained with another config than 'cpu'" in err and "do not fit" in err
    assert not (tmp_path / "c" / "best.pt").exists()


def test_warm_start_from_another_config_whose_weights_all_fit(small_data, tmp_path, capsys):
    """--set changes the config; --init from a run of the plain preset loads every weight it
    has, and the heatmap prior's new weight starts at its initial value (1)."""
    args = ["train", "--data", str(small_data), "--workers", "0", "--quiet", "--epochs", "1", "--config", "tiny"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    start = checkpoint.read(tmp_path / "a" / "best.pt")["model"]
    capsys.readouterr()
    prior = ["--set", "heatmap_prior=true", "--set", "loss_3d_peak_sigma_mm=6"]
    assert main(args + ["--out", str(tmp_path / "b"), "--lr", "0", "--init", str(tmp_path / "a" / "best.pt")]
                + prior) == 0
    assert "new, at their initial values: fusion.prior_weight" in capsys.readouterr().out
    tuned = checkpoint.read(tmp_path / "b" / "best.pt")
    assert tuned["config"]["heatmap_prior"] is True and tuned["config"]["loss_3d_peak_sigma_mm"] == 6.0
    assert float(tuned["model"]["fusion.prior_weight"]) == 1.0
    for name, weights in start.items():
        torch.testing.assert_close(tuned["model"][name], weights)
    # resuming needs the same changes; a bad --set is refused before any work
    assert main(args + ["--out", str(tmp_path / "b"), "--epochs", "2"]) == 2
    assert "trained with another config than 'tiny'" in capsys.readouterr().err
    assert main(args + ["--out", str(tmp_path / "c"), "--set", "heatmap_prior=true", "--set", "use_sce=false"]) == 2
    assert "--set: heatmap_prior needs the SCE's heatmaps" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_the_shipped_models_can_be_fine_tuned(small_data, tmp_path, capsys):
    """Both, and each as if saved before later fields (sce_ffn_dim, position_max_cycles)
    existed: those take the defaults that keep the architecture, for fine-tuning as for loading. A model with a
    centre head is fine-tuned with one, and a config without one is refused with the way to keep it."""
    from x2p_ros.models import baseline_checkpoint, default_checkpoint
    for shipped, config in ((default_checkpoint(), "cpu"), (baseline_checkpoint(), "cpu-baseline")):
        state = checkpoint.read(shipped)
        for later in ("sce_ffn_dim", "position_max_cycles"):
            state["config"].pop(later, None)
        path = tmp_path / f"{config}-older.pt"
        torch.save(state, path)
        args = ["train", "--data", str(small_data), "--config", config, "--out", str(tmp_path / config),
                "--epochs", "1", "--lr", "0", "--workers", "0", "--quiet", "--init", str(path)]
        if state["config"].get("centre_head"):
            assert main(args) == 2
            assert "it has a centre head: --set centre_head=true keeps it" in capsys.readouterr().err
            args += ["--set", "centre_head=true"]
        assert main(args) == 0
        tuned = checkpoint.read(tmp_path / config / "best.pt")["model"]
        for name, weights in checkpoint.read(path)["model"].items():
            torch.testing.assert_close(tuned[name], weights)


def test_data_parallel_training_through_torchrun(small_data, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path
    torchrun = Path(sys.executable).parent / "torchrun"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    result = subprocess.run([str(torchrun), "--nproc-per-node", "2", "-m", "x2p_ros.cli", "train", "--data",
                             str(small_data), "--config", "tiny", "--out", str(tmp_path / "ddp"), "--epochs", "1",
                             "--workers", "0", "--quiet"], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stdout.count("best validation") == 1  # one process writes and reports
    assert checkpoint.read(tmp_path / "ddp" / "last.pt")["epoch"] == 0


class OracleNet(nn.Module):
    """Stands in for X2P-Net where the windowing logic is under test: it reports
    the known vertebrae that lie in the window, from the one nearest the prompt down."""

    def __init__(self, xyz, config):
        super().__init__()
        self.xyz = torch.as_tensor(xyz, dtype=torch.float64)
        self.config = config
        self.calls = 0

    def forward(self, images, P, prompt):
        self.calls += 1
        S = images.shape[-1]
        N = self.config.n_vertebrae
        uv, _ = geometry.project_torch(P[0].double(), self.xyz[None].expand(2, -1, -1))  # (2, M, 2)
        inside = ((uv >= 0) & (uv <= S - 1)).all(-1).all(0)
        start = int((uv[0] - prompt[0, 0].double()).norm(dim=-1).argmin())
        chain = [i for i in range(start, len(self.xyz)) if inside[i]][:N]
        xyz = torch.zeros(1, N, 3, dtype=torch.float64)
        presence = torch.zeros(1, N)
        xyz[0, :len(chain)] = self.xyz[chain]
        presence[0, :len(chain)] = 0.9
        return {"xyz": xyz, "presence": presence}


def test_long_film_sliding_window_finds_every_vertebra_once():
    from x2p_ros.geometry import carm_view
    cfg = preset("tiny", n_vertebrae=4)
    W, H = 64, 256  # a film four windows tall
    Ps = {}
    for view in ("ap", "lat"):
        P, _ = carm_view(view, 550.0, 1000.0, 100.0, W)
        Ps[view] = geometry.apply_pixel_transform(geometry.crop_transform(0, -(H - W) / 2), P)
    xyz = np.array([[0.0, 0.0, z] for z in np.linspace(170, -170, 12)])  # 12 vertebrae top to bottom
    net = OracleNet(xyz, cfg)
    localizer = Localizer(net, presence_threshold=0.5)
    images = {v: np.random.default_rng(0).random((H, W)).astype(np.float32) for v in Ps}
    prompts = {v: geometry.project(Ps[v], xyz[:1])[0] for v in Ps}
    found = localizer.localize(images, Ps, prompts, reference_level="T1")
    present = [f for f in found if f.present]
    assert net.calls > 1
    np.testing.assert_allclose([f.xyz_mm for f in present], xyz, atol=1e-9)
    assert [f.index for f in present] == list(range(12))
    assert [f.label for f in present][:3] == ["T1", "T2", "T3"]


@pytest.mark.parametrize("count, windows", [(7, 2), (4, 2), (3, 1)])
def test_a_square_view_with_more_than_n_vertebrae_continues_below_the_last_one(count, windows):
    """N = 4: a full chain in the first window goes on in a second, smaller one from the
    last vertebra found; a chain that ends inside the first window does not."""
    from x2p_ros.geometry import carm_view
    cfg = preset("tiny", n_vertebrae=4)
    Ps = {v: carm_view(v, 550.0, 1000.0, 100.0, 64)[0] for v in ("ap", "lat")}
    xyz = np.array([[0.0, 0.0, z] for z in np.linspace(40, -40, 7)])[:count]
    net = OracleNet(xyz, cfg)
    images = {v: np.random.default_rng(0).random((64, 64)).astype(np.float32) for v in Ps}
    found = Localizer(net, presence_threshold=0.5).localize(images, Ps, {v: geometry.project(Ps[v], xyz[:1])[0]
                                                                           for v in Ps})
    present = [f for f in found if f.present]
    assert net.calls == windows
    np.testing.assert_allclose([f.xyz_mm for f in present], xyz, atol=1e-9)
    assert [f.index for f in present] == list(range(count))


class DriftingOracle(OracleNet):
    """An oracle whose estimate drifts down the chain: the k-th vertebra below the prompt is off by
    k times 1.5 mm sideways, as the shipped models' errors grow with k on the real CTs; from the
    blind_from-th call on it finds nothing."""

    def __init__(self, xyz, config, blind_from=None):
        super().__init__(xyz, config)
        self.blind_from = blind_from

    def forward(self, images, P, prompt):
        out = super().forward(images, P, prompt)
        out["xyz"][0, :, 0] += 1.5 * torch.arange(self.config.n_vertebrae)
        if self.blind_from is not None and self.calls >= self.blind_from:
            out["presence"][:] = 0.0
        return out


def drifting_chain(count, stride, blind_from=None, spacing=40.0 / 3):
    """count vertebrae spacing mm apart down from 40 mm, found by a Localizer of that stride in a 64 x 64
    pair: their centroids, the oracle, the vertebrae found present and the P matrices."""
    from x2p_ros.geometry import carm_view
    cfg = preset("tiny", n_vertebrae=4, chain_stride=stride)
    Ps = {v: carm_view(v, 550.0, 1000.0, 100.0, 64)[0] for v in ("ap", "lat")}
    xyz = np.array([[0.0, 0.0, 40.0 - spacing * i] for i in range(count)])
    net = DriftingOracle(xyz, cfg, blind_from)
    images = {v: np.random.default_rng(0).random((64, 64)).astype(np.float32) for v in Ps}
    found = Localizer(net, presence_threshold=0.5).localize(images, Ps, {v: geometry.project(Ps[v], xyz[:1])[0]
                                                                           for v in Ps})
    return xyz, net, [f for f in found if f.present], Ps


@pytest.mark.parametrize("stride, windows, drift_at", [(0, 2, (0, 1, 2, 3, 1, 2, 3)), (1, 8, (0,) * 7),
                                                       (2, 5, (0, 1, 0, 1, 0, 1, 0)),
                                                       (3, 4, (0, 1, 2, 0, 1, 2, 0))])
def test_a_chain_stride_prompts_again_every_s_vertebrae_so_the_estimates_do_not_drift(stride, windows, drift_at):
    # the whole view's chain (two windows: N = 4, then a continuation), then one window per s vertebrae
    xyz, net, present, _ = drifting_chain(7, stride)
    assert net.calls == windows
    assert [f.index for f in present] == list(range(7))
    np.testing.assert_allclose([f.xyz_mm[0] for f in present], 1.5 * np.array(drift_at), atol=1e-9)
    np.testing.assert_allclose([f.xyz_mm[1:] for f in present], xyz[:, 1:], atol=1e-9)


def test_a_chain_stride_set_while_a_pair_runs_applies_from_the_next_pair():
    # the node sets the parameter from the executor thread while the worker localises
    from x2p_ros.geometry import carm_view
    Ps = {v: carm_view(v, 550.0, 1000.0, 100.0, 64)[0] for v in ("ap", "lat")}
    xyz = np.array([[0.0, 0.0, 40.0 - 40.0 / 3 * i] for i in range(7)])
    net = DriftingOracle(xyz, preset("tiny", n_vertebrae=4, chain_stride=2))
    localizer = Localizer(net, presence_threshold=0.5)
    forward = net.forward
    net.forward = lambda *a: (setattr(localizer, "chain_stride", 0), forward(*a))[1]
    images = {v: np.random.default_rng(0).random((64, 64)).astype(np.float32) for v in Ps}
    prompts = {v: geometry.project(Ps[v], xyz[:1])[0] for v in Ps}
    present = [f for f in localizer.localize(images, Ps, prompts) if f.present]
    assert net.calls == 5 and len(present) == 7  # stride 2 to the end of this pair
    net.calls = 0
    assert len([f for f in localizer.localize(images, Ps, prompts) if f.present]) == 7 and net.calls == 2


def test_a_window_that_finds_nothing_at_the_new_prompt_leaves_the_chain_found_before():
    xyz, net, present, _ = drifting_chain(7, 2, blind_from=3)  # blind after the whole view's two windows
    assert net.calls == 5
    assert [f.index for f in present] == list(range(7))  # none lost
    np.testing.assert_allclose([f.xyz_mm[0] for f in present], 1.5 * np.array([0, 1, 2, 3, 1, 2, 3]), atol=1e-9)
    with pytest.raises(ValueError, match="chain_stride"):
        preset("tiny", chain_stride=-1)


def test_a_chain_stride_adds_no_vertebra_to_the_whole_views_chain():
    # the stride's windows reach past the image's bottom, and the oracle reports every vertebra a window
    # covers, shown by the images or not: the chain is still the whole view's
    xyz, net, present, Ps = drifting_chain(11, 1, spacing=14.0)
    shown = np.all([geometry.inside_image(geometry.project(Ps[v], xyz), (64, 64)) for v in Ps], axis=0)
    assert 3 < shown.sum() < len(xyz)
    np.testing.assert_allclose([f.xyz_mm for f in present], xyz[shown], atol=1e-9)


class PromptFollowingOracle(OracleNet):
    """An oracle whose estimates follow the click half-way: every vertebra is moved sideways by half
    the prompt's distance (in mm at the vertebra) from the true projection of the one nearest it, as a
    model does that places a vertebra partly by the prompt. Blind (nothing present) when told."""

    def __init__(self, xyz, config, Ps, blind=False):
        super().__init__(xyz, config)
        self.blind = blind
        u0 = geometry.project(Ps["ap"], xyz[:1])[0][0]
        self.px_per_mm = geometry.project(Ps["ap"], xyz[:1] + [1.0, 0.0, 0.0])[0][0] - u0  # AP u along x

    def forward(self, images, P, prompt):
        out = super().forward(images, P, prompt)
        uv, _ = geometry.project_torch(P[0, 0].double(), self.xyz[None])  # AP projections (1, M, 2)
        nearest = (uv[0] - prompt[0, 0].double()).norm(dim=-1).argmin()
        out["xyz"][0, :, 0] += 0.5 * float(prompt[0, 0, 0] - uv[0, nearest, 0]) / self.px_per_mm
        if self.blind:
            out["presence"][:] = 0.0
        return out


@pytest.mark.parametrize("refinements", [0, 1, 3])
def test_prompt_refinement_moves_the_prompt_onto_the_estimate_so_the_click_matters_less(refinements):
    from x2p_ros.geometry import carm_view
    Ps = {v: carm_view(v, 550.0, 1000.0, 100.0, 64)[0] for v in ("ap", "lat")}
    xyz = np.array([[0.0, 0.0, 20.0 - 10.0 * i] for i in range(3)])
    net = PromptFollowingOracle(xyz, preset("tiny", n_vertebrae=4, prompt_refinements=refinements), Ps)
    images = {v: np.random.default_rng(0).random((64, 64)).astype(np.float32) for v in Ps}
    prompts = {v: geometry.project(Ps[v], xyz[:1])[0] for v in Ps}
    prompts["ap"] = prompts["ap"] + [4.0, 0.0]  # the click 4 px beside the vertebra's centre
    error_mm = 0.5 * 4.0 / net.px_per_mm
    present = [f for f in Localizer(net, presence_threshold=0.5).localize(images, Ps, prompts) if f.present]
    assert net.calls == refinements + 1 and len(present) == 3
    # each refinement halves the offset: the estimate converges on the vertebra, not on the click
    np.testing.assert_allclose([f.xyz_mm[0] for f in present], error_mm / 2 ** refinements, rtol=1e-6)
    np.testing.assert_allclose([f.xyz_mm[1:] for f in present], xyz[:, 1:], atol=1e-9)


def test_prompt_refinement_keeps_the_prompt_when_the_prompted_vertebra_is_not_found():
    from x2p_ros.geometry import carm_view
    Ps = {v: carm_view(v, 550.0, 1000.0, 100.0, 64)[0] for v in ("ap", "lat")}
    xyz = np.array([[0.0, 0.0, 20.0 - 10.0 * i] for i in range(3)])
    net = PromptFollowingOracle(xyz, preset("tiny", n_vertebrae=4, prompt_refinements=3), Ps, blind=True)
    images = {v: np.random.default_rng(0).random((64, 64)).astype(np.float32) for v in Ps}
    prompts = {v: geometry.project(Ps[v], xyz[:1])[0] for v in Ps}
    found = Localizer(net, presence_threshold=0.5).localize(images, Ps, prompts)
    assert net.calls == 2 and not any(f.present for f in found)  # one refinement tried, then the pair as given
    with pytest.raises(ValueError, match="prompt_refinements"):
        preset("tiny", prompt_refinements=-1)


@pytest.mark.parametrize("change, message", [
    (lambda i, P, p: i.__setitem__("ap", np.full((64, 64), np.nan)), "NaN or Inf pixels"),
    (lambda i, P, p: i.__setitem__("lat", np.ones((64, 64))), "constant"),
    (lambda i, P, p: i.__setitem__("ap", np.ones(64)), "must be 2D"),
    (lambda i, P, p: p.__setitem__("ap", (70.0, 10.0)), "outside the 64 x 64 image"),
    (lambda i, P, p: p.__setitem__("lat", (np.nan, 10.0)), "two finite numbers"),
    (lambda i, P, p: P.__setitem__("ap", np.zeros((3, 4))), "singular"),
    (lambda i, P, p: P.pop("lat"), "all needed"),
])
def test_bad_localisation_input_is_refused_with_a_reason(change, message):
    from x2p_ros.geometry import carm_view
    model = X2PNet(preset("tiny"))
    images = {v: np.random.default_rng(1).random((64, 64)) for v in ("ap", "lat")}
    Ps = {v: carm_view(v, 550.0, 1000.0, 100.0, 64)[0] for v in ("ap", "lat")}
    prompts = {"ap": (32.0, 10.0), "lat": (30.0, 11.0)}
    change(images, Ps, prompts)
    with pytest.raises(InputError, match=message):
        Localizer(model).localize(images, Ps, prompts)


def test_the_peaked_3d_target_tells_a_peak_from_a_blob_the_squared_error_cannot():
    # issue 12: the fusion's volumes were blobs wider than the gap between vertebrae; the soft-argmax
    # of a symmetric blob is its centre, so the squared 3D error gave no reason to sharpen it
    from x2p_ros.training.losses import peak_3d_loss, x2p_losses
    g = torch.arange(-10.0, 11.0) * 3.0  # 21 voxels of 3 mm per axis
    points = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), dim=-1)[None]  # (1, 21, 21, 21, 3)
    truth = torch.tensor([[[0.0, 0.0, 0.0]]])
    r2 = points.square().sum(-1)[None]  # (1, 1, 21, 21, 21)
    batch = {"present": torch.ones(1, 1, dtype=torch.bool), "xyz": truth, "pixels": torch.zeros(1, 2, 1, 2),
             "images": torch.zeros(1, 2, 1, 64, 64)}
    terms = {}
    for name, sigma in (("peak", 6.0), ("blob", 30.0)):
        logits = -r2 / (2 * sigma ** 2)
        xyz = logits.flatten(2).softmax(-1) @ points.reshape(1, -1, 3)
        terms[name] = x2p_losses({"xyz": xyz, "volume_logits": logits, "volume_points": points}, batch,
                                 preset("tiny", loss_3d_peak_sigma_mm=6.0, loss_3d_peak_weight=0.1))
    assert terms["peak"]["3d"] == pytest.approx(terms["blob"]["3d"], abs=1e-6)  # both centred on the truth
    assert terms["peak"]["peak"] == pytest.approx(0.0, abs=1e-5)  # the target itself
    assert terms["blob"]["peak"] > 0.1
    assert "peak" not in x2p_losses({"xyz": xyz, "volume_logits": logits, "volume_points": points}, batch,
                                    preset("tiny"))
    # a peak off by a vertebra costs more than the blob over it
    off = -((points - torch.tensor([0.0, 0.0, 30.0])).square().sum(-1)[None]) / (2 * 6.0 ** 2)
    assert peak_3d_loss(off, points, truth, torch.ones(1, 1), 6.0) > peak_3d_loss(logits, points, truth,
                                                                                 torch.ones(1, 1), 6.0)


class LookMisreadingOracle(OracleNet):
    """An oracle that misreads one look: run on a batch of looks of one window, it places every vertebra 50
    mm off sideways and finds none present in the second look, and is right in the others; it keeps each
    batch it was given."""

    def __init__(self, xyz, config):
        super().__init__(xyz, config)
        self.batches = []

    def forward(self, images, P, prompt):
        self.batches.append((images.clone(), P.clone(), prompt.clone()))
        one = super().forward(images[:1], P[:1], prompt[:1])
        xyz, presence = one["xyz"].repeat(len(images), 1, 1), one["presence"].repeat(len(images), 1)
        if len(images) > 1:
            xyz[1, :, 0] += 50.0
            presence[1] = 0.0
        return {"xyz": xyz, "presence": presence}


@pytest.mark.parametrize("extra_looks", [0, 2, 4])
def test_extra_looks_run_each_window_in_other_looks_and_one_misread_look_moves_no_estimate(extra_looks):
    from x2p_ros.geometry import carm_view
    Ps = {v: carm_view(v, 550.0, 1000.0, 100.0, 64)[0] for v in ("ap", "lat")}
    xyz = np.array([[0.0, 0.0, 20.0 - 12.0 * i] for i in range(3)])
    net = LookMisreadingOracle(xyz, preset("tiny", n_vertebrae=4, extra_looks=extra_looks))
    localizer = Localizer(net, presence_threshold=0.5)
    assert localizer.extra_looks == extra_looks  # the checkpoint's own
    images = {v: np.random.default_rng(1).random((64, 64)).astype(np.float32) for v in Ps}
    present = [f for f in localizer.localize(images, Ps, {v: geometry.project(Ps[v], xyz[:1])[0] for v in Ps})
               if f.present]
    assert net.calls == localizer.windows_run == 1  # the looks share one forward: a batch
    batch_images, batch_P, batch_prompt = net.batches[0]
    assert batch_images.shape == (extra_looks + 1, 2, 1, 64, 64)
    for k in range(1, extra_looks + 1):  # the same window in another look, with the same geometry
        assert (batch_images[k] - batch_images[0]).abs().mean() > 0.02
        torch.testing.assert_close(batch_P[k], batch_P[0])
        torch.testing.assert_close(batch_prompt[k], batch_prompt[0])
    # the median of the looks' estimates and their mean presence (0.9 but in the misread look)
    np.testing.assert_allclose([f.xyz_mm for f in present], xyz, atol=1e-9)
    np.testing.assert_allclose([f.confidence for f in present], 0.9 * extra_looks / (extra_looks + 1) if extra_looks
                               else 0.9, rtol=1e-6)


SYNTH = ["data", "synth", "--out", "{tmp}/out", "--cases", "2"]
EVALUATE = ["evaluate", "--data", "{tmp}/data", "--checkpoint", "{tmp}/m.pt", "--out", "{tmp}/out"]
TRAIN = ["train", "--data", "{tmp}/data", "--out", "{tmp}/out"]


@pytest.mark.parametrize("command, message", [
    (SYNTH + ["--seed", "-1"], "argument --seed: must be at least 0, got -1"),
    (SYNTH + ["--seed", "x"], "argument --seed: invalid int value: 'x'"),
    (EVALUATE + ["--limit", "-1"], "argument --limit: must be at least 1, got -1"),
    (EVALUATE + ["--look-seed", "-3"], "argument --look-seed: must be at least 0, got -3"),
    (TRAIN + ["--epochs", "0"], "argument --epochs: must be at least 1, got 0"),
    (TRAIN + ["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    (TRAIN + ["--lr", "nan"], "argument --lr: must be at least 0.0, got nan"),
    (TRAIN + ["--lr", "-1"], "argument --lr: must be at least 0.0, got -1"),
    (TRAIN + ["--time-limit", "-5"], "argument --time-limit: must be at least 0.0, got -5"),
    (TRAIN + ["--workers", "-1"], "argument --workers: must be at least 0, got -1"),
    (["model", "summary", "--size", "7"], "--size 7: image_size must be a positive multiple of 8"),
    (["model", "summary", "--size", "-64"], "--size -64: image_size must be a positive multiple of 8")])
def test_out_of_range_numbers_are_usage_errors_that_write_nothing(tmp_path, capsys, command, message):
    """Before: a negative seed ended in numpy's traceback, --limit -1 evaluated every case but the last,
    --epochs 0 wrote a run with an infinite 'best' validation, --time-limit -5 trained an epoch and a size
    the config cannot take ended model summary in a traceback."""
    assert main([arg.format(tmp=tmp_path) for arg in command]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_extra_looks_out_of_range_are_refused():
    with pytest.raises(ValueError, match="extra_looks"):
        preset("tiny", extra_looks=5)
    with pytest.raises(ValueError, match="extra_looks"):
        preset("tiny", extra_looks=-1)


def test_look_consistency_is_zero_for_equal_halves_and_the_hand_computed_difference_otherwise():
    from x2p_ros.training.losses import look_consistency
    present = torch.tensor([[True, True, False], [True, True, False]] * 2).float()  # (4, 3): 2 samples, twice
    xyz = torch.zeros(4, 3, 3)
    maps = torch.zeros(4, 2, 3, 4, 4)
    assert float(look_consistency({"xyz": xyz, "heatmaps": maps}, present, 30.0)) == 0.0
    xyz[2, 0, 0] = 30.0  # sample 0's first vertebra 30 mm off in the other look: 1 in loss units
    xyz[3, 2, 1] = 300.0  # an absent vertebra counts for nothing
    maps[3, 1, 1, 2, 2] = 0.5  # sample 1's second vertebra, LAT view: one cell 0.5 off
    # 3D: 1 over the 4 present vertebrae; heatmaps: 0.25 over their 8 maps
    assert float(look_consistency({"xyz": xyz, "heatmaps": maps}, present, 30.0)) == pytest.approx(1 / 4 + 0.25 / 8)


def test_training_with_look_consistency_runs_each_sample_in_two_looks_of_the_same_geometry(small_data, tmp_path):
    from x2p_ros.training.data import BiplanarDataset, with_paired_looks
    names = case_io.read_split(small_data, "train")
    sample = BiplanarDataset(small_data, names, 64, 4, train=True, paired_looks=True)[0]
    plain = BiplanarDataset(small_data, names, 64, 4, train=True)[0]
    assert sample["other_images"].shape == sample["images"].shape == plain["images"].shape
    assert (sample["other_images"] - sample["images"]).abs().mean() > 0.02  # another look
    for key in ("P", "xyz", "present", "pixels"):  # of the same crop
        torch.testing.assert_close(sample[key], plain[key])
    assert "other_images" not in plain
    batch = torch.utils.data.default_collate([sample, sample])
    doubled = with_paired_looks(batch)
    assert doubled["images"].shape[0] == 4 and doubled["paired_looks"] and "other_images" not in doubled
    torch.testing.assert_close(doubled["images"][2:], batch["other_images"])
    torch.testing.assert_close(doubled["xyz"][2:], batch["xyz"])
    assert doubled["name"] == batch["name"] * 2
    assert main(["train", "--data", str(small_data), "--config", "tiny", "--out", str(tmp_path / "run"), "--workers",
                 "0", "--quiet", "--epochs", "1", "--set", "loss_look_consistency_weight=1.0"]) == 0
    log = list(csv.DictReader((tmp_path / "run" / "log.csv").open()))
    assert float(log[0]["looks"]) > 0  # the term was there and finite
    with pytest.raises(ValueError, match="loss_look_consistency_weight"):
        preset("tiny", loss_look_consistency_weight=-1.0)

"""The centre head and centre snapping (model/centres.py): the chain walked down onto every vertebra's centre."""
import csv

import numpy as np
import pytest
import torch

from x2p_ros import geometry
from x2p_ros.cli import main
from x2p_ros.data import case_io
from x2p_ros.inference import Localizer
from x2p_ros.model import build_model, checkpoint, preset
from x2p_ros.model.centres import snap_chain, snapped_estimates
from x2p_ros.training.losses import CENTRE_SIGMA_CELLS, centre_loss

SIZE, CELLS = 128, 64  # input pixels and centre-map cells (stride 2)


def centre_map(pixels, height: float = 1.0) -> torch.Tensor:
    """A (CELLS, CELLS) map with a Gaussian of the head's targets (peak 1 on the grid) at each pixel (u, v)."""
    cells = torch.arange(CELLS, dtype=torch.float32)
    out = torch.zeros(CELLS, CELLS)
    for u, v in pixels:
        cu, cv = geometry.pixel_to_cell(u, SIZE, CELLS), geometry.pixel_to_cell(v, SIZE, CELLS)
        g = torch.exp(-((cells[None] - cu) ** 2 + (cells[:, None] - cv) ** 2) / (2 * CENTRE_SIGMA_CELLS ** 2))
        out = torch.maximum(out, height * g / g.max())
    return out


TRUE = [(64.0, 20.0), (65.0, 54.0), (66.0, 90.0), (66.0, 124.0)]  # steps of 34, 36 and 34 px


def test_snapping_walks_down_the_chain_so_that_one_steps_error_is_not_carried_into_the_next():
    """The model steps 40 px each time (6, 4 and 6 px too far): its last vertebra is 16 px off; snapped, each
    starts one model step below the one before it as snapped, and every one lands on its centre."""
    maps = centre_map(TRUE)[None, None]  # (B, V, h, w)
    chain = torch.tensor([[[[64.0, 20.0], [64.0, 60.0], [64.0, 100.0], [64.0, 140.0]]]])
    snapped = snap_chain(maps, chain, (SIZE, SIZE), radius_share=0.3, floor=0.3)[0, 0]
    torch.testing.assert_close(snapped, torch.tensor(TRUE), atol=0.3, rtol=0)
    # the radius bounds the move: at 0.1 of a 40 px step nothing lies within 4 px of vertebra 1's start
    kept = snap_chain(maps, chain, (SIZE, SIZE), radius_share=0.1, floor=0.3)[0, 0]
    torch.testing.assert_close(kept[1], chain[0, 0, 1])


def test_a_centre_the_map_does_not_show_leaves_the_model_step_and_the_walk_goes_on():
    """Vertebra 2's centre is faint (under the floor): it stays one model step below vertebra 1 as snapped, and
    vertebra 3, one model step below that, still finds its own centre."""
    maps = torch.maximum(centre_map([TRUE[0], TRUE[1], TRUE[3]]), centre_map([TRUE[2]], height=0.2))[None, None]
    chain = torch.tensor([[[[64.0, 20.0], [64.0, 58.0], [64.0, 94.0], [64.0, 129.0]]]])
    snapped = snap_chain(maps, chain, (SIZE, SIZE), radius_share=0.3, floor=0.3)[0, 0]
    torch.testing.assert_close(snapped[1], torch.tensor(TRUE[1]), atol=0.3, rtol=0)
    torch.testing.assert_close(snapped[2], snapped[1] + torch.tensor([0.0, 36.0]))
    torch.testing.assert_close(snapped[3], torch.tensor(TRUE[3]), atol=0.3, rtol=0)
    with pytest.raises(ValueError, match="square"):
        snap_chain(maps[..., :-1], chain, (SIZE, SIZE), 0.3, 0.3)


P_PAIR = np.stack([geometry.carm_view(v, 1000.0, 1200.0, 200.0, SIZE)[0] for v in ("ap", "lat")])
POINTS = np.array([[0.0, 0.0, 40.0], [2.0, 1.0, 10.0], [3.0, 3.0, -22.0], [3.0, 6.0, -55.0]])  # mm


@pytest.mark.parametrize("agree", [0.0, 0.1])
def test_snapped_estimates_triangulate_the_snapped_pixels_of_both_views(agree):
    """Two calibrated views of four points: the model's estimates 5 mm too far down from the second on, the maps
    exact -> the snapped estimates are the points (the two views' snaps meet: the agreement check takes them)."""
    maps = torch.stack([centre_map(geometry.project(p, POINTS)) for p in P_PAIR])[None]  # (1, V, h, w)
    off = POINTS + np.array([[0.0, 0.0, 0.0], [0.0, 0.0, -5.0], [0.0, 0.0, -10.0], [0.0, 0.0, -15.0]])
    out = {"xyz": torch.tensor(off[None], dtype=torch.float32), "centres": maps}
    xyz = snapped_estimates(out, torch.tensor(P_PAIR[None]), (SIZE, SIZE), radius_share=0.3, agree_share=agree)[0]
    np.testing.assert_allclose(xyz.numpy(), POINTS, atol=0.6)
    assert np.abs(off - POINTS).max() == 15.0


def test_snaps_of_two_views_that_do_not_meet_are_not_taken_and_the_walk_goes_on():
    """The AP map shows vertebra 1's centre 6 px too low (as when a view's snap takes another peak), the LAT map
    every centre where it is; the model's own estimates are exact. Snapped without the check, vertebra 1 lands
    between the two views' heights; with it, both views keep their start places there, and vertebrae 2 and 3,
    whose snaps meet, still move onto their centres."""
    uv = np.stack([geometry.project(p, POINTS) for p in P_PAIR])  # (V, N, 2)
    wrong = uv.copy()
    wrong[0, 1, 1] += 6.0
    maps = torch.stack([centre_map(wrong[0]), centre_map(uv[1])])[None]  # (1, V, h, w)
    # the model's pixels 3 px too low at vertebrae 2 and 3 (start places the snaps must correct)
    chain = torch.tensor(uv[None]) + torch.tensor([0.0, 0.0, 3.0, 3.0])[:, None] * torch.tensor([0.0, 1.0])
    P = torch.tensor(P_PAIR[None])
    taken = snap_chain(maps, chain, (SIZE, SIZE), 0.3, 0.3, P)[0]  # agree_share 0: every snap
    checked = snap_chain(maps, chain, (SIZE, SIZE), 0.3, 0.3, P, agree_share=0.1)[0]
    assert abs(taken[0, 1, 1] - wrong[0, 1, 1]) < 0.3  # the AP snap took the wrong peak
    xyz = lambda pixels: geometry.triangulate_torch(P, pixels[None].double())[0].numpy()  # noqa: E731
    assert np.linalg.norm(xyz(taken)[1] - POINTS[1]) > 1.5
    torch.testing.assert_close(checked[:, 1], chain[0, :, 1].float())  # both views kept their start places
    np.testing.assert_allclose(xyz(checked), POINTS, atol=0.6)


def test_the_centre_loss_is_zero_for_its_target_and_counts_every_vertebra_inside_the_view():
    inside = torch.tensor([[[True, True, False], [True, True, True]]])  # (B, V, M)
    centres = torch.tensor([[[[30.0, 20.0], [32.0, 60.0], [999.0, 999.0]], [[40.0, 20.0], [41.0, 60.0],
                                                                           [42.0, 100.0]]]])
    target = torch.stack([centre_map(centres[0, 0, :2].tolist()), centre_map(centres[0, 1].tolist())])[None]
    assert centre_loss(target, centres, inside, (SIZE, SIZE)) < 1e-10
    # a map without the third centre of the LAT view misses it
    missing = torch.stack([target[0, 0], centre_map(centres[0, 1, :2].tolist())])[None]
    assert centre_loss(missing, centres, inside, (SIZE, SIZE)) > 1e-4
    assert centre_loss(torch.zeros_like(target), centres, inside, (SIZE, SIZE)) > 1e-3


def test_training_samples_hold_every_vertebra_inside_each_window_whatever_the_chain(small_data):
    """A crop's chain starts at the top-most vertebra inside both views; the centres are every labelled vertebra
    inside each view, above or beside the chain too, at their projections."""
    from x2p_ros.training.data import BiplanarDataset
    names = case_io.list_cases(small_data)
    train = BiplanarDataset(small_data, names, 64, 4, train=True, full_share=0.0)
    more = 0
    for epoch in range(4):
        train.set_epoch(epoch)
        for i in range(len(train)):
            s = train[i]
            case = case_io.read_case(small_data / s["name"])
            for k in range(2):
                uv = geometry.project(s["P"][k].double().numpy(), case.xyz_mm)
                inside = geometry.inside_image(uv, (64, 64), 0.02 * 64 + 0.5)
                n = len(case.labels)
                assert s["centre_inside"][k, :n].numpy().tolist() == inside.tolist()
                assert not s["centre_inside"][k, n:].any()
                np.testing.assert_allclose(s["centres"][k, :n][inside].numpy(), uv[inside], atol=1e-3)
                more += int(inside.sum() > s["present"].sum())
    assert more > 0  # some windows show vertebrae outside the chain of N


def test_a_centre_head_trained_alone_leaves_every_other_weight_as_it_was(small_data, tmp_path, capsys):
    args = ["train", "--data", str(small_data), "--workers", "0", "--quiet", "--epochs", "1", "--config", "tiny"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    start = checkpoint.read(tmp_path / "a" / "best.pt")["model"]
    head = ["--set", "centre_head=true", "--set", "centre_snap=0.3", "--lr", "1e-2",
            "--init", str(tmp_path / "a" / "best.pt")]
    assert main(args + ["--out", str(tmp_path / "b"), "--train-only", "centre_head."] + head) == 0
    said = capsys.readouterr().out
    assert "new, at their initial values: centre_head.* (" in said and "U-Net copied from the VFE" in said
    tuned = checkpoint.read(tmp_path / "b" / "best.pt")
    for name, weights in start.items():
        torch.testing.assert_close(tuned["model"][name], weights)
    initial = build_model(preset("tiny", centre_head=True)).state_dict()
    assert any(not torch.equal(tuned["model"][n], initial[n]) for n in tuned["model"] if n.startswith("centre_head."))
    assert float(next(csv.DictReader((tmp_path / "b" / "log.csv").open()))["centres"]) > 0
    # a new head's U-Net starts as the model's VFE
    assert main(args + ["--out", str(tmp_path / "d"), "--train-only", "centre_head."] + head + ["--lr", "0"]) == 0
    untrained = checkpoint.read(tmp_path / "d" / "best.pt")["model"]
    for name, weights in start.items():
        if name.startswith("vfe."):
            torch.testing.assert_close(untrained[f"centre_head.{name}"], weights)
    assert main(args + ["--out", str(tmp_path / "c"), "--train-only", "no_such_head."] + head) == 2
    assert "no weight of the tiny model's is named so" in capsys.readouterr().err
    # resumed, it trains the same weights, or not at all
    assert main(args + ["--epochs", "2", "--out", str(tmp_path / "b")] + head) == 2
    assert "was trained with --train-only centre_head.; resume it with the same" in capsys.readouterr().err
    assert main(args + ["--epochs", "2", "--out", str(tmp_path / "b"), "--train-only", "centre_head."]
                + head) == 0
    resumed = checkpoint.read(tmp_path / "b" / "last.pt")
    assert resumed["epoch"] == 1 and resumed["meta"]["train_only"] == "centre_head."
    for name, weights in start.items():
        torch.testing.assert_close(resumed["model"][name], weights)


class OverSteppingNet(torch.nn.Module):
    """Stands in for a model whose steps are 20 % too long (the shipped models' error on the real CTs, README):
    the k-th vertebra below the prompt is placed k / 5 of a step too far down; its centre maps mark every
    vertebra in the window exactly."""

    def __init__(self, xyz, config):
        super().__init__()
        self.xyz = torch.as_tensor(xyz, dtype=torch.float64)
        self.config = config

    def forward(self, images, P, prompt):
        S, N = images.shape[-1], self.config.n_vertebrae
        uv, _ = geometry.project_torch(P[0].double(), self.xyz[None].expand(2, -1, -1))  # (V, M, 2)
        start = int((uv[0] - prompt[0, 0].double()).norm(dim=-1).argmin())
        chain = self.xyz[start:start + N]
        step = self.xyz[1] - self.xyz[0]
        xyz = torch.zeros(1, N, 3, dtype=torch.float64)
        xyz[0, :len(chain)] = chain + 0.2 * torch.arange(len(chain), dtype=torch.float64)[:, None] * step
        cells = torch.arange(S // 2, dtype=torch.float64)
        maps = torch.zeros(1, 2, S // 2, S // 2, dtype=torch.float64)
        for v in range(2):
            for u, w in uv[v]:
                cu, cw = geometry.pixel_to_cell(u, S, S // 2), geometry.pixel_to_cell(w, S, S // 2)
                g = torch.exp(-((cells[None] - cu) ** 2 + (cells[:, None] - cw) ** 2) / (2 * CENTRE_SIGMA_CELLS ** 2))
                maps[0, v] = torch.maximum(maps[0, v], g / g.max())
        presence = torch.zeros(1, N)
        presence[0, :len(chain)] = 0.9
        return {"xyz": xyz, "presence": presence, "centres": maps}


@pytest.mark.parametrize("snap", [0.0, 0.3])
def test_the_localizer_walks_the_chain_onto_the_centres_when_told(snap):
    """Four vertebrae 13 mm apart in a 64 x 64 pair: the model's own chain drifts to 0.6 of a step at the fourth;
    snapped, every vertebra is on its centroid (to the map's sub-cell accuracy) and the presence is the model's."""
    Ps = {v: geometry.carm_view(v, 550.0, 1000.0, 100.0, 64)[0] for v in geometry.VIEWS}
    xyz = np.array([[0.0, 0.0, 20.0 - 13.0 * i] for i in range(4)])
    net = OverSteppingNet(xyz, preset("tiny", n_vertebrae=4, centre_head=True, centre_snap=snap))
    images = {v: np.random.default_rng(0).random((64, 64)).astype(np.float32) for v in Ps}
    found = Localizer(net, presence_threshold=0.5).localize(images, Ps, {v: geometry.project(Ps[v], xyz[:1])[0]
                                                                           for v in Ps})
    errors = np.linalg.norm([f.xyz_mm for f in found] - xyz, axis=1)
    assert [f.confidence for f in found] == pytest.approx([0.9] * 4)
    if snap:
        assert errors.max() < 0.5
    else:
        np.testing.assert_allclose(errors, [0.0, 2.6, 5.2, 7.8], atol=1e-6)


@pytest.mark.parametrize("change, message", [(dict(centre_snap=0.3), "needs the centre head"),
                                             (dict(centre_head=True, centre_snap=1.5), "centre_snap must be"),
                                             (dict(centre_head=True, loss_centre_weight=-1.0), "loss_centre_weight"),
                                             (dict(centre_head=True, centre_agree=0.1), "centre_agree needs snapping"),
                                             (dict(centre_head=True, centre_snap=0.3, centre_agree=1.5),
                                              "centre_agree must be")])
def test_centre_settings_out_of_range_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        preset("tiny", **change)


def test_the_model_summary_counts_the_centre_head_as_a_unit_of_its_own():
    from x2p_ros.model.summary import model_summary
    plain, with_head = model_summary(preset("tiny")), model_summary(preset("tiny", centre_head=True))
    assert "centre_head" not in plain
    head = with_head["centre_head"]
    assert head["params"] > 0 and head["gmacs"] > 0
    assert with_head["total"]["params"] == plain["total"]["params"] + head["params"]
    assert with_head["total"]["gmacs"] == pytest.approx(plain["total"]["gmacs"] + head["gmacs"])


def test_evaluate_snaps_at_the_given_radius_and_refuses_a_radius_it_cannot_use(small_data, tmp_path, capsys):
    import json
    torch.manual_seed(0)
    with_head, plain = tmp_path / "head.pt", tmp_path / "plain.pt"
    checkpoint.save(with_head, build_model(preset("tiny", centre_head=True)))
    checkpoint.save(plain, build_model(preset("tiny")))
    args = ["evaluate", "--data", str(small_data), "--split", "all", "--no-realct"]
    assert main(args + ["--checkpoint", str(with_head), "--centre-snap", "0.3", "--out", str(tmp_path / "e")]) == 0
    assert ", centre snap 0.3" in capsys.readouterr().out
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["centre_snap"] == 0.3
    assert main(args + ["--checkpoint", str(with_head), "--centre-snap", "0.3", "--centre-agree", "0.15",
                        "--out", str(tmp_path / "f")]) == 0
    assert ", centre snap 0.3, agreement 0.15" in capsys.readouterr().out
    assert json.loads((tmp_path / "f" / "metrics.json").read_text())["centre_agree"] == 0.15
    assert main(args + ["--checkpoint", str(with_head), "--centre-snap", "0.3", "--centre-agree", "2"]) == 2
    assert "centre agree must be 0 (no check) to 1" in capsys.readouterr().err
    for checkpoint_path, snap, message in ((plain, "0.3", "needs a checkpoint with a centre head"),
                                           (with_head, "1.5", "centre snap must be 0")):
        assert main(args + ["--checkpoint", str(checkpoint_path), "--centre-snap", snap]) == 2
        assert message in capsys.readouterr().err

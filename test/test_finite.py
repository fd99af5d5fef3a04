"""A forward pass that stays finite over any C-arm geometry, and training that
one bad batch cannot destroy: property tests of the model and losses in fp32
and bf16 autocast, the trainer's step check, checkpoints, and evaluation of a
model whose output is not finite."""
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from x2p_ros import geometry
from x2p_ros.cli import main
from x2p_ros.geometry import carm_view
from x2p_ros.inference import Localizer, ModelOutputError
from x2p_ros.model import X2PNet, build_model, checkpoint, preset
from x2p_ros.training.losses import x2p_losses

S = 64  # the tiny config's input size
CONFIGS = {"tiny": preset("tiny"), "tiny-lifting": preset("tiny", lifting=True)}
MODELS = {}


def model(name):
    if name not in MODELS:
        torch.manual_seed(0)
        MODELS[name] = build_model(CONFIGS[name])
    return MODELS[name]


def rotated_view(azimuth, tilt, roll, sid, sdd, fov_mm):
    """P of a source at azimuth (0: AP, from -y) and tilt around the origin, the image rolled by roll."""
    source = sid * np.array([np.sin(azimuth) * np.cos(tilt), -np.cos(azimuth) * np.cos(tilt), np.sin(tilt)])
    R, t = geometry.look_at_pose(source, np.zeros(3))
    c, s = np.cos(roll), np.sin(roll)
    R = R @ np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])  # about the viewing axis
    spacing = fov_mm * sdd / sid / S
    return geometry.projection_matrix(geometry.intrinsics(sdd / spacing, ((S - 1) / 2, (S - 1) / 2)), R, t)


def make_batch(Ps, xyz, present, prompt, rng):
    """A two-sample batch: the given case and an empty one (no vertebra present,
    NaN targets where nothing is present, as a data set may hold them)."""
    N = preset("tiny").n_vertebrae
    pixels = np.stack([np.asarray(xyz) @ P[:, :3].T + P[:, 3] for P in Ps])  # (V, N, 3) homogeneous
    with np.errstate(divide="ignore", invalid="ignore"):
        pixels = pixels[..., :2] / pixels[..., 2:3]
    present = np.asarray(present, dtype=bool)
    pixels[:, ~present] = np.nan
    xyz = np.where(present[:, None], xyz, np.nan)
    t = torch.as_tensor
    return {"images": t(rng.normal(0, 1, (2, 2, 1, S, S)), dtype=torch.float32),
            "P": t(np.stack([Ps, Ps]), dtype=torch.float32),
            "prompt": t(np.stack([prompt, np.full((2, 2), (S - 1) / 2)]), dtype=torch.float32),
            "xyz": t(np.stack([xyz, np.full((N, 3), np.nan)]), dtype=torch.float32),
            "present": t(np.stack([present, np.zeros(N, bool)])),
            "pixels": t(np.stack([pixels, np.full((2, N, 2), np.nan)]), dtype=torch.float32)}


def non_finite(name, batch, bf16):
    """Names of the outputs, losses and gradients that are not finite."""
    net = model(name)
    net.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = net(batch["images"], batch["P"], batch["prompt"])
    cfg = net.config
    losses = x2p_losses(out, batch, cfg)
    losses["total"].backward()
    bad = [k for k, v in out.items() if torch.is_tensor(v) and not torch.isfinite(v).all()]
    bad += [f"loss {k}" for k, v in losses.items() if not torch.isfinite(v)]
    bad += [f"gradient {k}" for k, p in net.named_parameters()
            if p.grad is not None and not torch.isfinite(p.grad).all()]
    return bad


rolls = st.one_of(st.just(0.0), st.just(math.pi), st.floats(-math.pi, math.pi))


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(CONFIGS)),
       azimuth=st.floats(-math.pi, math.pi), between=st.floats(0.3, math.pi - 0.3),
       tilts=st.tuples(st.floats(-0.8, 0.8), st.floats(-0.8, 0.8)), roll_ap=rolls, roll_lat=rolls,
       sid=st.floats(120.0, 2000.0), sdd_extra=st.floats(50.0, 800.0), fov_mm=st.floats(40.0, 600.0),
       count=st.integers(0, 4), spread_mm=st.floats(1.0, 400.0), seed=st.integers(0, 2 ** 16),
       prompt_kind=st.sampled_from(["vertebra", "border", "outside", "anywhere"]))
@example(name="tiny", azimuth=0.0, between=math.pi / 2, tilts=(0.0, 0.0), roll_ap=0.0, roll_lat=math.pi,
         sid=600.0, sdd_extra=400.0, fov_mm=150.0, count=3, spread_mm=30.0, seed=0, prompt_kind="vertebra")
@example(name="tiny", azimuth=0.3, between=1.2, tilts=(0.5, -0.5), roll_ap=0.0, roll_lat=0.0,
         sid=120.0, sdd_extra=50.0, fov_mm=600.0, count=4, spread_mm=400.0, seed=1, prompt_kind="outside")
def test_forward_losses_and_gradients_stay_finite_over_any_geometry(name, azimuth, between, tilts, roll_ap, roll_lat,
                                                                     sid, sdd_extra, fov_mm, count, spread_mm, seed,
                                                                     prompt_kind):
    """Views at any angle, rolled up to upside down, sources from 12 cm to 2 m
    (parts of the volume behind a source), vertebrae at the border, in one
    view only or behind a source, a prompt on or past the border, empty and
    one-vertebra cases: outputs, losses and gradients stay finite in fp32 and
    under bf16 autocast."""
    rng = np.random.default_rng(seed)
    Ps = [rotated_view(azimuth, tilts[0], roll_ap, sid, sid + sdd_extra, fov_mm),
          rotated_view(azimuth + between, tilts[1], roll_lat, sid, sid + sdd_extra, fov_mm)]
    N = preset("tiny").n_vertebrae
    xyz = np.zeros((N, 3))
    xyz[:count] = rng.normal(0, spread_mm, (count, 3))
    present = np.arange(N) < count
    if prompt_kind == "vertebra" and count:
        prompt = np.stack([geometry.project_torch(torch.as_tensor(P), torch.as_tensor(xyz[:1]))[0][0].numpy()
                           for P in Ps])
        prompt = np.nan_to_num(prompt, nan=0.0).clip(-S, 2 * S)
    elif prompt_kind == "border":
        prompt = rng.choice([-0.5, S - 0.5], size=(2, 2))
    elif prompt_kind == "outside":
        prompt = rng.uniform(-S, 2 * S, size=(2, 2))
    else:
        prompt = rng.uniform(-0.5, S - 0.5, size=(2, 2))
    batch = make_batch(Ps, xyz, present, prompt, rng)
    for bf16 in (False, True):
        assert non_finite(name, batch, bf16) == [], f"bf16={bf16}"


def test_a_view_shown_upside_down_gives_the_same_volume_frame():
    """A C-arm image rotated by 180 degrees (a display setting) used to cancel the
    other view's "up" and turn every output into NaN."""
    from x2p_ros.model.fusion import volume_frame
    Pap, Plat = (torch.as_tensor(carm_view(v, 600.0, 1000.0, 150.0, S)[0])[None] for v in ("ap", "lat"))
    rotate_180 = torch.tensor([[-1.0, 0, S - 1], [0, -1, S - 1], [0, 0, 1]], dtype=torch.float64)
    anchor = torch.tensor([[5.0, -3.0, 20.0]], dtype=torch.float64)
    upright = volume_frame(torch.stack([Pap, Plat], 1), (S, S), anchor, 0.5)
    flipped = volume_frame(torch.stack([Pap, rotate_180 @ Plat], 1), (S, S), anchor, 0.5)
    for a, b in zip(upright, flipped):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(a, b)


def test_absent_vertebrae_with_nan_targets_leave_the_losses_finite():
    cfg = preset("tiny")
    N = cfg.n_vertebrae
    out = {"xyz": torch.zeros(1, N, 3, requires_grad=True),
           "heatmaps": torch.zeros(1, 2, N, cfg.embed_size, cfg.embed_size, requires_grad=True),
           "volume_logits": torch.zeros(1, N, 4, 3, 3, requires_grad=True),
           "volume_points": torch.randn(1, 4, 3, 3, 3) * 50}
    present = torch.tensor([[True] + [False] * (N - 1)])
    xyz = torch.full((1, N, 3), float("nan"))
    xyz[0, 0] = torch.tensor([1.0, 2.0, 3.0])
    pixels = torch.full((1, 2, N, 2), float("nan"))
    pixels[0, :, 0] = 30.0
    batch = {"present": present, "xyz": xyz, "pixels": pixels, "images": torch.zeros(1, 2, 1, S, S)}
    losses = x2p_losses(out, batch, replace(cfg, loss_3d_peak_sigma_mm=6.0))
    losses["total"].backward()
    assert all(torch.isfinite(v) for v in losses.values()) and losses["peak"] > 0
    assert torch.isfinite(out["xyz"].grad).all() and torch.isfinite(out["heatmaps"].grad).all()
    assert torch.isfinite(out["volume_logits"].grad).all() and not out["volume_logits"].grad[0, 1:].any()
    assert losses["3d"].item() == pytest.approx((1 + 4 + 9) / cfg.loss_3d_scale_mm ** 2)  # the present one counts


def test_a_checkpoint_with_non_finite_weights_is_never_written(tmp_path):
    torch.manual_seed(0)
    net = X2PNet(preset("tiny"))
    with torch.no_grad():
        next(net.parameters())[0] = float("nan")
    with pytest.raises(checkpoint.CheckpointError, match="NaN or Inf"):
        checkpoint.save(tmp_path / "bad.pt", net)
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from x2p_ros.data.synth import SynthConfig, synthesize
    root = tmp_path_factory.mktemp("finite")
    synthesize(root, 6, seed=4, config=SynthConfig(size=64), workers=1, progress=False)
    return root


def poison(monkeypatch, bad_names):
    """Cases whose images turn to NaN on loading: their batches give NaN losses."""
    from x2p_ros.training.data import BiplanarDataset
    real = BiplanarDataset.__getitem__

    def getitem(self, i):
        sample = real(self, i)
        if sample["name"] in bad_names:
            sample["images"] = torch.full_like(sample["images"], float("nan"))
        return sample
    monkeypatch.setattr(BiplanarDataset, "__getitem__", getitem)


def all_finite(path):
    return all(torch.isfinite(v).all() for v in checkpoint.read(path)["model"].values() if v.is_floating_point())


def test_a_non_finite_batch_is_skipped_logged_with_its_cases_and_counted(data, tmp_path, monkeypatch, capsys):
    from x2p_ros.data import case_io
    train_names = case_io.read_split(data, "train")
    bad = train_names[0]
    poison(monkeypatch, {bad})
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--config", "tiny", "--out", str(run), "--workers", "0", "--quiet",
                 "--epochs", "2", "--batch-size", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("non-finite loss or gradient") == 2 and f"cases in the batch: {bad}" in out  # once per epoch
    rows = (run / "log.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert [r.split(",")[header.index("skipped")] for r in rows[1:]] == ["1", "1"]
    steps = [int(r.split(",")[header.index("step")]) for r in rows[1:]]
    assert steps == [len(train_names) - 1, 2 * (len(train_names) - 1)]  # no update for the skipped ones
    assert all_finite(run / "last.pt") and all_finite(run / "best.pt")


def test_a_run_whose_batches_are_all_bad_makes_no_update_then_stops(data, tmp_path, monkeypatch, capsys):
    from x2p_ros.data import case_io
    poison(monkeypatch, set(case_io.read_split(data, "train")) | set(case_io.read_split(data, "val")))
    args = ["train", "--data", str(data), "--config", "tiny", "--workers", "0", "--quiet", "--batch-size", "1",
            "--epochs", "1", "--seed", "3"]
    # below the limit: the epoch ends with the weights it started from; validation is
    # NaN, so there is no best.pt
    assert main(args + ["--out", str(tmp_path / "a"), "--max-bad-steps", "100"]) == 0
    torch.manual_seed(3)
    start = X2PNet(preset("tiny")).state_dict()
    for k, v in checkpoint.read(tmp_path / "a" / "last.pt")["model"].items():
        torch.testing.assert_close(v, start[k])
    assert not (tmp_path / "a" / "best.pt").exists()
    capsys.readouterr()
    # at the limit: a clear error, exit status 2, no checkpoint at all
    assert main(args + ["--out", str(tmp_path / "b"), "--max-bad-steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "2 steps in a row had a non-finite loss or gradient" in err
    assert not (tmp_path / "b" / "last.pt").exists()


class NaNModel(torch.nn.Module):
    """X2P-Net whose output turns to NaN for chosen calls."""

    def __init__(self, calls_to_spoil):
        super().__init__()
        torch.manual_seed(0)
        self.net = X2PNet(preset("tiny"))
        self.config = self.net.config
        self.spoil, self.calls = set(calls_to_spoil), 0

    def forward(self, *args):
        out = self.net(*args)
        self.calls += 1
        if self.calls in self.spoil:
            out["xyz"] = out["xyz"] * float("nan")
        return out


def test_a_non_finite_model_output_is_a_failed_frame_never_a_pose():
    Ps = {v: carm_view(v, 550.0, 1000.0, 100.0, S)[0] for v in ("ap", "lat")}
    images = {v: np.random.default_rng(1).random((S, S)) for v in Ps}
    prompts = {"ap": (32.0, 10.0), "lat": (30.0, 11.0)}
    localizer = Localizer(NaNModel({1}), presence_threshold=0.0)
    with pytest.raises(ModelOutputError, match="3D positions are not finite"):
        localizer.localize(images, Ps, prompts)
    assert all(np.isfinite(v.xyz_mm).all() for v in localizer.localize(images, Ps, prompts))  # the next call is fine


def test_evaluate_counts_a_non_finite_case_as_failed_and_names_it(data, monkeypatch):
    from x2p_ros.data import case_io
    from x2p_ros.training import evaluate as evaluation
    names = case_io.read_split(data, "train")[:3]
    localizer = Localizer(NaNModel({1}), presence_threshold=0.0)  # the first case's first window
    errors = evaluation.evaluate_cases(localizer, data, names)
    assert [f["case"] for f in errors["failed"]] == [names[0]] and "not finite" in errors["failed"][0]["error"]
    sizes = [len(case_io.read_case(data / n).labels) for n in names]
    assert len(errors["3d"]) == sum(sizes) and len(errors["ap"]) == len(errors["3d"])
    assert np.isinf(errors["3d"][:sizes[0]]).all() and np.isfinite(errors["3d"][sizes[0]:]).any()

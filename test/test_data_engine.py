"""Data engine: DRR physics, synthetic cases (determinism, ground truth on bone,
exact P), the data set format and its validation."""
import json

import numpy as np
import pytest
import torch

from x2p_ros import geometry
from x2p_ros.data import carm, case_io, drr
from x2p_ros.data.phantom import CHAIN, VERSE_NUMBER, PhantomSpec, make_phantom, spine_curve
from x2p_ros.data.synth import SynthConfig, field, first_framed, make_case, synthesize
from x2p_ros.data.volume import Volume
from x2p_ros.geometry import carm_view

SMALL = SynthConfig(size=160)


def test_drr_matches_analytic_chords_of_a_water_ball():
    # a 30 mm water ball: the line integral is mu_water times the chord length
    n, voxel = 81, 1.0
    g = (np.arange(n) - 40) * voxel
    Z, Y, X = np.meshgrid(g, g, g, indexing="ij")
    hu = np.where(X ** 2 + Y ** 2 + Z ** 2 <= 30.0 ** 2, 0.0, -1000.0).astype(np.float32)
    affine = np.diag([voxel, voxel, voxel, 1.0])
    affine[:3, 3] = -40 * voxel
    volume = Volume(hu, affine)
    P, _ = carm_view("lat", sid=500.0, sdd=1000.0, fov_mm=100.0, size=101)
    water, bone = drr.line_integral(volume, P, (101, 101)).numpy()
    source, rays = geometry.backproject(P, [[50.0, 50.0], [50.0, 70.0], [80.0, 35.0]])
    for (u, v), d in zip([(50, 50), (50, 70), (80, 35)], rays):
        # chord of the ray through the ball: 2 sqrt(r^2 - distance(centre, ray)^2)
        dist2 = np.sum(source ** 2) - (source @ d) ** 2
        chord = 2 * np.sqrt(max(30.0 ** 2 - dist2, 0.0))
        assert water[v, u] == pytest.approx(chord, rel=0.03, abs=0.3)  # mm of water at 1 g/cm^3
    assert water[0, 0] == 0.0  # a ray that misses the ball crosses only air
    assert np.all(bone == 0.0)  # water holds no bone


def test_synthetic_case_is_deterministic_by_seed():
    a = make_case(11, SMALL)
    b = make_case(11, SMALL)
    c = make_case(12, SMALL)
    for view in case_io.VIEWS:
        np.testing.assert_array_equal(a[0][view], b[0][view])
        np.testing.assert_array_equal(a[1][view], b[1][view])
    assert a[3] == b[3]
    assert not np.array_equal(a[0]["ap"], c[0]["ap"])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    stats = synthesize(root, 6, seed=3, config=SynthConfig(size=192), workers=1, progress=False)
    return root, stats


def test_synthesize_writes_a_valid_dataset_with_splits_and_stats(dataset):
    root, stats = dataset
    problems, summary = case_io.check_dataset(root)
    assert problems == []
    assert summary["cases"] == 6 and summary["readable"] == 6
    splits = {s: case_io.read_split(root, s) for s in case_io.SPLITS}
    assert sorted(sum(splits.values(), [])) == [f"case_{i:05d}" for i in range(6)]
    assert len(splits["test"]) == 1 and len(splits["val"]) == 1
    # a field is framed on 3 to N = 10 vertebrae (one patch of the model, docs/design.md); its room may show two more
    assert 3 <= stats["vertebrae_per_case"]["min"] <= stats["vertebrae_per_case"]["max"] <= 12
    assert json.loads((root / "dataset.json").read_text())["seed"] == 3


def test_resumed_generation_keeps_finished_cases(dataset, tmp_path):
    root, _ = dataset
    before = (root / "case_00002" / "ap.png").stat().st_mtime_ns
    (root / "case_00004" / "case.json").unlink()  # as if interrupted while writing case 4
    synthesize(root, 6, seed=3, config=SynthConfig(size=192), workers=1, progress=False)
    assert (root / "case_00002" / "ap.png").stat().st_mtime_ns == before
    assert case_io.read_case(root / "case_00004").labels
    # completing it with another recipe would mix two data sets: refused, nothing touched
    for seed, config in ((4, SynthConfig(size=192)), (3, SynthConfig(size=192, long_field=(7, 12)))):
        with pytest.raises(case_io.DatasetError, match="another seed or synthesis config"):
            synthesize(root, 7, seed=seed, config=config, workers=1, progress=False)
    assert not (root / "case_00006").exists()
    assert (root / "case_00002" / "ap.png").stat().st_mtime_ns == before


def test_a_data_set_of_another_engine_version_is_never_completed(tmp_path):
    config = SynthConfig(size=64)
    synthesize(tmp_path, 1, seed=3, config=config, workers=1, progress=False)
    made = json.loads((tmp_path / "dataset.json").read_text())
    (tmp_path / "dataset.json").write_text(json.dumps({**made, "engine": 1}))  # as version 1 left it
    with pytest.raises(case_io.DatasetError, match="version 1 of the data engine"):
        synthesize(tmp_path, 2, seed=3, config=config, workers=1, progress=False)
    assert not (tmp_path / "case_00001").exists()


def test_one_split_alone_is_that_split_of_the_whole_data_set_and_completes_to_it(tmp_path, capsys):
    from x2p_ros.cli import main
    config = SynthConfig(size=64)
    synthesize(tmp_path / "whole", 8, seed=3, config=config, workers=1, progress=False)
    whole = {s: case_io.read_split(tmp_path / "whole", s) for s in case_io.SPLITS}
    assert main(["data", "synth", "--out", str(tmp_path / "part"), "--cases", "8", "--size", "64", "--seed", "3",
                 "--workers", "1", "--split", "test", "--quiet"]) == 0
    assert "8 cases (split 'test' of them)" in capsys.readouterr().out
    part = tmp_path / "part"
    assert sorted(p.name for p in part.iterdir() if p.is_dir()) == whole["test"]  # nothing else rendered
    assert {s: case_io.read_split(part, s) for s in case_io.SPLITS} == {**{s: [] for s in whole},
                                                                       "test": whole["test"]}
    for name in whole["test"]:  # the same cases, byte for byte
        for file in ("ap.png", "lat.png", "case.json"):
            assert (part / name / file).read_bytes() == (tmp_path / "whole" / name / file).read_bytes()
    assert json.loads((part / "dataset.json").read_text())["splits_rendered"] == ["test"]
    assert main(["data", "check", str(part)]) == 0
    synthesize(part, 8, seed=3, config=config, workers=1, progress=False, split="val")  # another split: both
    made = json.loads((part / "dataset.json").read_text())
    assert made["splits_rendered"] == ["val", "test"]
    counts = {n: len(case_io.read_case(part / n).labels) for n in whole["val"] + whole["test"]}
    assert made["vertebrae_per_case"] == {"min": min(counts.values()), "median": float(np.median(list(
        counts.values()))), "max": max(counts.values())}  # the statistics of every case there
    assert len(set(counts.values())) > 1  # so that one split's statistics alone would not match them
    stamp = (part / whole["test"][0] / "ap.png").stat().st_mtime_ns
    synthesize(part, 8, seed=3, config=config, workers=1, progress=False)  # completed: the whole data set
    assert {s: case_io.read_split(part, s) for s in case_io.SPLITS} == whole
    assert (part / whole["test"][0] / "ap.png").stat().st_mtime_ns == stamp  # kept, not rendered again
    assert json.loads((part / "dataset.json").read_text())["splits_rendered"] == list(case_io.SPLITS)
    with pytest.raises(case_io.DatasetError, match="no case of 1 falls in split 'test'"):
        synthesize(tmp_path / "none", 1, seed=3, config=config, split="test")
    with pytest.raises(case_io.DatasetError, match="--split must be one of train, val, test"):
        synthesize(tmp_path / "none", 8, seed=3, config=config, split="all")
    assert not (tmp_path / "none").exists()


def test_a_larger_data_set_keeps_every_case_in_its_split_and_the_added_ct_pairs(tmp_path):
    config = SynthConfig(size=64)
    synthesize(tmp_path, 5, seed=3, config=config, workers=1, progress=False)
    before = {s: case_io.read_split(tmp_path, s) for s in case_io.SPLITS}
    with open(tmp_path / "train.txt", "a") as f:  # as `x2p data add-ct` leaves it
        f.write("ct0123456789ab_s0_00000\n")
    synthesize(tmp_path, 8, seed=3, config=config, workers=1, progress=False)
    after = {s: case_io.read_split(tmp_path, s) for s in case_io.SPLITS}
    for s in case_io.SPLITS:
        assert after[s][:len(before[s])] == before[s]  # a test case never becomes a training one
    assert "ct0123456789ab_s0_00000" in after["train"]
    every = sum(after.values(), [])
    assert sorted(n for n in every if n.startswith("case_")) == [f"case_{i:05d}" for i in range(8)]
    assert len(every) == len(set(every)) == 9


def test_ground_truth_triangulates_back_from_the_projections(dataset):
    root, _ = dataset
    for name in case_io.list_cases(root):
        case = case_io.read_case(root / name)
        uv = np.stack([case.pixels(v) for v in case_io.VIEWS])
        xyz, residual = geometry.triangulate(np.stack([case.views[v].P for v in case_io.VIEWS]), uv)
        assert np.abs(xyz - case.xyz_mm).max() < 0.01
        assert residual.max() < 1e-6


def _ring_mean(image, u, v, radius):
    angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    us = np.clip(np.round(u + radius * np.cos(angles)).astype(int), 0, image.shape[1] - 1)
    vs = np.clip(np.round(v + radius * np.sin(angles)).astype(int), 0, image.shape[0] - 1)
    return image[vs, us].astype(float).mean()


def test_projected_ground_truth_is_inside_the_image_and_on_bone(monkeypatch):
    # a plain look (flat panel, much dose, no post-processing) so that brightness is bone
    monkeypatch.setattr(carm.Look, "sample", classmethod(lambda cls, rng, size, **_: cls(photons=1e6)))
    brighter, total = 0, 0
    for seed in range(8):
        images, Ps, _, vertebrae, _ = make_case(seed, SynthConfig(size=256))
        xyz = np.array([v["xyz_mm"] for v in vertebrae])
        for view in case_io.VIEWS:
            uv = geometry.project(Ps[view], xyz)
            assert np.all((uv >= 0) & (uv <= 255)), f"seed {seed} {view}: ground truth outside the image"
            pitch = np.median(np.linalg.norm(np.diff(uv, axis=0), axis=1))
            image = images[view]
            for u, v in uv:
                centre = image[int(round(v)) - 1:int(round(v)) + 2, int(round(u)) - 1:int(round(u)) + 2].mean()
                brighter += centre > _ring_mean(image, u, v, pitch)
                total += 1
    assert total > 40
    # ribs, scapulae and arms overlap some centres, as in real views; a projection off by a
    # vertebra's width scores about half
    assert brighter / total >= 0.75, f"only {brighter}/{total} vertebra centres are brighter than their surroundings"


def test_fields_are_framed_with_random_room_that_sometimes_shows_the_next_vertebra():
    # engine 3 framed every field alike (half a gap each side): the spine's size in the image was a constant
    curve = spine_curve(PhantomSpec.sample(np.random.default_rng(0), CHAIN))[0]
    gaps = np.linalg.norm(np.diff(curve, axis=0), axis=1)
    rng = np.random.default_rng(1)
    room_above, room_below = [], []
    for first, n in [(3, 5), (10, 7), (15, 4), (18, 6)]:
        for _ in range(100):
            centre, fov = field(curve, first, n, rng)
            top, bottom = centre[2] + fov / 2, centre[2] - fov / 2
            room_above.append((top - curve[first, 2]) / gaps[first - 1])
            room_below.append((curve[first + n - 1, 2] - bottom) / gaps[first + n - 1])
            assert np.allclose(centre[:2], curve[first:first + n, :2].mean(axis=0))
    for room in (np.array(room_above), np.array(room_below)):
        assert room.min() >= 0.3 - 1e-9 and room.max() < 1.6  # every framed vertebra in, the one after next out
        assert 0.25 < np.mean(room > 1.0) < 0.6  # the next vertebra in the field, often
        assert room.max() - room.min() > 1.0  # not one framing
    assert abs(np.corrcoef(room_above, room_below)[0, 1]) < 0.2  # each edge drawn on its own


def test_half_of_the_fields_end_on_the_lumbosacral_column_and_the_rest_anywhere():
    # engine 11 placed every field anywhere along C1-S1 with equal chance: L5 was in 1 field of 10, S1 in 1 of
    # 20, and a field starting at L1 or below came once in 15
    rng = np.random.default_rng(0)
    config = SynthConfig(size=64)
    low, high = CHAIN.index("L3"), CHAIN.index("S1")
    ends, starts = [], []
    for n in list(range(3, 11)) * 300:
        first = first_framed(n, rng, config)
        assert 0 <= first and first + n <= len(CHAIN)
        ends.append(first + n - 1)
        starts.append(first)
    ends, starts = np.array(ends), np.array(starts)
    lumbosacral = (ends >= low) & (ends <= high)
    assert 0.5 < lumbosacral.mean() < 0.65  # half by the rule, some more by chance
    assert 0.12 < np.mean(ends == high) < 0.2 and np.mean(starts >= CHAIN.index("L1")) > 0.1
    assert set(range(0, 8)) <= set(starts.tolist())  # cervical fields are still framed
    only = SynthConfig(size=64, lumbosacral_share=1.0)
    assert all(low <= first_framed(n, rng, only) + n - 1 <= high for n in range(3, 11) for _ in range(50))
    never = SynthConfig(size=64, lumbosacral_share=0.0)
    assert np.mean([first_framed(6, rng, never) + 5 >= low for _ in range(2000)]) < 0.3


@pytest.mark.parametrize("changes, message", [
    (dict(lumbosacral_share=1.5), "lumbosacral_share must be 0 to 1"),
    (dict(lumbosacral_ends=("S1", "L3")), "the upper first"),
    (dict(lumbosacral_ends=("L3", "L7")), "two levels of C1-S1"),
])
def test_bad_field_placement_settings_are_refused(changes, message):
    with pytest.raises(case_io.DatasetError, match=message):
        SynthConfig(size=64, **changes)


@pytest.mark.parametrize("config", [
    SynthConfig(size=64),
    # three framed vertebrae above the lumbar spine: fields widened to their 100 mm minimum, with small gaps
    # that the patient's shift crosses (engine 12 left the column ending inside some of these images)
    SynthConfig(size=64, short_field_share=1.0, short_field=(3, 3), lumbosacral_share=0.0),
], ids=["default", "short-fields"])
def test_every_vertebra_in_the_field_is_painted_and_its_neighbours_beyond_it_too(config):
    # fields with more than a gap of room show vertebrae past the framed ones: they must be in the phantom
    counts = []
    for seed in range(8):
        _, _, _, vertebrae, info = make_case(seed, config)
        rendered = [CHAIN.index(name) for name in info["phantom"]["levels_rendered"]]
        shown = [CHAIN.index(v["label"]) for v in vertebrae]
        assert min(rendered) <= max(min(shown) - 1, 0) and max(rendered) >= min(max(shown) + 1, len(CHAIN) - 1)
        counts.append(len(shown))
    assert len(set(counts)) > 1


def test_phantom_ground_truth_is_the_body_centroid_inside_its_own_vertebra():
    for seed in range(6):
        rng = np.random.default_rng(seed)
        names = CHAIN[int(rng.integers(0, len(CHAIN) - 6)):][:6]
        phantom = make_phantom(PhantomSpec.sample(rng, names), rng)
        volume = phantom.volume
        for v in phantom.vertebrae:
            k, j, i = np.round(volume.world_to_voxel(np.array([v["xyz_mm"]]))[0][::-1]).astype(int)
            assert volume.labels[k, j, i] == VERSE_NUMBER[v["label"]], f"seed {seed} {v['label']}"
            assert 20 < volume.hu[k, j, i] < 1500  # bone: trabecular (osteoporotic ones too) or the shell


def test_renderer_runs_on_cuda_when_present():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    a = make_case(5, SMALL, device="cpu")[0]["ap"].astype(float)
    b = make_case(5, SMALL, device="cuda")[0]["ap"].astype(float)
    assert np.abs(a - b).mean() < 50


def _write_valid_case(folder):
    P, spacing = carm_view("ap", 550.0, 1000.0, 150.0, 64)
    P2, _ = carm_view("lat", 550.0, 1000.0, 150.0, 64)
    img = np.full((64, 64), 1000, np.uint16)
    case_io.write_case(folder, {"ap": img, "lat": img}, {"ap": P, "lat": P2}, {"ap": spacing, "lat": spacing},
                       [{"label": "L1", "xyz_mm": [0.0, 0.0, 0.0]}], "test", 1)
    return json.loads((folder / "case.json").read_text())


@pytest.mark.parametrize("corrupt, message", [
    (lambda m: m.pop("vertebrae"), "missing key 'vertebrae'"),
    (lambda m: m.pop("lat"), "missing key 'lat'"),
    (lambda m: m["ap"].pop("P"), "missing key 'ap.P'"),
    (lambda m: m["ap"].__setitem__("P", [[1, 2, 3]]), r"ap.P must have shape \[3, 4\]"),
    (lambda m: m["lat"]["P"][1].__setitem__(2, float("nan")), "lat.P contains NaN"),
    (lambda m: m["ap"].__setitem__("P", [[0.0] * 4] * 3), "singular"),
    (lambda m: m["vertebrae"][0].__setitem__("xyz_mm", [1.0, 2.0]), r"xyz_mm must have shape \[3\]"),
    (lambda m: m["vertebrae"][0].__setitem__("xyz_mm", [1.0, float("nan"), 2.0]), "xyz_mm contains NaN"),
    (lambda m: m["ap"].__setitem__("size", [64, 32]), "case.json says ap.size"),
    (lambda m: m["ap"].__setitem__("pixel_spacing_mm", -1), "pixel_spacing_mm must be a positive number"),
])
def test_bad_case_files_give_clear_errors(tmp_path, corrupt, message):
    meta = _write_valid_case(tmp_path)
    corrupt(meta)
    (tmp_path / "case.json").write_text(json.dumps(meta))
    with pytest.raises(case_io.DatasetError, match=message):
        case_io.read_case(tmp_path)


def test_unreadable_json_and_images_give_clear_errors(tmp_path):
    _write_valid_case(tmp_path)
    (tmp_path / "lat.png").write_bytes(b"not a png")
    with pytest.raises(case_io.DatasetError, match="lat.png: not a readable image"):
        case_io.read_case(tmp_path)
    (tmp_path / "case.json").write_text("{ broken")
    with pytest.raises(case_io.DatasetError, match="not valid JSON"):
        case_io.read_case(tmp_path)


def test_check_reports_problems_instead_of_failing(tmp_path, capsys):
    from x2p_ros.cli import main
    good, bad = tmp_path / "good", tmp_path / "bad"
    _write_valid_case(good)
    meta = _write_valid_case(bad)
    meta["vertebrae"][0]["xyz_mm"] = [0.0, 0.0, 400.0]  # projects far outside the image
    (bad / "case.json").write_text(json.dumps(meta))
    (tmp_path / "train.txt").write_text("good\nbad\n")
    (tmp_path / "test.txt").write_text("good\n")
    assert main(["data", "check", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "bad: ap: vertebra L1 projects outside the image" in out
    assert "good: listed in both train.txt and test.txt" in out


@pytest.mark.parametrize("args, message", [(["--cases", "0"], "--cases must be at least 1"),
                                           (["--cases", "2", "--size", "7"], "image size must be 32 to 4096"),
                                           (["--cases", "2", "--workers", "0"], "--workers must be at least 1")])
def test_bad_synth_settings_are_refused_before_any_folder_is_made(tmp_path, capsys, args, message):
    from x2p_ros.cli import main
    assert main(["data", "synth", "--out", str(tmp_path / "d"), "--quiet", *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "d").exists()

"""`x2p adapt`: the table deformations keep the ground truth on the bone; a
tiny adaptation writes a checkpoint the node loads, whose provenance names the
CT by hash; bad input is a clear error that leaves nothing behind."""
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from x2p_ros.cli import main as x2p
from x2p_ros.data import case_io
from x2p_ros.data.ct_import import load_ct
from x2p_ros.data.deform import DeformConfig, deform, segment_motions
from x2p_ros.data.patient_pairs import planned_pairs, sha256
from x2p_ros.data.volume import Volume
from x2p_ros.model import X2PNet, checkpoint, preset
from x2p_ros.training.adapt import AdaptConfig, AdaptError, adapt

CENTROIDS = np.array([[0.0, 0.0, z] for z in (60, 30, 0, -30, -60)])


def _blobs() -> tuple[Volume, np.ndarray]:
    """Air with a bone ball of 5 mm radius at each centroid (1 mm voxels), and the
    world coordinates of every voxel."""
    n = (50, 60, 180)  # i, j, k
    affine = np.eye(4)
    affine[:3, 3] = [-25, -30, -90]
    k, j, i = np.mgrid[0:n[2], 0:n[1], 0:n[0]]
    xyz = np.stack([i, j, k], axis=-1) + affine[:3, 3]
    hu = np.full(n[::-1], -1000.0, dtype=np.float32)
    for c in CENTROIDS:
        hu[((xyz - c) ** 2).sum(-1) < 25] = 1000.0
    return Volume(hu, affine), xyz


def test_each_moved_centroid_is_the_centre_of_its_moved_bone():
    volume, xyz = _blobs()
    strong = DeformConfig(sagittal_deg=5, coronal_deg=5, axial_deg=5, shift_mm=2, soft_tissue_mm=0)
    out, moved = deform(volume, CENTROIDS, np.random.default_rng(0), strong)
    assert np.abs(moved - CENTROIDS).max() > 2  # it did move
    for m in moved:
        weight = np.clip(out.hu + 1000, 0, None) * (((xyz - m) ** 2).sum(-1) < 144)
        centre = (xyz * weight[..., None]).sum((0, 1, 2)) / weight.sum()
        assert np.linalg.norm(centre - m) < 0.1


def test_deformation_is_seeded_within_its_ranges_and_none_is_the_identity():
    volume, _ = _blobs()
    a = deform(volume, CENTROIDS, np.random.default_rng(3))
    b = deform(volume, CENTROIDS, np.random.default_rng(3))
    assert np.array_equal(a[0].hu, b[0].hu) and np.array_equal(a[1], b[1])
    config = DeformConfig(sagittal_deg=2, coronal_deg=1, axial_deg=3, shift_mm=1)
    for seed in range(20):
        motions = segment_motions(CENTROIDS, np.random.default_rng(seed), config)
        assert np.array_equal(motions[len(CENTROIDS) // 2], np.eye(4))  # the middle vertebra stays
        for upper, lower in zip(motions[:-1], motions[1:]):
            relative = np.linalg.inv(upper) @ lower
            angle = np.degrees(np.arccos(np.clip((np.trace(relative[:3, :3]) - 1) / 2, -1, 1)))
            assert angle <= np.sqrt(2 ** 2 + 1 ** 2 + 3 ** 2) + 1e-6
    still = DeformConfig(sagittal_deg=0, coronal_deg=0, axial_deg=0, shift_mm=0, soft_tissue_mm=0)
    out, moved = deform(volume, CENTROIDS, np.random.default_rng(0), still)
    np.testing.assert_allclose(moved, CENTROIDS, atol=1e-9)
    np.testing.assert_allclose(out.hu, volume.hu, atol=0.5)
    with pytest.raises(ValueError, match="sagittal_deg"):
        DeformConfig(sagittal_deg=float("nan"))


@pytest.fixture(scope="module")
def tiny_init(tmp_path_factory):
    torch.manual_seed(0)
    return checkpoint.save(tmp_path_factory.mktemp("init") / "tiny.pt", X2PNet(preset("tiny")),
                           meta={"config_name": "tiny"})


QUICK = dict(minutes=0.4, render_share=0.5, max_cases=6, val_cases=2, batch_size=2)


def test_a_tiny_adaptation_writes_a_loadable_patient_checkpoint_named_by_hash(phantom_ct, tiny_init, tmp_path,
                                                                                capsys):
    root, _, _ = phantom_ct
    out = tmp_path / "patient.pt"
    assert x2p(["adapt", "--ct", str(root / "ct.nii.gz"), "--mask", str(root / "seg.nii.gz"), "--out", str(out),
                "--init", str(tiny_init), "--minutes", "0.5", "--quiet"]) == 0
    assert f"checkpoint:={out}" in capsys.readouterr().out
    payload = torch.load(out, weights_only=True)
    meta = payload["meta"]["adaptation"]
    assert meta["ct_sha256"] == sha256(root / "ct.nii.gz") and meta["init_sha256"] == sha256(tiny_init)
    assert str(root) not in json.dumps(payload["meta"])  # a hash, never the patient's files or data
    assert meta["training_pairs"] >= 1 and meta["epochs"] >= 1 and meta["minutes"] < 0.5 + 0.25
    assert not (tmp_path / "patient.pt.work").exists()  # the patient's pairs are not left behind
    init_weights = torch.load(tiny_init, weights_only=True)["model"]
    assert any(not torch.equal(v, init_weights[k]) for k, v in payload["model"].items() if v.is_floating_point())
    from x2p_ros.inference import Localizer
    assert Localizer.from_checkpoint(out).config.image_size == 64


class Interrupted(Exception):
    pass


def test_an_interrupted_adaptation_resumes_and_a_changed_one_is_refused(phantom_ct, tiny_init, tmp_path,
                                                                       monkeypatch):
    from types import SimpleNamespace

    import x2p_ros.data.patient_pairs as pairs
    import x2p_ros.training.adapt as module
    root, _, _ = phantom_ct
    out, work = tmp_path / "patient.pt", tmp_path / "patient.pt.work"
    settings = AdaptConfig(**QUICK)

    def stopped(*args):
        raise Interrupted
    with monkeypatch.context() as patch:  # a run stopped once its pairs were rendered
        patch.setattr(module, "_epoch_seconds", stopped)
        # as fast a machine as it takes to render all of them in their share: the count is not this one's speed
        patch.setattr(pairs, "time", SimpleNamespace(monotonic=lambda: float("-inf")))
        with pytest.raises(Interrupted):
            adapt(root / "ct.nii.gz", out, mask=root / "seg.nii.gz", init=tiny_init, config=settings, progress=False)
    assert len([p for p in (work / "data").iterdir() if (p / "case.json").is_file()]) == 6 + 2 and not out.exists()
    rendered = []
    real_pair = pairs.render_patient_pair
    monkeypatch.setattr(pairs, "render_patient_pair", lambda *a, **k: rendered.append(1) or real_pair(*a, **k))
    adapt(root / "ct.nii.gz", out, mask=root / "seg.nii.gz", init=tiny_init, config=settings, progress=False)
    assert out.is_file() and rendered == []  # it went on from the rendered pairs
    work.mkdir()
    (work / "recipe.json").write_text(json.dumps({"ct_sha256": "another CT"}))
    with pytest.raises(AdaptError, match="other inputs or settings"):
        adapt(root / "ct.nii.gz", tmp_path / "patient.pt", mask=root / "seg.nii.gz", init=tiny_init, config=settings,
              progress=False)


def test_a_share_of_training_fields_shows_every_level_spread_over_the_pairs():
    windows = [w for _, _, w in planned_pairs("train", 0, 10, (3, 7), 0.5)]
    assert windows == [(3, 7), None] * 5  # every level in every second field: an early stop keeps the share
    assert [w for _, _, w in planned_pairs("train", 0, 4, (3, 7), 1.0)] == [None] * 4
    assert [w for _, _, w in planned_pairs("train", 0, 4, (3, 7), 0.0)] == [(3, 7)] * 4
    seeds = [seed for _, seed, _ in planned_pairs("train", 0, 10, (3, 7), 0.5)]
    assert len(set(seeds)) == 10 and seeds == [seed for _, seed, _ in planned_pairs("train", 0, 10, (3, 7), 1.0)]
    with pytest.raises(AdaptError, match="whole_field_share"):
        AdaptConfig(whole_field_share=1.5)


def _save_like(reference: nib.Nifti1Image, data, path, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(data), reference.affine if affine is None else affine), path)
    return path


def test_bad_input_is_a_clear_error_and_leaves_no_checkpoint(phantom_ct, tiny_init, tmp_path, capsys):
    root, ct, _ = phantom_ct
    ct_data = np.asarray(ct.dataobj)
    mask = nib.load(root / "seg.nii.gz")
    raw = _save_like(ct, (ct_data + 1024).astype(np.uint16), tmp_path / "raw.nii.gz")  # rescale dropped
    shifted = np.eye(4)
    shifted[:3, 3] = [5, 0, 0]
    moved_mask = _save_like(mask, np.asarray(mask.dataobj), tmp_path / "moved.nii.gz", shifted @ mask.affine)
    empty_mask = _save_like(mask, np.zeros(mask.shape, np.uint8), tmp_path / "empty.nii.gz")
    cases = [(["--ct", str(raw), "--mask", str(root / "seg.nii.gz")], "not Hounsfield units"),
             (["--ct", str(root / "ct.nii.gz"), "--mask", str(moved_mask)], "does not match the CT's voxel grid"),
             (["--ct", str(root / "ct.nii.gz"), "--mask", str(empty_mask)], "no vertebra labels"),
             (["--ct", str(root / "ct.nii.gz"), "--mask", str(root / "seg.nii.gz"), "--minutes", "0"],
              "more than 0 minutes"),
             (["--ct", str(root / "ct.nii.gz"), "--mask", str(root / "seg.nii.gz"), "--minutes", "nan"],
              "more than 0 minutes"),
             (["--ct", str(root / "ct.nii.gz"), "--mask", str(root / "seg.nii.gz"), "--init",
               str(tmp_path / "none.pt")], "not found")]
    if not torch.cuda.is_available():
        cases.append((["--ct", str(root / "ct.nii.gz"), "--mask", str(root / "seg.nii.gz"), "--device", "cuda"],
                      "no CUDA device"))
    for args, message in cases:
        assert x2p(["adapt", *args, "--out", str(tmp_path / "p.pt"), "--quiet"]
                   + ([] if "--init" in args else ["--init", str(tiny_init)])) == 2, args
        assert message in capsys.readouterr().err, args
        assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.nii.gz", "moved.nii.gz", "raw.nii.gz"]
    with pytest.raises(case_io.DatasetError, match="not Hounsfield units"):
        load_ct(raw)

"""Real-CT import: VerSe centroid files in both layouts, label masks (body
centroid, not whole-vertebra centroid), and clear errors for bad files."""
import json

import nibabel as nib
import nibabel.orientations as nio
import numpy as np
import pytest

from x2p_ros.data import case_io
from x2p_ros.data.ct_import import RAS_TO_LPS, TOTALSEG_LABELS, import_ct, read_mask_centroids, read_verse_centroids
from x2p_ros.data.phantom import VERSE_NUMBER
from x2p_ros.data.synth import SynthConfig


def _entries(points_ijk, direction):
    return [{"direction": list(direction)}] + [
        {"label": VERSE_NUMBER[name], "X": float(p[0]), "Y": float(p[1]), "Z": float(p[2])} for name, p in points_ijk]


def test_subject_based_ctd_json_is_read_in_image_voxels(phantom_ct):
    root, ct, truth = phantom_ct
    to_voxel = np.linalg.inv(RAS_TO_LPS @ ct.affine)
    points = [(name, (to_voxel @ np.append(xyz, 1))[:3]) for name, xyz in truth.items()]
    path = root / "sub-01_ctd.json"
    path.write_text(json.dumps(_entries(points, nio.aff2axcodes(ct.affine))))
    got = read_verse_centroids(path, ct)
    assert [v["label"] for v in got] == list(truth)  # superior first
    for v in got:
        np.testing.assert_allclose(v["xyz_mm"], truth[v["label"]], atol=1e-6)


def test_challenge_iso_ctd_json_is_read_on_a_1mm_grid_in_its_direction(phantom_ct):
    root, ct, truth = phantom_ct
    # The 1 mm grid in A, S, L axes whose central voxel sits where that of the
    # image reoriented to A, S, L does; as VerSe resampled (nibabel), the
    # central voxel is (n - 1) // 2.
    to_asl = nio.ornt_transform(nio.io_orientation(ct.affine), nio.axcodes2ornt(("A", "S", "L")))
    ct_asl = ct.as_reoriented(to_asl)
    n = np.array(ct_asl.shape)
    centre_ras = ct_asl.affine @ np.append((n - 1) // 2, 1)
    n_iso = np.round(n * 1.5).astype(int)
    axes_ras = np.array([[0, 1, 0], [0, 0, 1], [-1, 0, 0]], dtype=float).T  # A, S, L as RAS columns
    points = []
    for name, xyz in truth.items():
        ras = (RAS_TO_LPS @ np.append(xyz, 1))[:3]
        points.append((name, axes_ras.T @ (ras - centre_ras[:3]) + (n_iso - 1) // 2))
    path = root / "sub-01_iso-ctd.json"
    path.write_text(json.dumps(_entries(points, ("A", "S", "L"))))
    for v in read_verse_centroids(path, ct):
        np.testing.assert_allclose(v["xyz_mm"], truth[v["label"]], atol=1e-6)


def test_label_mask_gives_the_body_centroid_not_the_whole_vertebra(phantom_ct):
    root, _, truth = phantom_ct
    got = {v["label"]: np.array(v["xyz_mm"]) for v in read_mask_centroids(root / "seg.nii.gz", "verse")}
    seg = nib.load(root / "seg.nii.gz")
    data = np.asarray(seg.dataobj)
    assert set(got) == set(truth) - {"S1"}
    for name, xyz in got.items():
        ijk = np.argwhere(data == VERSE_NUMBER[name]).mean(0)
        whole = (RAS_TO_LPS @ seg.affine @ np.append(ijk, 1))[:3]
        assert np.linalg.norm(whole - truth[name]) > 8.0  # the posterior elements pull it back
        assert np.linalg.norm(xyz - truth[name]) < 1.0, name


def test_totalsegmentator_numbering():
    assert TOTALSEG_LABELS[26] == "S1" and TOTALSEG_LABELS[27] == "L5" and TOTALSEG_LABELS[31] == "L1"
    assert TOTALSEG_LABELS[32] == "T12" and TOTALSEG_LABELS[44] == "C7" and TOTALSEG_LABELS[50] == "C1"


def test_import_round_trip_renders_a_case_with_the_same_anatomy(phantom_ct, tmp_path):
    root, ct, truth = phantom_ct
    to_voxel = np.linalg.inv(RAS_TO_LPS @ ct.affine)
    points = [(name, (to_voxel @ np.append(xyz, 1))[:3]) for name, xyz in truth.items()]
    (root / "rt_ctd.json").write_text(json.dumps(_entries(points, nio.aff2axcodes(ct.affine))))
    folder = import_ct(root / "ct.nii.gz", tmp_path / "case", centroids=root / "rt_ctd.json", seed=4,
                       config=SynthConfig(size=128))
    case = case_io.read_case(folder)
    assert case.labels == [name for name in truth if name in case.labels] and len(case.labels) >= 3
    # rigidly placed in the C-arm frame: distances between vertebrae are kept
    ref = np.array([truth[n] for n in case.labels])
    np.testing.assert_allclose(np.linalg.norm(case.xyz_mm[:, None] - case.xyz_mm[None], axis=2),
                               np.linalg.norm(ref[:, None] - ref[None], axis=2), atol=1e-6)
    assert case.source == "ct:ct.nii.gz"


def test_bad_import_inputs_give_clear_errors(phantom_ct, tmp_path):
    root, ct, _ = phantom_ct
    bad = tmp_path / "bad_ctd.json"
    bad.write_text(json.dumps([{"label": 20, "X": 1.0, "Y": float("nan"), "Z": 2.0}]))
    with pytest.raises(case_io.DatasetError, match="NaN"):
        read_verse_centroids(bad, ct)
    bad.write_text(json.dumps([{"label": 20, "X": 1.0}]))
    with pytest.raises(case_io.DatasetError, match="needs label, X, Y and Z"):
        read_verse_centroids(bad, ct)
    bad.write_text(json.dumps({"label": 20}))
    with pytest.raises(case_io.DatasetError, match="JSON list"):
        read_verse_centroids(bad, ct)
    not_nifti = tmp_path / "ct.nii.gz"
    not_nifti.write_bytes(b"garbage")
    with pytest.raises(case_io.DatasetError, match="not a readable NIfTI"):
        import_ct(not_nifti, tmp_path / "out", mask=root / "seg.nii.gz")
    with pytest.raises(case_io.DatasetError, match="exactly one ground-truth source"):
        import_ct(root / "ct.nii.gz", tmp_path / "out")
    with pytest.raises(case_io.DatasetError, match="no vertebra labels"):
        read_mask_centroids(root / "seg.nii.gz", "totalseg")


def test_a_vertebra_cut_by_the_volumes_edge_is_left_out(phantom_ct, tmp_path):
    """The CT ends inside the top vertebra: its mask's centroid would sit on the cut."""
    root, _, truth = phantom_ct
    seg = nib.load(root / "seg.nii.gz")  # PIR: voxel axis 1 runs inferior
    data = np.asarray(seg.dataobj)
    top = min(truth, key=lambda name: -truth[name][2])  # the most superior labelled vertebra
    rows = np.flatnonzero((data == VERSE_NUMBER[top]).any(axis=(0, 2)))
    cut = int(rows[len(rows) // 2])  # the volume now starts half-way through it
    nib.save(nib.Nifti1Image(data[:, cut:], seg.affine @ _shift_rows(cut)),
             tmp_path / "cut.nii.gz")
    got = {v["label"] for v in read_mask_centroids(tmp_path / "cut.nii.gz", "verse")}
    assert top not in got and got == set(truth) - {"S1", top}


def _shift_rows(rows: int) -> np.ndarray:
    """Voxel map of dropping the first `rows` slices along axis 1."""
    shift = np.eye(4)
    shift[1, 3] = rows
    return shift


def test_add_ct_adds_deformed_pairs_to_one_split_resumes_and_refuses_another_split(phantom_ct, tmp_path, capsys):
    from x2p_ros.cli import main as x2p
    root, _, truth = phantom_ct
    data = tmp_path / "set"
    data.mkdir()
    (data / "train.txt").write_text("phantom_00000\n")  # the data set's own cases stay
    args = ["data", "add-ct", "--ct", str(root / "ct.nii.gz"), "--mask", str(root / "seg.nii.gz"), "--data",
            str(data), "--size", "64", "--quiet"]
    assert x2p(args + ["--pairs", "2"]) == 0
    first = case_io.read_split(data, "train")
    assert len(first) == 3 and first[0] == "phantom_00000"
    cases = [case_io.read_case(data / name) for name in first[1:]]
    whole = cases[1]  # every second pair is framed on every level the labels hold
    levels = [v["label"] for v in read_mask_centroids(root / "seg.nii.gz")]
    assert len(whole.labels) >= len(levels) - 1 and " ".join(whole.labels) in " ".join(levels)
    # the pairs are deformed: the ground truth moved from the CT's centroids, by millimetres only
    rendered = {label: xyz for label, xyz in zip(whole.labels, whole.xyz_mm)}
    shift = [np.linalg.norm(np.diff(np.array([rendered[a], rendered[b]]), axis=0)) -
             np.linalg.norm(truth[a] - truth[b]) for a, b in zip(whole.labels, whole.labels[1:])]
    assert 0 < np.max(np.abs(shift)) < 6
    assert str(root) not in json.dumps([json.loads((data / n / "case.json").read_text()) for n in first[1:]])

    stamps = {n: (data / n / "ap.png").stat().st_mtime_ns for n in first[1:]}
    assert x2p(args + ["--pairs", "3"]) == 0  # more pairs: the first two are kept, not rendered again
    names = case_io.read_split(data, "train")
    assert names[:3] == first and len(names) == 4 and len(set(names)) == 4
    assert all((data / n / "ap.png").stat().st_mtime_ns == t for n, t in stamps.items())
    capsys.readouterr()
    assert x2p(args + ["--pairs", "1", "--split", "test"]) == 2  # the same CT in test would leak
    assert "already in split 'train'" in capsys.readouterr().err and not (data / "test.txt").exists()
    assert x2p(args + ["--pairs", "0", "--data", str(tmp_path / "new")]) == 2
    assert "at least 1" in capsys.readouterr().err and not (tmp_path / "new").exists()

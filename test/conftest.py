import atexit
import os
import random
import shutil
import tempfile

import pytest

# ROS writes logs under ~/.ros unless told otherwise; keep test runs self-contained
# (a log folder of this run's own, removed at its end), and keep DDS discovery on
# this machine on a domain of this run's own.
if "ROS_LOG_DIR" not in os.environ:
    os.environ["ROS_LOG_DIR"] = tempfile.mkdtemp(prefix="x2p_ros_log_")
    atexit.register(shutil.rmtree, os.environ["ROS_LOG_DIR"], ignore_errors=True)
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("ROS_DOMAIN_ID", str(random.Random(os.getpid()).randint(1, 100)))


@pytest.fixture(scope="session")
def phantom_ct(tmp_path_factory):
    """A small phantom (L1-L3) written as a NIfTI CT in PIR orientation with 1.5 mm
    voxels, its VerSe label mask, and its true body centroids (LPS mm)."""
    import nibabel as nib
    import nibabel.orientations as nio
    import numpy as np

    from x2p_ros.data.ct_import import RAS_TO_LPS
    from x2p_ros.data.phantom import PhantomSpec, make_phantom
    root = tmp_path_factory.mktemp("ct")
    rng = np.random.default_rng(0)
    spec = PhantomSpec.sample(rng, ["T12", "L1", "L2", "L3", "L4"], voxel_mm=1.5)
    spec.fractures, spec.implant_levels, spec.scoliosis_mm = {}, [], 0.0
    phantom = make_phantom(spec, rng)
    affine_ras = RAS_TO_LPS @ phantom.volume.affine  # the volume's (i, j, k) -> RAS
    ct = nib.Nifti1Image(phantom.volume.hu.transpose(2, 1, 0).astype(np.int16), affine_ras)
    labels = nib.Nifti1Image(phantom.volume.labels.transpose(2, 1, 0).astype(np.uint8), affine_ras)
    to_pir = nio.ornt_transform(nio.io_orientation(affine_ras), nio.axcodes2ornt(("P", "I", "R")))
    ct, labels = ct.as_reoriented(to_pir), labels.as_reoriented(to_pir)
    nib.save(ct, root / "ct.nii.gz")
    nib.save(labels, root / "seg.nii.gz")
    truth = {v["label"]: np.array(v["xyz_mm"]) for v in phantom.vertebrae}
    return root, ct, truth


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """Five small synthetic cases (96 x 96) for training and evaluation tests."""
    from x2p_ros.data.synth import SynthConfig, synthesize
    root = tmp_path_factory.mktemp("train")
    synthesize(root, 5, seed=2, config=SynthConfig(size=96), workers=1, progress=False)
    return root

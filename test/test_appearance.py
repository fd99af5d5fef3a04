"""Appearance randomisation of training images (x2p_ros/training/appearance.py):
deterministic, windowed as at inference, strong, and never moving anything."""
import cv2
import numpy as np
import pytest
import torch

from x2p_ros import preprocess
from x2p_ros.data import case_io
from x2p_ros.training import appearance


def _radiograph(size: int = 128) -> np.ndarray:
    """A normalised image with a column of bright squares on a sloping background."""
    v, u = np.mgrid[0:size, 0:size].astype(np.float32)
    image = 0.3 * u / size
    for top in range(10, size - 20, 24):
        image[top:top + 16, size // 2 - 10:size // 2 + 10] += 1.0
    return preprocess.normalize(image)


def _high_pass(x):
    return x - cv2.GaussianBlur(x, (0, 0), 4.0)


def test_strong_is_deterministic_per_generator_and_differs_between_draws():
    image = _radiograph()
    a = appearance.strong(image, np.random.default_rng(5))
    np.testing.assert_array_equal(a, appearance.strong(image, np.random.default_rng(5)))
    assert not np.allclose(a, appearance.strong(image, np.random.default_rng(6)))


def test_strong_output_is_windowed_as_inference_windows_every_image():
    image = _radiograph()
    for seed in range(30):
        x = appearance.strong(image, np.random.default_rng(seed))
        assert x.dtype == np.float32 and x.shape == image.shape and np.isfinite(x).all()
        assert x.min() >= -1.5 and x.max() <= 1.5
        lo, hi = np.percentile(x, [1.0, 99.5])
        assert lo == pytest.approx(-1.0, abs=0.02) and hi == pytest.approx(1.0, abs=0.02)


def test_strong_changes_the_look_far_more_than_mild_but_keeps_the_structure_in_place():
    """Over 200 draws: the correlation of the augmented image with the original
    drops several times more than under the mild augmentation, yet the
    squares' edges stay where they were (high-pass correlation clearly positive
    in almost every draw; a shift of half a square would make it negative)."""
    image = _radiograph()
    loss = {}
    for kind in appearance.KINDS:
        corr = [np.corrcoef(appearance.randomiser(kind)(image, np.random.default_rng(s)).ravel(), image.ravel())[0, 1]
                for s in range(200)]
        loss[kind] = 1.0 - np.mean(corr)
    assert loss["strong"] > 3 * loss["mild"], loss
    edges = _high_pass(image).ravel()
    kept = [np.corrcoef(_high_pass(appearance.strong(image, np.random.default_rng(s))).ravel(), edges)[0, 1]
            for s in range(200)]
    assert np.mean(np.array(kept) > 0.3) > 0.9 and np.median(kept) > 0.5
    shifted = np.roll(image, 8, axis=0)
    assert np.corrcoef(_high_pass(shifted).ravel(), edges)[0, 1] < 0


def test_each_strong_operation_stays_in_its_bounds():
    rng = np.random.default_rng(0)
    field = appearance._smooth_field(rng, (64, 80), 4)
    assert field.shape == (64, 80) and 0.3 < field.std() < 3.0
    # a smooth field: neighbouring pixels nearly equal
    assert np.abs(np.diff(field, axis=1)).max() < 0.5
    blobs = appearance._blobs(rng, (100, 100), 3)
    assert np.abs(blobs).max() <= 3 * 0.3 + 1e-6 and (np.abs(blobs) < 1e-3).mean() > 0.2  # soft, local
    x = np.linspace(0, 1, 100 * 100, dtype=np.float32).reshape(100, 100)
    boxed = appearance._boxes(x, rng, 2)
    changed = boxed != x
    assert 0 < changed.mean() <= 2 * 0.2 * 0.2 + 0.01  # at most two boxes of a fifth of each side
    equalised = appearance._clahe(x ** 3, 3.0, 4)
    assert equalised.min() >= 0 and equalised.max() <= 1 and np.median(equalised) > np.median(x ** 3)


def test_an_unknown_augmentation_is_refused(small_data):
    from x2p_ros.training.data import BiplanarDataset
    with pytest.raises(ValueError, match="augmentation must be one of mild, strong"):
        appearance.randomiser("heavy")
    with pytest.raises(ValueError, match="augmentation must be one of mild, strong"):
        BiplanarDataset(small_data, case_io.list_cases(small_data), 64, 10, train=True, augment="heavy")


def test_training_samples_differ_only_in_their_images_between_augmentations(small_data):
    """The crop, P and targets of a training sample do not depend on the augmentation
    (the prompt's jitter is drawn after the images, so only it moves, within its range)."""
    from x2p_ros.training.data import BiplanarDataset
    names = case_io.list_cases(small_data)
    mild, strong = (BiplanarDataset(small_data, names, 64, 10, train=True, augment=k) for k in ("mild", "strong"))
    for i in range(len(names)):
        a, b = mild[i], strong[i]
        for key in ("P", "xyz", "present", "pixels"):
            torch.testing.assert_close(a[key], b[key])
        jitter = 2 * torch.tensor(mild.jitter_px) * 64 / 512
        assert ((a["prompt"] - b["prompt"]).abs() <= jitter + 1e-4).all()
        assert not torch.allclose(a["images"], b["images"])


def test_the_training_prompt_jitter_scales_with_its_range(small_data):
    from x2p_ros.training.data import BiplanarDataset
    names = case_io.list_cases(small_data)
    still, wide = (BiplanarDataset(small_data, names, 64, 10, train=True, prompt_jitter_px=j)
                   for j in ((0.0, 0.0), (60.0, 30.0)))
    offsets = torch.stack([wide[i]["prompt"] - still[i]["prompt"] for i in range(len(names))])  # (cases, V, 2)
    bound = torch.tensor([60.0, 30.0]) * 64 / 512
    assert (offsets.abs() <= bound + 1e-4).all()
    assert (offsets.abs().amax(dim=(0, 1)) > 0.5 * bound).all()  # the range is used along both axes


def test_inference_windowing_maps_the_percentiles_to_unit_range_in_float32():
    """preprocess.normalize, which strong's output must match: float32 for 8-bit,
    16-bit and float input alike (NumPy 2 would promote to float64 through the
    percentile scalars), 1st and 99.5th percentiles to -1 and 1, clipped at 1.5."""
    rng = np.random.default_rng(0)
    for image in (rng.integers(0, 256, (40, 50)).astype(np.uint8), rng.integers(0, 65536, (40, 50)).astype(np.uint16),
                  rng.normal(size=(40, 50)).astype(np.float32), rng.normal(size=(40, 50))):
        x = preprocess.normalize(image)
        assert x.dtype == np.float32
        lo, hi = np.percentile(x, [1.0, 99.5])
        assert lo == pytest.approx(-1.0, abs=1e-5) and hi == pytest.approx(1.0, abs=1e-5)
        assert x.min() >= -1.5 and x.max() <= 1.5
    with pytest.raises(ValueError, match="NaN or Inf"):
        preprocess.normalize(np.array([[0.0, np.nan]]))


def test_looks_are_the_image_and_distinct_deterministic_windowed_versions_that_keep_the_bright_squares():
    image = _radiograph()
    looks = preprocess.looks(image, 5)
    assert len(looks) == 5 and looks[0] is image  # the first look is the image as given
    again = preprocess.looks(image, 5)
    squares = np.zeros(image.shape, dtype=bool)
    for top in range(10, 128 - 20, 24):
        squares[top + 3:top + 13, 64 - 7:64 + 7] = True
    for k, look in enumerate(looks[1:], 1):
        np.testing.assert_array_equal(look, again[k])
        assert look.shape == image.shape and look.dtype == np.float32
        assert look.min() >= -1.5 and look.max() <= 1.5
        assert np.abs(look - image).mean() > 0.02, f"look {k} is the image again"
        assert look[squares].mean() > look[~squares].mean() + 0.5, f"look {k} lost the bone"
    for j in range(1, 5):
        for k in range(j + 1, 5):
            assert np.abs(looks[j] - looks[k]).mean() > 0.02, f"looks {j} and {k} are the same"
    assert preprocess.looks(image, 1) == [image]
    for bad in (0, 6):
        with pytest.raises(ValueError, match="looks"):
            preprocess.looks(image, bad)

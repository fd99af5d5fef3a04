"""The node's plain-Python parts, without ROS: pairing, key frames, the
inference worker, image conversion and the pose orientation."""
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from x2p_ros import geometry
from x2p_ros.pairing import Frame, KeyframeGate, Pairer
from x2p_ros.ros.images import MAX_PIXELS, ImageError, array_to_fields, image_to_array
from x2p_ros.worker import InferenceWorker


def frame(stamp, value=0.0):
    image = np.random.default_rng(int(stamp * 1000)).random((32, 32)).astype(np.float32) + value
    return Frame(stamp, image)


def test_pairs_form_only_within_the_slop_and_latest_wins():
    p = Pairer(slop=0.05)
    assert p.add("ap", frame(1.00)) is None
    assert p.add("lat", frame(1.20)) is None  # 0.2 s apart
    pair = p.add("ap", frame(1.18))
    assert pair is not None and pair.stamp == 1.20 and pair.frames["ap"].stamp == 1.18
    assert p.unpaired == 1  # the AP frame at 1.00 never paired
    assert p.newest_pair().stamp == 1.20
    p.add("lat", frame(1.40))
    assert p.newest_pair() is None


def test_a_stream_faster_than_the_slop_pairs_each_frame_with_its_own():
    """30 Hz with a 50 ms slop: AP of frame k must not pair with LAT of frame k - 1."""
    p = Pairer(slop=0.05)
    pairs = []
    for k in range(5):
        for view in ("ap", "lat"):
            pair = p.add(view, frame(1.0 + k / 30))
            if pair is not None:
                pairs.append((pair.frames["ap"].stamp, pair.frames["lat"].stamp))
    assert pairs == [(1.0 + k / 30, 1.0 + k / 30) for k in range(5)]
    assert p.unpaired == 0


def test_key_frames_follow_changes_and_the_rate_limit():
    gate = KeyframeGate(max_rate_hz=2.0, threshold=0.05)
    a = {"ap": frame(0.0), "lat": frame(0.0)}
    pair = lambda t, frames: SimpleNamespace(stamp=t, frames=frames)  # noqa: E731
    assert gate.check(pair(0.0, a), inputs_version=1) == (True, "first pair")
    assert gate.check(pair(0.2, a), 2)[1] == "rate limit"
    assert gate.check(pair(1.0, a), 1)[0] is False  # nothing changed
    assert gate.check(pair(1.5, a), 2) == (True, "prompt or calibration changed")
    b = {"ap": frame(3.0), "lat": frame(3.0)}  # other content
    key, why = gate.check(pair(2.5, b), 2)
    assert key and why.startswith("images changed")


def test_worker_runs_off_thread_and_the_newest_job_replaces_a_waiting_one():
    release = threading.Event()
    done = []

    def run(job):
        if job == "first":
            release.wait(5)
        if job == "bad":
            raise RuntimeError("CUDA out of memory")
        return job.upper()

    worker = InferenceWorker(run, lambda job, result, error, s: done.append((job, result, error)))
    worker.submit("first")
    time.sleep(0.2)
    assert worker.busy
    worker.submit("second")
    assert worker.submit("third") is True  # replaced "second", which never ran
    release.set()
    deadline = time.monotonic() + 5
    while len(done) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    worker.submit("bad")
    while len(done) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    worker.stop()
    assert [d[:2] for d in done[:2]] == [("first", "FIRST"), ("third", "THIRD")]
    assert done[2][0] == "bad" and "out of memory" in str(done[2][2])
    assert worker.skipped == 1


def msg(**fields):
    return SimpleNamespace(**{"is_bigendian": 0, **fields})


@pytest.mark.parametrize("image", [np.arange(12, dtype=np.uint8).reshape(3, 4),
                                   (np.arange(12, dtype=np.uint16) * 5000).reshape(3, 4),
                                   np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)])
def test_image_round_trip(image):
    np.testing.assert_array_equal(image_to_array(msg(**array_to_fields(image))), image)


def test_image_with_row_padding_and_big_endian():
    image = (np.arange(6, dtype=np.uint16) * 1000).reshape(2, 3)
    padded = np.zeros((2, 8), dtype=np.uint8)
    padded[:, :6] = image.astype(">u2").view(np.uint8).reshape(2, 6)
    m = msg(encoding="mono16", height=2, width=3, step=8, data=padded.tobytes())
    m.is_bigendian = 1
    np.testing.assert_array_equal(image_to_array(m), image)


@pytest.mark.parametrize("fields, message", [
    (dict(encoding="rgb8", height=2, width=2, step=6, data=bytes(12)), "unsupported encoding"),
    (dict(encoding="mono8", height=2, width=2, step=2, data=bytes(3)), "expected step x height"),
    (dict(encoding="mono8", height=0, width=2, step=2, data=b""), "zero-size"),
    (dict(encoding="mono16", height=2, width=2, step=2, data=bytes(4)), "shorter than a row"),
    (dict(encoding="32FC1", height=1, width=2, step=8, data=np.array([1, np.nan], np.float32).tobytes()), "NaN"),
    (dict(encoding="mono8", height=8192, width=8192, step=8192, data=b""), "exceeds the limit"),
])
def test_bad_images_are_refused(fields, message):
    with pytest.raises(ImageError, match=message):
        image_to_array(msg(**fields))
    assert MAX_PIXELS < 8192 * 8192


def test_pose_orientation_points_z_along_the_spine_to_the_vertebra_above():
    points = np.array([[0.0, 0.0, 60.0], [0.0, 5.0, 30.0], [0.0, 5.0, 0.0], [2.0, 0.0, -30.0]])
    quats = geometry.spine_orientations(points)
    for i, q in enumerate(quats):
        z = geometry.quaternion_to_rotation(q)[:, 2]
        above = points[max(i - 1, 0)] - points[min(i + 1, len(points) - 1)]
        np.testing.assert_allclose(z, above / np.linalg.norm(above), atol=1e-9)

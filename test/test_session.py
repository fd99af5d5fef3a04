"""The node's session logic without ROS: calibration matched to images by
stamp, prompts and the automatic prompt, key frames, and every bad input that
needs no DDS to show (the cross-process cases are in test_bad_input.py)."""
import numpy as np
import pytest

from x2p_ros import geometry
from x2p_ros.geometry import VIEWS, carm_view
from x2p_ros.inference import Vertebra
from x2p_ros.session import Job, Refusal, Session, Settings, Skip

S = 96


def views(shift=(0.0, 0.0)):
    return {v: geometry.apply_pixel_transform(geometry.crop_transform(*shift), carm_view(v, 550.0, 1000.0, 150.0, S)[0])
            for v in VIEWS}


def calibrate(session, stamp, Ps=None, only=VIEWS):
    for v in only:
        k9, t, q = geometry.projection_to_ros((Ps or views())[v])
        assert session.camera_info(v, stamp, k9, S, S) is None
        assert session.view_pose(v, stamp, "carm", t, q, f"{v}_optical") is None


def image(seed, shape=(S, S)):
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def send_pair(session, stamp, images=None, now=None):
    images = images or {v: image(int(stamp * 1000) + k) for k, v in enumerate(VIEWS)}
    out = None
    for v in VIEWS:
        out = session.image(v, stamp, images[v], f"{v}_optical", now if now is not None else stamp)
    return out


@pytest.fixture
def ready():
    """A session with calibration and prompts: the next pair is a key frame."""
    session = Session(Settings(keyframe_max_rate_hz=100.0, keyframe_change_threshold=0.0, auto_prompt=False))
    calibrate(session, 0.0)
    for v in VIEWS:
        assert session.prompt(v, 0.0, f"{v}_optical", 40.0, 30.0) is None
    return session


def test_a_complete_pair_is_a_job_with_the_calibration_and_prompts(ready):
    job = send_pair(ready, 1.0)
    assert isinstance(job, Job)
    for v in VIEWS:
        np.testing.assert_allclose(job.Ps[v] / job.Ps[v][2, 3], views()[v] / views()[v][2, 3], atol=1e-9)
        np.testing.assert_allclose(job.prompts[v], [40.0, 30.0])


def test_the_calibration_of_a_pair_is_the_one_stamped_at_or_before_it(ready):
    """A moved C-arm's calibration that arrives before the images of the frame before the
    move is not used for them (topics are not ordered)."""
    moved = views(shift=(-6.0, 4.0))
    calibrate(ready, 2.0, moved)
    before = send_pair(ready, 1.5)
    after = send_pair(ready, 2.0)
    assert isinstance(before, Job) and isinstance(after, Job)
    for v in VIEWS:
        np.testing.assert_allclose(before.Ps[v] / before.Ps[v][2, 3], views()[v] / views()[v][2, 3], atol=1e-9)
        np.testing.assert_allclose(after.Ps[v] / after.Ps[v][2, 3], moved[v] / moved[v][2, 3], atol=1e-9)


def test_the_same_calibration_sent_again_is_not_a_change(ready):
    ready.apply(keyframe_change_threshold=0.5)  # image noise alone never makes a key frame here
    assert isinstance(send_pair(ready, 1.0), Job)
    calibrate(ready, 1.5)  # a driver that sends its (unchanged) calibration with every frame
    assert isinstance(send_pair(ready, 2.0), Skip)
    calibrate(ready, 2.5, views(shift=(3.0, 0.0)))
    assert isinstance(send_pair(ready, 3.0), Job)


def refusal(outcome, text):
    assert isinstance(outcome, Refusal), outcome
    assert text in str(outcome), str(outcome)
    return outcome


def test_images_before_any_calibration_wait_for_it():
    session = Session()
    r = refusal(send_pair(session, 1.0), "calibration: no valid camera_info and pose yet for ap, lat")
    assert r.waiting
    calibrate(session, 5.0)  # stamped after the images: it does not apply to them
    r = refusal(send_pair(session, 1.1), "the newest is stamped 5.000, after the images")
    assert not r.waiting


@pytest.mark.parametrize("k9, text", [
    (np.zeros(9), "K focal lengths must be positive"),
    ([1000.0, 0, 48, 0, 1000.0, 48, 0, 0, 0], "K must be upper triangular with last row (0, 0, 1)"),
    ([np.nan, 0, 48, 0, 1000.0, 48, 0, 0, 1], "K contains NaN"),
])
def test_bad_camera_info_is_refused_and_stops_poses_until_a_valid_one(ready, k9, text):
    refusal(ready.camera_info("ap", 2.0, k9, S, S), f"ap/camera_info: {text}")
    assert isinstance(send_pair(ready, 1.0), Job)  # before it: the valid one
    refusal(send_pair(ready, 2.5), "the last calibration of ap before this pair was invalid")  # not the old one
    calibrate(ready, 3.0, only=("ap",))
    assert isinstance(send_pair(ready, 3.5), Job)
    assert ready.health.snapshot()["ap/camera_info"] == ("ok", False)


@pytest.mark.parametrize("change, text", [
    (dict(translation_m=[np.nan, 0.0, 0.0]), "pose translation contains NaN"),
    (dict(rotation_xyzw=[0.0, 0.0, 0.0, 0.0]), "quaternion must have unit norm, got norm 0"),
    (dict(rotation_xyzw=[0.0, 0.0, 0.0, 3.0]), "quaternion must have unit norm"),
    (dict(frame_id="world"), "pose is given in frame 'world', not the reference frame 'carm'"),
])
def test_bad_view_pose_is_refused(ready, change, text):
    _, t, q = geometry.projection_to_ros(views()["lat"])
    pose = {**dict(frame_id="carm", translation_m=t, rotation_xyzw=q, child_frame="lat_optical"), **change}
    refusal(ready.view_pose("lat", 2.0, **pose), f"lat/pose: {text}")
    refusal(send_pair(ready, 2.5), "lat before this pair was invalid")


@pytest.mark.parametrize("frame, u, v, text", [
    ("ap_optical", 500.0, 10.0, "prompt (500.0, 10.0) lies outside the 96 x 96 image"),
    ("ap_optical", float("nan"), 10.0, "prompt contains NaN"),
    ("lat_optical", 40.0, 30.0, "prompt is in the lat view's frame"),
])
def test_a_bad_prompt_is_refused_and_removes_the_views_prompt(ready, frame, u, v, text):
    refusal(ready.prompt("ap", 0.5, frame, u, v), f"ap/prompt: {text}")
    refusal(send_pair(ready, 1.0), "prompt: waiting for a prompt on ap")


def test_a_prompt_sent_before_the_calibration_is_checked_when_it_arrives():
    session = Session(Settings(auto_prompt=False))
    assert session.prompt("ap", 0.0, "ap_optical", 500.0, 10.0) is None  # the image size is not known yet
    assert session.prompt("lat", 0.0, "lat_optical", 40.0, 30.0) is None
    calibrate(session, 0.0)
    refusal(send_pair(session, 1.0), "prompt: waiting for a prompt on ap")
    assert "lies outside the 96 x 96 image" in session.health.snapshot()["ap/prompt"][0]


def test_after_a_bad_prompt_the_automatic_prompt_follows_the_last_result(ready):
    ready.apply(auto_prompt=True)
    assert isinstance(send_pair(ready, 1.0), Job)
    reference = np.array([1.0, 2.0, 3.0])
    ready.result([Vertebra(0, "V0", True, 0.9, reference), Vertebra(1, "V1", False, 0.1, np.zeros(3))])
    refusal(ready.prompt("ap", 1.5, "ap_optical", 500.0, 10.0), "outside")
    job = send_pair(ready, 2.0)
    assert isinstance(job, Job)  # every later pair still works
    for v in VIEWS:
        np.testing.assert_allclose(job.prompts[v], geometry.project(job.Ps[v], reference)[0])


def test_image_checks(ready):
    refusal(ready.image("ap", 1.0, np.full((S, S), 3.0, np.float32), "ap_optical", 1.0),
            "ap/image: image is constant")
    refusal(send_pair(ready, 1.0, images={"ap": image(1), "lat": image(2, (80, S))}),
            "lat/image: image is 96 x 80 but camera_info says 96 x 96")
    ready.apply(max_image_age_s=30.0)
    refusal(ready.image("ap", 1.0, image(3), "ap_optical", now=121.0), "ap/image: image is 120.0 s old "
                                                                        "(max_image_age_s = 30.0)")


def test_unsynchronised_images_make_no_pair(ready):
    assert ready.image("ap", 1.0, image(1), "ap_optical", 1.0) is None
    assert ready.image("lat", 1.3, image(2), "lat_optical", 1.3) is None  # 0.3 s apart, slop 0.05
    assert ready.pairer.unpaired == 0 and ready.pairer.newest_pair() is None
    assert isinstance(ready.image("ap", 1.31, image(3), "ap_optical", 1.31), Job)
    assert ready.pairer.unpaired == 1


def test_key_frames_follow_the_rate_and_the_image_change(ready):
    ready.apply(keyframe_max_rate_hz=2.0, keyframe_change_threshold=0.02)
    same = {v: image(k) for k, v in enumerate(VIEWS)}
    assert isinstance(send_pair(ready, 1.0, same), Job)
    assert send_pair(ready, 1.2, same).reason == "rate limit"
    assert "images unchanged" in send_pair(ready, 2.0, same).reason
    assert isinstance(send_pair(ready, 2.6, {v: image(10 + k) for k, v in enumerate(VIEWS)}), Job)
    assert isinstance(ready.localize_now(), Job)  # the service runs the newest pair regardless

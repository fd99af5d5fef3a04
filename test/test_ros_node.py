"""carm_sim -> x2p_localizer -> a listener, as separate processes with real
rclpy: outputs agree with each other, are in metres, carry the pair's stamp and
the reference frame; the services work; an unsynchronised pair gives no pose."""
import time

import pytest

rclpy = pytest.importorskip("rclpy")
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from geometry_msgs.msg import PoseArray  # noqa: E402
from ros_helpers import Listener, ros_processes  # noqa: E402
from std_srvs.srv import SetBool, Trigger  # noqa: E402
from visualization_msgs.msg import Marker, MarkerArray  # noqa: E402

from x2p_ros.levels import levels_below  # noqa: E402
from x2p_ros.model import X2PNet, checkpoint, preset  # noqa: E402
from x2p_ros.msg import VertebraArray  # noqa: E402
from x2p_ros.ros.qos import LATCHED, RELIABLE  # noqa: E402


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    import torch
    torch.manual_seed(0)
    return checkpoint.save(tmp_path_factory.mktemp("ckpt") / "tiny.pt", X2PNet(preset("tiny")))


def sim(*extra):
    """A live stream: noise makes every frame differ, so each pair can be a key frame."""
    return ["x2p_ros.ros.carm_sim", "--ros-args", "-p", "size:=96", "-p", "cases:=1", "-p", "rate_hz:=4.0",
            "-p", "noise:=0.01", *extra]


def localizer(ckpt, *extra):
    return ["x2p_ros.ros.localizer_node", "--ros-args", "-p", f"checkpoint:={ckpt}", "-p", "presence_threshold:=0.0",
            "-p", "keyframe_max_rate_hz:=4.0", "-p", "keyframe_change_threshold:=0.0", *extra]


def last_diagnostics(received) -> dict:
    """The key-values of the localizer's newest diagnostics message; empty before the first."""
    diagnostics = received["/diagnostics"]
    return {kv.key: kv.value for kv in diagnostics[-1].status[0].values} if diagnostics else {}


def test_outputs_agree_are_metric_stamped_and_services_work(tiny_checkpoint):
    listener = Listener([("vertebrae/poses", PoseArray, RELIABLE), ("vertebrae/markers", MarkerArray, RELIABLE),
                         ("vertebrae", VertebraArray, RELIABLE), ("ground_truth/poses", PoseArray, LATCHED),
                         ("/diagnostics", DiagnosticArray, RELIABLE)])
    r = listener.received
    try:
        with ros_processes(sim(), localizer(tiny_checkpoint, "-p", "reference_level:=L1")):
            assert listener.spin_until(lambda: len(r["vertebrae"]) >= 2 and len(r["vertebrae/poses"]) >= 2
                                       and len(r["vertebrae/markers"]) >= 2 and r["ground_truth/poses"], 45), \
                {k: len(v) for k, v in r.items()}
            va = r["vertebrae"][-1]
            poses = next(p for p in reversed(r["vertebrae/poses"]) if p.header.stamp == va.header.stamp)
            markers = next(m for m in reversed(r["vertebrae/markers"])
                           if m.markers[0].header.stamp == va.header.stamp)
            present = [v for v in va.vertebrae if v.present]
            assert va.header.frame_id == poses.header.frame_id == "carm"
            # tiny model: N = 4 and presence threshold 0, so every window's chain is full and
            # the view goes on in a second, smaller window below the fourth vertebra
            assert len(poses.poses) == len(present) > 4 and len(present) == len(va.vertebrae)
            assert [v.label for v in va.vertebrae] == levels_below("L1", len(present))
            for v, p in zip(present, poses.poses):
                assert (v.position.x, v.position.y, v.position.z) == (p.position.x, p.position.y, p.position.z)
                q = p.orientation
                assert abs(q.x ** 2 + q.y ** 2 + q.z ** 2 + q.w ** 2 - 1) < 1e-6
            # metres: the truth and the outputs lie within a few decimetres of the isocentre
            truth = r["ground_truth/poses"][0]
            assert all(abs(c) < 0.5 for p in truth.poses + poses.poses for c in (p.position.x, p.position.y,
                                                                               p.position.z))
            assert markers.markers[0].action == Marker.DELETEALL
            spheres = [m for m in markers.markers if m.type == Marker.SPHERE]
            assert [m.id for m in spheres] == [v.index for v in present]
            assert [(m.pose.position.x, m.pose.position.z) for m in spheres] == \
                [(v.position.x, v.position.z) for v in present]
            assert [m.text for m in markers.markers if m.type == Marker.TEXT_VIEW_FACING] == \
                levels_below("L1", len(present))
            # the pair's stamp: the simulated images' stamp, not the time of publication
            assert abs(va.header.stamp.sec + 1e-9 * va.header.stamp.nanosec - time.time()) < 60

            assert listener.spin_until(lambda: int(last_diagnostics(r).get("published", 0)) >= 1, 5)
            assert last_diagnostics(r)["state"] == "active" and last_diagnostics(r)["device"] == "cpu"

            response = listener.call(SetBool, "enable", SetBool.Request(data=False))
            assert response.success and response.message == "disabled"
            listener.spin_until(lambda: False, 1.0)  # let a pair in flight finish
            before = len(r["vertebrae/poses"])
            listener.spin_until(lambda: False, 2.0)
            assert len(r["vertebrae/poses"]) == before
            response = listener.call(Trigger, "localize", Trigger.Request())
            assert not response.success and "disabled" in response.message  # not from the stale pair either
            response = listener.call(SetBool, "enable", SetBool.Request(data=True))
            assert response.success and response.message == "enabled"
            # the newest frames may be one view ahead of the other: a pair forms within a frame
            for _ in range(10):
                response = listener.call(Trigger, "localize", Trigger.Request())
                if response.success:
                    break
                listener.spin_until(lambda: False, 0.3)
            assert response.success, response.message
            assert listener.spin_until(lambda: len(r["vertebrae/poses"]) > before, 30)

            # runtime parameter changes are validated; invalid ones are refused with a reason
            from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
            from rcl_interfaces.srv import SetParameters

            def set_param(name, **value):
                request = SetParameters.Request(parameters=[Parameter(name=name, value=ParameterValue(**value))])
                return listener.call(SetParameters, "x2p_localizer/set_parameters", request).results[0]
            refused = set_param("device", type=ParameterType.PARAMETER_STRING, string_value="gpu")
            assert not refused.successful and "auto, cuda or cpu" in refused.reason
            refused = set_param("checkpoint", type=ParameterType.PARAMETER_STRING, string_value="/no/such.pt")
            assert not refused.successful and "not found" in refused.reason
            refused = set_param("presence_threshold", type=ParameterType.PARAMETER_DOUBLE, double_value=1.5)
            assert not refused.successful
            accepted = set_param("reference_level", type=ParameterType.PARAMETER_STRING, string_value="T12")
            assert accepted.successful
    finally:
        listener.close()


def test_unsynchronised_pair_gives_no_pose(tiny_checkpoint):
    listener = Listener([("vertebrae/poses", PoseArray, RELIABLE), ("/diagnostics", DiagnosticArray, RELIABLE)])
    r = listener.received
    try:
        # LAT stamped half a frame period after AP: no two stamps come within the slop
        with ros_processes(sim("-p", "lat_delay_s:=0.125"), localizer(tiny_checkpoint, "-p", "sync_slop_s:=0.05")):
            # images reach the localizer (its diagnostics count unpaired frames), yet nothing pairs;
            # waiting on the count, not on a number of diagnostics, as the simulator's images may
            # take a few diagnostics periods longer than the localizer to be discovered
            assert listener.spin_until(lambda: int(last_diagnostics(r).get("unpaired_frames", 0)) >= 4, 60)
            listener.spin_until(lambda: False, 1.0)  # a pose that did pair would arrive within this
            assert r["vertebrae/poses"] == []
            assert last_diagnostics(r)["published"] == "0"
    finally:
        listener.close()


def test_vertebra_frames_for_tf_carry_the_poses():
    """The transforms the node puts on /tf (where tf2_msgs is installed), built without it."""
    import numpy as np

    from x2p_ros.inference import Vertebra
    from x2p_ros.ros import messages
    vertebrae = [Vertebra(0, "T12", True, 0.9, np.array([10.0, 20.0, 30.0])),
                 Vertebra(1, "L1", True, 0.8, np.array([12.0, 21.0, 0.0])),
                 Vertebra(2, "L2", False, 0.1, np.array([0.0, 0.0, -30.0]))]
    header = messages.header(12.5, "carm")
    transforms = messages.vertebra_transforms(header, vertebrae)
    poses = messages.pose_array(header, vertebrae).poses
    assert [t.child_frame_id for t in transforms] == ["vertebra_T12", "vertebra_L1"]  # present ones only
    for t, p in zip(transforms, poses):
        assert t.header.frame_id == "carm" and messages.stamp_seconds(t.header) == 12.5
        assert (t.transform.translation.x, t.transform.translation.y, t.transform.translation.z) == \
            (p.position.x, p.position.y, p.position.z)
        assert t.transform.rotation == p.orientation
    assert transforms[0].transform.translation.z == pytest.approx(0.030)  # metres


def test_diagnostics_go_stale_without_images_and_localize_is_refused_while_disabled(tiny_checkpoint):
    import numpy as np
    from diagnostic_msgs.msg import DiagnosticStatus
    from rclpy.parameter import Parameter

    from x2p_ros.ros import messages
    from x2p_ros.ros.localizer_node import LocalizerNode
    context = rclpy.Context()
    rclpy.init(context=context)
    node = LocalizerNode(context=context, parameter_overrides=[Parameter("checkpoint", value=str(tiny_checkpoint)),
                                                               Parameter("input_timeout_s", value=0.5)])
    try:
        assert node.diagnostic_status().level == DiagnosticStatus.WARN  # not active yet
        node.trigger_configure()
        node.trigger_activate()
        status = node.diagnostic_status()
        assert status.level == DiagnosticStatus.STALE and status.message.startswith("no images received yet")
        image = np.random.default_rng(0).integers(0, 60000, (64, 64), dtype=np.uint16)
        node._on_image("ap", messages.image_message(messages.header(time.time(), "ap_optical"), image))
        assert node.diagnostic_status().level == DiagnosticStatus.OK
        time.sleep(0.8)
        status = node.diagnostic_status()
        assert status.level == DiagnosticStatus.STALE and status.message.startswith("no images for")
        node._srv_enable(SetBool.Request(data=False), SetBool.Response())
        response = node._srv_localize(Trigger.Request(), Trigger.Response())
        assert not response.success and "disabled" in response.message
    finally:
        node.close()
        node.destroy_node()
        rclpy.try_shutdown(context=context)


def test_the_presence_threshold_and_inference_settings_are_the_checkpoints_own_unless_the_parameters_set_them(
        tmp_path):
    import torch
    from rclpy.parameter import Parameter

    from x2p_ros.ros.localizer_node import LocalizerNode
    torch.manual_seed(0)
    ckpt = checkpoint.save(tmp_path / "calibrated.pt", X2PNet(preset("tiny", presence_threshold=0.3, chain_stride=2,
                                                                           prompt_refinements=1, extra_looks=2,
                                                                           centre_head=True, centre_snap=0.3,
                                                                           centre_agree=0.1)))
    context = rclpy.Context()
    rclpy.init(context=context)
    node = LocalizerNode(context=context, parameter_overrides=[Parameter("checkpoint", value=str(ckpt)),
                                                               Parameter("autostart", value=False)])
    try:
        node.trigger_configure()
        node.trigger_activate()  # loads the model
        assert node.localizer.threshold == 0.3  # the default parameter (-1) keeps the calibrated threshold
        assert node.set_parameters([Parameter("presence_threshold", value=0.6)])[0].successful
        assert node.localizer.threshold == 0.6
        values = {kv.key: kv.value for kv in node.diagnostic_status().values}
        assert values["presence_threshold"] == "0.6"  # what runs is what diagnostics say
        assert node.set_parameters([Parameter("presence_threshold", value=-1.0)])[0].successful
        assert node.localizer.threshold == 0.3
        assert not node.set_parameters([Parameter("presence_threshold", value=1.5)])[0].successful
        assert node.localizer.threshold == 0.3
        # the integer settings, and the float ones the same way (below 0: the checkpoint's own)
        for name, own, chosen, out_of_range in (("chain_stride", 2, 0, 11), ("prompt_refinements", 1, 3, 6),
                                                ("extra_looks", 2, 4, 5), ("centre_snap", 0.3, 0.0, 1.5),
                                                ("centre_agree", 0.1, 0.25, 1.5)):
            assert getattr(node.localizer, name) == own  # the checkpoint's, like the threshold
            assert node.set_parameters([Parameter(name, value=chosen)])[0].successful
            assert getattr(node.localizer, name) == chosen
            assert {kv.key: kv.value for kv in node.diagnostic_status().values}[name] == str(chosen)
            assert node.set_parameters([Parameter(name, value=type(chosen)(-1))])[0].successful
            assert getattr(node.localizer, name) == own
            assert not node.set_parameters([Parameter(name, value=out_of_range)])[0].successful
    finally:
        node.close()
        node.destroy_node()
        rclpy.try_shutdown(context=context)


def test_centre_snap_without_a_centre_head_is_refused_with_a_reason_and_never_runs(tmp_path):
    import torch
    from rclpy.parameter import Parameter

    from x2p_ros.ros.localizer_node import LocalizerNode
    torch.manual_seed(0)
    ckpt = checkpoint.save(tmp_path / "plain.pt", X2PNet(preset("tiny")))
    context = rclpy.Context()
    rclpy.init(context=context)
    node = LocalizerNode(context=context, parameter_overrides=[Parameter("checkpoint", value=str(ckpt)),
                                                               Parameter("autostart", value=False),
                                                               Parameter("centre_snap", value=0.3)])
    try:
        node.trigger_configure()
        node.trigger_activate()  # set for another checkpoint: this one runs without snapping
        assert node.localizer.centre_snap == 0.0
        result = node.set_parameters([Parameter("centre_snap", value=0.2)])[0]
        assert not result.successful and "needs a checkpoint with a centre head" in result.reason
        assert node.localizer.centre_snap == 0.0
        assert node.set_parameters([Parameter("centre_snap", value=0.0)])[0].successful
    finally:
        node.close()
        node.destroy_node()
        rclpy.try_shutdown(context=context)


def test_qos_of_images_and_results_can_be_overridden_by_parameters(tiny_checkpoint):
    from rclpy.parameter import Parameter
    from rclpy.qos import DurabilityPolicy, ReliabilityPolicy

    from x2p_ros.ros.localizer_node import LocalizerNode
    context = rclpy.Context()
    rclpy.init(context=context)
    node = LocalizerNode(context=context, parameter_overrides=[
        Parameter("checkpoint", value=str(tiny_checkpoint)),
        Parameter("qos_overrides./ap/image.subscription.reliability", value="reliable"),
        Parameter("qos_overrides./vertebrae/poses.publisher.durability", value="volatile")])
    try:
        def qos(infos):
            return infos[0].qos_profile
        assert qos(node.get_subscriptions_info_by_topic("/ap/image")).reliability == ReliabilityPolicy.RELIABLE
        assert qos(node.get_subscriptions_info_by_topic("/lat/image")).reliability == ReliabilityPolicy.BEST_EFFORT
        assert qos(node.get_publishers_info_by_topic("/vertebrae/poses")).durability == DurabilityPolicy.VOLATILE
        assert qos(node.get_publishers_info_by_topic("/vertebrae")).durability == DurabilityPolicy.TRANSIENT_LOCAL
        from x2p_ros.ros.qos import RESULTS, SENSOR_DATA  # the package's profiles are left as they were
        assert SENSOR_DATA.reliability == ReliabilityPolicy.BEST_EFFORT
        assert RESULTS.durability == DurabilityPolicy.TRANSIENT_LOCAL
    finally:
        node.close()
        node.destroy_node()
        rclpy.try_shutdown(context=context)


def test_a_new_calibration_waiting_with_its_images_is_applied_to_them(tiny_checkpoint, tmp_path):
    """A busy node finds a C-arm move's calibration and the images after it waiting together:
    the images are localised with the new calibration, never with the one before."""
    import numpy as np
    from geometry_msgs.msg import PointStamped, TransformStamped
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import CameraInfo, Image

    from x2p_ros.data import case_io
    from x2p_ros.data.synth import SynthConfig, synthesize
    from x2p_ros.geometry import VIEWS, project
    from x2p_ros.ros import messages
    from x2p_ros.ros.localizer_node import LocalizerNode
    synthesize(tmp_path / "d", 2, seed=5, config=SynthConfig(size=96), workers=1, progress=False)
    cases = [case_io.read_case(tmp_path / "d" / f"case_{i:05d}") for i in range(2)]
    context = rclpy.Context()
    rclpy.init(context=context)
    node = LocalizerNode(context=context, parameter_overrides=[
        Parameter("checkpoint", value=str(tiny_checkpoint)), Parameter("keyframe_max_rate_hz", value=100.0)])
    driver = rclpy.create_node("driver", context=context)
    executor = rclpy.executors.SingleThreadedExecutor(context=context)
    executor.add_node(node)
    jobs = []
    try:
        node.trigger_configure()
        node.trigger_activate()
        node.worker.submit = jobs.append  # the jobs the node decides on, not run
        pubs = {(v, kind): driver.create_publisher(t, f"{v}/{kind}", 10)
                for v in VIEWS for kind, t in (("image", Image), ("camera_info", CameraInfo),
                                               ("pose", TransformStamped), ("prompt", PointStamped))}
        deadline = time.monotonic() + 10
        while any(p.get_subscription_count() == 0 for p in pubs.values()) and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.05)

        def send(case, stamp):
            for v in VIEWS:
                info, pose = messages.calibration_messages(case.views[v].P, case.views[v].size,
                                                           messages.header(stamp, "carm"), f"{v}_optical")
                pubs[v, "camera_info"].publish(info)
                pubs[v, "pose"].publish(pose)
                prompt = PointStamped(header=messages.header(stamp, f"{v}_optical"))
                prompt.point.x, prompt.point.y = (float(c) for c in case.pixels(v)[0])
                pubs[v, "prompt"].publish(prompt)
            for v in VIEWS:
                pubs[v, "image"].publish(messages.image_message(messages.header(stamp, f"{v}_optical"),
                                                                case.views[v].image))
            time.sleep(0.5)  # all of it delivered while the node is busy elsewhere
            count = len(jobs)
            deadline = time.monotonic() + 10
            while len(jobs) == count and time.monotonic() < deadline:
                executor.spin_once(timeout_sec=0.05)
            assert len(jobs) > count, f"no key frame for the pair stamped {stamp}"
            return jobs[-1]

        t0 = time.time()
        for stamp, case in ((t0, cases[0]), (t0 + 1.0, cases[1])):
            job = send(case, stamp)
            assert job.pair.stamp == stamp
            for v in VIEWS:
                np.testing.assert_allclose(project(job.Ps[v], case.xyz_mm), project(case.views[v].P, case.xyz_mm),
                                           atol=1e-3)
                np.testing.assert_allclose(job.prompts[v], case.pixels(v)[0], atol=1e-6)
    finally:
        executor.shutdown()
        node.close()
        node.destroy_node()
        driver.destroy_node()
        rclpy.try_shutdown(context=context)


@pytest.mark.parametrize("repeat", [True, False])
def test_the_sim_switches_cases_on_schedule_and_starts_over_only_when_asked(small_data, repeat):
    """The demo asks the sim not to start over: a restart would land on the moment it stops listening."""
    import numpy as np
    from rclpy.parameter import Parameter

    from x2p_ros.data import case_io
    from x2p_ros.ros.carm_sim import CarmSim
    from x2p_ros.ros.images import image_to_array
    from x2p_ros.ros.messages import stamp_seconds
    context = rclpy.Context()
    rclpy.init(context=context)
    # 5 cases, a new one every 2 frames
    node = CarmSim(context=context, parameter_overrides=[
        Parameter("data", value=str(small_data)), Parameter("case_period_s", value=0.4),
        Parameter("rate_hz", value=5.0), Parameter("repeat", value=repeat)])
    try:
        truths, images = [], []
        node.pub_truth.publish = truths.append
        node.pub_image["ap"].publish = images.append
        for _ in range(14):
            node._tick()
        stamps = [round((stamp_seconds(m.header) - node.t0) * 5) for m in images]
        assert stamps == list(range(14))
        cases = [case_io.read_case(small_data / name) for name in case_io.list_cases(small_data)]
        shown = [next(i for i, c in enumerate(cases) if np.array_equal(image_to_array(m), c.views["ap"].image))
                 for m in images]
        # the sim publishes frame k + 1's truth right after frame k: the 8th frame's is out by frame 7
        switches = [round((stamp_seconds(m.header) - node.t0) * 5) for m in truths]
        if repeat:
            assert shown == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 0, 0, 1, 1]
            assert switches == [0, 2, 4, 6, 8, 10, 12, 14]
        else:
            assert shown == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 4, 4, 4, 4]
            assert switches == [0, 2, 4, 6, 8]
    finally:
        node.destroy_node()
        rclpy.try_shutdown(context=context)

"""`make demo` end to end with a tiny model: the same table on every run, and
a recording that holds the inputs (so a session can be replayed), the outputs
and the ground truth stamped with the images it belongs to."""
import re

import pytest

pytest.importorskip("rclpy")


def test_the_demo_prints_the_same_table_every_run_and_records_inputs_and_outputs(tmp_path, capsys):
    import torch
    from mcap.reader import make_reader

    from x2p_ros.demo import main
    from x2p_ros.model import X2PNet, checkpoint, preset
    torch.manual_seed(0)
    ckpt = checkpoint.save(tmp_path / "tiny.pt", X2PNet(preset("tiny", presence_threshold=0.0)))
    tables = []
    for run in range(2):
        assert main(["--out", str(tmp_path / f"run{run}"), "--cases", "2", "--seconds", "8",
                     "--checkpoint", str(ckpt)]) == 0
        out = capsys.readouterr().out
        table = out[out.index("key frames localised"):out.index("latency:")]
        assert re.search(r"^   1 ", table, re.M), out  # both cases localised
        tables.append(table)
    assert tables[0] == tables[1]

    with open(tmp_path / "run0" / "session.mcap", "rb") as f:
        records = list(make_reader(f).iter_messages())
    topics = {channel.topic for _, channel, _ in records}
    inputs = {f"/{v}/{kind}" for v in ("ap", "lat") for kind in ("image", "camera_info", "pose", "prompt")}
    assert inputs | {"/vertebrae", "/vertebrae/poses", "/ground_truth/poses"} <= topics
    from rclpy.serialization import deserialize_message
    from sensor_msgs.msg import Image

    from x2p_ros.ros.messages import stamp_seconds
    image_stamps = {stamp_seconds(deserialize_message(m.data, Image).header)
                    for _, c, m in records if c.topic == "/ap/image"}
    from geometry_msgs.msg import PoseArray
    truth_stamps = [stamp_seconds(deserialize_message(m.data, PoseArray).header)
                    for _, c, m in records if c.topic == "/ground_truth/poses"]
    # each case's truth carries the stamp of its first images (the very first frame may go out
    # before the recorder's subscription is matched)
    assert len(truth_stamps) >= 2 and set(truth_stamps[1:]) <= image_stamps
    assert truth_stamps[0] <= min(image_stamps)

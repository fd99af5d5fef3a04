"""`x2p localize` on files, and MCAP recordings that read back."""
import json

import cv2
import numpy as np
import pytest
import torch
import yaml

from x2p_ros import geometry
from x2p_ros.cli import main
from x2p_ros.data import case_io
from x2p_ros.data.synth import SynthConfig, synthesize
from x2p_ros.model import X2PNet, checkpoint, preset


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("offline")
    synthesize(root / "data", 1, seed=4, config=SynthConfig(size=96), workers=1, progress=False)
    torch.manual_seed(0)
    ckpt = checkpoint.save(root / "tiny.pt", X2PNet(preset("tiny", presence_threshold=0.0)))
    return root, ckpt


def test_localize_a_case_folder_and_image_files_give_the_same_result(setup, tmp_path):
    root, ckpt = setup
    case_dir = root / "data" / "case_00000"
    assert main(["localize", str(case_dir), "--checkpoint", str(ckpt), "--out", str(tmp_path / "a.json")]) == 0
    a = json.loads((tmp_path / "a.json").read_text())
    assert (tmp_path / "a.png").is_file()
    case = case_io.read_case(case_dir)
    assert a["vertebrae"][0]["label"] == case.labels[0]

    # the same pair as files: a 16-bit TIFF, a PNG, and the calibration as K + pose in metres
    cv2.imwrite(str(tmp_path / "ap.tif"), case.views["ap"].image)
    cv2.imwrite(str(tmp_path / "lat.png"), case.views["lat"].image)
    calib = {}
    for v in ("ap", "lat"):
        k9, t, q = geometry.projection_to_ros(case.views[v].P)
        calib[v] = {"K": k9.tolist(), "translation_m": t.tolist(), "rotation_xyzw": q.tolist()}
    (tmp_path / "calib.yaml").write_text(yaml.safe_dump(calib))
    prompts = a["prompts"]
    assert main(["localize", "--ap", str(tmp_path / "ap.tif"), "--lat", str(tmp_path / "lat.png"),
                 "--calibration", str(tmp_path / "calib.yaml"), "--prompt-ap", *map(str, prompts["ap"]),
                 "--prompt-lat", *map(str, prompts["lat"]), "--checkpoint", str(ckpt),
                 "--reference-level", case.labels[0], "--out", str(tmp_path / "b.json")]) == 0
    b = json.loads((tmp_path / "b.json").read_text())
    np.testing.assert_allclose([v["xyz_mm"] for v in b["vertebrae"]], [v["xyz_mm"] for v in a["vertebrae"]],
                               atol=1e-3)


def test_localize_refuses_bad_files_with_a_reason(setup, tmp_path, capsys):
    root, ckpt = setup
    (tmp_path / "calib.yaml").write_text("ap: {P: [[1, 2], [3, 4]]}\nlat: {}\n")
    cv2.imwrite(str(tmp_path / "img.png"), np.full((64, 64), 1000, np.uint16))
    code = main(["localize", "--ap", str(tmp_path / "img.png"), "--lat", str(tmp_path / "img.png"),
                 "--calibration", str(tmp_path / "calib.yaml"), "--prompt-ap", "1", "1", "--prompt-lat", "1", "1",
                 "--checkpoint", str(ckpt), "--out", str(tmp_path / "x.json")])
    assert code == 2
    assert "calib.yaml: ap:" in capsys.readouterr().err
    code = main(["localize", "--ap", str(tmp_path / "missing.png"), "--lat", str(tmp_path / "img.png"),
                 "--calibration", str(tmp_path / "calib.yaml"), "--checkpoint", str(ckpt)])
    assert code == 2 and "missing" in capsys.readouterr().err
    (tmp_path / "bad.pt").write_bytes(b"\x00" * 100)
    assert main(["localize", str(root / "data" / "case_00000"), "--checkpoint", str(tmp_path / "bad.pt")]) == 2
    assert "not a readable checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    ({"--calibration": "{tmp}/words.yaml"}, "words.yaml: not a calibration: expected 'ap' and 'lat' entries"),
    ({"--reference-level": "Q7"}, "reference level: unknown vertebral level 'Q7'; expected one of C1, C2, "),
    ({"--reference-level": "T14"}, "L5, L6, S1 or T13"),
    ({"--out": "{tmp}/a-file/x.json"}, "a-file: cannot write the results there")])
def test_localize_refuses_what_it_could_not_use_or_write_with_a_reason(setup, tmp_path, capsys, change, message):
    """Each ended in a traceback: YAML that is not a mapping, an unknown level (after the model had run), a
    results folder that cannot be made."""
    root, ckpt = setup
    case = case_io.read_case(root / "data" / "case_00000")
    (tmp_path / "words.yaml").write_text("just words\n")
    (tmp_path / "a-file").write_text("")
    calib = {v: {"P": case.views[v].P.tolist()} for v in ("ap", "lat")}
    (tmp_path / "calib.yaml").write_text(yaml.safe_dump(calib))
    for v in ("ap", "lat"):
        cv2.imwrite(str(tmp_path / f"{v}.png"), case.views[v].image)
    args = {"--ap": "{tmp}/ap.png", "--lat": "{tmp}/lat.png", "--calibration": "{tmp}/calib.yaml",
            "--out": "{tmp}/out/r.json", "--checkpoint": str(ckpt), **change}
    argv = ["localize", "--prompt-ap", "40", "10", "--prompt-lat", "40", "10"]
    for name, value in args.items():
        argv += [name, value.format(tmp=tmp_path)]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_mcap_recording_reads_back_with_its_schemas(tmp_path):
    pytest.importorskip("rclpy")
    from mcap.reader import make_reader
    from rclpy.serialization import deserialize_message

    from x2p_ros.msg import Vertebra, VertebraArray
    from x2p_ros.ros.recording import McapRecorder

    msg = VertebraArray(reference_level="L1", vertebrae=[Vertebra(label="L1", present=True)])
    msg.header.frame_id = "carm"
    rec = McapRecorder(tmp_path / "s.mcap")
    rec.write("/vertebrae", msg, 1_000)
    rec.write("/vertebrae", msg, 2_000)
    rec.close()
    with open(tmp_path / "s.mcap", "rb") as f:
        records = list(make_reader(f).iter_messages())
    assert len(records) == 2
    schema, channel, message = records[0]
    assert schema.name == "x2p_ros/msg/VertebraArray" and schema.encoding == "ros2msg"
    assert b"MSG: x2p_ros/Vertebra" in schema.data and b"MSG: builtin_interfaces/Time" in schema.data
    assert channel.topic == "/vertebrae" and channel.message_encoding == "cdr"
    assert deserialize_message(message.data, VertebraArray) == msg

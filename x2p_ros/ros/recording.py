"""An MCAP recording of ROS 2 messages (CDR with ros2msg schemas), readable by
Foxglove and `ros2 bag`: the schema of each type is its .msg text followed by
those of the types it uses, as rosbag2 writes them."""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from mcap.writer import Writer
from rclpy.serialization import serialize_message

PRIMITIVES = {"bool", "byte", "char", "float32", "float64", "int8", "uint8", "int16", "uint16", "int32", "uint32",
              "int64", "uint64", "string", "wstring"}
SEPARATOR = "=" * 80


def _share_dirs():
    prefixes = [p for p in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if p] or [sys.prefix]
    return [Path(p) / "share" for p in prefixes]


def msg_text(type_name: str) -> str:
    """The .msg text of 'pkg/msg/Name' (or 'pkg/Name')."""
    pkg, name = type_name.split("/")[0], type_name.split("/")[-1]
    for share in _share_dirs():
        path = share / pkg / "msg" / f"{name}.msg"
        if path.is_file():
            return path.read_text()
    raise FileNotFoundError(f"no .msg file for {type_name} under {', '.join(map(str, _share_dirs()))}")


def msg_definition(type_name: str) -> str:
    """ros2msg schema text: the type's definition and every type it depends on."""
    pkg = type_name.split("/")[0]
    parts, seen, todo = [msg_text(type_name)], set(), [(pkg, msg_text(type_name))]
    while todo:
        pkg, text = todo.pop(0)
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if not line or "=" in line.split()[-1] or len(line.split()) < 2:
                continue  # blank, comment or constant
            field_type = re.sub(r"\[.*\]$", "", line.split()[0])
            if field_type in PRIMITIVES or field_type.startswith("string<"):
                continue
            full = "std_msgs/Header" if field_type == "Header" else field_type if "/" in field_type \
                else f"{pkg}/{field_type}"
            if full in seen:
                continue
            seen.add(full)
            dep = msg_text(full)
            parts.append(f"{SEPARATOR}\nMSG: {full}\n{dep}")
            todo.append((full.split("/")[0], dep))
    return "\n".join(parts)


class McapRecorder:
    def __init__(self, path):
        self.file = open(path, "wb")
        self.writer = Writer(self.file)
        self.writer.start(profile="ros2", library="x2p_ros")
        self.channels = {}

    def write(self, topic: str, msg, time_ns: int):
        if topic not in self.channels:
            module, name = type(msg).__module__.split("."), type(msg).__name__
            type_name = f"{module[0]}/msg/{name}"
            schema = self.writer.register_schema(name=type_name, encoding="ros2msg",
                                                 data=msg_definition(type_name).encode())
            self.channels[topic] = self.writer.register_channel(topic=topic, message_encoding="cdr", schema_id=schema)
        self.writer.add_message(self.channels[topic], log_time=time_ns, data=serialize_message(msg),
                                publish_time=time_ns)

    def close(self):
        self.writer.finish()
        self.file.close()

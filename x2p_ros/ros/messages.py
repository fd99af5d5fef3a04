"""Localisation results -> ROS messages (metres, REP 103: converted here, once)."""
from __future__ import annotations

import numpy as np
from geometry_msgs.msg import Point, Pose, PoseArray, TransformStamped
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import ColorRGBA, Header
from visualization_msgs.msg import Marker, MarkerArray

from .. import geometry
from ..msg import Vertebra, VertebraArray
from .images import array_to_fields

TEXT_ID, LINE_ID = 1000, 2000  # marker ids: spheres use the vertebra index


def header(stamp: float, frame_id: str) -> Header:
    """A header stamped `stamp` seconds."""
    h = Header(frame_id=frame_id)
    h.stamp.sec = int(stamp)
    h.stamp.nanosec = int(round((stamp - int(stamp)) * 1e9)) % 1_000_000_000
    return h


def stamp_seconds(h: Header) -> float:
    return h.stamp.sec + 1e-9 * h.stamp.nanosec


def _point(xyz_mm) -> Point:
    x, y, z = (float(c) / geometry.MM_PER_M for c in xyz_mm)
    return Point(x=x, y=y, z=z)


def pose_array(header: Header, vertebrae) -> PoseArray:
    present = [v for v in vertebrae if v.present]
    msg = PoseArray(header=header)
    if present:
        quats = geometry.spine_orientations(np.array([v.xyz_mm for v in present]))
        for v, q in zip(present, quats):
            pose = Pose(position=_point(v.xyz_mm))
            pose.orientation.x, pose.orientation.y, pose.orientation.z, pose.orientation.w = (float(c) for c in q)
            msg.poses.append(pose)
    return msg


def vertebra_frame(label: str) -> str:
    """The tf frame of a vertebra: vertebra_T12, or vertebra_V0 without a known level."""
    return f"vertebra_{label}"


def vertebra_transforms(header: Header, vertebrae) -> list[TransformStamped]:
    """One transform per present vertebra from header.frame_id (the reference
    frame) to its frame, with the pose array's position and orientation."""
    present = [v for v in vertebrae if v.present]
    transforms = []
    for v, pose in zip(present, pose_array(header, present).poses):
        t = TransformStamped(header=header, child_frame_id=vertebra_frame(v.label))
        t.transform.translation.x, t.transform.translation.y, t.transform.translation.z = \
            pose.position.x, pose.position.y, pose.position.z
        t.transform.rotation = pose.orientation
        transforms.append(t)
    return transforms


def vertebra_array(header: Header, vertebrae, reference_level: str) -> VertebraArray:
    msg = VertebraArray(header=header, reference_level=reference_level)
    for v in vertebrae:
        msg.vertebrae.append(Vertebra(
            label=v.label, index=int(v.index), present=bool(v.present), position=_point(v.xyz_mm),
            confidence=float(v.confidence),
            ap_pixel=Point(x=float(v.pixels["ap"][0]), y=float(v.pixels["ap"][1])),
            lat_pixel=Point(x=float(v.pixels["lat"][0]), y=float(v.pixels["lat"][1]))))
    return msg


def marker_array(header: Header, vertebrae, sphere_mm: float = 12.0) -> MarkerArray:
    """DELETEALL first (stale markers go), then a sphere and a label per present
    vertebra (ids stable per index) and a line through them."""
    msg = MarkerArray(markers=[Marker(header=header, ns="vertebrae", action=Marker.DELETEALL)])
    present = [v for v in vertebrae if v.present]
    colour = ColorRGBA(r=1.0, g=0.6, b=0.0, a=0.9)
    for v in present:
        sphere = Marker(header=header, ns="vertebrae", id=int(v.index), type=Marker.SPHERE, action=Marker.ADD,
                        color=colour)
        sphere.pose.position = _point(v.xyz_mm)
        sphere.pose.orientation.w = 1.0
        sphere.scale.x = sphere.scale.y = sphere.scale.z = sphere_mm / geometry.MM_PER_M
        text = Marker(header=header, ns="vertebrae", id=TEXT_ID + int(v.index), type=Marker.TEXT_VIEW_FACING,
                      action=Marker.ADD, text=v.label, color=ColorRGBA(r=1.0, g=1.0, b=1.0, a=1.0))
        text.pose.position = _point(v.xyz_mm)
        text.pose.position.x += 2.0 * sphere_mm / geometry.MM_PER_M
        text.pose.orientation.w = 1.0
        text.scale.z = sphere_mm / geometry.MM_PER_M
        msg.markers += [sphere, text]
    if len(present) >= 2:
        line = Marker(header=header, ns="vertebrae", id=LINE_ID, type=Marker.LINE_STRIP, action=Marker.ADD,
                      color=colour, points=[_point(v.xyz_mm) for v in present])
        line.pose.orientation.w = 1.0
        line.scale.x = 0.2 * sphere_mm / geometry.MM_PER_M
        msg.markers.append(line)
    return msg


def image_message(header: Header, image: np.ndarray) -> Image:
    return Image(header=header, **array_to_fields(image))


def calibration_messages(P, size, header: Header, child_frame: str) -> tuple[CameraInfo, TransformStamped]:
    """CameraInfo (K) and the view pose (TransformStamped, metres) of a view P (mm -> px)."""
    k9, t, q = geometry.projection_to_ros(P)
    w, h = size
    info_header = Header(stamp=header.stamp, frame_id=child_frame)
    info = CameraInfo(header=info_header, width=int(w), height=int(h), distortion_model="plumb_bob", d=[0.0] * 5,
                      k=[float(x) for x in k9], r=[1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
                      p=[float(x) for x in (*k9[0:3], 0.0, *k9[3:6], 0.0, *k9[6:9], 0.0)])
    pose = TransformStamped(header=header, child_frame_id=child_frame)
    tr, r = pose.transform.translation, pose.transform.rotation
    tr.x, tr.y, tr.z = (float(c) for c in t)
    r.x, r.y, r.z, r.w = (float(c) for c in q)
    return info, pose

"""What a spine radiograph shows besides the spine, painted into a phantom's
canvas (x2p_ros/data/phantom.py: patient frame x left, y posterior, z superior,
mm): costal cartilage, the heart, aorta, the lungs' vessels, liver, kidneys,
psoas muscles, stomach and bowel gas, the colon with its haustra, the shoulder
girdle (clavicles, scapulae, sternum), the arms, the mandible, the hips
(femoral heads and necks, pubic rami) and the operating table.

Each painter takes the spine's landmarks (`Landmarks`: a centre per level and
the body's outline) and writes Hounsfield units only where no vertebra is
(labels 0), so the vertebrae, and their centroids, stay as painted.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

HU_BLOOD, HU_LIVER, HU_MUSCLE, HU_FAT, HU_GAS = 45.0, 60.0, 55.0, -90.0, -900.0


@dataclass
class Landmarks:
    chain: list[str]  # level names, superior first
    centres: np.ndarray  # (L, 3) body centres of the chain, mm
    dims: np.ndarray  # (L, 4) width, depth, height, disc below
    front: callable  # z (mm) -> the skin's y in front
    torso_scale: float
    bone_density: float

    def at(self, level: float) -> np.ndarray:
        """Spine centre at a fractional level index (0 = C1)."""
        t = np.arange(len(self.chain))
        return np.array([np.interp(level, t, self.centres[:, a]) for a in range(3)])

    def level(self, name: str) -> int:
        return self.chain.index(name)


def ellipsoid(canvas, centre, axes, value: float, where=None, rotation=None):
    """Paints an ellipsoid (semi-axes in mm, optionally rotated: columns are its axes
    in the patient frame) over voxels without a vertebra and, if given, where where(hu) holds."""
    centre, axes = np.asarray(centre, dtype=np.float64), np.asarray(axes, dtype=np.float64)
    reach = axes.max()
    sl, X, Y, Z = canvas.axes(centre - reach, centre + reach)
    if canvas.hu[sl].size == 0:
        return
    d = (X - centre[0], Y - centre[1], Z - centre[2])
    R = np.eye(3) if rotation is None else np.asarray(rotation)
    e = sum(((d[0] * R[0, a] + d[1] * R[1, a] + d[2] * R[2, a]) / axes[a]) ** 2 for a in range(3))
    mask = (e <= 1.0) & (canvas.labels[sl] == 0)
    if where is not None:
        mask &= where(canvas.hu[sl])
    canvas.hu[sl][mask] = value


def tube(canvas, points, radius: float, value: float, where=None):
    """Paints a tube along a polyline over voxels without a vertebra (and where where(hu) holds):
    segment by segment, the voxels of its bounding box within `radius` of it."""
    points = np.asarray(points, dtype=np.float64)
    for a, b in zip(points[:-1], points[1:]):
        sl, X, Y, Z = canvas.axes(np.minimum(a, b) - radius, np.maximum(a, b) + radius)
        if canvas.hu[sl].size == 0:
            continue
        ab = b - a
        t = ((X - a[0]) * ab[0] + (Y - a[1]) * ab[1] + (Z - a[2]) * ab[2]) / max(float(ab @ ab), 1e-9)
        t = np.clip(t, 0.0, 1.0)
        d2 = (X - a[0] - t * ab[0]) ** 2 + (Y - a[1] - t * ab[1]) ** 2 + (Z - a[2] - t * ab[2]) ** 2
        mask = (d2 <= radius ** 2) & (canvas.labels[sl] == 0)
        if where is not None:
            mask &= where(canvas.hu[sl])
        canvas.hu[sl][mask] = value


def _inside_body(hu):
    return hu > -500.0  # soft tissue and fat, not the air around the patient or in the lungs


def _soft_or_lung(hu):
    return (hu > -950.0) & (hu < 100.0)  # inside the body (lungs included), not bone


def _aerated_lung(hu):
    return (hu > -900.0) & (hu < -700.0)


def _gas(hu):
    return hu < -500.0


def paint_thorax(canvas, m: Landmarks, rng: np.random.Generator):
    """Heart between the lungs, the aorta down the spine's left front (calcified in some patients)."""
    t6, t9 = m.at(m.level("T6")), m.at(m.level("T9"))
    s = m.torso_scale
    heart = (t6 + t9) / 2 + np.array([25.0 * s, -70.0 * s, 0.0])
    ellipsoid(canvas, heart, np.array([60.0, 50.0, 55.0]) * s * rng.uniform(0.85, 1.15), HU_BLOOD,
              where=_soft_or_lung)
    path = [m.at(k) + np.array([18.0, -m.dims[int(k), 1] / 2 - 14.0, 0.0])
            for k in np.linspace(m.level("T4"), m.level("L4"), 12)]
    radius = rng.uniform(9.0, 14.0)
    tube(canvas, path, radius, HU_BLOOD, where=_soft_or_lung)
    if rng.random() < 0.35:  # plaques in the abdominal aorta, bright in the lateral view
        for _ in range(int(rng.integers(2, 10))):
            k = rng.uniform(m.level("T12"), m.level("L4"))
            wall = m.at(k) + np.array([18.0, -m.dims[int(k), 1] / 2 - 14.0, 0.0])
            a = rng.uniform(0, 2 * np.pi)
            spot = wall + radius * np.array([np.cos(a), np.sin(a), 0.0])
            tube(canvas, [spot, spot + np.array([0.0, 0.0, rng.uniform(2, 8)])], rng.uniform(0.8, 2.0),
                 rng.uniform(400, 900))


def paint_lung_vessels(canvas, m: Landmarks, rng: np.random.Generator):
    """The pulmonary arteries and veins: from each hilum (beside T5-T7, in front of the spine)
    trees of branching tubes, tapering by 0.68 a generation down to 1 mm (Murray's law for two equal
    daughters gives 0.79; faster here, as vessels fade from sight in the lung's outer third). Blood
    only in aerated lung, so they give the lung fields their streaks and nothing else changes."""
    s = m.torso_scale
    for side in (-1, 1):
        hilum = m.at(rng.uniform(m.level("T5"), m.level("T7"))) + np.array([side * 40.0 * s, -60.0 * s, 0.0])
        starts, ends, generation = [], [], []
        for _ in range(int(rng.integers(5, 8))):  # lobar and segmental trunks, fanning out sideways
            direction = np.array([side * rng.uniform(0.3, 1.0), rng.uniform(-0.6, 0.6), rng.uniform(-1.0, 1.0)])
            tips = [(hilum, direction / np.linalg.norm(direction))]
            length = rng.uniform(25.0, 35.0) * s
            for g in range(6):
                children = []
                for start, d in tips:
                    end = start + d * length
                    starts.append(start)
                    ends.append(end)
                    generation.append(g)
                    for _ in range(2):
                        child = d + rng.normal(0.0, 0.45, size=3)
                        children.append((end, child / np.linalg.norm(child)))
                tips, length = children, length * 0.75
        starts, ends, generation = np.array(starts), np.array(ends), np.array(generation)
        radius = rng.uniform(5.0, 8.0)
        for g in range(6):
            r = radius * 0.68 ** g
            if r < max(1.0, 0.5 * canvas.voxel):
                break
            idx = canvas.segments(starts[generation == g], ends[generation == g], r)
            keep = (canvas.labels[idx] == 0) & _aerated_lung(canvas.hu[idx])
            canvas.hu[tuple(a[keep] for a in idx)] = HU_BLOOD


def ring(canvas, centre, axis, r_inner: float, r_outer: float, half_thickness: float, value: float, where=None):
    """Paints a flat ring (a fold across a tube whose axis is `axis`, a unit vector) over voxels
    without a vertebra and, if given, where where(hu) holds."""
    centre = np.asarray(centre, dtype=np.float64)
    sl, X, Y, Z = canvas.axes(centre - r_outer - half_thickness, centre + r_outer + half_thickness)
    if canvas.hu[sl].size == 0:
        return
    d = (X - centre[0], Y - centre[1], Z - centre[2])
    along = d[0] * axis[0] + d[1] * axis[1] + d[2] * axis[2]
    radial2 = d[0] ** 2 + d[1] ** 2 + d[2] ** 2 - along ** 2
    mask = (np.abs(along) <= half_thickness) & (radial2 >= r_inner ** 2) & (radial2 <= r_outer ** 2)
    mask &= canvas.labels[sl] == 0
    if where is not None:
        mask &= where(canvas.hu[sl])
    canvas.hu[sl][mask] = value


def colon_frame(m: Landmarks) -> np.ndarray:
    """The colon's course (K, 3) mm, 5 mm apart: caecum in the right iliac fossa, ascending colon
    up the right flank, hepatic flexure under the liver, the transverse colon sagging in front,
    splenic flexure high on the left, descending colon down the left flank, sigmoid into the pelvis."""
    s = m.torso_scale
    at = lambda name, x, y, z: m.at(m.level(name)) + np.array([x * s, y * s, z])  # noqa: E731
    stations = np.array([at("L5", -65, -70, -15), at("L3", -85, -45, 0), at("L1", -80, -55, 0),
                         at("L2", -30, -110, -10), at("L3", 10, -115, 0), at("L1", 60, -80, 0),
                         at("T12", 85, -40, 0), at("L2", 85, -35, 0), at("L4", 80, -40, 0),
                         at("S1", 55, -55, -15), at("S1", 15, -75, -45)])
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(stations, axis=0), axis=1))])
    t = np.arange(0.0, arc[-1], 5.0)
    return np.stack([np.interp(t, arc, stations[:, a]) for a in range(3)], axis=1)


def paint_colon(canvas, m: Landmarks, rng: np.random.Generator, stretches: int):
    """Gas in `stretches` stretches of the colon, each 6-16 cm long, with haustral folds: rings of
    wall reaching into the gas every 15-30 mm (the colon's sacculations, which give bowel gas on a
    radiograph its scalloped, segmented look)."""
    frame = colon_frame(m)
    for _ in range(stretches):
        n = int(rng.uniform(60.0, 160.0) / 5.0)
        start = int(rng.integers(0, max(len(frame) - n, 1)))
        path = frame[start:start + n]
        radius = rng.uniform(12.0, 28.0) * m.torso_scale
        tube(canvas, path, radius, rng.uniform(-950.0, -800.0), where=_inside_body)
        walked, next_fold = 0.0, rng.uniform(15.0, 30.0)
        for a, b in zip(path[:-1], path[1:]):
            walked += float(np.linalg.norm(b - a))
            if walked < next_fold:
                continue
            walked, next_fold, axis = 0.0, rng.uniform(15.0, 30.0), (b - a) / np.linalg.norm(b - a)
            ring(canvas, b, axis, radius * rng.uniform(0.4, 0.7), radius + 1.0, 1.5, HU_MUSCLE, where=_gas)


def paint_abdomen(canvas, m: Landmarks, rng: np.random.Generator, bowel_loops: int, stool: int):
    """Liver under the right dome, kidneys in their fat, psoas muscles in fat sheaths, gas in the
    stomach, in `bowel_loops` loops of bowel and, mottled, in `stool` stretches of colon."""
    s = m.torso_scale
    l1, l3 = m.at(m.level("L1")), m.at(m.level("L3"))
    ellipsoid(canvas, m.at(m.level("T11")) + np.array([-75.0 * s, -45.0 * s, 0.0]),
              np.array([85.0, 75.0, 70.0]) * s, HU_LIVER, where=_inside_body)
    for side, drop in ((1, 0.0), (-1, 15.0)):  # the right kidney sits lower
        c = (l1 + l3) / 2 + np.array([side * 60.0 * s, 10.0, -drop])
        ellipsoid(canvas, c, np.array([35.0, 30.0, 62.0]) * s + 8.0, HU_FAT, where=_inside_body)
        ellipsoid(canvas, c, np.array([27.0, 22.0, 55.0]) * s, HU_MUSCLE, where=_inside_body)
    if "S1" in m.chain:
        lo, hi = m.level("T12"), m.level("S1")
        for side in (-1, 1):
            path = [m.at(k) + np.array([side * (m.dims[int(k), 0] / 2 + 4 + 14 * (k - lo) / (hi - lo)), 0.0, 0.0])
                    for k in np.linspace(lo, hi, 8)]
            width = rng.uniform(14.0, 24.0) * s
            tube(canvas, path, width + 3.0, HU_FAT, where=_inside_body)
            tube(canvas, path, width, HU_MUSCLE, where=_inside_body)
    if rng.random() < 0.6:  # the stomach's gas bubble under the left dome
        ellipsoid(canvas, m.at(m.level("T12")) + np.array([70.0 * s, -80.0 * s, 10.0]),
                  rng.uniform(15, 40, size=3), HU_GAS, where=_inside_body)
    def abdominal_point():
        k = rng.uniform(m.level("L1"), m.level("S1") + 1.5)
        return m.at(min(k, len(m.chain) - 1)) + np.array([rng.uniform(-110, 110) * s, -rng.uniform(30, 120) * s,
                                                          -max(k - len(m.chain) + 1, 0) * 30.0])

    for _ in range(bowel_loops):  # random walks of gas
        points = [abdominal_point()]
        for _ in range(int(rng.integers(2, 8))):
            points.append(points[-1] + rng.normal(0.0, 18.0, size=3))
        tube(canvas, points, rng.uniform(3.0, 14.0), rng.uniform(-950, -500), where=_inside_body)
    for _ in range(stool):  # bubbles of gas in faeces
        centre = abdominal_point()
        for bubble in centre + rng.normal(0.0, 15.0, size=(int(rng.integers(15, 50)), 3)):
            ellipsoid(canvas, bubble, rng.uniform(1.5, 5.0, size=3), rng.uniform(-900, -400), where=_inside_body)


def paint_shoulders(canvas, m: Landmarks, rng: np.random.Generator, arms_down: bool):
    """Sternum, clavicles, scapulae and humeri; the arms hang beside the chest or are raised."""
    s, bone = m.torso_scale, m.bone_density
    t1, t3, t9 = (m.at(m.level(n)) for n in ("T1", "T3", "T9"))
    front = lambda z: m.front(z) + 12.0  # noqa: E731 - the sternum lies under the skin
    top, bottom = t3[2] + 10.0, t9[2]
    path = [np.array([0.0, front(z), z]) for z in np.linspace(top, bottom, 6)]
    tube(canvas, path, 9.0, 450.0 * bone, where=_inside_body)
    for side in (-1, 1):
        notch = np.array([side * 15.0, front(top), top + 5.0])
        acromion = t1 + np.array([side * 150.0 * s, 20.0, 15.0])
        tube(canvas, [notch, (notch + acromion) / 2 + np.array([0.0, -15.0, 8.0]), acromion], 7.0 * s,
             700.0 * bone)
        # the scapula: a thin plate on the back of the ribs from T2 to T7, its spine a ridge on top
        centre = m.at(m.level("T4")) + np.array([side * 85.0 * s, 55.0 * s, 0.0])
        normal = np.array([side * 0.45, 0.9, 0.0])
        normal /= np.linalg.norm(normal)
        R = np.stack([np.cross(normal, [0.0, 0.0, 1.0]), normal, [0.0, 0.0, 1.0]], axis=1)
        ellipsoid(canvas, centre, np.array([50.0, 3.0, 75.0]) * s, 600.0 * bone, rotation=R)
        tube(canvas, [centre + np.array([-side * 40.0, 3.0, 45.0]) * s, acromion], 5.0 * s, 700.0 * bone)
        shoulder = acromion + np.array([side * 10.0, -5.0, -25.0]) * s
        if arms_down:
            elbow = shoulder + np.array([side * 15.0, 0.0, -290.0]) * s
            tube(canvas, [shoulder, elbow], 45.0 * s, HU_MUSCLE, where=lambda hu: hu < -950)
        else:  # raised beside the head, as for a prone patient
            elbow = shoulder + np.array([side * 40.0, -60.0, 260.0]) * s
        tube(canvas, [shoulder, elbow], 11.0 * s, 800.0 * bone)
        ellipsoid(canvas, shoulder, np.full(3, 24.0 * s), 650.0 * bone)  # the humeral head


def paint_costal_cartilage(canvas, m: Landmarks, rib_ends: dict, hu: float):
    """Costal cartilage from each rib's front end (rib_ends[(level, side)], mm) onwards: ribs 1-7
    to the sternum's edge, each a step lower on it; ribs 8-10 up and inwards to the costal margin
    (the cartilage of the rib above); ribs 11 and 12 float free."""
    s = m.torso_scale
    top, bottom = m.at(m.level("T3"))[2] + 10.0, m.at(m.level("T9"))[2]  # the sternum, as paint_shoulders has it
    for (name, side), end in rib_ends.items():
        k = m.level(name) - m.level("T1")  # the rib's number - 1
        if k <= 6:
            z = top + (bottom - top) * k / 6.0
            target = np.array([side * 15.0, m.front(z) + 12.0, z])
        elif k <= 9:
            target = end + np.array([-side * 45.0 * s, -10.0, 35.0])
        else:
            continue
        bend = (end + target) / 2 + np.array([side * 10.0 * s, -5.0, 0.0])  # bowed outwards along the chest wall
        tube(canvas, [end, bend, target], 4.0 * s, hu, where=_inside_body)


def paint_mandible(canvas, m: Landmarks):
    """The mandible's U in front of C2-C3."""
    c = m.at(m.level("C2")) + np.array([0.0, -20.0, 5.0])
    s = m.torso_scale
    arch = [c + np.array([50 * s * np.sin(a), -60 * s * (1 - np.cos(a)) - 10.0, -15.0 * (1 - np.cos(a))])
            for a in np.linspace(-1.2, 1.2, 15)]
    tube(canvas, arch, 6.0, 1100.0 * m.bone_density)
    for side in (-1, 1):  # the rami up to the skull
        tube(canvas, [arch[0 if side < 0 else -1], c + np.array([side * 50.0 * s, 10.0, 45.0])], 5.0,
             1000.0 * m.bone_density)


def paint_hips(canvas, m: Landmarks):
    """Femoral heads in their sockets, the necks and shafts, and the pubic rami meeting in front."""
    s, bone = m.torso_scale, m.bone_density
    s1 = m.at(m.level("S1"))
    for side in (-1, 1):
        head = s1 + np.array([side * 85.0 * s, -45.0 * s, -95.0 * s])
        ellipsoid(canvas, head, np.full(3, 32.0 * s), 650.0 * bone)  # the acetabulum's rim
        ellipsoid(canvas, head, np.full(3, 24.0 * s), 550.0 * bone)
        trochanter = head + np.array([side * 55.0, 10.0, -30.0]) * s
        tube(canvas, [head, trochanter, trochanter + np.array([-side * 10.0, 0.0, -150.0])], 14.0 * s,
             750.0 * bone)
        symphysis = s1 + np.array([0.0, -120.0 * s, -110.0 * s])
        tube(canvas, [head + np.array([-side * 20.0, -15.0, 5.0]), symphysis], 8.0 * s, 650.0 * bone)
        tube(canvas, [head + np.array([-side * 10.0, 0.0, -25.0]), symphysis + np.array([0.0, 5.0, -25.0])],
             6.0 * s, 650.0 * bone)


def paint_table(canvas, y_surface: float, thickness: float):
    """A carbon-fibre table under a prone patient: two thin skins around a foam core."""
    far = 1e5  # the whole canvas in x and z
    sl, X, Y, Z = canvas.axes(np.array([-far, y_surface - thickness, -far]), np.array([far, y_surface, far]))
    hu = canvas.hu[sl]
    y = np.broadcast_to(Y, hu.shape)
    skin = (y >= y_surface - 2.0) | (y <= y_surface - thickness + 2.0)
    hu[(hu < -900) & ~skin] = -850.0
    hu[(hu < -900) & skin] = 700.0

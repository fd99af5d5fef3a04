"""Procedural spine phantoms: CT-like volumes (HU, mm) with the vertebral body
centroids as ground truth.

Patient frame: x to the patient's left, y posterior, z superior, in mm. Each
vertebra has a local frame (origin: body centre, ez along the spine, ey
posterior) in which its parts are drawn: the body, waisted, with concave end
plates, as a cortical shell around textured trabecular bone, and the posterior
elements (pedicles, laminae, articular, spinous and transverse processes) as
tubes. Around the column: discs, ribs on T1-T12, lungs, sacrum and iliac wings
below L5, the skull base above C1, soft tissue with a fat layer, air, and what
x2p_ros/data/context.py adds (costal cartilage, organs, lung vessels, gas,
colon, shoulder girdle, arms, mandible, hips, table). Variability: patient size
and habitus, bone density (down to osteoporosis), sagittal curves, scoliosis
with axial rotation, wedge and burst fractures, degenerated discs with
osteophytes, pedicle screws with rods, interbody cages.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from ..levels import LEVELS, VERSE_LABELS
from . import context
from .volume import Volume

CHAIN = [name for name in LEVELS if name != "L6"]  # C1..L5, S1: the usual column
VERSE_NUMBER = {name: number for number, name in VERSE_LABELS.items()}
VERSE_NUMBER["S1"] = 26  # VerSe's sacrum label

HU_AIR, HU_FAT, HU_SOFT, HU_LUNG, HU_DISC = -1000.0, -90.0, 40.0, -820.0, 90.0
HU_PROCESS = 450.0  # a thin process: cancellous bone in a cortex about a millimetre thick
HU_METAL = 14000.0  # titanium attenuates about 15 times more than water

# Body width (lateral), depth (AP), height and the disc below, in mm, for an
# average adult, at anchor levels; other levels are interpolated. Rounded from
# the end-plate widths and depths and the body heights of Panjabi et al.:
# "Cervical human vertebrae", Spine 16(8):861-869 (1991); "Thoracic human
# vertebrae", Spine 16(8):888-901 (1991); "Human lumbar vertebrae", Spine
# 17(3):299-306 (1992); disc heights after Gilad and Nissan, Spine 11(2):154-157 (1986).
_ANCHORS = {  # level: (width, depth, height, disc)
    "C1": (14, 10, 10, 4), "C2": (17, 15, 20, 5), "C3": (17, 15, 14, 5), "C7": (22, 17, 15, 5),
    "T1": (25, 17, 17, 4), "T6": (30, 24, 19, 5), "T12": (40, 30, 24, 7),
    "L1": (42, 31, 25, 9), "L5": (50, 35, 27, 11), "S1": (48, 33, 25, 0),
}


# Pedicle width (transverse) and height, in mm, at anchor levels, rounded from the same three
# studies of Panjabi et al.: narrow and short in the cervical spine, narrowest in the mid-thoracic
# one, then taller down to T12 and wider down to L5, whose pedicle is wider than it is tall.
_PEDICLE_ANCHORS = {  # level: (width, height)
    "C3": (5.5, 7.0), "C7": (6.5, 7.5), "T1": (8.0, 9.5), "T6": (4.5, 11.0), "T12": (7.8, 15.5),
    "L1": (8.7, 15.4), "L3": (10.3, 14.9), "L5": (18.0, 14.0),
}


def _interpolated(anchors: dict, name: str) -> np.ndarray:
    idx = CHAIN.index(name)
    keys = [CHAIN.index(k) for k in anchors]
    values = np.array(list(anchors.values()), dtype=np.float64)
    return np.array([np.interp(idx, keys, values[:, c]) for c in range(values.shape[1])])


def level_dimensions(name: str) -> np.ndarray:
    """(width, depth, height, disc below) of a level, interpolated between anchors."""
    return _interpolated(_ANCHORS, name)


def pedicle_dimensions(name: str) -> np.ndarray:
    """(width, height) of a level's pedicles, interpolated between anchors."""
    return _interpolated(_PEDICLE_ANCHORS, name)


@dataclass
class PhantomSpec:
    """Everything random about one phantom, drawn by PhantomSpec.sample."""
    levels: list[str]
    scale: float = 1.0
    bone_density: float = 1.0
    lordosis_mm: float = 20.0
    kyphosis_mm: float = 30.0
    lumbar_lordosis_mm: float = 25.0
    scoliosis_mm: float = 0.0
    scoliosis_phase: float = 0.0
    cortical_hu: float = 1600.0  # compact bone as a CT measures it
    cortex_mm: float = 0.4  # the vertebral body's cortical shell
    trabecular_hu: float = 220.0  # 80-130 in osteoporosis
    texture: float = 0.3  # trabecular contrast, relative
    endplate_mm: float = 1.5  # depth of the lower end plate's central concavity; the upper one's is about half
    endplate_cortex_mm: float = 0.8  # compact bone of the end plates, with the dense subchondral layer a CT adds to it
    # per CHAIN level, relative to level_dimensions x scale: the body's height and the disc below it; empty: 1
    body_heights: list[float] = field(default_factory=list)
    disc_heights: list[float] = field(default_factory=list)
    fractures: dict[str, float] = field(default_factory=dict)  # level -> height loss (0..1)
    burst: list[str] = field(default_factory=list)  # fractured levels whose body is crushed, not wedged
    degenerated: dict[str, float] = field(default_factory=dict)  # level -> height left to the disc below
    osteophytes: list[str] = field(default_factory=list)
    implant_levels: list[str] = field(default_factory=list)
    cage_levels: list[str] = field(default_factory=list)  # a cage in the disc below
    torso_scale: float = 1.0
    fat_mm: float = 12.0
    gas_blobs: int = 0
    bowel_loops: int = 0
    stool: int = 0  # stretches of colon with mottled gas
    colon_gas: int = 0  # stretches of colon filled with gas, haustra and all
    cartilage_hu: float = 120.0  # costal cartilage: hyaline, or calcified (300-600) as in many older patients
    arms_down: bool = False
    table_mm: float = 0.0  # thickness of the table in front of a prone patient; 0: none
    voxel_mm: float = 1.0

    @classmethod
    def sample(cls, rng: np.random.Generator, levels: list[str], voxel_mm: float = 1.0) -> "PhantomSpec":
        spec = cls(levels=list(levels), voxel_mm=voxel_mm,
                   scale=rng.uniform(0.85, 1.15), bone_density=rng.uniform(0.7, 1.2),
                   lordosis_mm=rng.uniform(5, 20), kyphosis_mm=rng.uniform(15, 45),
                   lumbar_lordosis_mm=rng.uniform(10, 35), torso_scale=rng.uniform(0.85, 1.25),
                   fat_mm=rng.uniform(5, 30), gas_blobs=int(rng.integers(0, 5)),
                   bowel_loops=int(rng.integers(0, 40)), stool=int(rng.integers(0, 6)),
                   cortical_hu=rng.uniform(1300, 1800), cortex_mm=rng.uniform(0.25, 0.7),
                   trabecular_hu=rng.uniform(80, 300),
                   texture=rng.uniform(0.1, 0.5), endplate_mm=rng.uniform(0.5, 3.0),
                   endplate_cortex_mm=rng.uniform(0.4, 1.5),
                   arms_down=bool(rng.random() < 0.3), table_mm=rng.uniform(15, 40) if rng.random() < 0.6 else 0.0,
                   colon_gas=int(rng.integers(0, 5)),
                   cartilage_hu=120.0 if rng.random() < 0.6 else rng.uniform(300, 600))
        # Heights vary from level to level and discs from patient to patient beyond the body size: the
        # standard deviations in the morphometry above are about 5 % of a body's height and 15-20 % of a
        # disc's. A column whose steps follow one smooth law lets a model extrapolate the next vertebra
        # from the last instead of finding it.
        spec.body_heights = np.clip(rng.normal(1.0, 0.05, len(CHAIN)), 0.88, 1.12).tolist()
        # Discs narrow with degeneration, which most patients of spine surgery's age show at many levels
        # (grades III-V of Pfirrmann et al., "Magnetic resonance classification of lumbar intervertebral disc
        # degeneration", Spine 26(17):1873-1878, 2001): the patient's disc height reaches down to half.
        spec.disc_heights = (rng.uniform(0.5, 1.25) * np.clip(rng.normal(1.0, 0.12, len(CHAIN)), 0.7, 1.3)).tolist()
        if rng.random() < 0.2:
            spec.scoliosis_mm = rng.uniform(10, 40) * rng.choice([-1, 1])
            spec.scoliosis_phase = rng.uniform(-0.3, 0.3)
        body_levels = [name for name in levels if name not in ("C1", "C2", "S1")]
        if body_levels and rng.random() < 0.15:
            for name in rng.choice(body_levels, size=min(len(body_levels), int(rng.integers(1, 3))), replace=False):
                spec.fractures[str(name)] = rng.uniform(0.2, 0.5)
                if rng.random() < 0.3:
                    spec.burst.append(str(name))
        discs = [name for name in levels if name not in ("C1", "S1")]
        if discs and rng.random() < 0.3:  # degenerative changes, mostly lower lumbar and cervical
            for name in rng.choice(discs, size=min(len(discs), int(rng.integers(1, 4))), replace=False):
                spec.degenerated[str(name)] = rng.uniform(0.3, 0.8)
                if rng.random() < 0.6:
                    spec.osteophytes.append(str(name))
        screwable = [name for name in levels if name[0] in "TL"]
        if len(screwable) >= 2 and rng.random() < 0.15:
            n = int(rng.integers(2, min(4, len(screwable)) + 1))
            start = int(rng.integers(0, len(screwable) - n + 1))
            spec.implant_levels = screwable[start:start + n]
            if rng.random() < 0.5:
                spec.cage_levels = [str(rng.choice(spec.implant_levels[:-1]))]
        return spec


@dataclass
class Phantom:
    volume: Volume
    vertebrae: list[dict]  # {"label": name, "xyz_mm": [x, y, z]}, superior first
    spec: PhantomSpec


@lru_cache(maxsize=1)
def _trabecular_tile(n: int = 32) -> np.ndarray:
    """A periodic (n, n, n) field of unit spread with the grain of trabecular bone:
    struts about a voxel wide over a coarser marrow pattern. Fixed; each vertebra
    reads it at its own random offset."""
    from scipy.ndimage import gaussian_filter
    noise = np.random.default_rng(0).normal(size=(n, n, n))
    fine, coarse = gaussian_filter(noise, 0.8, mode="wrap"), gaussian_filter(noise, 2.5, mode="wrap")
    tile = fine / fine.std() + 0.5 * coarse / coarse.std()
    return (tile / tile.std()).astype(np.float32)


@lru_cache(maxsize=32)
def _ball_offsets(radius_vox: float) -> np.ndarray:
    r = int(np.ceil(radius_vox))
    g = np.mgrid[-r:r + 1, -r:r + 1, -r:r + 1].reshape(3, -1).T
    return g[(g ** 2).sum(1) <= radius_vox ** 2 + 1e-9]  # (M, 3) as (dk, dj, di)


class _Canvas:
    """Axis-aligned voxel grid in the patient frame being painted."""

    def __init__(self, lo: np.ndarray, hi: np.ndarray, voxel: float):
        self.voxel = voxel
        self.origin = lo
        nx, ny, nz = np.ceil((hi - lo) / voxel).astype(int) + 1
        self.hu = np.full((nz, ny, nx), HU_AIR, dtype=np.float32)
        self.labels = np.zeros((nz, ny, nx), dtype=np.uint8)

    @classmethod
    def of(cls, volume: Volume) -> "_Canvas":
        """A painted phantom's volume as a canvas again (its arrays, shared)."""
        canvas = cls.__new__(cls)
        canvas.voxel, canvas.origin = float(volume.affine[0, 0]), volume.affine[:3, 3].copy()
        canvas.hu, canvas.labels = volume.hu, volume.labels
        return canvas

    def axes(self, lo=None, hi=None):
        """Index slices and world coordinates (broadcastable X, Y, Z) of the box [lo, hi]."""
        shape = np.array(self.hu.shape[::-1])
        a = np.zeros(3, int) if lo is None else np.clip(np.floor((lo - self.origin) / self.voxel), 0, shape).astype(int)
        b = shape if hi is None else np.clip(np.ceil((hi - self.origin) / self.voxel) + 1, 0, shape).astype(int)
        sl = (slice(a[2], b[2]), slice(a[1], b[1]), slice(a[0], b[0]))
        coords = [self.origin[d] + self.voxel * np.arange(a[d], b[d], dtype=np.float32) for d in range(3)]
        X, Y, Z = coords[0][None, None, :], coords[1][None, :, None], coords[2][:, None, None]
        return sl, X, Y, Z

    def tube(self, points: np.ndarray, radius: float) -> tuple[np.ndarray, ...]:
        """Voxel indices (k, j, i) of a tube of `radius` mm along a polyline (N, 3) mm."""
        points = np.asarray(points, dtype=np.float64)
        return self.segments(points[:-1], points[1:], radius)

    def segments(self, starts: np.ndarray, ends: np.ndarray, radius: float) -> tuple[np.ndarray, ...]:
        """Voxel indices (k, j, i) of tubes of `radius` mm around the straight segments
        starts[i] -> ends[i] ((N, 3) mm each): balls on points half a voxel apart."""
        starts, ends = (np.asarray(p, dtype=np.float64).reshape(-1, 3) for p in (starts, ends))
        seg = ends - starts
        n = np.maximum(np.ceil(np.linalg.norm(seg, axis=1) / (0.5 * self.voxel)).astype(int), 1)
        dense = np.concatenate([p + s * np.linspace(0, 1, k + 1)[:, None] for p, s, k in zip(starts, seg, n)])
        centres = np.unique(np.round((dense - self.origin) / self.voxel).astype(int)[:, ::-1], axis=0)
        idx = (centres[:, None, :] + _ball_offsets(round(radius / self.voxel * 2) / 2)[None]).reshape(-1, 3)
        shape = np.array(self.hu.shape)
        idx = idx[np.all((idx >= 0) & (idx < shape), axis=1)]
        return tuple(idx.T)


def spine_curve(spec: PhantomSpec):
    """Centres (L, 3) and local frames (L, 3, 3) (columns ex, ey, ez) of all CHAIN levels."""
    dims = np.array([level_dimensions(n) for n in CHAIN]) * spec.scale
    if spec.body_heights:
        dims[:, 2] *= spec.body_heights
    if spec.disc_heights:
        dims[:, 3] *= spec.disc_heights
    z = np.zeros(len(CHAIN))
    for i in range(1, len(CHAIN)):
        dims[i - 1, 3] *= spec.degenerated.get(CHAIN[i - 1], 1.0)
        z[i] = z[i - 1] - dims[i - 1, 2] / 2 - dims[i - 1, 3] - dims[i, 2] / 2
    t = np.arange(len(CHAIN), dtype=np.float64)
    # sagittal profile: cervical and lumbar lordosis (anterior, -y), thoracic kyphosis (+y)
    y = (-spec.lordosis_mm * np.sin(np.pi * np.clip(t / 7, 0, 1))
         + spec.kyphosis_mm * np.sin(np.pi * np.clip((t - 7) / 12, 0, 1))
         - spec.lumbar_lordosis_mm * np.sin(np.pi * np.clip((t - 19) / 5.5, 0, 1)))
    y[CHAIN.index("S1")] += 10.0 * spec.scale  # sacral promontory sits back
    # scoliosis: one lateral curve over the thoracolumbar column
    x = spec.scoliosis_mm * np.sin(np.pi * np.clip((t - 8) / 15 + spec.scoliosis_phase, 0, 1))
    centres = np.stack([x, y, z], axis=1)
    tangent = np.gradient(centres, axis=0)
    ez = -tangent / np.linalg.norm(tangent, axis=1, keepdims=True)  # superior
    # axial rotation follows the scoliotic offset, as in real curves
    twist = np.deg2rad(0.4) * x
    ey0 = np.stack([-np.sin(twist), np.cos(twist), np.zeros_like(twist)], axis=1)
    ey = ey0 - ez * (ey0 * ez).sum(1, keepdims=True)
    ey /= np.linalg.norm(ey, axis=1, keepdims=True)
    ex = np.cross(ey, ez)
    return centres, np.stack([ex, ey, ez], axis=2), dims


def _local(X, Y, Z, c, F):
    """Local coordinates of world grids in the frame (c, F)."""
    d = (X - c[0], Y - c[1], Z - c[2])
    return [d[0] * F[0, a] + d[1] * F[1, a] + d[2] * F[2, a] for a in range(3)]


def _torso_outline(spec: PhantomSpec, centres, z):
    """Half width, front (min y) and back (max y) of the body's outline at heights z."""
    t = np.interp(z, centres[::-1, 2], np.arange(len(CHAIN))[::-1])  # level index per height
    half_w = spec.torso_scale * np.interp(t, [0, 6, 9, 14, 19, 25], [55, 65, 145, 150, 155, 175])
    half_d = spec.torso_scale * np.interp(t, [0, 6, 9, 14, 19, 25], [55, 60, 100, 110, 115, 120])
    back = np.interp(z, centres[::-1, 2], centres[::-1, 1]) \
        + np.interp(t, [0, 7, 19, 25], [45, 60, 70, 75]) * spec.scale + spec.fat_mm
    return half_w, back - 2 * half_d, back


def _paint_soft_tissue(canvas: _Canvas, spec: PhantomSpec, centres, rng) -> bool:
    """Fat, muscle, the lungs beside the thoracic column and gas blobs; returns whether lungs were painted."""
    sl, X, Y, Z = canvas.axes()
    half_w, front, back = (a.astype(np.float32)[:, None, None] for a in _torso_outline(spec, centres, Z[:, 0, 0]))
    half_d = (back - front) / 2
    # the outline is an ellipse in each slice: per row (z, y), how far from x = 0 the skin
    # and the fat's inner edge lie
    y2 = ((Y - (back - half_d)) / half_d) ** 2  # (nz, ny, 1)
    inner = (1.0 - spec.fat_mm / half_d) ** 2
    skin_x = half_w * np.sqrt(np.clip(1.0 - y2, 0.0, None))
    muscle_x = half_w * np.sqrt(np.clip(inner - y2, 0.0, None))
    hu, ax_ = canvas.hu, np.abs(X)
    np.copyto(hu, HU_FAT, where=ax_ <= skin_x)
    np.copyto(hu, HU_SOFT, where=ax_ <= muscle_x)
    # lungs beside the thoracic column
    zt, zb = centres[CHAIN.index("T1"), 2] + 10, centres[CHAIN.index("T11"), 2]
    lungs = bool(Z.max() > zb and Z.min() < zt)
    if lungs:
        zc, hz = (zt + zb) / 2, (zt - zb) / 2
        w = spec.torso_scale * 140.0
        spine_y = np.interp(zc, centres[::-1, 2], centres[::-1, 1])
        for side in (-1, 1):
            c = np.array([side * 0.5 * w, spine_y - 35.0 - 40.0 * spec.torso_scale, zc])
            ax = np.array([0.4 * w, 80.0 * spec.torso_scale, hz])
            lsl, lX, lY, lZ = canvas.axes(c - ax, c + ax)
            lung = ((lX - c[0]) / ax[0]) ** 2 + ((lY - c[1]) / ax[1]) ** 2 + ((lZ - c[2]) / ax[2]) ** 2 <= 1.0
            hu[lsl][lung & (np.abs(lX) <= muscle_x[lsl[0], lsl[1]])] = HU_LUNG
    # bowel gas in the abdomen
    for _ in range(spec.gas_blobs):
        level = rng.uniform(CHAIN.index("L1"), CHAIN.index("L5"))
        c = np.array([rng.uniform(-90, 90),
                      np.interp(level, np.arange(len(CHAIN)), centres[:, 1]) - rng.uniform(40, 90),
                      np.interp(level, np.arange(len(CHAIN)), centres[:, 2])])
        ax = rng.uniform(8, 25, size=3)
        bsl, bX, bY, bZ = canvas.axes(c - ax, c + ax)
        m = ((bX - c[0]) / ax[0]) ** 2 + ((bY - c[1]) / ax[1]) ** 2 + ((bZ - c[2]) / ax[2]) ** 2 <= 1
        hu[bsl][m] = -900.0
    return lungs


def _paint_vertebra(canvas: _Canvas, spec: PhantomSpec, name: str, c, F, dim, rng,
                    rib_ends: dict) -> np.ndarray | None:
    """Paints one vertebra; returns its body centroid (mm), or None if the body is off the canvas.
    A thoracic vertebra's ribs are painted too, their front ends put in rib_ends[(name, side)]."""
    W, D, H, disc = dim
    density = spec.bone_density
    label = VERSE_NUMBER[name]
    fracture = spec.fractures.get(name, 0.0)
    # The body's cortical shell is a few tenths of a millimetre thick (0.38 mm on average in the lumbar
    # spine: Silva et al., "Direct and computed tomography thickness measurements of the human, lumbar
    # vertebral shell and endplate", Bone 15(4):409-414, 1994), thinner than any CT voxel: a CT shows it
    # as a one-voxel rim of compact and cancellous bone mixed by their shares of the voxel. The 2 mm
    # shell at 600-1400 HU of engine 6 drew each body as a bright box outline, far sharper than in the
    # radiographs of patient CTs (docs/realism_sheet.png).
    shell = canvas.voxel
    trabecular = spec.trabecular_hu + 150.0 * fracture
    rim_hu = trabecular + (spec.cortical_hu - trabecular) * min(1.0, spec.cortex_mm / canvas.voxel)
    burst = name in spec.burst
    if burst:  # a burst fracture spreads the crushed body out
        W, D = W * (1.0 + 0.4 * fracture), D * (1.0 + 0.3 * fracture)
    reach = 0.6 * max(W, D, H) + 2.0  # the body only: the other parts are tubes
    sl, X, Y, Z = canvas.axes(c - reach, c + reach)
    lx, ly, lz = _local(X, Y, Z, c, F)
    # body: elliptic cylinder with a waist and dished end plates; a compression fracture
    # lowers the anterior end plate more than the posterior one (a wedge), a burst fracture all of it.
    # The end plates are flat over their rim, the epiphyseal ring, and concave over the central 70 % of
    # their diameter, the lower one (cranial to its disc) twice as deep as the upper one (1.5 against 0.7 mm
    # on average: Wang, Battie and Videman, "A morphological study of lumbar vertebral endplates", Eur Spine J
    # 21(11):2316-2323, 2012). Engine 10 dished them over their whole width, so that no part lay flat.
    waist = 1.0 - 0.08 * (1.0 - np.clip(2 * lz / H, -1, 1) ** 2)
    top = H / 2 - fracture * H * (1.0 if burst else 0.5 - ly / D)
    ell = (lx / (W / 2 * waist)) ** 2 + (ly / (D / 2 * waist)) ** 2
    central = np.clip(1.0 - ell / 0.7 ** 2, 0.0, 1.0)
    dish_top, dish_bottom = 0.47 * spec.endplate_mm * central, spec.endplate_mm * central
    body = (ell <= 1) & (lz >= -H / 2 + dish_bottom) & (lz <= top - dish_top)
    inside_plates = (lz >= -H / 2 + shell + dish_bottom) & (lz <= top - shell - dish_top)
    core = (((lx / (W / 2 * waist - shell)) ** 2 + (ly / (D / 2 * waist - shell)) ** 2) <= 1) & inside_plates
    # The bony end plate is denser than the side wall (its rim the densest: 32.5 % above its centre in CT,
    # Segami et al., "Regional distribution of computed tomography attenuation across the lumbar endplate",
    # 2021), and a CT voxel adds the dense subchondral bone under it. A flat plate across the whole body seen
    # edge-on, as both views see it, draws the bright line a radiograph shows at every end plate; engine 10
    # gave it the side wall's 0.25-0.7 mm.
    plates = body & ~inside_plates
    plate_hu = trabecular + (spec.cortical_hu - trabecular) * min(1.0, spec.endplate_cortex_mm / canvas.voxel)
    hu, labels = canvas.hu[sl], canvas.labels[sl]
    hu[body] = rim_hu * density
    hu[plates] = np.minimum(plate_hu * (1.0 + 0.3 * (1.0 - central[plates])), spec.cortical_hu) * density
    k, j, i = np.nonzero(core)
    tile = _trabecular_tile()
    o = rng.integers(0, tile.shape[0], size=3)
    n = tile.shape[0]
    hu[k, j, i] = trabecular * density \
        * np.clip(1.0 + spec.texture * tile[(k + o[0]) % n, (j + o[1]) % n, (i + o[2]) % n], 0.4, 1.6)
    labels[body] = label
    if not body.any():
        return None
    centroid = np.array([np.broadcast_to(a, body.shape)[body].mean() for a in (X, Y, Z)], dtype=np.float64)

    def world(p):
        return c + np.asarray(p, dtype=np.float64) @ F.T

    def paint(points, radius, value=800.0):
        idx = canvas.tube(world(points), radius)
        keep = canvas.labels[idx] != label  # posterior elements never overwrite the body
        idx = tuple(i[keep] for i in idx)
        canvas.hu[idx] = value * density
        canvas.labels[idx] = label

    def paint_plate(points, offsets, radius, value=800.0):
        """Tubes along the same polyline, each shifted by one of `offsets` (local mm): a plate or an oval bar."""
        for offset in offsets:
            paint(np.asarray(points, dtype=np.float64) + offset, radius, value)

    s = spec.scale
    # bony lips around the front and sides of both end plates, cortex over cancellous bone as dense as the rim
    if name in spec.osteophytes:
        for z_rim, lip in ((H / 2, 1.0), (-H / 2, -1.0)):
            arc = [(W / 2 * 1.02 * np.cos(a), D / 2 * 1.02 * np.sin(a), z_rim + lip * 2.0 * abs(np.cos(a)))
                   for a in np.linspace(-np.pi * 0.95, -np.pi * 0.05, 12)]
            paint(arc, rng.uniform(1.5, 3.0), rim_hu)
    if name == "S1":
        _paint_sacrum(canvas, spec, c, F, dim, world, paint)
        return centroid
    if name == "C1":  # the atlas: a ring with lateral masses instead of a body
        ring = [(22 * s * np.sin(a), D / 2 + 16 * s - 22 * s * np.cos(a), 0)
                for a in np.linspace(0.5, 2 * np.pi - 0.5, 24)]
        paint(ring, 3.5 * s)
        for side in (-1, 1):
            paint([(side * 17 * s, D / 2 + 4, -6), (side * 17 * s, D / 2 + 4, 6)], 7 * s)
            paint([(side * 17 * s, D / 2 + 4, 0), (side * 38 * s, D / 2 + 6, 0)], 3 * s)
        return centroid
    if name == "C2":  # the dens rises from the body of the axis
        paint([(0, 0, H / 2), (0, 0, H / 2 + 14 * s)], 5 * s, 1000.0)
    region = name[0]
    p_len = {"C": 6, "T": 8, "L": 10}[region] * s
    l_len = {"C": 10, "T": 12, "L": 14}[region] * s
    sp_len, sp_drop = {"C": (18, 6), "T": (32, 22), "L": (30, 4)}[region]
    tp_len = {"C": 8, "T": 22, "L": 30}[region] * s
    r_ped = max(2.5, 0.12 * W)
    xp = 0.32 * W
    y0, y1 = D / 2 - 3, D / 2 + p_len
    zp = 0.15 * H
    # The posterior arch reaches down to the disc below (Bogduk, "Clinical Anatomy of the Lumbar Spine and
    # Sacrum", 4th ed., 2005, ch. 2 and 3): the laminae cover the lower half of the body, and the inferior
    # articular processes hang from them to meet the superior ones of the next vertebra beside the disc,
    # where the facet joints lie. Engine 9's arch ended a third of the body above its lower end plate.
    # Engine 13 drew the pedicles as round tubes, the articular processes as rods 5-7 mm thick and the
    # transverse processes as solid bone 8-9 mm round: in a lateral view the posterior column was faint
    # but for a bright dot per level where both transverse processes lie end-on, a landmark a patient's
    # radiograph does not show. The pedicles now have their measured oval section (pedicle_dimensions),
    # the articular processes are plates as wide as their facets (about 14 mm in the lumbar spine, 10 mm
    # above: Panjabi et al., "Articular facets of the human spine", Spine 18(10):1298-1310, 1993), and the
    # transverse processes are flattened front to back, cancellous bone in a thin cortex.
    pedicle_w, pedicle_h = pedicle_dimensions(name) * s
    r_oval, long_half = min(pedicle_w, pedicle_h) / 2, max(pedicle_w, pedicle_h) / 2
    facet = (14.0 if region == "L" else 10.0) * s
    r_tp = 2.0 * s
    # the oval's long axis: vertical, but across for a pedicle wider than tall (L5)
    oval_axis = np.array([0.0, 0.0, 1.0]) if pedicle_h >= pedicle_w else np.array([1.0, 0.0, 0.0])
    oval = np.linspace(r_oval - long_half, long_half - r_oval, 3)[:, None] * oval_axis
    r_thin = 0.55 * r_ped  # laminae and articular processes
    facet_plate = np.linspace(r_thin - facet / 2, facet / 2 - r_thin, 3)[:, None] * [0.0, 1.0, 0.0]
    for side in (-1, 1):
        paint_plate([(side * xp, y0, zp), (side * xp, y1, zp)], oval, r_oval)  # pedicle
        paint_plate([(side * xp, y1, zp), (0, y1 + l_len, zp - 0.15 * H)],
                    [(0.0, 0.0, dz) for dz in (0.2 * H, -0.2 * H, -0.55 * H)], r_thin)  # lamina
        paint_plate([(side * xp, y1 + 2, zp), (side * xp, y1 + 2, H / 2 + 0.3 * disc)], facet_plate,
                    r_thin)  # superior articular process
        paint_plate([(side * 0.8 * xp, y1 + 5, zp - 0.2 * H), (side * 0.8 * xp, y1 + 5, -H / 2 - 0.6 * disc)],
                    facet_plate, r_thin)  # inferior articular process
        tip = (side * (W / 2 + tp_len), y1 + (6 if region == "T" else -2), zp)
        # transverse process: a plate about a third of the body high
        paint_plate([(side * xp, y1, zp), tip], [(0.0, 0.0, dz) for dz in (-0.12 * H, 0.0, 0.12 * H)], r_tp,
                    HU_PROCESS)
        if region == "T":
            rib_ends[(name, side)] = _paint_rib(canvas, spec, name, world(tip), side)
    # the spinous process: a lumbar one is a tall plate over the lower half of the body
    sp = [(0, y1 + l_len, 0), (0, y1 + l_len + sp_len * s, -sp_drop * s)]
    paint_plate(sp, [(0.0, 0.0, dz) for dz in ((0.0, -0.25 * H, -0.5 * H) if region == "L" else (0.0, -4 * s))],
                3.0 * s)
    if name in spec.implant_levels:
        for side in (-1, 1):  # pedicle screws converge medially into the body
            head = (side * (xp + 8 * s), y1 + 8 * s, zp)
            paint([head, (side * 0.08 * W, -0.25 * D, zp)], 3.0 * s, HU_METAL / density)
    return centroid


def _paint_rib(canvas, spec, name, tp_tip, side) -> np.ndarray:
    """Paints a rib from a transverse process's tip around the chest; returns its front end (mm)."""
    level = CHAIN.index(name) - CHAIN.index("T1")  # 0..11
    a = spec.torso_scale * np.interp(level, [0, 3, 7, 11], [70, 115, 135, 130])
    b = spec.torso_scale * np.interp(level, [0, 3, 7, 11], [55, 85, 100, 95])
    x0 = abs(tp_tip[0])
    phi0 = np.arcsin(np.clip(x0 / a, 0, 0.95))
    phi1 = np.pi - np.interp(level, [0, 11], [0.7, 1.2])
    yc = tp_tip[1] + 8 - b * np.cos(phi0)
    phi = np.linspace(phi0, phi1, 40)
    drop = np.interp(level, [0, 11], [25, 45])
    pts = np.stack([tp_tip[0] + side * (a * np.sin(phi) - x0), yc + b * np.cos(phi),
                    tp_tip[2] - drop * (phi - phi0) / (phi1 - phi0)], axis=1)
    idx = canvas.tube(np.vstack([tp_tip, pts]), 4.0 * spec.scale)
    keep = canvas.labels[idx] == 0
    idx = tuple(i[keep] for i in idx)
    canvas.hu[idx] = 550.0 * spec.bone_density
    return pts[-1]


def _paint_sacrum(canvas, spec, c, F, dim, world, paint):
    W, D, H, _ = dim
    s = spec.scale
    # S2-S5: shrinking segments curving posteriorly (sacral kyphosis)
    prev = (0.0, 0.0, -H / 2)
    for k in range(1, 5):
        centre = (0.0, 6.0 * k * k * s / 4, -H / 2 - 16 * k * s)
        paint([prev, centre], (0.3 - 0.05 * k) * W, 450.0)
        prev = centre
    for side in (-1, 1):
        paint([(side * W / 3, 5, 0), (side * (W / 2 + 25 * s), 15 * s, -10 * s)], 12 * s, 500.0)  # ala
        # iliac wing: a thin tilted plate beside the sacrum
        centre = world((side * (W / 2 + 55 * s), 10 * s, 5 * s))
        normal = F @ np.array([side * np.cos(0.5), -np.sin(0.5), 0.0])
        u = F @ np.array([side * np.sin(0.5), np.cos(0.5), 0.0])
        v = F[:, 2]
        ext = 70 * s * np.abs(u) + 55 * s * np.abs(v) + 6.0 * np.abs(normal)  # the plate's bounding box
        sl, X, Y, Z = canvas.axes(centre - ext, centre + ext)
        d = (X - centre[0], Y - centre[1], Z - centre[2])
        dn = d[0] * normal[0] + d[1] * normal[1] + d[2] * normal[2]
        du = d[0] * u[0] + d[1] * u[1] + d[2] * u[2]
        dv = d[0] * v[0] + d[1] * v[1] + d[2] * v[2]
        e = (du / (70 * s)) ** 2 + (dv / (55 * s)) ** 2
        plate = (e <= 1) & (np.abs(dn) <= 3.0 + 3.0 * (e > 0.85))  # a thicker crest at the rim
        sub_hu, sub_lab = canvas.hu[sl], canvas.labels[sl]
        sub_hu[plate & (sub_lab == 0)] = 650.0 * spec.bone_density


def _paint_discs(canvas, spec, centres, frames, dims, painted):
    for i in range(len(CHAIN) - 1):
        if CHAIN[i] not in painted or CHAIN[i + 1] not in painted:
            continue
        upper_bottom = centres[i] - frames[i][:, 2] * dims[i, 2] / 2
        lower_top = centres[i + 1] + frames[i + 1][:, 2] * dims[i + 1, 2] / 2
        c = (upper_bottom + lower_top) / 2
        F = (frames[i] + frames[i + 1]) / 2
        F, _ = np.linalg.qr(F)
        F *= np.sign(np.diag(F))
        h = np.linalg.norm(upper_bottom - lower_top) + 2
        W, D = (dims[i, :2] + dims[i + 1, :2]) / 2
        sl, X, Y, Z = canvas.axes(c - W, c + W)
        lx, ly, lz = _local(X, Y, Z, c, F)
        disc = ((lx / (W / 2)) ** 2 + (ly / (D / 2)) ** 2 <= 1) & (np.abs(lz) <= h / 2) & (canvas.labels[sl] == 0)
        canvas.hu[sl][disc] = HU_DISC
        if CHAIN[i] in spec.cage_levels:  # a PEEK cage with three metal markers
            canvas.hu[sl][disc & (np.abs(lx) <= 0.3 * W) & (np.abs(ly) <= 0.25 * D)] = 300.0
            for mx, my in ((-0.28 * W, 0.0), (0.28 * W, 0.0), (0.0, -0.23 * D)):
                pin = [c + F @ np.array([mx, my, -h / 2]), c + F @ np.array([mx, my, h / 2])]
                canvas.hu[canvas.tube(np.array(pin), 0.8)] = HU_METAL


def _paint_skull(canvas, spec, centres):
    c1 = centres[0]
    centre = c1 + np.array([0.0, 5.0, 62.0]) * spec.scale
    ax = np.array([70.0, 90.0, 70.0]) * spec.scale
    sl, X, Y, Z = canvas.axes(centre - ax, centre + ax)
    e = ((X - centre[0]) / ax[0]) ** 2 + ((Y - centre[1]) / ax[1]) ** 2 + ((Z - centre[2]) / ax[2]) ** 2
    inner = (((X - centre[0]) / (ax[0] - 7)) ** 2 + ((Y - centre[1]) / (ax[1] - 7)) ** 2
             + ((Z - centre[2]) / (ax[2] - 7)) ** 2)
    hu = canvas.hu[sl]
    hu[(e <= 1) & (Z > c1[2] + 10)] = 1300.0 * spec.bone_density
    hu[(inner <= 1) & (Z > c1[2] + 10)] = 35.0  # brain


def spine_landmarks(spec: PhantomSpec) -> context.Landmarks:
    """What the context painters need of a phantom's spine and outline."""
    centres, _, dims = spine_curve(spec)
    return context.Landmarks(
        CHAIN, centres, dims, front=lambda z: _torso_outline(spec, centres, z)[1],
        torso_scale=spec.torso_scale, bone_density=spec.bone_density)


def make_phantom(spec: PhantomSpec, rng: np.random.Generator) -> Phantom:
    """Renders the levels of spec (consecutive names from CHAIN) into a volume
    that holds them with a margin, and returns the body centroids."""
    centres, frames, dims = spine_curve(spec)
    idx = [CHAIN.index(n) for n in spec.levels]
    if idx != list(range(idx[0], idx[0] + len(idx))):
        raise ValueError(f"levels must be consecutive in {CHAIN}, got {spec.levels}")
    top, bottom = centres[idx[0]], centres[idx[-1]]
    margin_z = 0.5 * (dims[idx[0], 2] + dims[idx[-1], 2]) + 20.0
    if "C1" in spec.levels:
        margin_top = 140.0 * spec.scale  # room for the skull base
    else:
        margin_top = margin_z
    if "S1" in spec.levels:
        margin_z += 150.0 * spec.scale  # room for the hips
    lo = np.array([0.0, 0.0, bottom[2] - margin_z])
    hi = np.array([0.0, 0.0, top[2] + margin_top])
    half_w, front, back = _torso_outline(spec, centres, np.linspace(lo[2], hi[2], 32))
    # hanging arms reach from the shoulders (C7-T1) to the elbows (about T10)
    arms_beside = spec.arms_down and idx[0] <= CHAIN.index("T10") and idx[-1] >= CHAIN.index("C7")
    arm_room = 110.0 * spec.torso_scale if arms_beside else 0.0
    lo[:2] = -half_w.max() - 5 - arm_room, front.min() - 5 - spec.table_mm
    hi[:2] = half_w.max() + 5 + arm_room, back.max() + 5
    canvas = _Canvas(lo, hi, spec.voxel_mm)
    lungs = _paint_soft_tissue(canvas, spec, centres, rng)
    landmarks = spine_landmarks(spec)
    context.paint_thorax(canvas, landmarks, rng)
    if lungs:
        context.paint_lung_vessels(canvas, landmarks, rng)
    context.paint_abdomen(canvas, landmarks, rng, spec.bowel_loops, spec.stool)
    context.paint_colon(canvas, landmarks, rng, spec.colon_gas)
    vertebrae, rib_ends = [], {}
    for i in idx:
        centroid = _paint_vertebra(canvas, spec, CHAIN[i], centres[i], frames[i], dims[i], rng, rib_ends)
        if centroid is not None:
            vertebrae.append({"label": CHAIN[i], "xyz_mm": centroid.tolist()})
    _paint_discs(canvas, spec, centres, frames, dims, set(spec.levels))
    context.paint_costal_cartilage(canvas, landmarks, rib_ends, spec.cartilage_hu)
    if "C1" in spec.levels:
        _paint_skull(canvas, spec, centres)
    _paint_rods(canvas, spec, centres, frames, dims)
    context.paint_shoulders(canvas, landmarks, rng, arms_beside)
    if idx[0] <= CHAIN.index("C4"):
        context.paint_mandible(canvas, landmarks)
    if "S1" in spec.levels:
        context.paint_hips(canvas, landmarks)
    if spec.table_mm:
        context.paint_table(canvas, front.min() - 3.0, spec.table_mm)
    affine = np.diag([spec.voxel_mm] * 3 + [1.0])
    affine[:3, 3] = canvas.origin
    return Phantom(Volume(canvas.hu, affine, canvas.labels), vertebrae, spec)


def _paint_rods(canvas, spec, centres, frames, dims):
    if not spec.implant_levels:
        return
    for side in (-1, 1):
        heads = []
        for name in spec.implant_levels:
            i = CHAIN.index(name)
            W, D, H, _ = dims[i]
            region = name[0]
            y1 = D / 2 + {"T": 8, "L": 10}[region] * spec.scale
            local = np.array([side * (0.32 * W + 8 * spec.scale), y1 + 8 * spec.scale + 4, 0.15 * H])
            heads.append(centres[i] + frames[i] @ local)
        ext = frames[CHAIN.index(spec.implant_levels[0])][:, 2] * 10
        pts = np.vstack([heads[0] + ext, np.array(heads), heads[-1] - ext])
        idx = canvas.tube(pts, 3.0 * spec.scale)
        canvas.hu[idx] = HU_METAL

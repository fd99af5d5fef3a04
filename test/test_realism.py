"""The data engine's realism (issue 11): the C-arm image chain (x2p_ros/data/carm.py,
the materials of drr.py), the vertebrae's morphology and pathologies
(phantom.py) and the context anatomy (context.py): ground truth on bone,
determinism, ranges."""
import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial.distance import cdist

from x2p_ros import geometry
from x2p_ros.data import carm, context, drr, realism
from x2p_ros.data.phantom import (
    CHAIN,
    HU_LUNG,
    HU_PROCESS,
    VERSE_NUMBER,
    PhantomSpec,
    _Canvas,
    level_dimensions,
    make_phantom,
    pedicle_dimensions,
    spine_curve,
    spine_landmarks,
)
from x2p_ros.data.synth import SynthConfig, make_case, render_pair
from x2p_ros.data.volume import Volume

# --- physics -----------------------------------------------------------------

def test_materials_split_hu_into_water_and_cortical_bone():
    water, bone = drr.materials(torch.tensor([-1000.0, -500.0, 0.0, 800.0, drr.HU_CORTICAL_BONE, 14000.0])).numpy()
    np.testing.assert_allclose(water, [0.0, 0.5, 1.0, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(bone, [0.0, 0.0, 0.0, 800.0 / drr.HU_CORTICAL_BONE, 1.0, 14000.0 / drr.HU_CORTICAL_BONE])
    assert 1450 < drr.HU_CORTICAL_BONE < 1750  # cortical bone at a CT's 70 keV
    assert drr.MU_WATER_PER_MM == pytest.approx(0.0193, abs=0.001)


def test_spectrum_hardens_with_filtration_and_voltage_and_refuses_bad_settings():
    def mean_energy(kvp, al):
        e, w = carm.spectrum(kvp, al)
        assert w.sum() == pytest.approx(1.0) and np.all(w >= 0) and e.max() < kvp
        return float(e @ w)
    assert mean_energy(80, 2.5) < mean_energy(80, 6.0)
    assert mean_energy(60, 3.0) < mean_energy(120, 3.0)
    for kvp in (20.0, 200.0):
        with pytest.raises(ValueError, match="tube voltage"):
            carm.spectrum(kvp, 3.0)


def test_polychromatic_primary_hardens_the_beam_and_bone_contrast_falls_with_kvp():
    water = torch.tensor([50.0, 100.0, 200.0, 0.0])
    bone = torch.tensor([0.0, 0.0, 0.0, 10.0])
    lines = torch.stack([water, bone])[:, None, :]  # (2, 1, 4)
    for kvp in (60.0, 120.0):
        log = -np.log(carm.primary(lines, kvp, 3.0)[0])
        # beam hardening: each further mm of water attenuates less than the first ones
        assert log[1] / 100 < log[0] / 50 and log[2] / 200 < log[1] / 100
    bone_60 = -np.log(carm.primary(lines, 60.0, 3.0)[0, 3])
    bone_120 = -np.log(carm.primary(lines, 120.0, 3.0)[0, 3])
    assert bone_60 > 1.5 * bone_120  # calcium's photoelectric absorption at low energies
    assert carm.primary(torch.zeros(2, 3, 3), 80.0, 3.0) == pytest.approx(np.ones((3, 3)))  # air: 1


def _phantom_lines(size=128):
    rng = np.random.default_rng(4)
    spec = PhantomSpec.sample(rng, ["L1", "L2", "L3"], voxel_mm=1.5)
    spec.colon_gas = spec.gas_blobs = spec.bowel_loops = spec.stool = 0  # a dense middle (the spine) between soft
    # tissue, no gas: what the scatter test needs
    phantom = make_phantom(spec, rng)
    centre = np.mean([v["xyz_mm"] for v in phantom.vertebrae], axis=0)
    volume = phantom.volume.transformed(np.vstack([np.c_[np.eye(3), -centre], [0, 0, 0, 1]]))
    P, _ = geometry.carm_view("ap", 550.0, 1000.0, 160.0, size)
    return drr.line_integral(volume, P, (size, size))


@pytest.fixture(scope="module")
def lines():
    return _phantom_lines()


def _flat(look_kwargs):
    return carm.Look(**{"electronic_noise": 0.0, "scatter": 0.0, "blur_px": 0.0, **look_kwargs})


def test_image_chain_is_deterministic_by_seed_and_marks_the_unexposed_field(lines):
    look = _flat(dict(intensifier=True, field_radius=0.5, vignetting=0.3, shutters=(0.1, 0.0),
                      dark_surround=False, edge_gain=1.0, bits=16))
    a = carm.image(lines, look, np.random.default_rng(1))
    b = carm.image(lines, look, np.random.default_rng(1))
    c = carm.image(lines, look, np.random.default_rng(2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)  # quantum noise
    assert a.dtype == np.uint16 and a.shape == (128, 128)
    assert a[0, 0] == a[-1, -1] == 65535  # corners: outside the round field, shown white here
    assert np.all(a[:, :10] == 65535)  # behind the left shutter
    field = carm.exposed_field(look, a.shape)
    assert field[64, 64] == 1.0 and field[0, 0] == 0.0 and field[64, 5] == 0.0
    inside = a[field == 1.0]
    assert inside.min() < 1000 and inside.max() > 60000  # windowed to the full range


def test_eight_bit_output_has_256_levels(lines):
    image = carm.image(lines, _flat(dict(bits=8)), np.random.default_rng(0))
    levels = np.unique(image)
    assert len(levels) <= 256 and np.all(levels % 257 == 0)
    assert len(np.unique(carm.image(lines, _flat(dict(bits=16)), np.random.default_rng(0)))) > 256


def _roughness(image):
    x = image.astype(np.float64)[32:96, 32:96]
    return np.abs(np.diff(x, 2, axis=1)).mean()  # the fine detail: second differences


def test_dose_blur_and_edge_enhancement_change_the_image_as_they_should(lines):
    low, high = (_roughness(carm.image(lines, _flat(dict(photons=p)), np.random.default_rng(0)))
                 for p in (100.0, 1e6))
    assert low > 2 * high  # less dose, more quantum noise
    sharp = _roughness(carm.image(lines, _flat(dict(photons=1e7)), np.random.default_rng(0)))
    blurred = _roughness(carm.image(lines, _flat(dict(photons=1e7, blur_px=2.0)), np.random.default_rng(0)))
    enhanced = _roughness(carm.image(lines, _flat(dict(photons=1e7, edge_gain=1.5)), np.random.default_rng(0)))
    assert blurred < 0.8 * sharp < enhanced


def test_vignetting_darkens_the_rim_of_an_intensifier_field():
    lines = torch.zeros(2, 129, 129)  # air: any structure is the chain's
    look = _flat(dict(photons=1e8, intensifier=True, field_radius=0.55, vignetting=0.4, window=(0.0, 100.0)))
    image = carm.image(lines, look, np.random.default_rng(0)).astype(float)
    assert image[64, 64] < image[64, 10]  # less light at the rim: higher "attenuation" (bone bright)


def test_looks_cover_their_ranges():
    rng = np.random.default_rng(0)
    looks = [carm.Look.sample(rng, 512) for _ in range(300)]
    assert all(60 <= look.kvp <= 120 and 2.5 <= look.filtration_mm_al <= 6 for look in looks)
    assert all(300 <= look.photons <= 2e4 and 0 <= look.scatter <= 0.3 for look in looks)
    assert {look.bits for look in looks} == {8, 16}
    assert {look.intensifier for look in looks} == {True, False}
    assert any(look.shutters != (0.0, 0.0) for look in looks) and any(look.edge_gain == 0 for look in looks)
    assert all(look.field_radius >= 0.5 for look in looks)  # the inscribed circle at least
    # a smaller image bins the detector's pixels: more photons per pixel, sharper in pixels
    small = carm.Look.sample(np.random.default_rng(0), 256)
    large = carm.Look.sample(np.random.default_rng(0), 512)
    assert small.photons == pytest.approx(4 * large.photons) and small.blur_px == pytest.approx(large.blur_px / 2)


def test_synthetic_vertebrae_lie_inside_both_exposed_fields():
    for seed in range(6):
        _, Ps, _, vertebrae, info = make_case(seed, SynthConfig(size=128))
        xyz = np.array([v["xyz_mm"] for v in vertebrae])
        assert len(vertebrae) >= 3
        for view in ("ap", "lat"):
            look = carm.Look(**{**info["looks"][view], "shutters": tuple(info["looks"][view]["shutters"]),
                                "window": tuple(info["looks"][view]["window"])})
            uv = geometry.project(Ps[view], xyz)
            assert np.all(carm.inside_field(look, (128, 128), uv, 0.0)), f"seed {seed} {view}"


def test_each_view_draws_its_noise_from_its_own_stream(monkeypatch):
    # quantum noise takes a varying count of random numbers: drawn from the shared stream, the LAT view's
    # noise and look depended on what the AP image held (engine 10 and before)
    streams, images = [], []
    record = carm.image

    def recording(lines, look, rng):
        streams.append(rng.bit_generator.state["state"])
        return record(lines, look, rng)

    monkeypatch.setattr(carm, "image", recording)
    g = np.arange(-30.0, 31.0)
    Z, Y, X = np.meshgrid(g, g, g, indexing="ij")
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = -30.0
    for ball_hu in (40.0, 1500.0):  # two patients alike but for a small bone ball in soft tissue
        hu = np.where((X - 12) ** 2 + Y ** 2 + Z ** 2 <= 25.0, ball_hu, 40.0).astype(np.float32)
        out = render_pair(Volume(hu, affine), [{"label": "L1", "xyz_mm": [0.0, 0.0, 0.0]}], np.zeros(3), 100.0,
                          np.random.default_rng(3), SynthConfig(size=64))
        images.append(out[0])
    assert not np.array_equal(images[0]["ap"], images[1]["ap"])
    assert streams[0] == streams[2] and streams[1] == streams[3]  # AP's stream, LAT's stream: as before
    assert streams[0] != streams[1]


# --- the spine -----------------------------------------------------------------

def _phantom(levels, seed=0, **spec_fields):
    rng = np.random.default_rng(seed)
    spec = PhantomSpec.sample(rng, levels, voxel_mm=1.0)
    spec.fractures, spec.burst, spec.implant_levels, spec.cage_levels = {}, [], [], []
    spec.degenerated, spec.osteophytes, spec.scoliosis_mm = {}, [], 0.0
    for key, value in spec_fields.items():
        setattr(spec, key, value)
    return make_phantom(spec, rng)


def _body(phantom, name):
    return phantom.volume.labels == VERSE_NUMBER[name]


def test_phantoms_are_deterministic_by_seed():
    a, b = _phantom(["L2", "L3", "L4"], seed=3), _phantom(["L2", "L3", "L4"], seed=3)
    np.testing.assert_array_equal(a.volume.hu, b.volume.hu)
    assert a.vertebrae == b.vertebrae
    assert not np.array_equal(a.volume.hu, _phantom(["L2", "L3", "L4"], seed=4).volume.hu)


def test_trabecular_bone_is_textured_inside_a_thin_partial_volume_cortex():
    phantom = _phantom(["L2", "L3", "L4"], texture=0.4, trabecular_hu=200.0, cortical_hu=1600.0, cortex_mm=0.4,
                       bone_density=1.0)
    v = next(v for v in phantom.vertebrae if v["label"] == "L3")
    k, j, i = np.round(phantom.volume.world_to_voxel([v["xyz_mm"]])[0][::-1]).astype(int)
    core = phantom.volume.hu[k - 4:k + 5, j - 4:j + 5, i - 4:i + 5]
    assert 100 < np.median(core) < 300 and core.std() > 30  # cancellous, with a grain
    body = _body(phantom, "L3")
    rim_hu = 200.0 + (1600.0 - 200.0) * 0.4  # 0.4 mm of compact bone in a 1 mm voxel, the rest cancellous
    rim = body & np.isclose(phantom.volume.hu, rim_hu)
    assert rim.sum() > 200
    # one voxel thick: its voxels touch the outside of the vertebra (26-neighbourhood), all but those
    # that the pedicles cover
    outside = ndimage.binary_dilation(~body, np.ones((3, 3, 3)))
    assert (rim & outside).sum() > 0.9 * rim.sum()
    # a thicker cortex is a denser rim; one thicker than the voxel fills it with compact bone
    thick = _phantom(["L2", "L3", "L4"], texture=0.4, trabecular_hu=200.0, cortical_hu=1600.0, cortex_mm=2.0,
                     bone_density=1.0)
    assert np.isclose(thick.volume.hu, 1600.0).sum() > 200


def _local_bone(phantom, name, frame_of=None):
    """The voxels labelled as vertebra `name`, in the local frame of vertebra `frame_of` (default: its own;
    x lateral, y posterior, z superior, mm from its centre), with that one's (width, depth, height, disc below)."""
    centres, frames, dims = spine_curve(phantom.spec)
    i = CHAIN.index(frame_of or name)
    xyz = phantom.volume.voxel_to_world(np.argwhere(phantom.volume.labels == VERSE_NUMBER[name])[:, ::-1])
    return (xyz - centres[i]) @ frames[i], dims[i]


def test_the_posterior_arch_reaches_the_disc_below_where_the_facet_joints_are():
    phantom = _phantom(["L2", "L3", "L4"], seed=5)
    local, (W, D, H, disc) = _local_bone(phantom, "L3")
    arch = local[local[:, 1] > D / 2 + 2]  # behind the body
    beside_disc = arch[(arch[:, 2] < -H / 2 - 0.3 * disc)]
    # the inferior articular processes, on both sides, at the level of the disc below (not the body's)
    assert (beside_disc[:, 0] < -5).sum() > 20 and (beside_disc[:, 0] > 5).sum() > 20
    # the lumbar spinous process covers the lower half of the body
    spinous = arch[(np.abs(arch[:, 0]) < 4) & (arch[:, 1] > D / 2 + 35)]
    assert spinous[:, 2].min() < -0.5 * H and spinous[:, 2].max() > 0
    # a thoracic arch reaches its disc too, and no arch reaches into the next vertebra's body
    thoracic = _phantom(["T6", "T7", "T8"], seed=5)
    local, (W, D, H, disc) = _local_bone(thoracic, "T7")
    assert (local[(local[:, 1] > D / 2 + 2)][:, 2] < -H / 2 - 0.3 * disc).sum() > 20
    for p, upper, lower in ((phantom, "L2", "L3"), (phantom, "L3", "L4"), (thoracic, "T7", "T8")):
        local, (W, D, H, _) = _local_bone(p, upper, frame_of=lower)
        x, y, z = local.T
        assert not np.any(((x / (W / 2)) ** 2 + (y / (D / 2)) ** 2 < 0.8) & (np.abs(z) < H / 2 - 2))


def _extent(points, axis):
    return points[:, axis].max() - points[:, axis].min() if len(points) else 0.0


@pytest.mark.parametrize("level, seed", [("L3", 5), ("L5", 6), ("T6", 7)])
def test_pedicles_facets_and_transverse_processes_have_their_measured_shapes(level, seed):
    i = CHAIN.index(level)
    phantom = _phantom(CHAIN[i - 1:i + 2], seed=seed, bone_density=1.0)
    local, (W, D, H, disc) = _local_bone(phantom, level)
    s = phantom.spec.scale
    width, height = pedicle_dimensions(level) * s
    # the pedicle between the body and the arch, on the left: its oval section, to a voxel or two
    pedicle = local[(local[:, 1] > D / 2 + 0.5) & (local[:, 1] < D / 2 + 4) & (local[:, 0] > 0)]
    assert abs(_extent(pedicle, 2) - height) <= 2.5 and abs(_extent(pedicle, 0) - width) <= 2.5
    assert (_extent(pedicle, 2) > _extent(pedicle, 0)) == (height > width)  # L5's is wider than tall
    if level[0] == "L":
        # the superior articular process above the body: a plate about as wide (front to back) as its facet
        superior = local[(local[:, 2] > H / 2 + 1) & (local[:, 0] > 5) & (local[:, 1] > D / 2)]
        assert _extent(superior, 1) >= 14 * s - 2
        # the transverse process beyond the body: flat front to back, a third of the body high,
        # cancellous bone in a thin cortex
        bone = phantom.volume.labels == VERSE_NUMBER[level]
        hu = phantom.volume.hu[bone]
        process = (local[:, 0] > W / 2 + 5) & (local[:, 0] < W / 2 + 15)
        assert _extent(local[process], 1) <= 4 * s + 2 < _extent(local[process], 2)
        np.testing.assert_allclose(np.median(hu[process]), HU_PROCESS, rtol=0.02)


def _centroid_voxel(phantom, name):
    """(k, j, i): the voxel of a vertebra's ground-truth centroid."""
    v = next(v for v in phantom.vertebrae if v["label"] == name)
    return np.round(phantom.volume.world_to_voxel([v["xyz_mm"]])[0][::-1]).astype(int)


def _plate_rows(phantom, name, anterior_mm=0):
    """The lowest and highest voxel row (z) of a body's column at its centroid, or anterior_mm in front of it."""
    _, j, i = _centroid_voxel(phantom, name)
    rows = np.flatnonzero(_body(phantom, name)[:, j - anterior_mm, i])
    return rows.min(), rows.max()


def _lateral_rows(phantom, name, j):
    """Per voxel row (z): the HU of the vertebra's bone a lateral ray (along x) adds up, averaged over a 7 mm slab
    of rays about row j (y)."""
    band = slice(j - 3, j + 4)
    return np.where(_body(phantom, name)[:, band], phantom.volume.hu[:, band], 0.0).sum(axis=2).mean(axis=1)


def test_end_plates_are_dished_in_their_centre_flat_over_their_rim_and_a_burst_fracture_crushes_the_body():
    flat = _phantom(["L2", "L3", "L4"], endplate_mm=0.0)
    dished = _phantom(["L2", "L3", "L4"], endplate_mm=3.0)
    (low_flat, high_flat), (low_dished, high_dished) = _plate_rows(flat, "L3"), _plate_rows(dished, "L3")
    assert 2 <= low_dished - low_flat <= 4  # the lower end plate's concavity: 3 mm deep at the centre
    assert 0 <= high_flat - high_dished <= 2 and high_flat - high_dished < low_dished - low_flat  # the upper: half
    # the epiphyseal rim, outside the central 70 % of the diameter (the body is 34 mm deep), lies flat
    assert _plate_rows(dished, "L3", anterior_mm=15) == _plate_rows(flat, "L3", anterior_mm=15)
    burst = _phantom(["L2", "L3", "L4"], endplate_mm=0.0, fractures={"L3": 0.4}, burst=["L3"])
    assert _body(burst, "L3").sum() < _body(flat, "L3").sum()  # lower...
    width = lambda p: np.ptp(np.nonzero(_body(p, "L3").any(axis=(0, 1)))[0])  # noqa: E731
    assert width(burst) > width(flat) + 5  # ...and wider
    assert [v["label"] for v in burst.vertebrae] == ["L2", "L3", "L4"]  # the ground truth is still there


def test_end_plates_seen_edge_on_are_brighter_than_the_body_they_close():
    # the rows of bone a lateral ray crosses (along x), in a slab through the body's centre: at the lower end
    # plate the flat dense rim adds up to far more than at mid-height; engine 10's plates, as thin as the side
    # wall and dished over their whole width, did not. A straight column, so that the plates lie in voxel rows.
    straight = dict(texture=0.0, trabecular_hu=200.0, cortical_hu=1600.0, cortex_mm=0.3, endplate_mm=1.5,
                    bone_density=1.0, lordosis_mm=0.0, kyphosis_mm=0.0, lumbar_lordosis_mm=0.0)
    phantom = _phantom(["L2", "L3", "L4"], endplate_cortex_mm=1.2, **straight)
    j = _centroid_voxel(phantom, "L3")[1]
    rows = _lateral_rows(phantom, "L3", j)
    low, high = _plate_rows(phantom, "L3", anterior_mm=15)
    middle = np.median(rows[low + (high - low) // 4:high - (high - low) // 4])
    assert rows[low:low + 3].max() > 1.6 * middle and rows[high - 2:high + 1].max() > 1.6 * middle
    # where the end plate is the side wall's thin rim (engine 10's cortex), the rows add up to much less
    thin = _phantom(["L2", "L3", "L4"], endplate_cortex_mm=0.3, **straight)
    thin_rows = _lateral_rows(thin, "L3", j)
    assert thin_rows[low:low + 3].max() < 0.8 * rows[low:low + 3].max()


def test_degenerated_discs_narrow_and_osteophytes_and_cages_are_painted():
    rng = np.random.default_rng(0)
    spec = PhantomSpec.sample(rng, ["L3", "L4", "L5"])
    spec.degenerated, spec.fractures = {}, {}  # whatever the seed drew
    healthy = np.linalg.norm(np.diff(spine_curve(spec)[0], axis=0), axis=1)[CHAIN.index("L4")]
    spec.degenerated = {"L4": 0.4}
    narrowed = np.linalg.norm(np.diff(spine_curve(spec)[0], axis=0), axis=1)[CHAIN.index("L4")]
    assert narrowed < healthy - 3.0
    plain = _phantom(["L3", "L4", "L5"], seed=1)
    lipped = _phantom(["L3", "L4", "L5"], seed=1, osteophytes=["L4"])
    assert _body(lipped, "L4").sum() > _body(plain, "L4").sum() + 100  # bone beyond the body's rim
    caged = _phantom(["L3", "L4", "L5"], seed=1, cage_levels=["L4"], implant_levels=["L4", "L5"])
    metal = caged.volume.hu >= 10000
    z_l4, z_l5 = (v["xyz_mm"][2] for v in caged.vertebrae if v["label"] in ("L4", "L5"))
    zs = caged.volume.voxel_to_world(np.argwhere(metal)[:, ::-1])[:, 2]
    assert np.any((zs < z_l4) & (zs > z_l5))  # the cage's markers in the L4-L5 disc space


def test_body_and_disc_heights_vary_level_by_level_and_the_painted_body_follows():
    smooth_spec = PhantomSpec(levels=CHAIN)
    smooth = np.linalg.norm(np.diff(spine_curve(smooth_spec)[0], axis=0), axis=1)
    irregularity, lowest = [], []
    for seed in range(20):
        spec = PhantomSpec.sample(np.random.default_rng(seed), CHAIN)
        spec.degenerated, spec.fractures, spec.scoliosis_mm = {}, {}, 0.0
        assert spec.body_heights == PhantomSpec.sample(np.random.default_rng(seed), CHAIN).body_heights
        assert 0.88 <= min(spec.body_heights) and max(spec.body_heights) <= 1.12
        assert 0.5 * 0.7 <= min(spec.disc_heights) and max(spec.disc_heights) <= 1.25 * 1.3
        lowest.append(min(spec.disc_heights))
        steps = np.linalg.norm(np.diff(spine_curve(spec)[0], axis=0), axis=1) / (smooth * spec.scale)
        irregularity.append(np.std(np.diff(steps)))  # a step unlike its neighbour
    assert 0.02 < np.median(irregularity) < 0.15
    assert min(lowest) < 0.5  # degenerated columns: discs at half height (engine 10: never under 0.75 * 0.7)
    heights = []
    for factor in (0.88, 1.12):
        body_heights = [1.0] * len(CHAIN)
        body_heights[CHAIN.index("L3")] = factor
        phantom = _phantom(["L2", "L3", "L4"], seed=2, body_heights=body_heights)
        centre = next(v["xyz_mm"] for v in phantom.vertebrae if v["label"] == "L3")
        i, j, _ = np.round(phantom.volume.world_to_voxel(np.array([centre]))[0]).astype(int)
        heights.append(_body(phantom, "L3")[:, j, i].sum() * phantom.spec.voxel_mm)
    expected = 0.24 * phantom.spec.scale * level_dimensions("L3")[2]  # 1.12 - 0.88 of its height
    assert heights[1] - heights[0] == pytest.approx(expected, abs=2.0)


def test_disc_contrast_tells_dark_discs_from_bright_ones_along_a_tilted_spine():
    """Bodies 30 px apart along a tilted line: a dark band midway between them (a disc) gives a negative
    contrast, the same band at the bodies' centres a positive one, a flat image none."""
    v, u = np.mgrid[0:256, 0:256].astype(np.float64)
    direction = np.array([np.sin(0.2), np.cos(0.2)])  # (u, v) down the spine
    pixels = np.array([40.0, 20.0]) + np.arange(6)[:, None] * 30.0 * direction
    along = (u - 40.0) * direction[0] + (v - 20.0) * direction[1]
    phase = (along / 30.0) % 1.0
    band = (np.abs(phase - 0.5) < 0.15).astype(np.float64)
    noise = np.random.default_rng(0).normal(0, 0.01, band.shape)
    dark_discs, bright_discs = 1.0 - band + noise, band + noise
    assert realism.disc_contrast(dark_discs, pixels) < -0.5
    assert realism.disc_contrast(bright_discs, pixels) > 0.5
    assert abs(realism.disc_contrast(noise, pixels)) < 0.15  # noise alone, stretched to the window
    assert realism.spine_profile(dark_discs, pixels).shape == (5, len(realism.PHASES))
    # a step that leaves the image is left out; none inside: no figure
    assert realism.spine_profile(dark_discs, np.vstack([pixels, [[300.0, 300.0]]])).shape[0] == 5
    assert realism.disc_contrast(dark_discs, np.array([[300.0, 10.0], [300.0, 60.0]])) is None


# --- context -------------------------------------------------------------------

def test_context_anatomy_is_where_it_belongs():
    thorax = _phantom(["T5", "T6", "T7", "T8"], seed=2, arms_down=True, table_mm=25.0)
    vol = thorax.volume
    t7 = next(v["xyz_mm"] for v in thorax.vertebrae if v["label"] == "T7")
    k, j, i = np.round(vol.world_to_voxel([np.add(t7, [25.0, -75.0, 0.0])])[0][::-1]).astype(int)
    assert vol.hu[k, j, i] == context.HU_BLOOD  # the heart, in front of the spine, left
    _, j_spine, _ = np.round(vol.world_to_voxel([t7])[0][::-1]).astype(int)
    row = vol.hu[k, j_spine]
    assert np.sum(row == context.HU_MUSCLE) > 100  # the arms beside the chest
    assert np.sum((vol.hu >= 500) & (vol.labels == 0)) > 5000  # ribs, scapulae, sternum, humeri
    assert np.any(vol.hu[:, :3, :] == 700.0)  # the table's carbon skin in front
    pelvis = _phantom(["L4", "L5", "S1"], seed=2, table_mm=0.0)
    s1 = next(v["xyz_mm"] for v in pelvis.vertebrae if v["label"] == "S1")
    xyz = pelvis.volume.voxel_to_world(np.argwhere((pelvis.volume.hu > 400) & (pelvis.volume.labels == 0))[:, ::-1])
    assert np.any(xyz[:, 2] < s1[2] - 80)  # femoral heads and pubic rami below the sacrum
    abdomen = _phantom(["L1", "L2", "L3"], seed=5, gas_blobs=3)  # not left to the draw
    assert np.sum(abdomen.volume.hu <= -400) - np.sum(abdomen.volume.hu <= -990) > 1000  # gas inside the body


def test_context_never_paints_over_a_vertebra():
    rng = np.random.default_rng(7)
    spec = PhantomSpec.sample(rng, ["T11", "T12", "L1", "L2"])
    spec.bowel_loops, spec.stool = 30, 5
    phantom = make_phantom(spec, rng)
    labels, hu = phantom.volume.labels, phantom.volume.hu
    before, everything = hu[labels > 0].copy(), hu.copy()
    canvas, marks = _Canvas.of(phantom.volume), spine_landmarks(spec)
    context.paint_thorax(canvas, marks, rng)
    context.paint_abdomen(canvas, marks, rng, 40, 6)
    context.paint_shoulders(canvas, marks, rng, arms_down=True)
    context.paint_hips(canvas, marks)
    assert np.sum(hu != everything) > 1000  # the painters did paint (gas, above all)
    np.testing.assert_array_equal(hu[labels > 0], before)


def test_scatter_gamma_and_electronic_noise_act_as_they_should(lines):
    plain = _flat(dict(photons=1e7, window=(0.0, 100.0)))
    a = carm.image(lines, plain, np.random.default_rng(0)).astype(float)

    def centre_share(look):  # the spine's contrast against the whole image's
        image = carm.image(lines, look, np.random.default_rng(0)).astype(float)
        return image[40:88, 40:88].std() / image.std()
    # scatter veils the dense middle most: its contrast shrinks against the rest
    assert centre_share(carm.Look(**dict(plain.__dict__, scatter=1.0))) < 0.9 * centre_share(plain)
    bright = carm.image(lines, carm.Look(**dict(plain.__dict__, gamma=0.6)), np.random.default_rng(0)).astype(float)
    dark = carm.image(lines, carm.Look(**dict(plain.__dict__, gamma=1.6)), np.random.default_rng(0)).astype(float)
    assert np.median(bright) > np.median(a) > np.median(dark)  # the LUT bends the mid-tones only
    quiet = _roughness(carm.image(lines, _flat(dict(photons=300.0)), np.random.default_rng(0)))
    noisy = _roughness(carm.image(lines, _flat(dict(photons=300.0, electronic_noise=30.0)), np.random.default_rng(0)))
    assert noisy > quiet


def test_a_ct_resolution_blur_softens_the_projections():
    from x2p_ros.data import synth
    sharp = make_case(3, SynthConfig(size=128, ct_blur_mm=(0.0, 0.0)))
    soft = make_case(3, SynthConfig(size=128, ct_blur_mm=(2.5, 2.5)))
    assert sharp[4]["phantom"]["ct_blur_mm"] == 0.0 and soft[4]["phantom"]["ct_blur_mm"] == 2.5
    assert [v["label"] for v in sharp[3]] == [v["label"] for v in soft[3]]  # same patient, pose and look
    # the AP view's look is drawn before any noise: the same; only the image is softer
    assert sharp[4]["looks"]["ap"] == soft[4]["looks"]["ap"]
    assert _roughness(soft[0]["ap"]) < _roughness(sharp[0]["ap"])
    assert synth.SynthConfig().ct_blur_mm[0] == 0.0  # some phantoms stay sharp


def test_organs_sit_where_anatomy_puts_them():
    lumbar = _phantom(["T12", "L1", "L2", "L3"], seed=6)
    vol, marks = lumbar.volume, spine_landmarks(PhantomSpec(levels=["T12", "L1", "L2", "L3"]))

    def hu_at(xyz):
        k, j, i = np.round(vol.world_to_voxel([xyz])[0][::-1]).astype(int)
        return vol.hu[k, j, i]
    level = {v["label"]: np.array(v["xyz_mm"]) for v in lumbar.vertebrae}
    kidney = (level["L1"] + level["L3"]) / 2
    assert hu_at(kidney + [60.0 * marks.torso_scale, 10.0, 0.0]) == context.HU_MUSCLE  # left kidney
    assert hu_at(level["T12"] + [-75.0, -45.0, -10.0]) == context.HU_LIVER  # liver, right (x < 0)
    cervical = _phantom(["C1", "C2", "C3", "C4"], seed=6)
    c2 = next(v["xyz_mm"] for v in cervical.vertebrae if v["label"] == "C2")
    front = cervical.volume.voxel_to_world(np.argwhere((cervical.volume.hu > 900) & (cervical.volume.labels == 0))
                                           [:, ::-1])
    near_c2 = front[np.abs(front[:, 2] - c2[2]) < 30]
    assert np.any(near_c2[:, 1] < c2[1] - 40)  # the mandible, in front of the neck


def test_lung_vessels_branch_from_the_hila_through_aerated_lung_only():
    thorax = _phantom(["T5", "T6", "T7"], seed=4)
    canvas = _Canvas.of(thorax.volume)
    before = canvas.hu.copy()
    context.paint_lung_vessels(canvas, spine_landmarks(thorax.spec), np.random.default_rng(1))
    changed = canvas.hu != before
    assert changed.sum() > 2000
    assert np.all(before[changed] == HU_LUNG) and np.all(canvas.hu[changed] == context.HU_BLOOD)
    # dense near the hila (beside T5-T7, in front of the spine), sparse towards the lungs' rims
    marks, scale = spine_landmarks(thorax.spec), thorax.spec.torso_scale
    hila = np.array([marks.at(k) + [side * 40.0 * scale, -60.0 * scale, 0.0] for side in (-1, 1)
                     for k in np.linspace(marks.level("T5"), marks.level("T7"), 9)])
    lung = thorax.volume.voxel_to_world(np.argwhere(before == HU_LUNG)[:, ::-1])
    from_hilum = cdist(lung, hila).min(axis=1)
    now_blood = changed[before == HU_LUNG]
    assert now_blood[from_hilum < 25].mean() > 2 * now_blood[from_hilum > 60].mean() > 0


def test_colon_follows_its_frame_and_its_gas_has_haustral_folds():
    marks = spine_landmarks(PhantomSpec(levels=["L1", "L2", "L3"]))
    frame = context.colon_frame(marks)
    spine = {name: marks.at(marks.level(name)) for name in ("T12", "L3", "S1")}
    assert frame[0, 0] < -40 and frame[0, 2] < spine["L3"][2]  # the caecum: right, low
    transverse = frame[np.argmin(frame[:, 1])]
    assert transverse[1] < spine["L3"][1] - 90  # the transverse colon: the most anterior part
    assert frame[:, 2].max() > spine["L3"][2] and frame[np.argmax(frame[:, 2]), 0] > 40  # splenic flexure: left, high
    assert frame[-1, 2] < spine["S1"][2]  # the sigmoid, into the pelvis

    abdomen = _phantom(["L1", "L2", "L3"], seed=8, colon_gas=0, bowel_loops=0, stool=0, gas_blobs=0)
    canvas = _Canvas.of(abdomen.volume)
    before, labels = canvas.hu.copy(), canvas.labels
    context.paint_colon(canvas, marks, np.random.default_rng(3), 3)
    gas = (canvas.hu <= -800) & (before > -500)
    fold = (canvas.hu == context.HU_MUSCLE) & (before != context.HU_MUSCLE)
    assert gas.sum() > 10000 and fold.sum() > 200
    assert not np.any((gas | fold) & (labels > 0))
    # a fold lies in the gas, not apart from it
    k, j, i = np.argwhere(fold)[len(np.argwhere(fold)) // 2]
    assert np.any(gas[k - 4:k + 5, j - 4:j + 5, i - 4:i + 5])
    far = cdist(abdomen.volume.voxel_to_world(np.argwhere(fold)[:, ::-1]), frame).min(axis=1)
    assert far.max() <= 28.0 * marks.torso_scale + 2.0  # within the colon's radius of its course


def test_costal_cartilage_joins_the_true_ribs_to_the_sternum_and_floating_ribs_have_none():
    marker = 333.0  # no other tissue has it
    thorax = _phantom(["T4", "T5", "T6", "T7"], seed=1, cartilage_hu=marker)
    vol = thorax.volume
    cartilage = vol.voxel_to_world(np.argwhere((vol.hu == marker) & (vol.labels == 0))[:, ::-1])
    assert len(cartilage) > 1000 and not np.any((vol.hu == marker) & (vol.labels > 0))
    t5 = next(v["xyz_mm"] for v in thorax.vertebrae if v["label"] == "T5")
    assert np.all(cartilage[:, 1] < t5[1] - 60)  # in the front of the chest
    for side in (-1, 1):  # from the ribs' ends at the side to the sternum's edge
        half = cartilage[side * cartilage[:, 0] > 0]
        assert np.abs(half[:, 0]).min() < 25 and np.abs(half[:, 0]).max() > 60
    floating = _phantom(["T11", "T12", "L1"], seed=1, cartilage_hu=marker)
    assert not np.any(floating.volume.hu == marker)

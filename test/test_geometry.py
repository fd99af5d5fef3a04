"""Geometry round trips and rejection of bad calibration (docs/design.md, section 1)."""
import numpy as np
import pytest

from x2p_ros import geometry as g


def carm_view(angle_deg, sid=550.0, sdd=968.0, spacing=0.6, size=(512, 480)):
    """A C-arm view rotated about the vertical (z) axis of the reference frame."""
    a = np.deg2rad(angle_deg)
    source = sid * np.array([np.sin(a), -np.cos(a), 0.0]) + [3.0, -2.0, 10.0]
    R, t = g.look_at_pose(source, np.array([3.0, -2.0, 10.0]))
    K = g.intrinsics(sdd / spacing, ((size[0] - 1) / 2 + 4.0, (size[1] - 1) / 2 - 3.0))
    return g.projection_matrix(K, R, t)


@pytest.fixture
def views():
    return carm_view(0.0), carm_view(90.0)


def test_projection_convention_image_axes(views):
    P_ap, _ = views
    K, R, t = g.decompose_projection(P_ap)
    # AP source at -y looks along +y; up (+z) is at the top of the image, so v decreases with z.
    centre = g.project(P_ap, [3.0, -2.0, 10.0])[0]
    above = g.project(P_ap, [3.0, -2.0, 30.0])[0]
    assert above[1] < centre[1]
    np.testing.assert_allclose(centre, K[:2, 2], atol=1e-9)


def test_project_then_triangulate_round_trip(views):
    rng = np.random.default_rng(0)
    X = rng.uniform(-80, 80, size=(50, 3))
    uv = np.stack([g.project(P, X) for P in views])
    Xt, residual = g.triangulate(np.stack(views), uv)
    assert np.abs(Xt - X).max() < 1e-6
    assert residual.max() < 1e-6


def test_triangulation_reports_reprojection_residual(views):
    X = np.array([[10.0, 5.0, -20.0]])
    uv = np.stack([g.project(P, X) for P in views])
    uv[0, 0, 1] += 4.0  # 4 px error in AP v: both views see the vertical axis
    _, residual = g.triangulate(np.stack(views), uv)
    # the 3D least-squares point splits the 4 px disagreement between the views
    assert np.all((1.5 < residual) & (residual < 2.5))


def test_decompose_is_inverse_of_compose(views):
    for P in views:
        K, R, t = g.decompose_projection(P)
        np.testing.assert_allclose(g.projection_matrix(K, R, t), P, atol=1e-9)
        # P is defined up to scale: a negatively scaled P decomposes to the same view
        K2, R2, t2 = g.decompose_projection(-2.5 * P)
        np.testing.assert_allclose(K2, K, atol=1e-9)
        np.testing.assert_allclose(R2, R, atol=1e-12)
        np.testing.assert_allclose(t2, t, atol=1e-9)
        np.testing.assert_allclose(g.source_position(P), t, atol=1e-9)


def test_backproject_rays_pass_through_points(views):
    X = np.array([[1.0, 2.0, 3.0], [-40.0, 25.0, 60.0]])
    for P in views:
        c, d = g.backproject(P, g.project(P, X))
        to_point = X - c
        along = (to_point * d).sum(1)
        assert np.all(along > 0)
        np.testing.assert_allclose(to_point, along[:, None] * d, atol=1e-9)


def test_crop_and_resize_keep_projections_consistent(views):
    P = views[0]
    X = np.random.default_rng(1).uniform(-60, 60, size=(20, 3))
    uv = g.project(P, X)
    A = g.resize_transform((400, 380), (256, 256)) @ g.crop_transform(37, 52)
    P2 = g.apply_pixel_transform(A, P)
    np.testing.assert_allclose(g.project(P2, X), g.transform_pixels(A, uv), atol=1e-6)
    # the same holds through K: P' = (A K) [R^T | -R^T t]
    K, R, t = g.decompose_projection(P)
    np.testing.assert_allclose(g.projection_matrix(g.apply_pixel_transform(A, K), R, t), P2, atol=1e-6)


def test_resize_maps_pixel_centres_and_edges():
    A = g.resize_transform((512, 512), (256, 256))
    # the image edges stay at the image edges; pixels 0 and 1 average into pixel 0
    np.testing.assert_allclose(g.transform_pixels(A, [[-0.5, -0.5], [511.5, 511.5], [0.5, 0.5]]),
                               [[-0.5, -0.5], [255.5, 255.5], [0.0, 0.0]], atol=1e-12)


def test_ros_round_trip_metres_to_mm(views):
    for P in views:
        k9, t_m, q = g.projection_to_ros(P)
        K, R, t_mm = g.decompose_projection(P)
        np.testing.assert_allclose(t_m * g.MM_PER_M, t_mm, atol=1e-9)
        np.testing.assert_allclose(np.linalg.norm(q), 1.0, atol=1e-12)
        np.testing.assert_allclose(g.projection_from_ros(k9, t_m, q), P, atol=1e-7)


def test_quaternion_rotation_round_trip():
    rng = np.random.default_rng(2)
    for q in rng.normal(size=(20, 4)):
        q /= np.linalg.norm(q)
        q = q if q[3] >= 0 else -q
        np.testing.assert_allclose(g.rotation_to_quaternion(g.quaternion_to_rotation(q)), q, atol=1e-12)


K_OK = [[1600.0, 0, 255.5], [0, 1600.0, 255.5], [0, 0, 1]]


@pytest.mark.parametrize("K, message", [
    ([[np.nan, 0, 1], [0, 1, 1], [0, 0, 1]], "NaN"),
    ([[0.0, 0, 1], [0, 1, 1], [0, 0, 1]], "focal lengths must be positive"),
    (np.zeros((3, 3)), "focal lengths must be positive"),
    ([[1.0, 0, 1], [0, 1, 1], [0, 0, 0]], "last row"),
    (np.eye(2), "shape"),
])
def test_bad_intrinsics_are_refused(K, message):
    with pytest.raises(g.CalibrationError, match=message):
        g.validate_intrinsics(K)


@pytest.mark.parametrize("q, message", [
    ([0.0, 0.0, 0.0, 0.0], "unit norm"),
    ([0.0, 0.0, 0.0, 2.0], "unit norm"),
    ([np.nan, 0.0, 0.0, 1.0], "NaN"),
    ([0.0, 0.0, 1.0], "shape"),
])
def test_bad_quaternions_are_refused(q, message):
    with pytest.raises(g.CalibrationError, match=message):
        g.projection_from_ros(np.ravel(K_OK), [0.0, -0.5, 0.0], q)


def test_non_rotations_and_singular_projections_are_refused():
    with pytest.raises(g.CalibrationError, match="not a rotation"):
        g.projection_matrix(K_OK, np.diag([1.0, 1.0, -1.0]), np.zeros(3))
    with pytest.raises(g.CalibrationError, match="not a rotation"):
        g.projection_matrix(K_OK, 2 * np.eye(3), np.zeros(3))
    with pytest.raises(g.CalibrationError, match="singular"):
        g.project(np.zeros((3, 4)), [0.0, 0.0, 1.0])
    with pytest.raises(g.CalibrationError, match="NaN"):
        g.projection_from_ros(np.ravel(K_OK), [np.inf, 0.0, 0.0], [0, 0, 0, 1.0])


def test_points_behind_the_source_and_parallel_rays_are_refused(views):
    P = views[0]
    src = g.source_position(P)
    with pytest.raises(g.CalibrationError, match="behind"):
        g.project(P, src - (g.backproject(P, [[255.5, 255.5]])[1][0] * 10.0))
    uv = g.project(P, [[0.0, 0.0, 0.0]])
    with pytest.raises(g.CalibrationError, match="parallel"):
        g.triangulate(np.stack([P, P]), np.stack([uv, uv]))


def test_pixel_convention_helpers_against_hand_computed_values():
    # an 8-pixel axis: its edges -0.5 and 7.5 are grid_sample's -1 and 1, pixel 0 is at -7/8
    assert g.pixel_to_grid(-0.5, 8) == -1.0 and g.pixel_to_grid(7.5, 8) == 1.0
    assert g.pixel_to_grid(0.0, 8) == -0.875 and g.pixel_to_grid(3.5, 8) == 0.0
    # 2 cells over 8 pixels: cell 0's centre covers pixels 0-3, so it sits at pixel 1.5
    assert g.cell_to_pixel(0.0, 2, 8) == 1.5 and g.cell_to_pixel(1.0, 2, 8) == 5.5
    assert g.cell_to_pixel(-0.5, 2, 8) == -0.5  # the edges coincide
    u = np.linspace(-0.5, 7.5, 17)
    np.testing.assert_allclose(g.cell_to_pixel(g.pixel_to_cell(u, 8, 2), 2, 8), u)
    uv = np.array([[-0.5, 0.0], [-0.6, 0.0], [9.5, 5.5], [9.5, 5.6], [3.0, 3.0]])
    assert g.inside_image(uv, (10, 6)).tolist() == [True, False, True, False, True]
    assert g.inside_image(uv, (10, 6), margin=1.0).tolist() == [False, False, False, False, True]
    assert g.inside_image([2.0, 2.0], (10, 6))  # one point


def test_closed_form_3x3_solve_and_determinant_match_torch_linalg(views):
    import torch
    gen = torch.Generator().manual_seed(0)
    M = torch.randn(50, 3, 3, generator=gen, dtype=torch.float64) + 2 * torch.eye(3, dtype=torch.float64)
    b = torch.randn(50, 3, generator=gen, dtype=torch.float64)
    assert torch.allclose(g.solve3_torch(M, b), torch.linalg.solve(M, b), atol=1e-9)
    assert torch.allclose(g.det3_torch(M), torch.linalg.det(M), atol=1e-9)
    # a C-arm's M (focal length in pixels), float32 as the model has it, with b broadcast
    M = torch.as_tensor(np.stack(views)[:, :, :3], dtype=torch.float32)  # (2, 3, 3)
    b = torch.tensor([0.0, 1.0, 0.0])
    x = g.solve3_torch(M, b)
    assert torch.allclose(x, torch.linalg.solve(M, b.expand(2, 3)), rtol=1e-4, atol=1e-9)
    assert torch.equal(torch.sign(g.det3_torch(M)), torch.sign(torch.linalg.det(M)))

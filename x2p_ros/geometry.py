"""C-arm geometry with one convention (docs/design.md, section 1).

- 3D in millimetres in the reference frame; 2D in pixels, u to the right, v
  down, the centre of the top-left pixel at (0, 0).
- A view pose (R, t) maps the view's optical frame into the reference frame:
  X_ref = R @ X_view + t. The optical frame has its origin at the X-ray source,
  z towards the detector, x along +u and y along +v.
- A calibrated view is P = K [R^T | -R^T t] (3 x 4), reference mm -> pixels.

All functions take and return float64 numpy arrays and raise CalibrationError
with a message that says what is wrong with the input.
"""
from __future__ import annotations

import numpy as np

MM_PER_M = 1000.0
VIEWS = ("ap", "lat")  # the two calibrated views, in this order everywhere


class CalibrationError(ValueError):
    """Calibration input that cannot describe a real C-arm view."""


def _finite(name: str, a, shape: tuple) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.shape != shape:
        raise CalibrationError(f"{name} must have shape {shape}, got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise CalibrationError(f"{name} contains NaN or Inf: {a.tolist()}")
    return a


def validate_intrinsics(K) -> np.ndarray:
    """Checks a 3x3 pinhole K: positive focal lengths, zero skew row, K[2] = (0, 0, 1)."""
    K = _finite("K", K, (3, 3))
    if K[0, 0] <= 0 or K[1, 1] <= 0:
        raise CalibrationError(f"K focal lengths must be positive, got fx={K[0, 0]}, fy={K[1, 1]}")
    if K[1, 0] != 0 or not np.allclose(K[2], [0.0, 0.0, 1.0]):
        raise CalibrationError(f"K must be upper triangular with last row (0, 0, 1), got {K.tolist()}")
    return K


def validate_rotation(R, tol: float = 1e-6) -> np.ndarray:
    R = _finite("rotation", R, (3, 3))
    if not np.allclose(R @ R.T, np.eye(3), atol=tol) or np.linalg.det(R) <= 0:
        raise CalibrationError(f"not a rotation matrix (R R^T != I or det <= 0): {R.tolist()}")
    return R


def validate_projection(P) -> np.ndarray:
    """Checks a 3x4 P: finite, with an invertible left 3x3 block (a finite source)."""
    P = _finite("P", P, (3, 4))
    M = P[:, :3]
    scale = np.abs(M).max()
    if scale == 0 or abs(np.linalg.det(M / scale)) < 1e-12:
        raise CalibrationError("P is singular: its left 3x3 block is not invertible")
    return P


def quaternion_to_rotation(q_xyzw, tol: float = 1e-3) -> np.ndarray:
    """Rotation matrix of a unit quaternion (x, y, z, w), as in geometry_msgs.

    A quaternion whose norm is off 1 by more than tol is refused rather than
    normalised: it means the sender computed the pose wrongly."""
    q = _finite("quaternion", q_xyzw, (4,))
    n = np.linalg.norm(q)
    if abs(n - 1.0) > tol:
        raise CalibrationError(f"quaternion must have unit norm, got norm {n:.6g}")
    x, y, z, w = q / n
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def rotation_to_quaternion(R) -> np.ndarray:
    """Unit quaternion (x, y, z, w) with w >= 0 of a rotation matrix."""
    R = validate_rotation(R, tol=1e-5)
    # Shepperd's method: pivot on the largest diagonal term for stability.
    tr = np.trace(R)
    i = int(np.argmax([tr, R[0, 0], R[1, 1], R[2, 2]]))
    if i == 0:
        s = 2.0 * np.sqrt(1.0 + tr)
        q = [(R[2, 1] - R[1, 2]) / s, (R[0, 2] - R[2, 0]) / s, (R[1, 0] - R[0, 1]) / s, s / 4]
    elif i == 1:
        s = 2.0 * np.sqrt(1.0 + R[0, 0] - R[1, 1] - R[2, 2])
        q = [s / 4, (R[0, 1] + R[1, 0]) / s, (R[0, 2] + R[2, 0]) / s, (R[2, 1] - R[1, 2]) / s]
    elif i == 2:
        s = 2.0 * np.sqrt(1.0 + R[1, 1] - R[0, 0] - R[2, 2])
        q = [(R[0, 1] + R[1, 0]) / s, s / 4, (R[1, 2] + R[2, 1]) / s, (R[0, 2] - R[2, 0]) / s]
    else:
        s = 2.0 * np.sqrt(1.0 + R[2, 2] - R[0, 0] - R[1, 1])
        q = [(R[0, 2] + R[2, 0]) / s, (R[1, 2] + R[2, 1]) / s, s / 4, (R[1, 0] - R[0, 1]) / s]
    q = np.array(q)
    return q if q[3] >= 0 else -q


def intrinsics(focal_px, principal_point) -> np.ndarray:
    """K from focal lengths (source-to-detector distance / pixel spacing) and principal point."""
    fx, fy = np.broadcast_to(np.asarray(focal_px, dtype=np.float64), (2,))
    cx, cy = principal_point
    return validate_intrinsics([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


def projection_matrix(K, R, t) -> np.ndarray:
    """P = K [R^T | -R^T t] from intrinsics and the view pose (R, t) in the reference frame."""
    K = validate_intrinsics(K)
    R = validate_rotation(R)
    t = _finite("translation", t, (3,))
    return K @ np.hstack([R.T, (-R.T @ t)[:, None]])


def decompose_projection(P):
    """(K, R, t) of P, the inverse of projection_matrix (RQ decomposition via QR)."""
    P = validate_projection(P)
    M = P[:, :3]
    # RQ of M from QR of the row-and-column-flipped transpose.
    flip = np.eye(3)[::-1]
    q, r = np.linalg.qr((flip @ M).T)
    K = flip @ r.T @ flip
    Rt = flip @ q.T  # world -> view rotation, up to signs
    signs = np.diag(np.sign(np.diag(K)))
    K, Rt = K @ signs, signs @ Rt
    if np.linalg.det(Rt) < 0:  # P known only up to scale: take the sign giving a rotation
        Rt, P = -Rt, -P
    scale = K[2, 2]
    K = K / scale
    t_view = np.linalg.solve(K, P[:, 3] / scale)
    R = Rt.T
    return K, R, -R @ t_view


def source_position(P) -> np.ndarray:
    """The X-ray source (camera centre) in the reference frame: P @ [C, 1] = 0."""
    P = validate_projection(P)
    return -np.linalg.solve(P[:, :3], P[:, 3])


def project(P, points) -> np.ndarray:
    """Pixels (N, 2) of reference-frame points (N, 3). Points at or behind the source are refused."""
    P = validate_projection(P)
    X = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    h = X @ P[:, :3].T + P[:, 3]  # (N, 3) homogeneous pixels
    depth = h[:, 2] * np.sign(np.linalg.det(P[:, :3]))
    if np.any(depth <= 0):
        raise CalibrationError("a point lies at or behind the X-ray source of this view")
    return h[:, :2] / h[:, 2:3]


def backproject(P, pixels):
    """Rays through pixels (N, 2): origin (the source, (3,)) and unit directions (N, 3)
    pointing from the source towards the detector."""
    P = validate_projection(P)
    uv = np.asarray(pixels, dtype=np.float64).reshape(-1, 2)
    M = P[:, :3]
    d = np.linalg.solve(M, np.hstack([uv, np.ones((len(uv), 1))]).T).T  # (N, 3)
    d *= np.sign(np.linalg.det(M))  # towards positive depth
    return source_position(P), d / np.linalg.norm(d, axis=1, keepdims=True)


def triangulate(P_views, pixels_views):
    """Closed-form least-squares point from V >= 2 views.

    P_views: (V, 3, 4); pixels_views: (V, N, 2). Returns (points (N, 3) mm,
    reprojection residual (V, N) px). The point minimises the sum of squared
    distances to the V rays: sum_v (I - d d^T) X = sum_v (I - d d^T) c_v, a 3x3
    solve per point that is singular only when the rays are parallel, which is
    refused."""
    P_views = np.asarray(P_views, dtype=np.float64)
    uv = np.asarray(pixels_views, dtype=np.float64)
    if P_views.ndim != 3 or P_views.shape[0] < 2 or uv.shape[0] != P_views.shape[0] or uv.shape[-1] != 2:
        raise CalibrationError(f"triangulate needs (V>=2, 3, 4) P and (V, N, 2) pixels, "
                               f"got {P_views.shape}, {uv.shape}")
    if not np.all(np.isfinite(uv)):
        raise CalibrationError("pixels contain NaN or Inf")
    A = np.zeros((uv.shape[1], 3, 3))
    b = np.zeros((uv.shape[1], 3))
    for P, p in zip(P_views, uv):  # V is 2 here: a loop over views, vectorised over points
        c, d = backproject(P, p)
        proj = np.eye(3) - d[:, :, None] * d[:, None, :]  # (N, 3, 3)
        A += proj
        b += proj @ c
    det = np.linalg.det(A)
    if np.any(np.abs(det) < 1e-12):
        raise CalibrationError("the views' rays are parallel: the point cannot be triangulated")
    X = np.linalg.solve(A, b[:, :, None])[:, :, 0]
    residual = np.stack([np.linalg.norm(project(P, X) - p, axis=1) for P, p in zip(P_views, uv)])
    return X, residual


# The pixel convention at work: every conversion between pixels, heatmap or
# feature cells and grid_sample coordinates goes through these four (numpy
# arrays, torch tensors or numbers alike).

def pixel_to_grid(u, size):
    """grid_sample's coordinate (align_corners=False) of pixel coordinate u on
    an axis of `size` pixels: the image's edges -0.5 and size - 0.5 go to -1
    and 1. An x coordinate pairs with the width, y with the height."""
    return (2 * u + 1) / size - 1


def cell_to_pixel(c, cells: int, size):
    """Pixel coordinate of cell coordinate c on a grid of `cells` cells over
    `size` pixels (centres on integers on both: the edges coincide)."""
    return (c + 0.5) * size / cells - 0.5


def pixel_to_cell(u, size, cells: int):
    """The inverse of cell_to_pixel."""
    return (u + 0.5) * cells / size - 0.5


def inside_image(uv, size, margin: float = 0.0) -> np.ndarray:
    """True where pixels (..., 2) lie in a (W, H) image, at least `margin`
    pixels inside its edges (the edges are at -0.5 and W - 0.5)."""
    uv = np.asarray(uv, dtype=np.float64)
    w, h = size
    return ((uv[..., 0] >= -0.5 + margin) & (uv[..., 0] <= w - 0.5 - margin)
            & (uv[..., 1] >= -0.5 + margin) & (uv[..., 1] <= h - 0.5 - margin))


# Image crops and resizes act on pixels by an affine map A: uv' = A uv, so K' = A K and P' = A P.

def crop_transform(x0: float, y0: float) -> np.ndarray:
    """Pixel map of a crop whose top-left kept pixel is (x0, y0) of the source image."""
    return np.array([[1.0, 0.0, -x0], [0.0, 1.0, -y0], [0.0, 0.0, 1.0]])


def resize_transform(src_size, dst_size) -> np.ndarray:
    """Pixel map of resizing a (W, H) image to (W', H') with pixel centres at integers:
    the image edges -0.5 and W - 0.5 map to -0.5 and W' - 0.5, so u' = (u + 0.5) s - 0.5."""
    (w, h), (w2, h2) = src_size, dst_size
    if min(w, h, w2, h2) <= 0:
        raise CalibrationError(f"image sizes must be positive, got {src_size} -> {dst_size}")
    sx, sy = w2 / w, h2 / h
    return np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5], [0.0, 0.0, 1.0]])


def apply_pixel_transform(A, K_or_P) -> np.ndarray:
    """K or P of the transformed image."""
    return np.asarray(A, dtype=np.float64) @ np.asarray(K_or_P, dtype=np.float64)


def transform_pixels(A, pixels) -> np.ndarray:
    uv = np.asarray(pixels, dtype=np.float64).reshape(-1, 2)
    return uv @ np.asarray(A)[:2, :2].T + np.asarray(A)[:2, 2]


def look_at_pose(source, target, up=(0.0, 0.0, 1.0)):
    """View pose (R, t) of a source at `source` looking at `target`; image v runs
    along -up (the detector shows `up` at the top)."""
    source = _finite("source", source, (3,))
    z = _finite("target", target, (3,)) - source
    if np.linalg.norm(z) == 0:
        raise CalibrationError("source and target coincide")
    z /= np.linalg.norm(z)
    y = -np.asarray(up, dtype=np.float64)
    y = y - z * (y @ z)
    if np.linalg.norm(y) < 1e-9:
        raise CalibrationError("viewing direction is parallel to the up vector")
    y /= np.linalg.norm(y)
    x = np.cross(y, z)
    return np.stack([x, y, z], axis=1), source


def carm_view(name: str, sid: float, sdd: float, fov_mm: float, size: int, principal_offset=(0.0, 0.0)):
    """(P, detector pixel spacing) of an ideal AP or LAT view of a square
    `size`-pixel detector whose field covers fov_mm x fov_mm at the isocentre
    (the origin); z is up in both images, AP looks along +y, LAT along +x."""
    source = {"ap": np.array([0.0, -sid, 0.0]), "lat": np.array([-sid, 0.0, 0.0])}[name]
    R, t = look_at_pose(source, np.zeros(3), up=(0.0, 0.0, 1.0))
    spacing = fov_mm * sdd / sid / size
    K = intrinsics(sdd / spacing, ((size - 1) / 2 + principal_offset[0], (size - 1) / 2 + principal_offset[1]))
    return projection_matrix(K, R, t), spacing


# ROS boundary: CameraInfo K (row-major 9) and TransformStamped (metres, xyzw) <-> P (mm).

def projection_from_ros(k9, translation_m, rotation_xyzw) -> np.ndarray:
    """P (mm) from a sensor_msgs/CameraInfo K and the view pose of a geometry_msgs/TransformStamped."""
    K = validate_intrinsics(np.asarray(k9, dtype=np.float64).reshape(3, 3))
    t_mm = _finite("translation", translation_m, (3,)) * MM_PER_M
    return projection_matrix(K, quaternion_to_rotation(rotation_xyzw), t_mm)


def projection_to_ros(P):
    """(K as 9 floats, translation in metres, quaternion xyzw) of P (mm)."""
    K, R, t = decompose_projection(P)
    return K.reshape(-1), t / MM_PER_M, rotation_to_quaternion(R)


# Batched torch versions for the network (same conventions; no validation: the
# inputs were validated where they entered the package).

def project_torch(P, points):
    """P (..., 3, 4), points (..., M, 3) -> pixels (..., M, 2) and depth (..., M)
    (positive in front of the source, in P's scale)."""
    h = points @ P[..., :3].transpose(-1, -2) + P[..., None, :, 3]  # (..., M, 3)
    sign = _sign_det_torch(P)
    depth = h[..., 2] * sign[..., None]
    return h[..., :2] / h[..., 2:3], depth


# 3 x 3 determinants and solves in closed form (cross products): elementwise, so that a CUDA graph can
# hold them (torch.linalg's solvers check their results on the CPU, which ends a capture), and no slower
# at these sizes. Callers pass well-conditioned matrices (a P's M, a sum of ray projectors).

def det3_torch(M):
    """(..., 3, 3) -> determinants (...)."""
    import torch
    return (M[..., 0, :] * torch.linalg.cross(M[..., 1, :], M[..., 2, :])).sum(-1)


def solve3_torch(M, b):
    """M (..., 3, 3), b (..., 3) -> x (..., 3) with M x = b (broadcast): the adjugate over the determinant."""
    import torch
    r0, r1, r2 = M[..., 0, :], M[..., 1, :], M[..., 2, :]
    c0, c1, c2 = torch.linalg.cross(r1, r2), torch.linalg.cross(r2, r0), torch.linalg.cross(r0, r1)  # inv(M)'s columns
    det = (r0 * c0).sum(-1, keepdim=True)
    return (c0 * b[..., 0:1] + c1 * b[..., 1:2] + c2 * b[..., 2:3]) / det


def _sign_det_torch(P):
    import torch
    return torch.sign(det3_torch(P[..., :3]))


def backproject_torch(P, pixels):
    """P (..., 3, 4), pixels (..., M, 2) -> source (..., 3), unit directions (..., M, 3)."""
    import torch
    M = P[..., :3]
    source = -solve3_torch(M, P[..., 3])
    homog = torch.cat([pixels, torch.ones_like(pixels[..., :1])], dim=-1)  # (..., M, 3)
    d = solve3_torch(M[..., None, :, :], homog) * _sign_det_torch(P)[..., None, None]
    return source, d / d.norm(dim=-1, keepdim=True)


def triangulate_torch(P, pixels):
    """P (B, V, 3, 4), pixels (B, V, M, 2) -> points (B, M, 3): the least-squares
    point of the V rays, as triangulate()."""
    import torch
    c, d = backproject_torch(P, pixels)  # (B, V, 3), (B, V, M, 3)
    proj = torch.eye(3, dtype=P.dtype, device=P.device) - d[..., :, None] * d[..., None, :]  # (B, V, M, 3, 3)
    A = proj.sum(1)  # (B, M, 3, 3)
    b = (proj @ c[:, :, None, :, None]).sum(1)[..., 0]  # (B, M, 3)
    return solve3_torch(A, b)


def spine_orientations(points) -> np.ndarray:
    """Quaternions (N, 4) xyzw for vertebrae (N, 3) ordered superior first: z
    along the local spine axis, pointing to the vertebra above (central
    differences inside, one-sided at the ends); x is the reference frame's x
    made orthogonal to z (its y when x is along the axis)."""
    X = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if len(X) < 2:
        return np.tile([0.0, 0.0, 0.0, 1.0], (len(X), 1))
    up = -np.gradient(X, axis=0)  # towards the vertebra above
    quats = []
    for z in up:
        n = np.linalg.norm(z)
        if n < 1e-9:
            quats.append([0.0, 0.0, 0.0, 1.0])
            continue
        z = z / n
        x = np.array([1.0, 0.0, 0.0]) if abs(z[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
        x = x - z * (x @ z)
        x /= np.linalg.norm(x)
        quats.append(rotation_to_quaternion(np.stack([x, np.cross(z, x), z], axis=1)))
    return np.array(quats)

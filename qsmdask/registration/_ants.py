"""Conversions between NIfTI (RAS, voxel-order arrays) and ANTs images (LPS physical space).

A NIfTI affine maps voxel indices to RAS millimetres, ``p_ras = A[:3, :3] @ ijk + A[:3, 3]``.
ITK/ANTs keep physical points in LPS, ``p_lps = origin + direction @ (spacing * ijk)``, with
``p_lps = F @ p_ras`` and ``F = diag(-1, -1, 1)``. Hence
``spacing = |A[:3, :3]| (column norms)``, ``direction = F @ A[:3, :3] / spacing``,
``origin = F @ A[:3, 3]``. The array itself is passed in the same (i, j, k) order.
"""

from __future__ import annotations

import numpy as np

LPS = np.diag([-1.0, -1.0, 1.0])
_INTERPOLATORS = {"linear": "linear", "nearest": "nearestNeighbor", "label": "genericLabel",
                  "bspline": "bSpline"}


def check_affine(affine, name: str = "affine") -> np.ndarray:
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be a finite 4x4 matrix, got shape {a.shape}")
    spacing = np.linalg.norm(a[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise ValueError(f"{name} has a zero voxel size")
    rot = a[:3, :3] / spacing
    if not np.allclose(rot.T @ rot, np.eye(3), atol=1e-4):
        raise ValueError(f"{name} has shear (non-orthogonal axes), which ANTs cannot represent")
    return a


def geometry(affine) -> tuple[tuple, tuple, np.ndarray]:
    """(origin_lps, spacing, direction_lps) of a NIfTI affine."""
    a = check_affine(affine)
    spacing = np.linalg.norm(a[:3, :3], axis=0)
    direction = LPS @ (a[:3, :3] / spacing)
    origin = LPS @ a[:3, 3]
    return tuple(float(v) for v in origin), tuple(float(v) for v in spacing), direction


def to_ants(array, affine, name: str = "image"):
    """ANTsImage (float32) of a 3-D array with a NIfTI affine."""
    import ants

    arr = np.asarray(array)
    if arr.ndim != 3:
        raise ValueError(f"{name} must be 3-D, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    origin, spacing, direction = geometry(affine)
    return ants.from_numpy(np.ascontiguousarray(arr, dtype=np.float32), origin=origin,
                           spacing=spacing, direction=direction)


def interpolator(name: str) -> str:
    if name not in _INTERPOLATORS:
        raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATORS)}, got {name!r}")
    return _INTERPOLATORS[name]


def ras_from_lps_params(parameters, fixed_parameters) -> np.ndarray:
    """4x4 RAS matrix of an ITK affine (12 parameters: 3x3 matrix row-major, translation;
    fixed parameters: centre). The ITK transform maps fixed-space points to moving space:
    ``y = M (x - c) + t + c`` (LPS)."""
    p = np.asarray(parameters, dtype=np.float64)
    c = np.asarray(fixed_parameters, dtype=np.float64)[:3]
    m = p[:9].reshape(3, 3)
    t = p[9:12]
    lps = np.eye(4)
    lps[:3, :3] = m
    lps[:3, 3] = t + c - m @ c
    f = np.eye(4)
    f[:3, :3] = LPS
    return f @ lps @ f


def lps_params_from_ras(matrix) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of ``ras_from_lps_params`` with centre 0."""
    f = np.eye(4)
    f[:3, :3] = LPS
    lps = f @ np.asarray(matrix, dtype=np.float64) @ f
    return np.r_[lps[:3, :3].ravel(), lps[:3, 3]], np.zeros(3)

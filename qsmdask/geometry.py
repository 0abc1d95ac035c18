"""Image geometry checks: shear in a NIfTI affine, and its removal when it is negligible.

Scanners, converters and simulators (qsm-forward writes ``diag(voxel) @ R``) sometimes
produce affines whose axes are a fraction of a degree from orthogonal.  Registration
(ANTs) cannot represent a shear, and the dipole kernel assumes orthogonal voxel axes.
:func:`orthogonalise_affine` replaces a shear below ``max_shear_deg`` by the nearest
orthogonal axes (polar decomposition, voxel sizes and origin kept) and refuses larger
ones.  Pure numpy: the IO layer calls it once at ingest.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SHEAR_TOLERANCE_DEG", "affine_shear_deg", "orthogonalise_affine"]

# Largest shear (degrees between any two voxel axes away from 90) that is removed silently
# apart from a note: qsm-forward writes 0.04-0.23 degrees; at 0.5 degrees a voxel at 120 mm
# from the origin moves by at most 120 * tan(0.5 deg) = 1.05 mm, about one voxel.
SHEAR_TOLERANCE_DEG = 0.5
# Below this the affine is treated as orthogonal and left exactly as it is.
_NEGLIGIBLE_DEG = 1e-4


def _check(affine) -> np.ndarray:
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise ValueError(f"affine must be a finite 4x4 matrix, got shape {a.shape}")
    if np.any(np.linalg.norm(a[:3, :3], axis=0) <= 0):
        raise ValueError("affine has a zero-length voxel axis")
    return a


def affine_shear_deg(affine) -> float:
    """Largest deviation from 90 degrees (in degrees) between two voxel axes of ``affine``."""
    a = _check(affine)
    cols = a[:3, :3] / np.linalg.norm(a[:3, :3], axis=0)
    worst = 0.0
    for i, j in ((0, 1), (0, 2), (1, 2)):
        c = float(np.clip(cols[:, i] @ cols[:, j], -1.0, 1.0))
        worst = max(worst, abs(90.0 - float(np.degrees(np.arccos(c)))))
    return worst


def orthogonalise_affine(affine, *, max_shear_deg: float = SHEAR_TOLERANCE_DEG
                         ) -> tuple[np.ndarray, float]:
    """Affine with orthogonal voxel axes, and the shear (degrees) that was removed.

    The column-normalised 3x3 part ``N`` is replaced by its nearest orthogonal matrix
    ``U V^T`` (from the SVD ``N = U S V^T``), scaled back by the voxel sizes; the origin
    (translation) is kept.  A shear below 1e-4 degrees returns the affine unchanged.

    Parameters
    ----------
    affine : 4x4 NIfTI affine (voxel indices to scanner mm).
    max_shear_deg : largest shear accepted (> 0).

    Returns
    -------
    (affine_out, shear_deg): float64 4x4 and the measured shear of the input.

    Raises
    ------
    ValueError when the shear exceeds ``max_shear_deg`` (the message gives both).
    """
    if not (np.isfinite(max_shear_deg) and max_shear_deg > 0):
        raise ValueError(f"max_shear_deg must be > 0, got {max_shear_deg!r}")
    a = _check(affine)
    shear = affine_shear_deg(a)
    if shear > max_shear_deg:
        raise ValueError(f"affine axes are {shear:.3g} degrees from orthogonal (sheared acquisition "
                         f"geometry); at most {max_shear_deg:g} degrees can be corrected")
    if shear <= _NEGLIGIBLE_DEG:
        return a.copy(), shear
    vs = np.linalg.norm(a[:3, :3], axis=0)
    u, _, vt = np.linalg.svd(a[:3, :3] / vs)
    out = a.copy()
    out[:3, :3] = (u @ vt) * vs
    out[3] = (0.0, 0.0, 0.0, 1.0)
    return out, shear

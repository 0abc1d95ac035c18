"""Phase-quality refinement of a brain mask: drop voxels whose wrapped phase is aliased."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from qsmdask.mask._common import largest_component

__all__ = ["max_wrapped_gradient", "phase_quality_mask"]


def _wrap(x):
    return (x + np.pi) % (2 * np.pi) - np.pi


def max_wrapped_gradient(phase_rad, mask=None) -> np.ndarray:
    """Largest |wrapped phase difference| (rad) from each voxel to its 6 face neighbours.

    Parameters
    ----------
    phase_rad : (x, y, z) wrapped phase in radians.
    mask : optional (x, y, z) bool; when given only pairs of neighbours that are both
        inside it count (a brain voxel is not judged by the noise phase of the air or
        bone next to it).

    Returns
    -------
    float32 (x, y, z) array in [0, pi]; 0 at neighbours outside the field of view
    (and, with ``mask``, for voxels with no neighbour in the mask).
    """
    phi = np.asarray(phase_rad, dtype=np.float32)
    if phi.ndim != 3:
        raise ValueError(f"phase_rad must be 3-D, got shape {phi.shape}")
    m = None
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        if m.shape != phi.shape:
            raise ValueError(f"mask shape {m.shape} differs from phase_rad shape {phi.shape}")
    g = np.zeros(phi.shape, dtype=np.float32)
    for axis in range(3):
        d = np.abs(_wrap(np.diff(phi, axis=axis)))
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis] = slice(0, -1)
        hi[axis] = slice(1, None)
        if m is not None:
            d = np.where(m[tuple(lo)] & m[tuple(hi)], d, np.float32(0))
        np.maximum(g[tuple(lo)], d, out=g[tuple(lo)])
        np.maximum(g[tuple(hi)], d, out=g[tuple(hi)])
    return g


PAIRS = ("all", "inside")


def phase_quality_mask(phase_rad, mask, *, max_gradient_rad: float = 1.0,
                       dilate_voxels: int = 1, pairs: str = "all",
                       dilate_min_gradient_rad: float = 0.0) -> np.ndarray:
    """Brain mask without the voxels where the wrapped phase cannot be trusted.

    Where the field changes by more than about pi per voxel (next to air and bone,
    where real scans also lose signal by intravoxel dephasing) the wrapped phase is
    aliased: no spatial unwrapping can recover it, and a Laplacian unwrapper spreads
    the error of those voxels over the whole brain.  Such voxels show large wrapped
    neighbour differences (aliased differences are spread over [-pi, pi]; noise in
    low-signal voxels too).  Voxels with a wrapped difference above
    ``max_gradient_rad`` to any compared face neighbour are removed, the removed set is
    dilated by ``dilate_voxels`` (aliased differences can wrap back to small values
    next to them), and the largest connected component of what is left is kept.
    Enclosed holes are not filled: they are the unreliable voxels.

    Parameters
    ----------
    phase_rad : (x, y, z) wrapped phase (rad) that will be spatially unwrapped; the
        echo-difference phase of :func:`qsmdask.unwrap.echo_difference_phase` (fewest wraps)
        or a single echo.
    mask : (x, y, z) bool brain mask.
    max_gradient_rad : largest trusted wrapped difference between neighbours, in (0, pi).
    dilate_voxels : int >= 0, dilation of the removed set (voxels, 6-connected steps).
    dilate_min_gradient_rad : the dilation takes only neighbours whose own largest wrapped
        difference (same pairs) exceeds this, in [0, ``max_gradient_rad``); 0 (default) takes
        every neighbour.  A neighbour whose aliased difference wrapped back to a small value
        still shows it unless it fell below this bound.
    pairs : "all" compares every face neighbour, also those outside ``mask``: a surface
        voxel next to noise (air, bone) is removed, and with the dilation the mask loses
        about two voxels at its whole surface (about 9 % of a 1 mm brain).  "inside"
        compares only pairs with both voxels in ``mask``: the surface is kept unless its
        own phase is aliased.  Measured on the project's simulated heads (threshold mask
        reaching into the extra-cerebral CSF next to bone) "all" is the more accurate
        (see docs/benchmarks.md, section recon-robustness (e)); "inside" suits tight brain masks.

    Returns
    -------
    bool (x, y, z) mask, a subset of ``mask`` (empty when nothing reliable is left).

    References
    ----------
    Ghiglia DC, Pritt MD. Two-Dimensional Phase Unwrapping. Wiley 1998 (phase
    derivative quality maps). Schofield MA, Zhu Y. Opt Lett 2003;28:1194-1196.
    """
    m = np.asarray(mask, dtype=bool)
    phi = np.asarray(phase_rad)
    if phi.ndim != 3:
        raise ValueError(f"phase_rad must be 3-D, got shape {phi.shape}")
    if m.shape != phi.shape:
        raise ValueError(f"mask shape {m.shape} differs from phase_rad shape {phi.shape}")
    if not (np.isfinite(max_gradient_rad) and 0 < max_gradient_rad < np.pi):
        raise ValueError(f"max_gradient_rad must be in (0, pi), got {max_gradient_rad!r}")
    if pairs not in PAIRS:
        raise ValueError(f"pairs must be one of {PAIRS}, got {pairs!r}")
    if int(dilate_voxels) != dilate_voxels or dilate_voxels < 0:
        raise ValueError(f"dilate_voxels must be an int >= 0, got {dilate_voxels!r}")
    if not (np.isfinite(dilate_min_gradient_rad) and 0 <= dilate_min_gradient_rad < max_gradient_rad):
        raise ValueError(f"dilate_min_gradient_rad must be in [0, max_gradient_rad), got {dilate_min_gradient_rad!r}")
    g = max_wrapped_gradient(phi, m if pairs == "inside" else None)
    bad = (g > max_gradient_rad) & m
    if dilate_voxels > 0 and bad.any():
        bad = ndimage.binary_dilation(bad, iterations=int(dilate_voxels),
                                      mask=g > dilate_min_gradient_rad if dilate_min_gradient_rad > 0 else None)
    return largest_component(m & ~bad)

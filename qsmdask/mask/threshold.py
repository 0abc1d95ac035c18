"""Brain mask by a robust intensity threshold and morphology."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from qsmdask.kernels import ellipsoid_structure
from qsmdask.mask._common import (check_volume, check_voxel_size, fill_holes, otsu_threshold,
                                  thickest_component)

__all__ = ["threshold_mask"]


def threshold_mask(magnitude, voxel_size_mm, *, threshold_fraction: float | None = None,
                   smooth_mm: float = 1.0, open_mm: float = 2.0) -> np.ndarray:
    """Brain mask from a magnitude image by thresholding and morphology.

    The magnitude (first echo if 4-D) is smoothed with a Gaussian of
    sigma ``smooth_mm``, thresholded, opened with a ball of ``open_mm`` (cuts
    thin bridges to scalp and vessels), reduced to its thickest connected
    component (largest inscribed ball: the brain, not a scalp shell), closed,
    and its holes are filled.

    Parameters
    ----------
    magnitude : (x, y, z) or (x, y, z, echo) array.
    voxel_size_mm : 3 floats.
    threshold_fraction : None (default) for Otsu's threshold on the voxels above
        the 2nd percentile, or a fraction in (0, 1) of the robust maximum (99.5th
        percentile).
    smooth_mm : Gaussian sigma in mm applied before thresholding (0 disables).
    open_mm : radius in mm of the opening (and closing) ball (0 disables).

    Returns
    -------
    bool array (x, y, z).

    References
    ----------
    Otsu N. IEEE Trans Syst Man Cybern 1979;9:62-66.
    """
    mag = np.abs(check_volume(magnitude, "magnitude"))
    vs = check_voxel_size(voxel_size_mm)
    if threshold_fraction is not None and not (0 < threshold_fraction < 1):
        raise ValueError(f"threshold_fraction must be in (0, 1) or None, got {threshold_fraction!r}")
    if smooth_mm < 0 or open_mm < 0:
        raise ValueError("smooth_mm and open_mm must be >= 0")
    if smooth_mm > 0:
        mag = ndimage.gaussian_filter(mag, sigma=smooth_mm / vs)
    lo, hi = np.percentile(mag, [2.0, 99.5])
    if hi <= lo:
        return np.zeros(mag.shape, dtype=bool)
    if threshold_fraction is None:
        thr = otsu_threshold(mag[mag > lo])
    else:
        thr = threshold_fraction * hi
    m = mag > thr
    if open_mm > 0:
        ball = ellipsoid_structure(open_mm, vs)
        opened = ndimage.binary_opening(m, structure=ball)
        if opened.any():
            m = opened
    m = thickest_component(m, vs)
    if open_mm > 0:
        ball = ellipsoid_structure(open_mm, vs)
        p = max(ball.shape)
        m = ndimage.binary_closing(np.pad(m, p), structure=ball)
        m = m[p:-p, p:-p, p:-p]
    return fill_holes(m)

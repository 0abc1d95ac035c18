"""V-SHARP: SHARP with variable SMV radius (Wu et al. 2012; Li et al. 2011)."""

from __future__ import annotations

import numpy as np

from qsmdask.bgremove.sharp import _check
from qsmdask.kernels import PaddedFFT, distance_to_edge_mm, smv_kernel

__all__ = ["vsharp", "default_radii_mm"]


def default_radii_mm(voxel_size_mm, *, max_radius_mm: float = 6.0) -> tuple[float, ...]:
    """Radii from ``max_radius_mm`` down to the largest voxel edge, in steps of that edge."""
    h = float(np.max(voxel_size_mm))
    if max_radius_mm < h:
        return (float(max_radius_mm),)
    radii = np.arange(max_radius_mm, h - 1e-6, -h)
    return tuple(float(r) for r in radii)


def vsharp(field_ppm, mask, voxel_size_mm, *, radii_mm=None, max_radius_mm: float = 6.0,
           threshold: float = 0.05, fft_workers: int = 1):
    """Variable-radius SHARP background field removal.

    For every radius (largest first) the high-passed field (delta - S_r) * field
    is taken in the voxels at least r from the mask edge that no larger radius
    reached, so the brain edge is kept with small spheres while the interior uses
    the large, well-conditioned one.  The combined image is deconvolved with the
    largest kernel (|1 - S| < ``threshold`` truncated).

    Parameters
    ----------
    field_ppm : (x, y, z) total field (ppm).
    mask : (x, y, z) bool brain mask.
    voxel_size_mm : 3 floats.
    radii_mm : radii in mm; default :func:`default_radii_mm` (voxel size to
        ``max_radius_mm``).
    max_radius_mm : largest radius when ``radii_mm`` is None (the reference study: 6 mm).
    threshold : truncation level in (0, 1).
    fft_workers : FFT threads (>= 1).

    Returns
    -------
    (local_field_ppm, eroded_mask): the mask eroded by the smallest radius.

    References
    ----------
    Wu B, Li W, Guidon A, Liu C. Whole brain susceptibility mapping using compressed
    sensing. Magn Reson Med 2012;67:137-147.
    Li W, Wu B, Liu C. Quantitative susceptibility mapping of human brain reflects
    spatial variation in tissue composition. NeuroImage 2011;55:1645-1656.
    """
    f, m, vs = _check(field_ppm, mask, voxel_size_mm)
    if radii_mm is None:
        if not (np.isfinite(max_radius_mm) and max_radius_mm > 0):
            raise ValueError(f"max_radius_mm must be > 0, got {max_radius_mm!r}")
        radii = default_radii_mm(vs, max_radius_mm=max_radius_mm)
    else:
        radii = tuple(sorted((float(r) for r in radii_mm), reverse=True))
        if not radii or min(radii) <= 0:
            raise ValueError(f"radii_mm must be positive radii, got {radii_mm!r}")
    if not (0 < threshold < 1):
        raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")
    pad = [int(np.ceil(radii[0] / d)) + 1 for d in vs]
    fft = PaddedFFT(f.shape, pad, workers=fft_workers)
    f0 = np.where(m, f - f[m].mean(), 0).astype(np.float32)
    spec = fft.forward(f0)
    combined = np.zeros(f.shape, dtype=np.float32)
    done = np.zeros(f.shape, dtype=bool)
    first_kernel = None
    # distance to the mask edge (the field-of-view border counts as outside), once for all radii
    dist = distance_to_edge_mm(m, vs)
    for r in radii:
        s = smv_kernel(fft.padded_shape, vs, r, real=True)
        one_minus_s = (1.0 - s).astype(np.float32)
        if first_kernel is None:
            first_kernel = one_minus_s
        er = dist > r
        new = er & ~done
        if new.any():
            hp = fft.inverse(one_minus_s * spec)
            combined[new] = hp[new]
            done |= new
    eroded = done
    if not eroded.any():
        raise ValueError(f"mask vanishes after erosion by the smallest radius {radii[-1]} mm")
    keep = np.abs(first_kernel) >= threshold
    inv = np.where(keep, 1.0 / np.where(keep, first_kernel, 1), 0).astype(np.float32)
    local = fft.inverse(inv * fft.forward(combined))
    local = np.where(eroded, local, 0).astype(np.float32)
    return local, eroded

"""Quality-guided region-growing phase unwrapping (path following)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["quality_map", "region_growing_unwrap"]

_TWO_PI = np.float32(2 * np.pi)


def _wrap(x):
    return (x + np.pi) % (2 * np.pi) - np.pi


def _shift(x: np.ndarray, step: int, axis: int) -> np.ndarray:
    """x shifted by ``step`` along ``axis`` with zero fill (no wrap-around)."""
    res = np.zeros_like(x)
    src = [slice(None)] * x.ndim
    dst = [slice(None)] * x.ndim
    if step > 0:
        src[axis], dst[axis] = slice(0, -step), slice(step, None)
    else:
        src[axis], dst[axis] = slice(-step, None), slice(0, step)
    res[tuple(dst)] = x[tuple(src)]
    return res


def quality_map(phase_rad: np.ndarray, magnitude=None) -> np.ndarray:
    """Voxel quality in [0, 1]: 1 - mean |wrapped neighbour difference| / pi, times the
    normalised magnitude when given (smooth, bright voxels are unwrapped first)."""
    phi = np.asarray(phase_rad, dtype=np.float32)
    acc = np.zeros(phi.shape, dtype=np.float32)
    cnt = np.zeros(phi.shape, dtype=np.float32)
    for a in range(3):
        d = np.abs(_wrap(np.diff(phi, axis=a)))
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[a] = slice(0, -1)
        hi[a] = slice(1, None)
        acc[tuple(lo)] += d
        acc[tuple(hi)] += d
        cnt[tuple(lo)] += 1
        cnt[tuple(hi)] += 1
    q = 1.0 - acc / np.maximum(cnt, 1) / np.pi
    if magnitude is not None:
        mag = np.abs(np.asarray(magnitude, dtype=np.float32))
        q = q * np.clip(mag / max(float(np.percentile(mag, 99)), 1e-12), 0, 1)
    return q.astype(np.float32)


def region_growing_unwrap(phase_rad, *, magnitude=None, mask=None, n_levels: int = 16,
                          max_steps: int = 100000) -> np.ndarray:
    """Unwrap by growing a region from the best voxel, in order of decreasing quality.

    Voxels are admitted in ``n_levels`` quality bands (best first).  Within a band
    the unwrapped region grows one neighbour shell at a time (voxels of the band
    not yet reachable wait for lower bands); each new voxel is unwrapped to within
    pi of the mean of its already-unwrapped 6-neighbours.  The result is congruent
    with the input (differs by multiples of 2 pi) and, unlike Laplacian
    unwrapping, keeps steep but valid phase gradients (< pi per voxel) exact.

    Parameters
    ----------
    phase_rad : (x, y, z) wrapped phase (rad).
    magnitude : optional (x, y, z) magnitude to weight the quality.
    mask : optional (x, y, z) bool region to unwrap (default: everything); voxels
        outside it keep their wrapped value.  Components not connected to the
        first seed's are grown from their own best voxel.
    n_levels : number of quality bands (>= 1).
    max_steps : safety limit on growth steps.

    Returns
    -------
    float32 (x, y, z) unwrapped phase (rad).

    References
    ----------
    Xu W, Cumming I. A region-growing algorithm for InSAR phase unwrapping. IEEE
    Trans Geosci Remote Sens 1999;37:124-134.
    Witoszynskyj S et al. Phase unwrapping of MR images using PhiUN. Med Image Anal
    2009;13:257-268.
    """
    phi = np.asarray(phase_rad, dtype=np.float32)
    if phi.ndim != 3:
        raise ValueError(f"phase_rad must be 3-D, got shape {phi.shape}")
    if int(n_levels) < 1:
        raise ValueError(f"n_levels must be >= 1, got {n_levels!r}")
    region = np.ones(phi.shape, bool) if mask is None else np.asarray(mask, dtype=bool)
    if region.shape != phi.shape:
        raise ValueError(f"mask shape {region.shape} differs from phase_rad shape {phi.shape}")
    if mask is not None and region.any():
        # work on the bounding box of the mask only
        idx = np.argwhere(region)
        lo = np.maximum(idx.min(axis=0) - 1, 0)
        hi = np.minimum(idx.max(axis=0) + 2, phi.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        if any(b - a < n for a, b, n in zip(lo, hi, phi.shape)):
            result = phi.copy()
            result[box] = region_growing_unwrap(
                phi[box], magnitude=None if magnitude is None else np.asarray(magnitude)[box],
                mask=region[box], n_levels=n_levels, max_steps=max_steps)
            return result
    q = quality_map(phi, magnitude)
    q = np.where(region, q, -np.inf)
    levels = list(np.quantile(q[region], np.linspace(1, 0, int(n_levels) + 1)[1:-1])) if region.any() else []
    result = phi.copy()
    done = np.zeros(phi.shape, dtype=bool)
    struct = ndimage.generate_binary_structure(3, 1)
    steps = 0
    for level in levels + [-np.inf]:
        allowed = region & (q >= level) & ~done
        while allowed.any() and steps < max_steps:
            front = (ndimage.binary_dilation(done, struct) & allowed) if done.any() else None
            if front is None or not front.any():
                if np.isfinite(level) and done.any():
                    break  # the rest of this band is not reachable yet: wait for lower bands
                # first seed, or a component not connected to the grown region
                seed = np.unravel_index(np.argmax(np.where(allowed, q, -np.inf)), q.shape)
                done[seed] = True
                allowed[seed] = False
                continue
            ssum = np.zeros(phi.shape, np.float32)
            scnt = np.zeros(phi.shape, np.float32)
            val = np.where(done, result, 0).astype(np.float32)
            dn = done.astype(np.float32)
            for a in range(3):
                for sh in (1, -1):
                    ssum += _shift(val, sh, a)
                    scnt += _shift(dn, sh, a)
            ref = ssum[front] / np.maximum(scnt[front], 1)
            result[front] = phi[front] + _TWO_PI * np.round((ref - phi[front]) / _TWO_PI)
            done |= front
            allowed &= ~front
            steps += 1
    return result

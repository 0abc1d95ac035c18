"""Shared input checks and morphology for the brain-mask methods."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from qsmdask.kernels import check_voxel_size  # noqa: F401  (re-exported for the mask modules)


def check_volume(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim == 4 and a.shape[3] >= 1:
        a = a[..., 0]
    if a.ndim != 3:
        raise ValueError(f"{name} must be a 3-D (x, y, z) array, got shape {a.shape}")
    a = a.astype(np.float32, copy=False)
    if not np.all(np.isfinite(a)):
        a = np.where(np.isfinite(a), a, 0).astype(np.float32)
    return a


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 6-connected component of a boolean mask (empty stays empty)."""
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask.astype(bool)
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    return labels == int(np.argmax(counts))


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill enclosed holes in 3-D and then slice by slice along the last (slice) axis."""
    m = ndimage.binary_fill_holes(mask)
    for k in range(m.shape[2]):
        if m[:, :, k].any():
            m[:, :, k] = ndimage.binary_fill_holes(m[:, :, k])
    return m


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a 1-D sample (maximises the between-class variance)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0 or v.max() <= v.min():
        return float(v.max()) if v.size else 0.0
    hist, edges = np.histogram(v, bins=bins)
    centres = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mt = m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mt * w0 / w0[-1] - m0) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = 0
    return float(edges[int(np.argmax(between)) + 1])


def thickest_component(mask: np.ndarray, voxel_size_mm) -> np.ndarray:
    """The connected component with the largest inscribed ball (max distance to its edge).

    Picks the brain rather than a thin but large scalp shell.  The distance is
    taken on a 2x subsampled grid (only the ranking of components matters)."""
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask.astype(bool)
    sub = labels[::2, ::2, ::2]
    vs2 = 2.0 * np.asarray(voxel_size_mm, dtype=float)
    dist = ndimage.distance_transform_edt(np.pad(sub > 0, 1), sampling=vs2)[1:-1, 1:-1, 1:-1]
    best = ndimage.maximum(dist, sub, index=np.arange(1, n + 1))
    best = np.nan_to_num(np.asarray(best, dtype=float), nan=0.0)
    if not np.any(best > 0):  # components too thin to survive subsampling: fall back to size
        return largest_component(mask)
    return labels == int(np.argmax(best)) + 1

"""Shared k-space kernels and geometry helpers (pure numpy/scipy).

All kernels follow one convention: ``shape`` is the (padded) array shape,
``voxel_size_mm`` the voxel edge lengths along the three array axes, and
``b0_dir`` the unit vector of the main field expressed in the (orthonormal)
frame of the voxel axes.  Kernels may be built for a full complex FFT
(``real=False``) or for ``scipy.fft.rfftn`` (``real=True``: last axis n//2+1).
"""

from __future__ import annotations

import numpy as np
import scipy.fft

__all__ = [
    "b0_direction_from_affine",
    "voxel_size_from_affine",
    "kspace_grid",
    "dipole_kernel",
    "fast_fft_shape",
    "pad_array",
    "unpad_array",
]


def voxel_size_from_affine(affine) -> tuple[float, float, float]:
    """Voxel edge lengths in mm: the norms of the affine's first three columns."""
    a = np.asarray(affine, dtype=float)
    return tuple(float(v) for v in np.linalg.norm(a[:3, :3], axis=0))


def b0_direction_from_affine(affine, scanner_b0=(0.0, 0.0, 1.0)) -> np.ndarray:
    """Unit B0 direction in voxel-axis coordinates.

    The NIfTI affine maps voxel indices to scanner (RAS) millimetres.  Its
    rotation part, with columns normalised by the voxel sizes, is ``R``; the
    scanner z axis (B0) seen in the voxel frame is ``R^T (0, 0, 1)``.  Shears
    are removed by taking the nearest orthonormal matrix (polar decomposition).
    """
    a = np.asarray(affine, dtype=float)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise ValueError(f"affine must be a finite 4x4 matrix, got shape {a.shape}")
    m = a[:3, :3]
    vs = np.linalg.norm(m, axis=0)
    if np.any(vs <= 0):
        raise ValueError("affine has a zero-length voxel axis")
    r = m / vs
    u, _, vt = np.linalg.svd(r)
    r = u @ vt
    b = r.T @ np.asarray(scanner_b0, dtype=float)
    return b / np.linalg.norm(b)


def kspace_grid(shape, voxel_size_mm, *, real: bool = False, dtype=np.float32):
    """Spatial-frequency coordinates (cycles/mm) as three broadcastable arrays."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise ValueError(f"shape must be 3-D, got {shape}")
    vs = np.asarray(voxel_size_mm, dtype=float)
    ks = []
    for axis, (n, d) in enumerate(zip(shape, vs)):
        if real and axis == 2:
            k = np.fft.rfftfreq(n, d=d)
        else:
            k = np.fft.fftfreq(n, d=d)
        view = [1, 1, 1]
        view[axis] = k.size
        ks.append(k.astype(dtype).reshape(view))
    return ks


def dipole_kernel(shape, voxel_size_mm, b0_dir=(0.0, 0.0, 1.0), *, real: bool = False,
                  dtype=np.float32) -> np.ndarray:
    """Unit dipole response in k-space, D = 1/3 - (k.b0)^2 / |k|^2, with D(0) = 0.

    Parameters
    ----------
    shape : 3 ints, the (padded) image shape.
    voxel_size_mm : 3 floats.
    b0_dir : 3 floats, B0 in voxel-axis coordinates (normalised here).
    real : build for ``rfftn`` (half spectrum on the last axis).

    Returns
    -------
    ndarray of ``dtype``; field_ppm = IFFT(D * FFT(chi_ppm)).
    """
    b = np.asarray(b0_dir, dtype=float)
    nb = np.linalg.norm(b)
    if b.shape != (3,) or not np.isfinite(nb) or nb == 0:
        raise ValueError(f"b0_dir must be a non-zero 3-vector, got {b0_dir!r}")
    b = b / nb
    kx, ky, kz = kspace_grid(shape, voxel_size_mm, real=real, dtype=np.float64)
    kb = kx * b[0] + ky * b[1] + kz * b[2]
    k2 = kx**2 + ky**2 + kz**2
    with np.errstate(divide="ignore", invalid="ignore"):
        d = 1.0 / 3.0 - kb**2 / k2
    d[0, 0, 0] = 0.0
    return d.astype(dtype)


def fast_fft_shape(shape, pad=(0, 0, 0)) -> tuple[int, int, int]:
    """Smallest shapes >= shape + 2*pad that scipy's FFT handles quickly."""
    return tuple(int(scipy.fft.next_fast_len(int(s) + 2 * int(p), real=True))
                 for s, p in zip(shape, pad))


def pad_array(x: np.ndarray, padded_shape) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Zero-pad ``x`` (centred) to ``padded_shape``; returns the array and the crop slices."""
    before = [(p - s) // 2 for s, p in zip(x.shape, padded_shape)]
    if any(b < 0 for b in before):
        raise ValueError(f"padded shape {padded_shape} smaller than {x.shape}")
    out = np.zeros(padded_shape, dtype=x.dtype)
    sl = tuple(slice(b, b + s) for b, s in zip(before, x.shape))
    out[sl] = x
    return out, sl


def unpad_array(x: np.ndarray, slices) -> np.ndarray:
    """Inverse of :func:`pad_array`."""
    return np.ascontiguousarray(x[tuple(slices)])

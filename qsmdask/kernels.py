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
    "check_voxel_size",
    "check_b0_dir",
    "b0_direction_from_affine",
    "voxel_size_from_affine",
    "kspace_grid",
    "dipole_kernel",
    "fast_fft_shape",
    "pad_array",
    "unpad_array",
    "smv_kernel",
    "laplacian_kernel",
    "finite_difference_laplacian",
    "ellipsoid_structure",
    "erode_mask_mm",
    "distance_to_edge_mm",
    "PaddedFFT",
]


def check_voxel_size(voxel_size_mm) -> np.ndarray:
    """``voxel_size_mm`` as three positive finite floats, or ValueError naming the parameter."""
    vs = np.asarray(voxel_size_mm, dtype=float).reshape(-1)
    if vs.shape != (3,) or not np.all(np.isfinite(vs)) or np.any(vs <= 0):
        raise ValueError(f"voxel_size_mm must be three positive numbers, got {voxel_size_mm!r}")
    return vs


def check_b0_dir(b0_dir) -> np.ndarray:
    """``b0_dir`` normalised to a unit 3-vector, or ValueError naming the parameter."""
    b = np.asarray(b0_dir, dtype=float).reshape(-1)
    n = np.linalg.norm(b) if b.shape == (3,) else 0.0
    if b.shape != (3,) or not np.isfinite(n) or n == 0:
        raise ValueError(f"b0_dir must be a non-zero 3-vector, got {b0_dir!r}")
    return b / n


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
    b = check_b0_dir(b0_dir)
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


def smv_kernel(shape, voxel_size_mm, radius_mm: float, *, real: bool = True,
               dtype=np.float32) -> np.ndarray:
    """Spherical mean value (SMV) kernel in k-space.

    The normalised indicator of a sphere of ``radius_mm`` (ellipsoidal in
    voxels when voxels are anisotropic), centred on voxel (0, 0, 0) with
    periodic wrap-around, transformed with ``rfftn`` (``real=True``) or
    ``fftn``.  The kernel is real (the sphere is point-symmetric), so only the
    real part is returned; S(0) = 1.

    Parameters
    ----------
    shape : 3 ints, the (padded) image shape.
    voxel_size_mm : 3 floats.
    radius_mm : float > 0, sphere radius in millimetres.

    References
    ----------
    Schweser F et al. NeuroImage 2011;54:2789-2807 (SHARP).
    """
    shape = tuple(int(s) for s in shape)
    vs = np.asarray(voxel_size_mm, dtype=float)
    if not (np.isfinite(radius_mm) and radius_mm > 0):
        raise ValueError(f"radius_mm must be > 0, got {radius_mm!r}")
    coords = []
    for axis, (n, d) in enumerate(zip(shape, vs)):
        i = np.arange(n)
        i = np.where(i > n // 2, i - n, i) * d
        view = [1, 1, 1]
        view[axis] = n
        coords.append(i.reshape(view))
    r2 = coords[0] ** 2 + coords[1] ** 2 + coords[2] ** 2
    sphere = (r2 <= radius_mm ** 2).astype(np.float64)
    sphere /= sphere.sum()
    if real:
        k = scipy.fft.rfftn(sphere).real
    else:
        k = scipy.fft.fftn(sphere).real
    return k.astype(dtype)


def laplacian_kernel(shape, voxel_size_mm, *, real: bool = True, dtype=np.float32) -> np.ndarray:
    """Eigenvalues of the periodic 7-point discrete Laplacian (1/mm^2) in k-space.

    L(k) = sum_i (2 cos(2 pi k_i h_i) - 2) / h_i^2, with k in cycles/mm and
    h the voxel size: ``IFFT(L * FFT(x))`` equals the finite-difference
    Laplacian of ``x`` with periodic boundaries.
    """
    vs = np.asarray(voxel_size_mm, dtype=float)
    ks = kspace_grid(shape, vs, real=real, dtype=np.float64)
    lap = 0.0
    for k, h in zip(ks, vs):
        lap = lap + (2.0 * np.cos(2.0 * np.pi * k * h) - 2.0) / h ** 2
    return np.asarray(lap, dtype=dtype)


def finite_difference_laplacian(x: np.ndarray, inv_h2, out: np.ndarray) -> np.ndarray:
    """7-point Laplacian of ``x`` with zeros beyond the array edge, written into ``out``.

    ``inv_h2``: 1 / voxel size^2 per axis (1/mm^2). The finite-difference counterpart of
    :func:`laplacian_kernel` (which is its periodic version in k-space)."""
    out.fill(0)
    for ax, w in enumerate(inv_h2):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[ax], hi[ax] = slice(None, -1), slice(1, None)
        out[tuple(lo)] += w * x[tuple(hi)]
        out[tuple(hi)] += w * x[tuple(lo)]
    out -= np.float32(2.0 * sum(inv_h2)) * x
    return out


def ellipsoid_structure(radius_mm: float, voxel_size_mm) -> np.ndarray:
    """Boolean structuring element: the voxels within ``radius_mm`` of the centre."""
    vs = np.asarray(voxel_size_mm, dtype=float)
    if not (np.isfinite(radius_mm) and radius_mm >= 0):
        raise ValueError(f"radius_mm must be >= 0, got {radius_mm!r}")
    half = [int(np.floor(radius_mm / d)) for d in vs]
    grids = np.ogrid[tuple(slice(-h, h + 1) for h in half)]
    r2 = sum((g * d) ** 2 for g, d in zip(grids, vs))
    return np.asarray(r2 <= radius_mm ** 2 + 1e-9)


def distance_to_edge_mm(mask: np.ndarray, voxel_size_mm) -> np.ndarray:
    """Euclidean distance (mm) from each mask voxel to the nearest voxel outside it.

    The field-of-view border counts as outside.  Computed on the mask's bounding
    box only (scipy's exact transform is the slow part on large volumes).
    """
    from scipy import ndimage

    m = np.asarray(mask, dtype=bool)
    out = np.zeros(m.shape, dtype=np.float32)
    if not m.any():
        return out
    idx = np.argwhere(m)
    lo, hi = idx.min(axis=0), idx.max(axis=0) + 1
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    sub = np.pad(m[box], 1)
    dist = ndimage.distance_transform_edt(sub, sampling=np.asarray(voxel_size_mm, dtype=float))
    out[box] = dist[1:-1, 1:-1, 1:-1]
    return out


def erode_mask_mm(mask: np.ndarray, radius_mm: float, voxel_size_mm) -> np.ndarray:
    """Erode a boolean mask by ``radius_mm`` (Euclidean, anisotropic voxels honoured).

    The field-of-view border counts as outside.  Uses a distance transform,
    so the cost does not grow with the radius.
    """
    return np.asarray(distance_to_edge_mm(mask, voxel_size_mm) > radius_mm)


class PaddedFFT:
    """Real 3-D FFT on a zero-padded, fast-size grid, built once and reused.

    ``forward(x)`` pads ``x`` (centred) to ``padded_shape`` and returns its
    ``rfftn``; ``inverse(X)`` returns the real inverse cropped back to
    ``shape``.  Threads only through ``workers`` (default 1: Dask owns the
    parallelism of the pipeline).

    Parameters
    ----------
    shape : 3 ints, the image shape.
    pad_voxels : 3 ints, minimum zero padding on each side.
    workers : int >= 1, FFT threads.
    """

    def __init__(self, shape, pad_voxels=(0, 0, 0), *, workers: int = 1):
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) != 3:
            raise ValueError(f"shape must be 3-D, got {shape}")
        if int(workers) < 1:
            raise ValueError(f"workers must be >= 1, got {workers!r}")
        self.workers = int(workers)
        self.padded_shape = fast_fft_shape(self.shape, pad_voxels)
        before = [(p - s) // 2 for s, p in zip(self.shape, self.padded_shape)]
        self.slices = tuple(slice(b, b + s) for b, s in zip(before, self.shape))

    def pad(self, x: np.ndarray) -> np.ndarray:
        out = np.zeros(self.padded_shape, dtype=np.float32)
        out[self.slices] = x
        return out

    def forward(self, x: np.ndarray) -> np.ndarray:
        return scipy.fft.rfftn(self.pad(x), workers=self.workers)

    def inverse(self, spectrum: np.ndarray) -> np.ndarray:
        full = scipy.fft.irfftn(spectrum, s=self.padded_shape, workers=self.workers)
        return np.ascontiguousarray(full[self.slices], dtype=np.float32)

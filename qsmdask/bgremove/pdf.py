"""Projection onto dipole fields (PDF) background field removal (Liu et al. 2011)."""

from __future__ import annotations

import numpy as np
import scipy.fft

from qsmdask.bgremove.sharp import _check
from qsmdask.kernels import PaddedFFT, check_b0_dir, dipole_kernel

__all__ = ["pdf"]


def pdf(field_ppm, mask, voxel_size_mm, *, b0_dir=(0.0, 0.0, 1.0), weight=None, max_iter: int = 50,
        tol: float = 1e-3, pad_voxels=(24, 24, 24), fft_workers: int = 1):
    """Background field as the field of dipoles outside the brain, fitted by least squares.

    Minimises || W (f - M D chi_out) ||^2 over susceptibility sources chi_out
    supported outside the mask (in the zero-padded field of view) with
    conjugate gradients on the normal equations; the local field is f minus
    that background, inside the mask (which is not eroded).

    Parameters
    ----------
    field_ppm : (x, y, z) total field (ppm).
    mask : (x, y, z) bool brain mask.
    voxel_size_mm : 3 floats.
    b0_dir : B0 in voxel-axis coordinates.
    weight : optional (x, y, z) non-negative data weight (e.g. magnitude/noise).
    max_iter : conjugate-gradient iterations (>= 1).
    tol : relative residual tolerance.
    pad_voxels : zero padding per side (room for outside sources).
    fft_workers : FFT threads (>= 1).

    Returns
    -------
    (local_field_ppm, mask): local field, 0 outside the mask, and the mask.

    References
    ----------
    Liu T, Khalidov I, de Rochefort L, et al. A novel background field removal method for
    MRI using projection onto dipole fields (PDF). NMR Biomed 2011;24:1129-1136.
    """
    f, m, vs = _check(field_ppm, mask, voxel_size_mm)
    b = check_b0_dir(b0_dir)
    if int(max_iter) < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter!r}")
    fft = PaddedFFT(f.shape, pad_voxels, workers=fft_workers)
    shape = fft.padded_shape
    d = dipole_kernel(shape, vs, b, real=True)
    mp = fft.pad(m.astype(np.float32)) > 0
    w = mp.astype(np.float32)
    if weight is not None:
        wt = np.asarray(weight, dtype=np.float32)
        if wt.shape != f.shape or np.any(wt < 0):
            raise ValueError("weight must be non-negative with the field's shape")
        w = w * fft.pad(wt / max(float(wt[m].mean()), 1e-12))
    w2 = w * w
    out = ~mp

    def conv(x):
        return scipy.fft.irfftn(d * scipy.fft.rfftn(x, workers=fft.workers), s=shape,
                                workers=fft.workers).astype(np.float32)

    def normal(x):  # A^T A x with A = W D P_out
        return np.where(out, conv(w2 * conv(np.where(out, x, 0))), 0).astype(np.float32)

    fp = fft.pad(np.where(m, f, 0))
    rhs = np.where(out, conv(w2 * fp), 0).astype(np.float32)
    x = np.zeros(shape, dtype=np.float32)
    r = rhs.copy()
    p = r.copy()
    rr = float(np.vdot(r, r))
    r0 = np.sqrt(rr) + 1e-30
    for _ in range(int(max_iter)):
        ap = normal(p)
        alpha = rr / max(float(np.vdot(p, ap)), 1e-30)
        x += np.float32(alpha) * p
        r -= np.float32(alpha) * ap
        rr_new = float(np.vdot(r, r))
        if np.sqrt(rr_new) / r0 < tol:
            break
        p = r + np.float32(rr_new / rr) * p
        rr = rr_new
    background = conv(np.where(out, x, 0))[fft.slices]
    local = np.where(m, f - background, 0).astype(np.float32)
    local[m] -= local[m].mean()
    return local, m.copy()

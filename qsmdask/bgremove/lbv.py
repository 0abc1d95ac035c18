"""LBV: Laplacian boundary value background field removal (Zhou et al. 2014)."""

from __future__ import annotations

import numpy as np
import scipy.fft
import scipy.ndimage as ndi

from qsmdask.bgremove.sharp import _check
from qsmdask.kernels import finite_difference_laplacian as _laplacian

__all__ = ["lbv"]


def _dirichlet_eigenvalues(shape, inv_h2) -> np.ndarray:
    """Eigenvalues of the box 7-point Laplacian with zero Dirichlet boundary (DST-I basis)."""
    ev = np.zeros(shape, dtype=np.float64)
    for ax, (n, w) in enumerate(zip(shape, inv_h2)):
        k = np.arange(1, n + 1)
        e = w * (2.0 * np.cos(np.pi * k / (n + 1)) - 2.0)
        s = [1, 1, 1]
        s[ax] = n
        ev = ev + e.reshape(s)
    return ev


def lbv(field_ppm, mask, voxel_size_mm, *, tol: float = 1e-4, max_iter: int = 300,
        fft_workers: int = 1):
    """Laplacian boundary value (LBV) background field removal.

    Background fields are harmonic in the brain, so the Laplacian of the total
    field is the Laplacian of the local field.  LBV solves Poisson's equation
    lap(f_L) = lap(f) in the brain with f_L = 0 on its boundary.  Unlike SHARP
    there is no spherical-mean kernel and no k-space truncation, so the slowly
    varying part of the local field of deep structures (which sets their ROI
    means) is kept and only one voxel is eroded.  The linear system (the masked
    7-point Laplacian) is solved by conjugate gradients preconditioned with the
    exact inverse of the Laplacian on the mask's bounding box (DST-I), which
    converges in a few tens of iterations.

    Parameters
    ----------
    field_ppm : (x, y, z) total field (ppm).
    mask : (x, y, z) bool brain mask.
    voxel_size_mm : 3 floats.
    tol : relative residual at which the iterations stop (> 0).
    max_iter : largest number of conjugate-gradient iterations (>= 1).
    fft_workers : FFT threads of the preconditioner (>= 1).

    Returns
    -------
    (local_field_ppm, eroded_mask): float32 local field, 0 outside ``eroded_mask``
    (the mask without its one-voxel boundary layer, where the Laplacian of the
    field would use voxels outside the brain).

    References
    ----------
    Zhou D, Liu T, Spincemaille P, Wang Y. Background field removal by solving the
    Laplacian boundary value problem. NMR Biomed 2014;27:312-319.
    """
    f, m, vs = _check(field_ppm, mask, voxel_size_mm)
    if not (np.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be > 0, got {tol!r}")
    if int(max_iter) < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter!r}")
    if int(fft_workers) < 1:
        raise ValueError(f"fft_workers must be >= 1, got {fft_workers!r}")
    interior = ndi.binary_erosion(m, structure=ndi.generate_binary_structure(3, 1), border_value=0)
    out = np.zeros(f.shape, dtype=np.float32)
    if not interior.any():
        raise ValueError("the mask has no interior voxels (is it thinner than 3 voxels?)")
    # work on the bounding box of the mask plus one voxel (zeros outside the mask)
    idx = np.nonzero(m)
    box = tuple(slice(max(int(i.min()) - 1, 0), min(int(i.max()) + 2, n)) for i, n in zip(idx, f.shape))
    fb = np.where(m[box], f[box], 0).astype(np.float32)
    fb[m[box]] -= fb[m[box]].mean()
    inner = interior[box]
    # grow the box (zeros: outside the brain) to lengths n whose DST-I (an FFT of length
    # 2(n + 1)) is fast: a prime n + 1 made each preconditioner call 2-3x slower; a larger
    # box is as good a preconditioner and the CG solves the same masked system
    crop = tuple(slice(0, n) for n in fb.shape)
    fast = tuple(scipy.fft.next_fast_len(n + 1) - 1 for n in fb.shape)
    if fast != fb.shape:
        pad = [(0, nf - n) for nf, n in zip(fast, fb.shape)]
        fb, inner = np.pad(fb, pad), np.pad(inner, pad)
    inv_h2 = tuple(np.float32(1.0 / (d * d)) for d in vs)
    tmp = np.empty_like(fb)
    # right-hand side: minus the Laplacian of the field where all six neighbours are brain
    b = np.where(inner, -_laplacian(fb, inv_h2, tmp), 0).astype(np.float32)
    nb = float(np.linalg.norm(b))
    if nb == 0:
        return out, interior
    inv_ev = (-1.0 / _dirichlet_eigenvalues(fb.shape, inv_h2)).astype(np.float32)
    workers = int(fft_workers)

    def apply_a(x, dst):  # -Laplacian restricted to the interior (x is 0 outside it)
        _laplacian(x, inv_h2, dst)
        np.negative(dst, out=dst)
        dst[~inner] = 0
        return dst

    def precondition(r):
        y = scipy.fft.idstn(scipy.fft.dstn(r, type=1, workers=workers) * inv_ev, type=1, workers=workers)
        y = y.astype(np.float32, copy=False)
        y[~inner] = 0
        return y

    x = np.zeros_like(b)
    r = b.copy()
    z = precondition(r)
    p = z.copy()
    rz = float(np.vdot(r, z))
    ap = np.empty_like(b)
    for _ in range(int(max_iter)):
        apply_a(p, ap)
        alpha = np.float32(rz / float(np.vdot(p, ap)))
        x += alpha * p
        r -= alpha * ap
        if float(np.linalg.norm(r)) <= tol * nb:
            break
        z = precondition(r)
        rz_new = float(np.vdot(r, z))
        p *= np.float32(rz_new / rz)
        p += z
        rz = rz_new
    out[box] = np.where(inner, x, 0)[crop]
    return out, interior

"""The part of a local field that a boundary-value background removal drops (issue 14).

LBV solves lap(f_L) = lap(f) in the brain with f_L = 0 on the brain's boundary.  The field of
the brain's own susceptibility is not 0 there, so what LBV returns is f_L - H, where H is the
harmonic function inside the brain that takes the true local field's boundary values.  A
deep source's field reaches the cortex, so H carries part of every deep source; the inversion
turns that smooth missing field into a broad halo of the opposite sign
(docs/benchmarks.md, "Where the halo comes from").

H is a function of the local field, i.e. of chi inside the brain: for a chi estimate ``x``
(0 outside its support), ``D*x - LBV(D*x)`` is exactly the harmonic function with the boundary
values of the field of ``x``: :func:`lbv_boundary_field`.  For the true chi, LBV's output plus
it is the true local field.  Over the whole mask this is no cure by itself: an estimate fitted
to LBV's output carries a halo whose field cancels H at the boundary, so any such estimate is
its own fixed point.  The chain therefore adds the boundary field of the DEEP part of its
first TV estimate only (``ChainConfig.lbv_boundary_depth_mm``), where the halo is a small part
of the sources (docs/benchmarks.md, "Where the halo comes from").
"""

from __future__ import annotations

import numpy as np

from qsmdask.bgremove.lbv import lbv
from qsmdask.bgremove.sharp import _check
from qsmdask.kernels import PaddedFFT, check_b0_dir, dipole_kernel

__all__ = ["dipole_field", "lbv_boundary_field"]


def dipole_field(chi_ppm, mask, voxel_size_mm, *, b0_dir, within=None, pad_voxels=(16, 16, 16),
                 fft_workers: int = 1) -> np.ndarray:
    """Field (ppm) of the susceptibility ``chi_ppm`` inside ``mask`` (0 outside it), on the
    voxels of ``within`` (default ``mask``; 0 elsewhere).

    Computed on the bounding box of ``mask | within`` zero-padded by ``pad_voxels`` per side: the
    padding sets how far the periodic images of the FFT are (the field falls off as 1/r^3, so
    16 voxels is a small error for a brain-sized box)."""
    chi = np.asarray(chi_ppm, dtype=np.float32)
    m = np.asarray(mask, dtype=bool)
    w = m if within is None else np.asarray(within, dtype=bool)
    if chi.shape != m.shape or chi.ndim != 3 or w.shape != m.shape:
        raise ValueError(f"chi_ppm {chi.shape}, mask {m.shape} and within {w.shape} must be the same 3-D shape")
    b = check_b0_dir(b0_dir)
    out = np.zeros(chi.shape, dtype=np.float32)
    if not (m.any() and w.any()):
        return out
    bb = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(m | w))
    fft = PaddedFFT(chi[bb].shape, pad_voxels, workers=fft_workers)
    d = dipole_kernel(fft.padded_shape, voxel_size_mm, b, real=True)
    out[bb] = fft.inverse(fft.forward(np.where(m[bb], chi[bb], 0)) * d)
    return np.where(w, out, 0).astype(np.float32)


def lbv_boundary_field(chi_ppm, chi_mask, brain_mask, voxel_size_mm, *, b0_dir,
                       pad_voxels=(16, 16, 16), tol: float = 1e-4, max_iter: int = 300,
                       fft_workers: int = 1, exterior: bool = False):
    """The part of the field of ``chi_ppm`` that LBV on ``brain_mask`` removes.

    Parameters
    ----------
    chi_ppm : (x, y, z) susceptibility estimate (ppm); only its values in ``chi_mask`` count.
    chi_mask : bool, support of the estimate (the chain's final mask: LBV's eroded mask).
    brain_mask : bool, the mask LBV was run on (the chain's quality mask).
    voxel_size_mm : 3 floats.
    b0_dir : unit B0 vector in voxel-axis coordinates.
    pad_voxels : zero padding of the dipole convolution.
    tol, max_iter, fft_workers : as :func:`qsmdask.bgremove.lbv`.
    exterior : also return, outside ``interior`` and inside the bounding box of ``brain_mask``,
        the field ``g`` of the estimate itself (LBV's output is 0 there, so ``g`` is what it lacks
        there too): the data outside the mask of an inversion that fits the field there
        (``tv_admm(outside_weight=)``). On LBV's boundary the two agree (there ``g - lbv(g) = g``).

    Returns
    -------
    (boundary_field_ppm, interior): float32, ``g - lbv(g)`` with ``g`` the field of the
    estimate, on LBV's eroded mask ``interior`` (0 outside it): the harmonic function in the
    brain with ``g``'s boundary values, up to a constant (LBV removes the field's mean over
    the mask first; a constant is not determined by the inversion either). With ``exterior``
    the first array also holds ``g`` outside ``interior`` within the bounding box of ``brain_mask``.
    """
    _, m, vs = _check(np.zeros(np.shape(brain_mask), np.float32), brain_mask, voxel_size_mm)
    cm = np.asarray(chi_mask, dtype=bool)
    if cm.shape != m.shape:
        raise ValueError(f"chi_mask shape {cm.shape} differs from brain_mask shape {m.shape}")
    # the field on the whole brain: LBV needs its values on the brain's boundary, which may lie
    # far outside the estimate's support (the chain passes only the deep region)
    within = m
    if exterior:
        within = np.zeros(m.shape, dtype=bool)
        within[tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(m))] = True
    g = dipole_field(chi_ppm, cm, vs, b0_dir=b0_dir, within=within, pad_voxels=pad_voxels, fft_workers=fft_workers)
    kept, interior = lbv(np.where(m, g, 0), m, vs, tol=tol, max_iter=max_iter, fft_workers=fft_workers)
    # kept is 0 outside interior, so g - kept is g there
    return np.where(interior | (within & exterior), g - kept, 0).astype(np.float32), interior

"""Residual receiver phase offset of single-echo data after background field removal.

With two or more echoes the echo fit separates the phase offset from the field. With one
echo the offset stays in the "field"; its harmonic part goes with the background, the rest
does not. The offset of coil-combined phase is, apart from harmonic terms (constant, linear
ramps of timing delays), the RF transceive phase, whose Laplacian is set by the tissue
conductivity (Helmholtz electrical properties tomography: lap(phi_tr) ~= 2 mu0 omega sigma,
about 1000 rad/m^2 for brain tissue at 3 T, nearly constant over the brain). So after
background removal it leaves the image of a field with a constant Laplacian: one shape,
fitted here by least squares and removed.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

__all__ = ["remove_constant_laplacian"]


def remove_constant_laplacian(local_field_ppm, eroded_mask, brain_mask, voxel_size_mm,
                              remove_background: Callable, *, weight=None):
    """Remove the component of a local field whose source has a constant Laplacian.

    Parameters
    ----------
    local_field_ppm : (x, y, z) local field after background removal (0 outside the mask).
    eroded_mask : (x, y, z) bool mask of ``local_field_ppm`` (the background removal's output).
    brain_mask : (x, y, z) bool mask the background removal was given.
    voxel_size_mm : 3 floats.
    remove_background : ``f(field_ppm, brain_mask) -> (local, eroded)``: the same background
        removal (method and options) that produced ``local_field_ppm``.
    weight : optional (x, y, z) non-negative least-squares weights (e.g. magnitude squared).

    Returns
    -------
    (local_field_ppm, laplacian_ppm_per_mm2): the field without the fitted component, 0 outside
    ``eroded_mask``, and the fitted Laplacian (ppm / mm^2) of the field that was removed.

    Notes
    -----
    The shape is ``remove_background(q)`` with ``q = |x - c|^2 / 6`` (Laplacian 1 / mm^2): every
    field with that Laplacian differs from ``q`` by a harmonic function, which background
    removal takes out, so one shape covers them all. The fit has an intercept, which is kept
    (the mean is not defined by a single-echo phase anyway).

    References
    ----------
    Katscher U, van den Berg CAT. Electric properties tomography: biochemical, physical and
    technical background, evaluation and clinical applications. NMR Biomed 2017;30:e3729
    (transceive phase, Helmholtz equation).
    """
    f = np.asarray(local_field_ppm, dtype=np.float32)
    m = np.asarray(eroded_mask, dtype=bool)
    b = np.asarray(brain_mask, dtype=bool)
    if f.shape != m.shape or b.shape != f.shape:
        raise ValueError(f"shapes differ: field {f.shape}, eroded mask {m.shape}, brain mask {b.shape}")
    vs = np.asarray(voxel_size_mm, dtype=float).reshape(-1)
    if vs.shape != (3,) or np.any(~np.isfinite(vs)) or np.any(vs <= 0):
        raise ValueError(f"voxel_size_mm must be 3 positive numbers, got {voxel_size_mm!r}")
    if m.sum() < 10:
        return f.copy(), 0.0
    idx = np.nonzero(b)
    centre = [float(i.mean()) for i in idx]
    q = np.zeros(f.shape, dtype=np.float32)
    ax = [((np.arange(n, dtype=np.float64) - c) * v) ** 2 for n, c, v in zip(f.shape, centre, vs)]
    q[...] = ((ax[0][:, None, None] + ax[1][None, :, None] + ax[2][None, None, :]) / 6.0)
    shape_field, eroded_q = remove_background(q, b)
    shape_field = np.asarray(shape_field, dtype=np.float64)
    use = m & np.asarray(eroded_q, dtype=bool)
    w = np.ones(int(use.sum())) if weight is None else np.asarray(weight, dtype=np.float64)[use]
    if np.any(w < 0) or not np.all(np.isfinite(w)):
        raise ValueError("weight must be finite and >= 0")
    a = np.stack([shape_field[use], np.ones(int(use.sum()))], axis=1)
    sw = np.sqrt(w)[:, None]
    coef, *_ = np.linalg.lstsq(a * sw, f[use].astype(np.float64) * sw[:, 0], rcond=None)
    out = np.where(m, f - np.float32(coef[0]) * shape_field.astype(np.float32), 0).astype(np.float32)
    return out, float(coef[0])

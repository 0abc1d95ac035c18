"""Laplacian phase unwrapping (Schofield & Zhu 2003)."""

from __future__ import annotations

import numpy as np
import scipy.fft

from qsmdask.kernels import check_voxel_size

__all__ = ["laplacian_unwrap", "wrapped_laplacian"]

_METHODS = ("sincos", "gradient")


def _wrap(x):
    return (x + np.pi) % (2 * np.pi) - np.pi


def _second_differences(x: np.ndarray, axis: int) -> np.ndarray:
    """x[i+1] - 2 x[i] + x[i-1] with replicated (Neumann) edges."""
    xp = np.concatenate([np.take(x, [0], axis=axis), x, np.take(x, [-1], axis=axis)], axis=axis)
    n = x.shape[axis]
    return (np.take(xp, range(2, n + 2), axis=axis) - 2 * x
            + np.take(xp, range(0, n), axis=axis))


def wrapped_laplacian(phase_rad: np.ndarray, voxel_size_mm, *, method: str = "sincos") -> np.ndarray:
    """Discrete Laplacian (rad/mm^2) of the true phase, computed from the wrapped phase.

    ``method="sincos"``: Schofield & Zhu's identity
    lap(phi) = cos(phi) lap(sin phi) - sin(phi) lap(cos phi).
    ``method="gradient"``: sum over axes of the differences of wrapped forward
    differences (exact for the discrete Laplacian wherever the true phase
    changes by less than pi between neighbours).  Edges are Neumann (replicated).
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    phi = np.asarray(phase_rad, dtype=np.float32)
    vs = np.asarray(voxel_size_mm, dtype=float)
    lap = np.zeros(phi.shape, dtype=np.float32)
    if method == "sincos":
        s, c = np.sin(phi), np.cos(phi)
        for axis in range(3):
            h2 = np.float32(vs[axis] ** 2)
            lap += (c * _second_differences(s, axis) - s * _second_differences(c, axis)) / h2
    else:
        for axis in range(3):
            h2 = np.float32(vs[axis] ** 2)
            d = _wrap(np.diff(phi, axis=axis))
            shape0 = list(phi.shape)
            shape0[axis] = 1
            z = np.zeros(shape0, dtype=np.float32)
            d = np.concatenate([z, d, z], axis=axis)  # Neumann: zero flux at the edges
            lap += np.diff(d, axis=axis) / h2
    return lap


def _neumann_poisson(rhs: np.ndarray, voxel_size_mm, workers: int) -> np.ndarray:
    """Solve lap(u) = rhs with Neumann edges by DCT-II; the solution has zero mean."""
    vs = np.asarray(voxel_size_mm, dtype=float)
    spec = scipy.fft.dctn(rhs, type=2, norm="ortho", workers=workers)
    eig = np.zeros(rhs.shape, dtype=np.float64)
    for axis, (n, h) in enumerate(zip(rhs.shape, vs)):
        view = [1, 1, 1]
        view[axis] = n
        eig = eig + ((2.0 * np.cos(np.pi * np.arange(n) / n) - 2.0) / h ** 2).reshape(view)
    eig[0, 0, 0] = 1.0
    spec = spec / eig.astype(np.float32)
    spec[0, 0, 0] = 0.0
    return scipy.fft.idctn(spec, type=2, norm="ortho", workers=workers).astype(np.float32)


def _dirichlet_poisson(rhs: np.ndarray, voxel_size_mm, workers: int) -> np.ndarray:
    """Solve lap(u) = rhs with u = 0 just outside the field of view, by DST-I."""
    vs = np.asarray(voxel_size_mm, dtype=float)
    spec = scipy.fft.dstn(rhs, type=1, norm="ortho", workers=workers)
    eig = np.zeros(rhs.shape, dtype=np.float64)
    for axis, (n, h) in enumerate(zip(rhs.shape, vs)):
        view = [1, 1, 1]
        view[axis] = n
        k = np.arange(1, n + 1)
        eig = eig + ((2.0 * np.cos(np.pi * k / (n + 1)) - 2.0) / h ** 2).reshape(view)
    spec = spec / eig.astype(np.float32)
    return scipy.fft.idstn(spec, type=1, norm="ortho", workers=workers).astype(np.float32)


def laplacian_unwrap(phase_rad, voxel_size_mm, *, mask=None, method: str = "sincos",
                     fft_workers: int = 1) -> np.ndarray:
    """Unwrap a 3-D phase image by the Laplacian (Poisson) method.

    The Laplacian of the true phase is computed from the wrapped phase
    (:func:`wrapped_laplacian`) and inverted with Neumann boundary conditions
    by a discrete cosine transform (the DCT-II diagonalises the Neumann
    discrete Laplacian exactly, so no padding is needed).  The result equals the
    true phase up to a constant (mean zero) where the phase is smooth.  When a
    ``mask`` is given the Laplacian is set to zero outside it (noise outside the
    brain cannot leak in) and the Poisson equation is solved with zero (Dirichlet)
    edges by a DST-I, so the result equals the true phase up to a harmonic function
    inside the mask; background field removal removes that harmonic part.  The result is
    not congruent to the input modulo 2 pi.

    Parameters
    ----------
    phase_rad : (x, y, z) wrapped phase in radians.
    voxel_size_mm : 3 floats.
    mask : optional (x, y, z) bool region where the Laplacian is trusted.
    method : "sincos" (Schofield & Zhu) or "gradient" (wrapped differences).
    fft_workers : int >= 1, transform threads.

    Returns
    -------
    float32 (x, y, z) unwrapped phase (rad), zero mean over the field of view when no mask is given.

    References
    ----------
    Schofield MA, Zhu Y. Fast phase unwrapping algorithm for interferometric
    applications. Opt Lett 2003;28:1194-1196.
    Ghiglia DC, Romero LA. J Opt Soc Am A 1994;11:107-117 (DCT Poisson solver).
    """
    phi = np.asarray(phase_rad)
    if phi.ndim != 3:
        raise ValueError(f"phase_rad must be 3-D, got shape {phi.shape}")
    vs = check_voxel_size(voxel_size_mm)
    if int(fft_workers) < 1:
        raise ValueError(f"fft_workers must be >= 1, got {fft_workers!r}")
    lap = wrapped_laplacian(phi.astype(np.float32), vs, method=method)
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        if m.shape != phi.shape:
            raise ValueError(f"mask shape {m.shape} differs from phase_rad shape {phi.shape}")
        return _dirichlet_poisson(lap * m, vs, int(fft_workers))
    return _neumann_poisson(lap, vs, int(fft_workers))

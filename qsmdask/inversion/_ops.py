"""Finite-difference operators shared by the regularised inversions (image domain)."""

from __future__ import annotations

import numpy as np


def _sl(axis, s):
    idx = [slice(None)] * 3
    idx[axis] = s
    return tuple(idx)


def gradient(x: np.ndarray, voxel_size_mm, out: np.ndarray | None = None) -> np.ndarray:
    """Forward differences with periodic wrap, stacked on axis 0: shape (3, *x.shape)."""
    if out is None:
        out = np.empty((3,) + x.shape, dtype=np.float32)
    for a in range(3):
        o = out[a]
        np.subtract(x[_sl(a, slice(1, None))], x[_sl(a, slice(None, -1))], out=o[_sl(a, slice(None, -1))])
        np.subtract(x[_sl(a, slice(0, 1))], x[_sl(a, slice(-1, None))], out=o[_sl(a, slice(-1, None))])
        if voxel_size_mm[a] != 1:
            o *= np.float32(1.0 / voxel_size_mm[a])
    return out


def gradient_adjoint(g: np.ndarray, voxel_size_mm, out: np.ndarray | None = None) -> np.ndarray:
    """Adjoint of :func:`gradient` (minus the backward-difference divergence)."""
    if out is None:
        out = np.empty(g.shape[1:], dtype=np.float32)
    out[...] = 0
    for a in range(3):
        ga = g[a]
        h = np.float32(1.0 / voxel_size_mm[a])
        # out[i] += (g[i-1] - g[i]) / h
        out[_sl(a, slice(1, None))] += (ga[_sl(a, slice(None, -1))] - ga[_sl(a, slice(1, None))]) * h
        out[_sl(a, slice(0, 1))] += (ga[_sl(a, slice(-1, None))] - ga[_sl(a, slice(0, 1))]) * h
    return out


def edge_weights(image: np.ndarray, mask: np.ndarray, voxel_size_mm, *, edge_fraction: float) -> np.ndarray:
    """Per-axis gradient weights (3, x, y, z): 0 on the strongest ``edge_fraction`` of the
    gradients of ``image`` inside ``mask`` (edges are not penalised), 1 elsewhere
    (as the MEDI edge mask)."""
    g = np.abs(gradient(image.astype(np.float32), voxel_size_mm))
    vals = g[:, mask]
    if vals.size == 0 or edge_fraction <= 0:
        return np.ones_like(g)
    thr = np.quantile(vals, 1.0 - edge_fraction)
    return (g < thr).astype(np.float32)


def check_admm_options(*, edge_fraction, max_iter, bregman_iterations, bregman_max_iter, data_correction,
                       debias, refit_mu) -> int:
    """Checks of the options :func:`~qsmdask.inversion.tv_admm` and
    :func:`~qsmdask.inversion.tgv_admm` share; returns the ADMM iterations of each Bregman step
    (``bregman_max_iter``, default ``max_iter``)."""
    if not (0 <= edge_fraction < 1):
        raise ValueError(f"edge_fraction must be in [0, 1), got {edge_fraction!r}")
    if int(max_iter) < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter!r}")
    if int(bregman_iterations) < 0:
        raise ValueError(f"bregman_iterations must be >= 0, got {bregman_iterations!r}")
    step_iter = int(max_iter if bregman_max_iter is None else bregman_max_iter)
    if step_iter < 1:
        raise ValueError(f"bregman_max_iter must be >= 1, got {bregman_max_iter!r}")
    if data_correction is not None and int(bregman_iterations) < 1:
        raise ValueError("data_correction needs bregman_iterations >= 1 (it is applied at the Bregman steps)")
    if debias not in ("none", "refit"):
        raise ValueError(f"debias must be 'none' or 'refit', got {debias!r}")
    if debias == "refit" and not (np.isfinite(refit_mu) and refit_mu > 0):
        raise ValueError(f"refit_mu must be > 0, got {refit_mu!r}")
    return step_iter


def corrected_data(data_correction, chi, mask, box, fft, full_shape, field, target, previous,
                   outside: bool = False):
    """The data of a Bregman step after ``data_correction`` (e.g. LBV's boundary field of the
    deep sources, :mod:`qsmdask.bgremove.boundary`), shared by the TV and TGV inversions.

    ``chi``: the current estimate on the padded grid of ``fft`` (a :class:`~qsmdask.kernels.PaddedFFT`
    over the bounding box ``box`` of ``mask``); ``data_correction(estimate)`` gets it on the full
    grid ``full_shape`` and returns a field there. ``field``: the measured field and ``target``
    the current data, both padded; ``previous``: the correction already in ``target``.
    Returns ``(target, base, correction)``: the data with the new correction in place of the
    previous one, the field plus the correction (what a Bregman residual is measured against),
    and the correction (padded). ``outside``: keep the correction's values outside ``mask`` too
    (inside ``box``: the data term of ``tv_admm(outside_weight=)`` reaches there), else 0 there.
    """
    est = np.zeros(full_shape, dtype=np.float32)
    est[box] = np.where(mask, chi[fft.slices], 0)
    c = np.asarray(data_correction(est), dtype=np.float32)
    if c.shape != tuple(full_shape):
        raise ValueError(f"data_correction returned shape {c.shape}, expected {tuple(full_shape)}")
    c = fft.pad(c[box] if outside else np.where(mask, c[box], 0))
    return (target + (c - previous)).astype(np.float32), (field + c).astype(np.float32), c

"""Multi-echo combination: magnitude-weighted linear fit of unwrapped phase over echo time."""

from __future__ import annotations

import numpy as np

__all__ = ["GAMMA_HZ_PER_T", "check_echo_inputs", "fit_phase_slope", "phase_slope_to_ppm"]

GAMMA_HZ_PER_T = 42.576e6


def check_echo_inputs(phase_rad, echo_times_s, magnitude=None):
    """Validated multi-echo inputs: ``(phase (x, y, z, echo) float32, echo times float64,
    magnitude (x, y, z, echo) float32, ones when None)``; 3-D inputs count as one echo."""
    phi = np.asarray(phase_rad, dtype=np.float32)
    if phi.ndim == 3:
        phi = phi[..., None]
    if phi.ndim != 4:
        raise ValueError(f"phase_rad must be (x, y, z, echo), got shape {phi.shape}")
    te = np.asarray(echo_times_s, dtype=np.float64).reshape(-1)
    if te.size != phi.shape[3]:
        raise ValueError(f"echo_times_s has {te.size} entries for {phi.shape[3]} echoes")
    if np.any(~np.isfinite(te)) or np.any(te <= 0):
        raise ValueError(f"echo_times_s must be positive seconds, got {te.tolist()}")
    if magnitude is None:
        return phi, te, np.ones(phi.shape, dtype=np.float32)
    mag = np.asarray(magnitude, dtype=np.float32)
    if mag.ndim == 3:
        mag = mag[..., None]
    if mag.shape != phi.shape:
        raise ValueError(f"magnitude shape {mag.shape} differs from phase_rad shape {phi.shape}")
    return phi, te, mag


def fit_phase_slope(phase_rad, echo_times_s, *, magnitude=None, mask=None, fit_offset: bool = True):
    """Weighted least-squares fit phase(TE) = slope * TE + offset, voxel by voxel.

    Weights are magnitude squared (phase noise variance scales with
    1 / magnitude^2), uniform when ``magnitude`` is None.

    Parameters
    ----------
    phase_rad : (x, y, z, echo) unwrapped phase in radians.
    echo_times_s : echo times in seconds, strictly positive, one per echo.
    magnitude : optional (x, y, z, echo) magnitude for the weights.
    mask : optional (x, y, z) bool; outside it the outputs are 0.
    fit_offset : fit the phase offset (intercept); needs >= 2 distinct echo times,
        otherwise the line goes through the origin.

    Returns
    -------
    slope_rad_per_s, offset_rad, residual_rad : float32 (x, y, z) arrays; the last is
    the weighted RMS residual of the fit (0 for fits with no degrees of freedom).

    References
    ----------
    Wu B et al. Fast and tissue-optimized mapping of magnetic susceptibility and T2*
    with multi-echo and multi-shot spirals. NeuroImage 2012;59:297-305 (weighted fit).
    """
    phi, te, w = check_echo_inputs(phase_rad, echo_times_s, magnitude)
    if magnitude is not None:
        w = np.square(w)
    # Rescale TE to O(1) for float32 accuracy.
    scale = float(te.max())
    t = (te / scale).astype(np.float32)
    sw = w.sum(axis=3)
    swt = (w * t).sum(axis=3)
    swtt = (w * t * t).sum(axis=3)
    swy = (w * phi).sum(axis=3)
    swty = (w * t * phi).sum(axis=3)
    eps = np.float32(1e-20)
    if fit_offset and np.unique(te).size >= 2:
        det = sw * swtt - swt * swt
        ok = det > eps * np.maximum(sw * swtt, eps)
        det_safe = np.where(ok, det, 1)
        slope = np.where(ok, (sw * swty - swt * swy) / det_safe, 0)
        offset = np.where(ok, (swtt * swy - swt * swty) / det_safe, 0)
        dof = phi.shape[3] - 2
    else:
        slope = np.where(swtt > eps, swty / np.maximum(swtt, eps), 0)
        offset = np.zeros_like(slope)
        dof = phi.shape[3] - 1
    pred = slope[..., None] * t + offset[..., None]
    if dof > 0:
        res = np.sqrt((w * (phi - pred) ** 2).sum(axis=3) / np.maximum(sw, eps))
    else:
        res = np.zeros_like(slope)
    slope = slope / np.float32(scale)
    out = [np.asarray(a, dtype=np.float32) for a in (slope, offset, res)]
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        out = [np.where(m, a, 0).astype(np.float32) for a in out]
    return tuple(out)


def phase_slope_to_ppm(slope_rad_per_s, *, b0_tesla: float, phase_sign: int = 1) -> np.ndarray:
    """Convert a phase slope (rad/s) to field in ppm: slope / (2 pi gamma B0) * 1e6 * phase_sign."""
    if not (np.isfinite(b0_tesla) and b0_tesla > 0):
        raise ValueError(f"b0_tesla must be > 0, got {b0_tesla!r}")
    if phase_sign not in (1, -1):
        raise ValueError(f"phase_sign must be 1 or -1, got {phase_sign!r}")
    f = np.asarray(slope_rad_per_s, dtype=np.float64) / (2 * np.pi * GAMMA_HZ_PER_T * b0_tesla) * 1e6
    return (phase_sign * f).astype(np.float32)

"""Temporal (echo-difference) phase unwrapping of multi-echo phase.

Only the echo-difference phase, which wraps least and carries no receiver phase
offset, is unwrapped in space; the later echoes are unwrapped in time from it,
voxel by voxel, which needs no spatial path at all.
"""

from __future__ import annotations

import numpy as np

from qsmdask.unwrap.echo_fit import check_echo_inputs
from qsmdask.unwrap.laplacian import laplacian_unwrap

__all__ = ["echo_difference_phase", "temporal_unwrap"]


def _wrap(x):
    return (x + np.pi) % (2 * np.pi) - np.pi


def _check(phase_rad, echo_times_s, magnitude):
    phi, te, mag = check_echo_inputs(phase_rad, echo_times_s, magnitude)
    if te.size > 1 and np.any(np.diff(te) <= 0):
        raise ValueError(f"echo_times_s must be strictly increasing, got {te.tolist()}")
    return phi, te, np.abs(mag)


def _uniform(te) -> bool:
    if te.size < 3:
        return te.size == 2
    d = np.diff(te)
    return bool(np.all(np.abs(d - d[0]) <= 1e-3 * d[0]))


def echo_difference_phase(phase_rad, echo_times_s, *, magnitude=None):
    """Wrapped phase accumulated over one echo spacing, free of the phase offset.

    With uniformly spaced echoes the consecutive complex products
    ``m_{k+1} m_k exp(i (phi_{k+1} - phi_k))`` are summed (all echo pairs average
    down the noise); otherwise only the first pair is used.

    Parameters
    ----------
    phase_rad : (x, y, z, echo) wrapped phase (rad), >= 2 echoes.
    echo_times_s : strictly increasing echo times in seconds.
    magnitude : optional (x, y, z, echo) magnitude (weights of the pairs).

    Returns
    -------
    (dphi_rad, delta_te_s): float32 (x, y, z) wrapped phase in (-pi, pi] and the echo
    spacing it spans.

    References
    ----------
    Robinson SD et al. An illustrated comparison of processing methods for MR phase
    imaging and QSM: combining array coil signals and phase unwrapping. NMR Biomed
    2017;30:e3601 (echo-difference combination).
    """
    phi, te, mag = _check(phase_rad, echo_times_s, magnitude)
    if te.size < 2:
        raise ValueError("echo_difference_phase needs at least 2 echoes")
    pairs = range(te.size - 1) if _uniform(te) else range(1)
    acc = np.zeros(phi.shape[:3], dtype=np.complex64)
    for k in pairs:
        acc += (mag[..., k + 1] * mag[..., k]) * np.exp(1j * (phi[..., k + 1] - phi[..., k])).astype(np.complex64)
    return np.angle(acc).astype(np.float32), float(te[1] - te[0])


def temporal_unwrap(phase_rad, echo_times_s, voxel_size_mm, *, magnitude=None, mask=None,
                    laplacian_form: str = "gradient", fft_workers: int = 1) -> np.ndarray:
    """Unwrap multi-echo phase: the echo-difference phase in space, every echo in time.

    The echo-difference phase (:func:`echo_difference_phase`, spacing ``dTE``) is
    unwrapped by the Laplacian method inside ``mask`` (result ``u``: the true
    difference phase plus a function harmonic in the mask, which background field
    removal takes out).  Echo k at ``te_k = te_1 + n dTE`` (integer n) is then
    ``phi_1 + n u + wrap(angle(z_k conj z_1) - n dphi)``: the wrapped residual is
    exact voxel by voxel (n * 2 pi multiples cancel), so later echoes add their
    longer phase evolution without any more spatial unwrapping.  Echoes off the
    uniform grid get their own Laplacian-unwrapped difference to echo 1.  The
    fitted slope over echo time (:func:`qsmdask.unwrap.fit_phase_slope`) is the
    field; the first echo's wrapped phase sits in the intercept (fit it).

    Parameters
    ----------
    phase_rad : (x, y, z, echo) or (x, y, z) wrapped phase (rad).
    echo_times_s : strictly increasing echo times (s).
    voxel_size_mm : 3 floats.
    magnitude : optional magnitude of the same shape (echo-pair weights).
    mask : optional (x, y, z) bool region where the phase is trusted (see
        :func:`qsmdask.mask.phase_quality_mask`).
    laplacian_form : "gradient" (default: wrapped differences, exact wherever neighbours
        differ by less than pi, which the quality mask ensures) or "sincos"
        (:func:`qsmdask.unwrap.wrapped_laplacian`; underestimates steep phase,
        e.g. by 7 % at 1.2 rad/voxel).
    fft_workers : transform threads (>= 1).

    Returns
    -------
    float32 (x, y, z, echo) phase whose slope over echo time is the field (a single
    echo is Laplacian-unwrapped as it is).

    References
    ----------
    Schofield MA, Zhu Y. Opt Lett 2003;28:1194-1196 (Laplacian unwrapping).
    Robinson SD et al. NMR Biomed 2017;30:e3601.
    """
    phi, te, mag = _check(phase_rad, echo_times_s, magnitude)
    n = te.size
    out = np.empty(phi.shape, dtype=np.float32)
    if n == 1:
        out[..., 0] = laplacian_unwrap(phi[..., 0], voxel_size_mm, mask=mask, method=laplacian_form,
                                       fft_workers=fft_workers)
        return out
    dphi, dte = echo_difference_phase(phi, te, magnitude=mag)
    u = laplacian_unwrap(dphi, voxel_size_mm, mask=mask, method=laplacian_form, fft_workers=fft_workers)
    out[..., 0] = phi[..., 0]
    for k in range(1, n):
        ratio = (te[k] - te[0]) / dte
        steps = int(round(ratio))
        dk = _wrap(phi[..., k] - phi[..., 0])
        if abs(ratio - steps) <= 1e-3 * max(ratio, 1.0):
            out[..., k] = phi[..., 0] + steps * u + _wrap(dk - steps * dphi)
        else:
            out[..., k] = phi[..., 0] + laplacian_unwrap(dk, voxel_size_mm, mask=mask, method=laplacian_form,
                                                         fft_workers=fft_workers)
    return out

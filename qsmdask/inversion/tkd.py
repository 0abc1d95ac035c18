"""Thresholded k-space division (TKD) dipole inversion."""

from __future__ import annotations

import numpy as np

from qsmdask.kernels import PaddedFFT, check_b0_dir, check_voxel_size, dipole_kernel

__all__ = ["tkd", "check_inversion_inputs"]


def check_inversion_inputs(local_field_ppm, mask, voxel_size_mm, b0_dir):
    f = np.asarray(local_field_ppm, dtype=np.float32)
    if f.ndim != 3:
        raise ValueError(f"local_field_ppm must be 3-D, got shape {f.shape}")
    m = np.asarray(mask, dtype=bool)
    if m.shape != f.shape:
        raise ValueError(f"mask shape {m.shape} differs from local_field_ppm shape {f.shape}")
    vs = check_voxel_size(voxel_size_mm)
    b = check_b0_dir(b0_dir)
    f = np.where(m, f, 0).astype(np.float32)
    return f, m, vs, b


def tkd(local_field_ppm, mask, voxel_size_mm, *, b0_dir=(0.0, 0.0, 1.0), threshold: float = 0.19,
        pad_voxels=(16, 16, 16), fft_workers: int = 1) -> np.ndarray:
    """Thresholded k-space division.

    chi = IFFT(FFT(field) * Dinv), Dinv = 1/D where |D| > ``threshold`` and
    sign(D)/``threshold`` elsewhere (D(0) = 0 gives 0: the mean is undetermined).

    Parameters
    ----------
    local_field_ppm : (x, y, z) local field in ppm (field = IFFT(D FFT(chi))).
    mask : (x, y, z) bool; the field is zeroed outside and the result masked.
    voxel_size_mm : 3 floats.
    b0_dir : B0 in voxel-axis coordinates (any non-zero 3-vector, normalised here).
    threshold : truncation level of |D| in (0, 2/3).
    pad_voxels : zero padding on each side before the FFT.
    fft_workers : FFT threads (>= 1).

    Returns
    -------
    float32 (x, y, z) susceptibility in ppm, 0 outside the mask.

    References
    ----------
    Shmueli K et al. Magnetic susceptibility mapping of brain tissue in vivo using MRI
    phase data. Magn Reson Med 2009;62:1510-1522.
    Wharton S, Schafer A, Bowtell R. Magn Reson Med 2010;63:1292-1304.
    """
    f, m, vs, b = check_inversion_inputs(local_field_ppm, mask, voxel_size_mm, b0_dir)
    if not (0 < threshold < 2.0 / 3.0):
        raise ValueError(f"threshold must be in (0, 2/3), got {threshold!r}")
    fft = PaddedFFT(f.shape, pad_voxels, workers=fft_workers)
    d = dipole_kernel(fft.padded_shape, vs, b, real=True)
    dinv = np.where(np.abs(d) > threshold, 1.0 / np.where(d == 0, 1, d),
                    np.sign(d) / threshold).astype(np.float32)
    chi = fft.inverse(dinv * fft.forward(f))
    return np.where(m, chi, 0).astype(np.float32)

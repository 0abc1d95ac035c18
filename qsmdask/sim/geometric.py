"""Geometric numerical phantom for testing and benchmarking the reconstruction chain.

``make_phantom`` builds a susceptibility phantom on a grid: a scalp shell, a dark
skull, an ellipsoidal "brain" with deep-grey-matter-like ellipsoids of different
chi, a strong external source (an air-like sinus) outside the brain, the total
field by the dipole forward model with an oblique B0, and wrapped multi-echo
phase with a phase offset and complex Gaussian noise.
"""

from __future__ import annotations

import numpy as np
import scipy.fft

from qsmdask.kernels import dipole_kernel, fast_fft_shape

__all__ = ["make_phantom", "forward_field", "DEEP_GREY", "HUMAN_BRAIN_AXES_MM"]

GAMMA_HZ_PER_T = 42.576e6

# Semi-axes (mm) of an adult brain (about 140 x 170 x 120 mm) and the scale of the deep
# structures that puts them at adult positions and sizes (putamen centre about 24 mm from
# the midline): ``make_phantom(brain_axes_mm=HUMAN_BRAIN_AXES_MM, structure_scale=2.0)``.
HUMAN_BRAIN_AXES_MM = (68.0, 84.0, 58.0)

# (centre mm, semi-axes mm, chi ppm, magnitude) relative to the brain; label index = position + 1
DEEP_GREY = [
    ((-12.0, 4.0, 0.0), (4.0, 7.0, 5.0), 0.10, 0.75),   # putamen L
    ((12.0, 4.0, 0.0), (4.0, 7.0, 5.0), 0.10, 0.75),    # putamen R
    ((-6.0, 2.0, -2.0), (2.5, 4.0, 3.0), 0.18, 0.6),    # pallidum L
    ((6.0, 2.0, -2.0), (2.5, 4.0, 3.0), 0.18, 0.6),     # pallidum R
    ((0.0, -10.0, -6.0), (3.0, 3.0, 3.0), 0.12, 0.65),  # red-nucleus-like
    ((0.0, 12.0, 8.0), (9.0, 3.0, 4.0), -0.04, 0.9),    # white-matter-like band
]


def _ellipsoid(coords, centre, axes, rot=None):
    x, y, z = (c - c0 for c, c0 in zip(coords, centre))
    if rot is not None:
        x, y, z = (rot[i, 0] * x + rot[i, 1] * y + rot[i, 2] * z for i in range(3))
    return (x / axes[0]) ** 2 + (y / axes[1]) ** 2 + (z / axes[2]) ** 2 <= 1.0


def forward_field(chi_ppm, voxel_size_mm, b0_dir, pad=16):
    """field_ppm = IFFT(D FFT(chi)) on a zero-padded grid (double precision)."""
    chi = np.asarray(chi_ppm, dtype=np.float64)
    shape = fast_fft_shape(chi.shape, (pad, pad, pad))
    d = dipole_kernel(shape, voxel_size_mm, b0_dir, real=True, dtype=np.float64)
    f = scipy.fft.irfftn(d * scipy.fft.rfftn(chi, s=shape), s=shape)
    return f[: chi.shape[0], : chi.shape[1], : chi.shape[2]]


def make_phantom(shape=(64, 64, 64), voxel_size_mm=(1.0, 1.0, 1.0), *, b0_dir=(0.25, 0.2, 0.947),
                 echo_times_s=(0.004, 0.008, 0.012, 0.016), b0_tesla=3.0, snr=None,
                 source_chi_ppm=9.4, source_gap_mm=6.0, brain_scale=1.0, brain_axes_mm=None, rotation_deg=0.0,
                 structure_scale=None, seed=0):
    """Simulate a phantom; returns a dict of arrays and parameters (see module docstring).

    ``snr`` is the brain magnitude over the complex noise sigma (None: noise-free).
    ``brain_scale`` scales the brain (and its structures); ``rotation_deg`` rotates the
    structures about the z axis; ``brain_axes_mm`` overrides the brain semi-axes.
    ``structure_scale`` (None: follow the brain) sets the scale of the deep
    structures' positions and sizes relative to :data:`DEEP_GREY`.

    Returns a dict: magnitude and phase_rad (x, y, z, echo), true chi, local and
    total field (ppm), brain_mask, labels (index into DEEP_GREY + 1, 0 elsewhere),
    voxel size, unit B0 direction, echo times and field strength.
    """
    rng = np.random.default_rng(seed)
    vs = np.asarray(voxel_size_mm, dtype=float)
    coords = np.meshgrid(*[(np.arange(n) - (n - 1) / 2.0) * d for n, d in zip(shape, vs)],
                         indexing="ij", sparse=True)
    ext = np.array(shape) * vs / 2.0  # half field of view (mm)
    if brain_axes_mm is None:
        brain_axes = np.array([0.62, 0.70, 0.55]) * ext.min() * brain_scale
        brain_axes = np.minimum(brain_axes, ext * np.array([0.62, 0.70, 0.58]))
    else:
        brain_axes = np.asarray(brain_axes_mm, dtype=float)
    if structure_scale is None:
        s = brain_axes / np.array([20.0, 22.0, 17.0])  # scale structures with the brain
    else:
        s = np.broadcast_to(np.asarray(structure_scale, dtype=float), (3,)).copy()
    th = np.deg2rad(rotation_deg)
    rot = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1.0]])
    brain = _ellipsoid(coords, (0, 0, 0), brain_axes)
    skull_inner = _ellipsoid(coords, (0, 0, 0), brain_axes + 2.0 * vs.max())
    head = _ellipsoid(coords, (0, 0, 0), brain_axes + 5.0 * vs.max())
    chi = np.zeros(shape, dtype=np.float64)
    mag = np.zeros(shape, dtype=np.float64)
    mag[head] = 0.8
    mag[skull_inner] = 0.05
    mag[brain] = 1.0
    labels = np.zeros(shape, dtype=np.int16)
    for i, (c, a, x, m) in enumerate(DEEP_GREY):
        cc = rot @ (np.array(c) * s)
        e = _ellipsoid(coords, cc, np.array(a) * s, rot.T) & brain
        chi[e] = x
        mag[e] = m
        labels[e] = i + 1
    # a vein-like cylinder along y
    vein = ((coords[0] - 0.0) ** 2 + (coords[2] - 10.0 * s[2]) ** 2 <= (1.2 * vs.max()) ** 2)
    vein = vein & brain & (np.abs(coords[1]) < 12 * s[1])
    chi[vein] = 0.3
    mag[vein] = 0.5
    # strong external source (air-like sinus) below-front of the brain, outside it
    # (front-below, on the diagonal of the y-z plane, ``source_gap_mm`` outside the brain)
    u = np.array([0.0, 1.0, -1.0]) / np.sqrt(2.0)
    r_edge = 1.0 / np.sqrt(np.sum((u / brain_axes) ** 2))
    src_axes = np.array([6.0, 4.0, 4.0]) * s.mean()
    src_c = u * (r_edge + source_gap_mm + src_axes[1])
    src = _ellipsoid(coords, src_c, src_axes) & ~skull_inner
    chi[src] = source_chi_ppm
    mag[src] = 0.0
    chi_brain = np.where(brain, chi, 0.0)
    field = forward_field(chi, vs, b0_dir)
    local = forward_field(chi_brain, vs, b0_dir)
    te = np.asarray(echo_times_s, dtype=float)
    t2s = np.where(brain, 0.040, 0.025)
    offset = 0.4 + 0.6 * coords[0] / ext[0] - 0.3 * coords[1] / ext[1]
    offset = np.broadcast_to(offset, shape)
    scale = 2 * np.pi * GAMMA_HZ_PER_T * b0_tesla * 1e-6
    mags, phases = [], []
    for t in te:
        sig = mag * np.exp(-t / t2s) * np.exp(1j * (scale * t * field + offset))
        if snr is not None:
            sigma = 1.0 / snr
            sig = sig + sigma * (rng.standard_normal(shape) + 1j * rng.standard_normal(shape))
        mags.append(np.abs(sig))
        phases.append(np.angle(sig))
    return {
        "magnitude": np.stack(mags, axis=-1).astype(np.float32),
        "phase_rad": np.stack(phases, axis=-1).astype(np.float32),
        "true_phase_rad": np.stack([scale * t * field + offset for t in te], axis=-1),
        "chi_ppm": chi.astype(np.float32),
        "chi_brain_ppm": chi_brain.astype(np.float32),
        "field_ppm": field.astype(np.float32),
        "local_field_ppm": local.astype(np.float32),
        "brain_mask": brain,
        "labels": labels,
        "voxel_size_mm": tuple(float(v) for v in vs),
        "b0_dir": np.asarray(b0_dir, dtype=float) / np.linalg.norm(b0_dir),
        "echo_times_s": te,
        "b0_tesla": float(b0_tesla),
    }

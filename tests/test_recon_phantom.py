"""Checks of the geometric phantom (qsmdask.sim.geometric) used by the reconstruction tests."""

from __future__ import annotations

import numpy as np

from qsmdask.sim.geometric import forward_field, make_phantom  # noqa: F401  (re-exported for the tests)


def test_phantom_field_matches_sphere_analytic():
    """A uniformly magnetised sphere: field outside = chi/3 * a^3/r^3 * (3cos^2-1)... check the inside is ~0."""
    shape, vs = (64, 64, 64), (1.0, 1.0, 1.0)
    coords = np.meshgrid(*[np.arange(n) - n / 2 for n in shape], indexing="ij", sparse=True)
    r = np.sqrt(coords[0] ** 2 + coords[1] ** 2 + coords[2] ** 2)
    chi = (r <= 8).astype(float)
    f = forward_field(chi, vs, (0, 0, 1), pad=32)
    # Inside a sphere the (Lorentz-corrected) field is 0; on the B0 axis outside it is 2/3 chi a^3/r^3.
    assert abs(np.median(f[r < 5])) < 0.02
    z = 16
    expected = 2.0 / 3.0 * 8 ** 3 / z ** 3
    assert abs(f[32, 32, 32 + z] - expected) < 0.15 * expected


def test_phantom_has_wraps_and_external_background():
    p = make_phantom(snr=None)
    assert p["brain_mask"].sum() > 5000
    assert np.ptp(p["true_phase_rad"][..., -1]) > 2 * np.pi  # the phase really wraps
    bg = p["field_ppm"] - p["local_field_ppm"]
    assert np.abs(bg[p["brain_mask"]]).max() > 5 * np.abs(p["local_field_ppm"][p["brain_mask"]]).std()

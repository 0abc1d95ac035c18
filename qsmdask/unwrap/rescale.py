"""Detect how a phase image is stored and rescale it to radians (the one detector).

Used by the BIDS reader (:func:`qsmdask.io.bids.phase_to_radians`, which names the file in
its errors) and available to library users with arrays from elsewhere.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["rescale_phase", "RADIANS_NOTE"]

RADIANS_NOTE = "phase already in radians [-pi, pi]"

# numbers of integer levels per 2 pi cycle that scanners and converters use (8-bit exports,
# 12-bit Siemens/Philips, Siemens signed -4096..4095, 16-bit)
_LEVELS = (256, 4096, 8192, 65536)

# names of common power-of-two integer encodings of one 2 pi cycle: (levels, first value) -> name
_VENDOR_NAMES = {
    (8192, -4096): "Siemens 12-bit signed",
    (4096, 0): "Siemens/Philips 12-bit unsigned",
    (4096, -2048): "12-bit signed",
    (65536, -32768): "16-bit signed",
    (65536, 0): "16-bit unsigned",
    (256, 0): "8-bit unsigned",
}


def rescale_phase(phase, *, strict: bool = True, tolerance_rad: float = 1e-3) -> tuple[np.ndarray, str]:
    """Return the phase in radians and a note saying how it was stored.

    Recognised, in this order:

    - radians within [-pi, pi] (``tolerance_rad`` slack): returned as float32;
    - radians within [0, 2 pi]: shifted to [-pi, pi);
    - whole degrees (a span of 300-360 within [-180, 360]): rejected, because they
      would otherwise pass as a 9-bit integer range;
    - GE milliradians (integers within +-3144 that reach 90 % of +-3142): divided by 1000;
    - other integer-valued data spanning at least 255: the smallest vendor range of 256,
      4096, 8192 or 65536 levels that contains them (signed ranges centred on 0, e.g.
      Siemens -4096..4095 or 0..4095, 12-bit -2048..2047) is mapped linearly onto
      [-pi, pi).  A 12-bit image whose phase does not use its whole range is still read
      as 12-bit (the levels are a vendor property, not a data one).

    Anything else raises ValueError when ``strict`` (the default; the BIDS reader uses
    this) or, with ``strict=False``, is mapped from its own minimum and maximum onto
    [-pi, pi) with a note saying so (a per-volume offset is absorbed by the echo fit, the
    scale is a guess).

    Parameters
    ----------
    phase : array of phase values (any shape).
    strict : reject unrecognised ranges (True) or min/max-rescale them (False).
    tolerance_rad : slack when deciding that data are already radians.

    Returns
    -------
    (phase_rad float32, note str); the note is :data:`RADIANS_NOTE` when nothing changed.
    """
    x = np.asarray(phase)
    if x.size == 0:
        raise ValueError("phase is empty")
    xf = x.astype(np.float64)
    finite = np.isfinite(xf)
    if not finite.all():
        raise ValueError("phase has non-finite values (NaN or inf)")
    lo, hi = float(xf.min()), float(xf.max())
    pi, tol = math.pi, float(tolerance_rad)
    if lo >= -pi - tol and hi <= pi + tol:
        return np.clip(xf, -pi, pi).astype(np.float32), RADIANS_NOTE
    if lo >= -tol and hi <= 2 * pi + tol:
        return (((xf + pi) % (2 * pi)) - pi).astype(np.float32), "phase in radians [0, 2 pi]; shifted to [-pi, pi)"
    span = hi - lo
    if 300 <= span <= 360 + tol and lo >= -180 - tol and hi <= 360 + tol:
        raise ValueError(f"phase values span [{lo:g}, {hi:g}]: looks like degrees; "
                         "qsmdask needs radians [-pi, pi] or a vendor integer range")
    integer_valued = bool(np.allclose(xf, np.round(xf), atol=1e-3))
    mrad = 1000 * pi
    if integer_valued and lo >= -mrad - 2 and hi <= mrad + 2 and max(-lo, hi) >= 0.9 * mrad:
        return (xf / 1000.0).astype(np.float32), "phase rescaled from milliradians (GE) to radians"
    if integer_valued and span >= 255:
        for levels in _LEVELS:  # the smallest vendor range that contains the data
            base = 0.0 if lo >= 0 else -levels / 2
            if lo >= base and hi <= base + levels - 1:
                break
        else:
            levels = 0
        if levels:
            name = _VENDOR_NAMES.get((levels, int(base)))
            rad = (xf - base) / levels * 2 * pi - pi
            used = (span + 1) / levels
            caution = (f"; the data use only {100 * used:.0f} % of that range, so its signedness and "
                       "scale are inferred: check" if used < 0.5 else "")
            return rad.astype(np.float32), (
                f"phase rescaled from vendor integer range [{base:g}, {base + levels - 1:g}] ({levels} levels"
                + (f", {name}" if name else "") + ") to radians" + caution)
    if strict:
        raise ValueError(f"phase values span [{lo:g}, {hi:g}]: neither radians [-pi, pi] "
                         "nor a vendor integer range")
    rad = (xf - lo) / max(hi - lo, 1e-12) * 2 * pi - pi
    return rad.astype(np.float32), (f"phase range [{lo:g}, {hi:g}] not recognised; rescaled from its "
                                    "min/max to [-pi, pi)")

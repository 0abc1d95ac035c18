"""Detect vendor phase encodings and rescale them to radians."""

from __future__ import annotations

import numpy as np

__all__ = ["rescale_phase"]

# (name, lo, hi): nominal stored range of one 2 pi cycle
_RANGES = (
    ("Siemens 12-bit signed (-4096..4095)", -4096.0, 4096.0),
    ("Siemens/Philips 12-bit unsigned (0..4095)", 0.0, 4096.0),
    ("GE milliradians (-3142..3142)", -1000 * np.pi, 1000 * np.pi),
    ("16-bit signed (-32768..32767)", -32768.0, 32768.0),
    ("16-bit unsigned (0..65535)", 0.0, 65536.0),
)


def rescale_phase(phase, *, tolerance_rad: float = 0.05) -> tuple[np.ndarray, str]:
    """Return phase in radians and a note saying what was detected.

    - values already within [-pi, pi] (or [0, 2 pi]) are taken as radians
      (only cast to float32; [0, 2 pi] is shifted to [-pi, pi));
    - integer-valued data are mapped from the tightest nominal vendor range
      that contains them (Siemens 12-bit -4096..4095 or 0..4095, GE
      milliradians, 16-bit) linearly onto [-pi, pi);
    - anything else is mapped from its own minimum/maximum onto [-pi, pi)
      (the note says so: a per-volume constant offset is harmless because the
      echo fit absorbs it, but then check the scale).

    Parameters
    ----------
    phase : array of phase values (any shape).
    tolerance_rad : slack when deciding that data are already radians.

    Returns
    -------
    (phase_rad float32, note str)
    """
    x = np.asarray(phase)
    if x.size == 0:
        raise ValueError("phase is empty")
    xf = x.astype(np.float64)
    finite = np.isfinite(xf)
    if not finite.any():
        raise ValueError("phase has no finite values")
    lo, hi = float(xf[finite].min()), float(xf[finite].max())
    pi = np.pi
    if lo >= -pi - tolerance_rad and hi <= pi + tolerance_rad:
        return np.clip(xf, -pi, pi).astype(np.float32), "phase already in radians [-pi, pi]"
    if lo >= -tolerance_rad and hi <= 2 * pi + tolerance_rad:
        return (((xf + pi) % (2 * pi)) - pi).astype(np.float32), "phase in radians [0, 2 pi]; shifted to [-pi, pi)"
    is_int = np.issubdtype(x.dtype, np.integer) or np.allclose(xf[finite], np.round(xf[finite]))
    if is_int:
        for name, rlo, rhi in sorted(_RANGES, key=lambda r: r[2] - r[1]):  # tightest first
            if lo >= rlo - 1 and hi <= rhi:
                rad = (xf - rlo) / (rhi - rlo) * 2 * pi - pi
                return rad.astype(np.float32), f"integer phase, {name}, rescaled to radians"
    rad = (xf - lo) / max(hi - lo, 1e-12) * 2 * pi - pi
    return rad.astype(np.float32), (f"phase range [{lo:g}, {hi:g}] not recognised; rescaled from its "
                                    "min/max to [-pi, pi)")

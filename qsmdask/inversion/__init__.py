"""Dipole inversion: local field (ppm) -> susceptibility (ppm)."""

from qsmdask.inversion.tkd import tkd

__all__ = ["tkd"]

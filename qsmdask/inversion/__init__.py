"""Dipole inversion: local field (ppm) -> susceptibility (ppm)."""

from qsmdask.inversion.tkd import tkd
from qsmdask.inversion.tv_admm import tv_admm

__all__ = ["tkd", "tv_admm"]

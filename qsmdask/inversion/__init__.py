"""Dipole inversion: local field (ppm) -> susceptibility (ppm)."""

from qsmdask.inversion.iterative_tkd import iterative_tkd, structure_mask_from_estimate
from qsmdask.inversion.tgv import tgv_admm
from qsmdask.inversion.tkd import tkd
from qsmdask.inversion.tv_admm import tv_admm

__all__ = ["iterative_tkd", "structure_mask_from_estimate", "tgv_admm", "tkd", "tv_admm"]

"""Phase unwrapping and multi-echo combination."""

from qsmdask.unwrap.echo_fit import GAMMA_HZ_PER_T, fit_phase_slope, phase_slope_to_ppm
from qsmdask.unwrap.laplacian import laplacian_unwrap, wrapped_laplacian

__all__ = ["GAMMA_HZ_PER_T", "fit_phase_slope", "phase_slope_to_ppm", "laplacian_unwrap",
           "wrapped_laplacian"]

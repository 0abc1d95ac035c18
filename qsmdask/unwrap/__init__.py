"""Phase unwrapping, vendor phase rescaling and multi-echo combination."""

from qsmdask.unwrap.echo_fit import GAMMA_HZ_PER_T, fit_phase_slope, phase_slope_to_ppm
from qsmdask.unwrap.laplacian import laplacian_unwrap, wrapped_laplacian
from qsmdask.unwrap.region_growing import quality_map, region_growing_unwrap
from qsmdask.unwrap.rescale import rescale_phase
from qsmdask.unwrap.temporal import echo_difference_phase, temporal_unwrap

__all__ = ["GAMMA_HZ_PER_T", "fit_phase_slope", "phase_slope_to_ppm", "laplacian_unwrap",
           "wrapped_laplacian", "quality_map", "region_growing_unwrap", "rescale_phase",
           "echo_difference_phase", "temporal_unwrap"]

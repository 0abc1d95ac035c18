"""Brain masks from magnitude images."""

from qsmdask.mask.bet import bet_mask
from qsmdask.mask.quality import PAIRS, max_wrapped_gradient, phase_quality_mask
from qsmdask.mask.threshold import threshold_mask

__all__ = ["bet_mask", "threshold_mask", "max_wrapped_gradient", "phase_quality_mask", "PAIRS"]

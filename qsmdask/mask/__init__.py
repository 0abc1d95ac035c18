"""Brain masks from magnitude images."""

from qsmdask.mask.threshold import threshold_mask

__all__ = ["threshold_mask"]

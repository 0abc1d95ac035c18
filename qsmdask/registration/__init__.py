"""Registration and spatial standardisation with ANTs (antspyx).

Arrays plus 4x4 NIfTI (RAS) affines in; ``Transform`` objects and resampled arrays out.
ANTs works in LPS physical space; the conversion is done once in
``qsmdask.registration._ants`` and tested with known shifts and rotations.
"""

from qsmdask.registration.register import TRANSFORMS, register
from qsmdask.registration.standardise import METHODS, SpatialNormalisation, standardise
from qsmdask.registration.transform import Transform, apply_transform, compose

__all__ = ["METHODS", "SpatialNormalisation", "standardise", "TRANSFORMS", "Transform", "apply_transform", "compose", "register"]

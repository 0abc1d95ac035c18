"""Voxel-wise permutation inference (GLM, Huh-Jhun or Freedman-Lane, max-T / cluster / TFCE FWE).

Numerics are pure numpy/scipy; the Dask fan-out lives in
:mod:`qsmdask.perm.distributed`.
"""

from qsmdask.perm.glm import (Design, correlation_design, glm_t, one_sample_design, paired_design,
                              t_to_z, two_group_design)
from qsmdask.perm.permute import PermutationOptions, PermutationResult, permutation_test

__all__ = ["Design", "two_group_design", "one_sample_design", "paired_design", "correlation_design",
           "glm_t", "t_to_z", "PermutationOptions", "PermutationResult", "permutation_test"]

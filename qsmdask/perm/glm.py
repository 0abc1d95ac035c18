"""General linear model designs and t statistics for voxel-wise inference.

A :class:`Design` holds the design matrix, the contrast of interest and the
exchangeability structure used by the permutation engine
(:mod:`qsmdask.perm.permute`).  Builders cover the study's models: two groups
with covariates, one-sample / paired (sign flipping), and correlation with a
clinical variable.

References
----------
Winkler AM, Ridgway GR, Webster MA, Smith SM, Nichols TE (2014). Permutation
inference for the general linear model. NeuroImage 92:381-397.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
from scipy import special, stats

__all__ = [
    "Design",
    "two_group_design",
    "one_sample_design",
    "paired_design",
    "correlation_design",
    "glm_t",
    "t_to_z",
]


@dataclass(frozen=True)
class Design:
    """A GLM design with a t contrast and its exchangeability structure.

    Attributes
    ----------
    matrix : ndarray, shape (n_subjects, n_regressors)
        Full design matrix X (float64), full column rank.
    contrast : ndarray, shape (n_regressors,)
        t contrast c; the tested effect is ``c @ beta``.
    names : tuple of str
        One name per column of ``matrix``.
    sign_flip : bool
        True for one-sample / paired tests (errors symmetric: flip signs
        instead of permuting rows).
    blocks : ndarray of int, shape (n_subjects,), or None
        Exchangeability blocks. ``None``: all subjects exchangeable.
    whole_block : bool
        False: shuffle within blocks. True: shuffle whole blocks (all blocks
        the same size; repeated measures), or flip signs per block.
    """

    matrix: np.ndarray
    contrast: np.ndarray
    names: tuple = field(default=())
    sign_flip: bool = False
    blocks: np.ndarray | None = None
    whole_block: bool = False

    def __post_init__(self):
        x = np.array(self.matrix, dtype=np.float64, copy=True)
        if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 1:
            raise ValueError(f"matrix must be 2-D (n_subjects, n_regressors), got shape {x.shape}")
        if not np.all(np.isfinite(x)):
            raise ValueError("matrix must be finite (no NaN/inf covariates)")
        c = np.array(self.contrast, dtype=np.float64, copy=True).ravel()
        if c.shape != (x.shape[1],):
            raise ValueError(f"contrast must have {x.shape[1]} elements, got {c.shape[0]}")
        if not np.any(c):
            raise ValueError("contrast must not be all zeros")
        if np.linalg.matrix_rank(x) < x.shape[1]:
            raise ValueError("matrix must have full column rank (collinear regressors)")
        if x.shape[0] <= x.shape[1]:
            raise ValueError("matrix needs more subjects than regressors (dof > 0)")
        names = tuple(self.names) if self.names else tuple(f"x{i}" for i in range(x.shape[1]))
        if len(names) != x.shape[1]:
            raise ValueError(f"names must have {x.shape[1]} entries, got {len(names)}")
        blocks = None
        if self.blocks is not None:
            blocks = np.asarray(self.blocks)
            if blocks.shape != (x.shape[0],):
                raise ValueError(f"blocks must have shape ({x.shape[0]},), got {blocks.shape}")
            _, blocks = np.unique(blocks, return_inverse=True)
            if self.whole_block:
                sizes = np.bincount(blocks)
                if not self.sign_flip and np.any(sizes != sizes[0]):
                    raise ValueError("whole_block permutation needs blocks of equal size")
        elif self.whole_block:
            raise ValueError("whole_block=True needs blocks")
        x.setflags(write=False)
        c.setflags(write=False)
        object.__setattr__(self, "matrix", x)
        object.__setattr__(self, "contrast", c)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "blocks", blocks)
        object.__setattr__(self, "sign_flip", bool(self.sign_flip))
        object.__setattr__(self, "whole_block", bool(self.whole_block))

    @property
    def n_subjects(self) -> int:
        return self.matrix.shape[0]

    @property
    def dof(self) -> int:
        """Residual degrees of freedom n - rank(X)."""
        return self.matrix.shape[0] - self.matrix.shape[1]


def _covariate_columns(covariates: Mapping[str, object] | None, n: int):
    """Numeric covariates are mean-centred; non-numeric ones become dummies (first level dropped)."""
    cols, names = [], []
    if covariates is None:
        return cols, names
    if not isinstance(covariates, Mapping):
        raise ValueError("covariates must be a mapping name -> values (e.g. a dict or DataFrame columns)")
    for name, values in covariates.items():
        v = np.asarray(values)
        if v.shape != (n,):
            raise ValueError(f"covariates[{name!r}] must have shape ({n},), got {v.shape}")
        if np.issubdtype(v.dtype, np.number) or v.dtype == bool:
            v = v.astype(np.float64)
            if np.unique(v).size < 2:
                raise ValueError(f"covariates[{name!r}] is constant")
            cols.append(v - v.mean())
            names.append(str(name))
        else:
            levels = np.unique(v)
            if levels.size < 2:
                raise ValueError(f"covariates[{name!r}] has a single level")
            for lev in levels[1:]:
                d = (v == lev).astype(np.float64)
                cols.append(d - d.mean())
                names.append(f"{name}[{lev}]")
    return cols, names


def two_group_design(group, *, covariates: Mapping[str, object] | None = None,
                     blocks=None, whole_block: bool = False) -> Design:
    """Two-group comparison (group 1 minus group 0) with covariates.

    Parameters
    ----------
    group : array-like, shape (n_subjects,)
        Two distinct values; the sorted second value is the tested group
        (e.g. 0 = control, 1 = patient: contrast patient - control).
    covariates : mapping name -> array, optional
        Nuisance covariates (age, sex, medication, site...). Numeric ones are
        mean-centred; strings/categories are dummy coded.
    blocks, whole_block : see :class:`Design`.

    Returns
    -------
    Design with columns ``[intercept, group, covariates...]`` and contrast on ``group``.
    """
    g = np.asarray(group)
    if g.ndim != 1:
        raise ValueError("group must be 1-D")
    levels = np.unique(g)
    if levels.size != 2:
        raise ValueError(f"group must have exactly 2 distinct values, got {levels.size}")
    n = g.shape[0]
    cols, names = _covariate_columns(covariates, n)
    x = np.column_stack([np.ones(n), (g == levels[1]).astype(np.float64)] + cols)
    c = np.zeros(x.shape[1])
    c[1] = 1.0
    return Design(x, c, ("intercept", "group", *names), blocks=blocks, whole_block=whole_block)


def correlation_design(variable, *, covariates: Mapping[str, object] | None = None,
                       blocks=None, whole_block: bool = False) -> Design:
    """Linear association of the maps with a (clinical) variable, adjusted for covariates.

    Parameters
    ----------
    variable : array-like, shape (n_subjects,)
        Numeric variable of interest (mean-centred in the design).
    covariates, blocks, whole_block : as in :func:`two_group_design`.
    """
    v = np.asarray(variable, dtype=np.float64)
    if v.ndim != 1 or np.unique(v).size < 2:
        raise ValueError("variable must be 1-D and not constant")
    n = v.shape[0]
    cols, names = _covariate_columns(covariates, n)
    x = np.column_stack([np.ones(n), v - v.mean()] + cols)
    c = np.zeros(x.shape[1])
    c[1] = 1.0
    return Design(x, c, ("intercept", "variable", *names), blocks=blocks, whole_block=whole_block)


def one_sample_design(n_subjects: int, *, covariates: Mapping[str, object] | None = None,
                      blocks=None, whole_block: bool = False) -> Design:
    """One-sample test of the mean (sign flipping), optionally adjusted for covariates.

    Parameters
    ----------
    n_subjects : int
    covariates : mapping, optional
        Mean-centred nuisance covariates (the intercept is then the mean at the
        covariates' average).
    """
    if int(n_subjects) != n_subjects or n_subjects < 2:
        raise ValueError("n_subjects must be an integer >= 2")
    n = int(n_subjects)
    cols, names = _covariate_columns(covariates, n)
    x = np.column_stack([np.ones(n)] + cols)
    c = np.zeros(x.shape[1])
    c[0] = 1.0
    return Design(x, c, ("intercept", *names), sign_flip=True, blocks=blocks, whole_block=whole_block)


def paired_design(n_pairs: int, *, covariates: Mapping[str, object] | None = None) -> Design:
    """Paired test: a one-sample sign-flipping test on within-pair differences.

    Feed it ``data = second - first`` (one row per pair); flipping the sign of a
    difference is swapping the two conditions of that pair.
    """
    return one_sample_design(n_pairs, covariates=covariates)


def glm_t(data, design: Design):
    """Ordinary least squares t statistic of the design's contrast at every voxel.

    Parameters
    ----------
    data : array-like, shape (n_subjects, n_voxels)
    design : Design

    Returns
    -------
    t : ndarray float64, shape (n_voxels,)
    dof : int
    """
    y = np.asarray(data, dtype=np.float64)
    if y.ndim != 2 or y.shape[0] != design.n_subjects:
        raise ValueError(f"data must have shape ({design.n_subjects}, n_voxels), got {y.shape}")
    x, c = design.matrix, design.contrast
    pinv = np.linalg.pinv(x)
    beta = pinv @ y
    resid = y - x @ beta
    dof = design.dof
    sigma2 = np.einsum("ij,ij->j", resid, resid) / dof
    var_c = c @ pinv @ pinv.T @ c
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (c @ beta) / np.sqrt(sigma2 * var_c)
    return np.where(np.isfinite(t), t, 0.0), dof


def t_to_z(t, dof: int):
    """Convert t statistics to z scores with equal tail probability (accurate in the far tails).

    Parameters
    ----------
    t : array-like
    dof : int, > 0

    Returns
    -------
    z : ndarray float64, same sign as t.
    """
    if dof <= 0:
        raise ValueError("dof must be > 0")
    t = np.asarray(t, dtype=np.float64)
    # log of the upper-tail probability of |t|, then back through the normal tail
    logp = stats.t.logsf(np.abs(t), dof)
    z = -special.ndtri_exp(logp)
    return np.sign(t) * np.maximum(z, 0.0)

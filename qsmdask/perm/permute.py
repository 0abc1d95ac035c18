"""Permutation inference for a GLM t contrast (Huh-Jhun or Freedman-Lane), batched as matrix products.

Two schemes (``scheme``), both exact for Gaussian errors and recommended by Winkler et
al. (2014, Table 2) for designs with nuisance regressors:

- ``"huh_jhun"`` (default for designs without exchangeability blocks or sign flipping):
  the data are projected once onto an orthonormal basis ``Q`` (n x m, ``m = n - rank(Z)``)
  of the complement of the nuisance space, ``W = Q' Y`` and ``x = Q' a``; in that space
  the model has no nuisance left and the permutations ``P`` (m x m) act on ``W``. With the
  columns of ``W`` and ``x`` of unit norm, ``g = (P x)' W_v`` is a correlation and
  ``t = sqrt(dof) g / sqrt(1 - g^2)`` (``dof = m - 1 = n - rank(X)``): one row of length
  ``m`` per permutation, and max-T per permutation is a function of ``max_v |g_v|``.
  ``Q`` is fixed deterministically (the Householder QR of ``Z``), so runs are reproducible;
  the identity permutation gives the ordinary GLM t map. The reduced space has no
  subjects, so exchangeability blocks cannot be respected, and sign flips there are exact
  only for Gaussian errors: those designs use Freedman-Lane.
- ``"freedman_lane"``, below.

Model ``Y = X b + e`` with contrast ``c``. The design is re-partitioned into
the effect of interest ``a = X (X'X)^-1 c`` and nuisance ``Z = X N`` with
``N`` a basis of the null space of ``c'`` (Beckmann partitioning, Winkler et
al. 2014, appendix A). Freedman-Lane permutes the residuals of the reduced
model ``R = (I - H_Z) Y``; the t statistic of the permuted data ``P R`` on the
full model is

    t = g_1 / sqrt((||R||^2 - sum_k g_k^2) / (n - p)),   g = U' P R,

where ``U`` is an orthonormal basis of ``span(X)`` whose first column is
``a / ||a||`` (``||P R|| = ||R||`` for permutations and sign flips). For a
batch of B permutations the rows ``(P' U)'`` are stacked and one product
``(B p x n) @ (n x V)`` gives every t map of the batch.

Two exact reductions keep that product at its floor. ``R`` lies in the
``m = n - rank(Z)`` dimensional complement of the nuisance space, so it is
stored in an orthonormal basis ``Q`` of that complement (``R = Q W``, ``W``
m x V) and each row is ``(P' U)' Q`` (length m, not n). The intercept row is
dropped when the intercept is a nuisance regressor (it is permutation
invariant and orthogonal to ``R``). The exact Freedman-Lane statistic still
needs all ``p`` rows per permutation (the tested effect and the refit of the
nuisance regressors on the permuted data, as nilearn's ``permuted_ols``
computes them); a single row would give Kennedy's statistic, whose null is
too narrow (anti-conservative).

For max-T the product is done in voxel blocks that stay in cache, with the
statistics (maximum per permutation, exceedance count per voxel) reduced per
block and the blocks shared among threads (BLAS single-threaded inside, so
the threads do not oversubscribe the cores).

Each batch of permutations is generated from ``numpy.random.default_rng((seed,
batch_index))`` so a run is reproducible and identical however the batches are
distributed (see :mod:`qsmdask.perm.distributed`).

References
----------
Freedman D, Lane D (1983). A nonstochastic interpretation of reported
significance levels. J Bus Econ Stat 1:292-298.
Winkler AM et al. (2014). Permutation inference for the general linear model.
NeuroImage 92:381-397.
Huh MH, Jhun M (2001). Random permutation testing in multiple linear regression.
Commun Stat Theory Methods 30:2023-2032.
Nichols TE, Holmes AP (2002). Nonparametric permutation tests for functional
neuroimaging. Hum Brain Mapp 15:1-25.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from scipy import linalg, stats

from qsmdask.perm.cluster import (cluster_statistics, cluster_table, cluster_threshold_t,
                                  connectivity_structure, max_cluster_statistics)
from qsmdask.perm.glm import Design, t_to_z
from qsmdask.perm.tfce import neighbour_pairs, tfce_values

__all__ = [
    "detectable_effect_size",
    "fwe_t_threshold",
    "PermutationOptions",
    "SCHEMES",
    "resolve_scheme",
    "PreparedModel",
    "PermutationResult",
    "prepare_model",
    "random_permutations",
    "permutation_rows",
    "voxel_null_block",
    "batch_t",
    "null_batch",
    "null_batches",
    "product_group_batches",
    "BLOCK_VOXELS",
    "TIE_RTOL",
    "TIE_ATOL",
    "tie_lowered_t",
    "NullAccumulator",
    "finalize",
    "permutation_test",
    "batch_sizes",
    "hj_null_block",
    "hj_threshold",
    "hj_to_t",
    "householder_reflectors",
    "reduce_to_complement",
    "huh_jhun_model",
]

INFERENCES = ("voxel", "cluster", "tfce")
SCHEMES = ("huh_jhun", "freedman_lane")


def resolve_scheme(design: Design, scheme: str | None = None) -> str:
    """The permutation scheme used for ``design``: ``scheme``, or by default ``"huh_jhun"``
    for designs whose subjects are all exchangeable and ``"freedman_lane"`` for designs
    with exchangeability blocks or sign flipping.

    ``"huh_jhun"`` permutes the rows of the data projected on the complement of the nuisance
    space, which are not subjects: it cannot respect exchangeability blocks, and sign flips
    there are exact only for Gaussian errors (sign-flip designs are chosen for symmetric,
    non-Gaussian ones), so both are refused.
    """
    if scheme is None:
        return "freedman_lane" if (design.sign_flip or design.blocks is not None) else "huh_jhun"
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if scheme == "huh_jhun" and design.blocks is not None:
        raise ValueError("scheme 'huh_jhun' permutes in the reduced space, where exchangeability blocks "
                         "have no meaning: use scheme='freedman_lane' for a design with blocks")
    if scheme == "huh_jhun" and design.sign_flip:
        raise ValueError("scheme 'huh_jhun' sign flips in the reduced space are exact only for Gaussian "
                         "errors: use scheme='freedman_lane' for a sign-flipping (one-sample/paired) design")
    return scheme


@dataclass(frozen=True)
class PermutationOptions:
    """Inference options (validated).

    n_perm : number of random permutations (sign flips) in the null distribution.
    seed : int seed; batch ``i`` uses ``default_rng((seed, i))``.
    batch_size : permutations per matrix product (memory ~ batch_size * p * n_voxels * 4 bytes).
    two_sided : test both signs (max |t|) or positive effects only.
    inference : subset of ("voxel", "cluster", "tfce").
    cluster_p : cluster-forming p (converted to t with the model dof; split over tails when two-sided).
    min_cluster_voxels : clusters smaller than this are ignored (observed and null).
    connectivity : 6, 18 or 26.
    tfce_E, tfce_H, tfce_dh : TFCE parameters (dh "auto" = max/100).
    scheme : "huh_jhun", "freedman_lane" or None (the design's default, :func:`resolve_scheme`).
    """

    n_perm: int = 5000
    seed: int = 0
    batch_size: int = 32
    two_sided: bool = True
    inference: tuple = ("voxel",)
    cluster_p: float = 0.005
    min_cluster_voxels: int = 10
    connectivity: int = 6
    tfce_E: float = 0.5
    tfce_H: float = 2.0
    tfce_dh: object = "auto"
    scheme: str | None = None

    def __post_init__(self):
        if self.scheme is not None and self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES} or None, got {self.scheme!r}")
        if int(self.n_perm) != self.n_perm or self.n_perm < 1:
            raise ValueError(f"n_perm must be a positive integer, got {self.n_perm!r}")
        if int(self.batch_size) != self.batch_size or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        inf = (self.inference,) if isinstance(self.inference, str) else tuple(self.inference)
        bad = [i for i in inf if i not in INFERENCES]
        if bad or not inf:
            raise ValueError(f"inference must be a non-empty subset of {INFERENCES}, got {self.inference!r}")
        object.__setattr__(self, "inference", inf)
        if not 0.0 < self.cluster_p < 1.0:
            raise ValueError(f"cluster_p must be in (0, 1), got {self.cluster_p!r}")
        if int(self.min_cluster_voxels) != self.min_cluster_voxels or self.min_cluster_voxels < 1:
            raise ValueError(f"min_cluster_voxels must be an integer >= 1, got {self.min_cluster_voxels!r}")
        connectivity_structure(self.connectivity)
        if not self.tfce_E > 0 or not self.tfce_H > 0:
            raise ValueError("tfce_E and tfce_H must be > 0")
        if isinstance(self.tfce_dh, str):
            if self.tfce_dh != "auto":
                raise ValueError(f"tfce_dh must be 'auto' or a positive float, got {self.tfce_dh!r}")
        elif not float(self.tfce_dh) > 0:
            raise ValueError(f"tfce_dh must be 'auto' or a positive float, got {self.tfce_dh!r}")


@dataclass
class PreparedModel:
    """Everything a permutation batch needs (picklable, shipped once to Dask workers)."""

    residuals: np.ndarray   # (m, V) float32, reduced-model residuals W = Q' R (scaled per voxel)
    basis: np.ndarray       # (n, p) float32, orthonormal basis U of span(X), U[:,0] = a/|a|;
                            # huh_jhun: (m, 1), the tested effect Q' a / |Q' a| in the reduced space
    ss: np.ndarray          # (V,) float32, ||W||^2 = ||R||^2 per voxel
    dof: int
    design: Design
    coords: np.ndarray      # (V, 3) int voxel coordinates of the masked voxels
    t_obs: np.ndarray       # (V,) float32 observed t (same arithmetic as the permutations)
    cluster_t: float        # cluster-forming threshold in t
    pairs: np.ndarray | None = None  # neighbour pairs for TFCE (None unless TFCE requested)
    floor: np.ndarray | None = None  # (V,) float32 lower bound of the residual sum of squares
    complement: np.ndarray | None = None  # (n, m) float64 orthonormal Q (None: identity, m = n)
    scheme: str = "freedman_lane"

    @property
    def n_exchangeable(self) -> int:
        """Length of a permutation: subjects (Freedman-Lane) or reduced-space rows (Huh-Jhun)."""
        return self.basis.shape[0]


def _as_data(data, design: Design):
    y = np.asarray(data)
    if y.ndim != 2 or y.shape[0] != design.n_subjects:
        raise ValueError(f"data must have shape ({design.n_subjects}, n_voxels), got {y.shape}")
    if not np.all(np.isfinite(y)):
        raise ValueError("data must be finite (mask out NaN voxels)")
    return y


def _mask_coords(mask, n_voxels):
    m = np.asarray(mask)
    if m.ndim != 3 or m.dtype != bool:
        raise ValueError("mask must be a 3-D bool array")
    if n_voxels < 1:
        raise ValueError("mask/data must hold at least one voxel")
    if int(m.sum()) != n_voxels:
        raise ValueError(f"mask has {int(m.sum())} voxels but data has {n_voxels} columns")
    return np.argwhere(m).astype(np.int32)


def _nuisance_and_basis(design: Design):
    x, c = design.matrix, design.contrast
    q = np.linalg.pinv(x.T @ x)
    a = x @ q @ c
    a = a / np.linalg.norm(a)
    if x.shape[1] > 1:
        z = x @ linalg.null_space(c[None, :])
        zo = linalg.orth(z)
        zo = zo - np.outer(a, a @ zo)  # exactly orthogonal to a (it is in theory)
        zo, _ = np.linalg.qr(zo)
        if not design.sign_flip:
            # Permutations fix the constant vector and R is orthogonal to span(Z): when the
            # intercept is a nuisance regressor its row of U' P R is exactly zero, so drop it.
            one = np.full(x.shape[0], 1.0 / np.sqrt(x.shape[0]))
            if np.linalg.norm(one - zo @ (zo.T @ one)) < 1e-8:
                rest = zo - np.outer(one, one @ zo)
                uu, sv, _ = np.linalg.svd(rest, full_matrices=False)
                zo = uu[:, sv > 1e-8 * max(sv.max(initial=0.0), 1.0)]
    else:
        z = np.zeros((x.shape[0], 0))
        zo = z
    basis = np.column_stack([a, zo])
    return z, basis


def householder_reflectors(z) -> list:
    """Unit Householder vectors ``v_j`` (length ``n - j``) of the QR decomposition of ``z`` (n x k).

    ``H_j = I - 2 v_j v_j'`` (acting on rows ``j:``); the last ``n - k`` columns of
    ``H_1 ... H_k`` are an orthonormal basis ``Q`` of the complement of ``span(z)``, fixed
    by ``z`` (no sign or rotation freedom left), so the Huh-Jhun reduced space is reproducible.
    """
    a = np.array(z, dtype=np.float64, copy=True)
    n, k = a.shape
    vs = []
    for j in range(k):
        x = a[j:, j]
        v = x.copy()
        v[0] += np.copysign(np.linalg.norm(x), x[0] if x[0] != 0 else 1.0)
        nv = np.linalg.norm(v)
        if nv == 0:
            raise ValueError("nuisance regressors are collinear")
        v /= nv
        a[j:, j:] -= 2.0 * np.outer(v, v @ a[j:, j:])
        vs.append(v)
    return vs


def reduce_to_complement(reflectors, y, *, column_block: int = 2048) -> np.ndarray:
    """``Q' y`` ((n - k) x V float64) for ``Q`` of :func:`householder_reflectors`, in O(n k V)
    without forming ``Q`` (n x n float64 would be 9.8 GB at 35,000 subjects); temporaries are
    bounded by ``column_block`` columns."""
    return _householder_apply(reflectors, y, column_block)[len(reflectors):]


def _householder_apply(reflectors, y, column_block: int = 2048) -> np.ndarray:
    """``H_k ... H_1 y`` (n x V float64): rows ``k:`` are ``Q' y``; the transform is orthogonal,
    so the column norms of ``y`` are those of the result."""
    r = np.array(y, dtype=np.float64, copy=True)
    if r.ndim == 1:
        r = r[:, None]
    for c0 in range(0, r.shape[1], int(column_block)):
        blk = r[:, c0:c0 + int(column_block)]
        for j, v in enumerate(reflectors):
            blk[j:] -= np.outer(2.0 * v, v @ blk[j:])
    return r


def huh_jhun_model(y, design: Design):
    """Reduced-space data ``W`` ((n - k) x V float32, unit-norm columns, zero for constant voxels),
    its squared norms ``ss`` (1 or 0) and the tested effect ``x`` ((n - k) x 1 float32, unit norm)."""
    z, basis = _nuisance_and_basis(design)
    refl = householder_reflectors(z)
    k = len(refl)
    full = _householder_apply(refl, y)
    y_norm = np.sqrt(np.einsum("ij,ij->j", full, full))      # = the norms of y (orthogonal transform)
    w = full[k:]
    norm = np.sqrt(np.einsum("ij,ij->j", w, w))
    # a voxel constant over subjects (in the nuisance space) leaves only rounding: t = 0
    scale = np.where(norm > 1e-9 * y_norm, norm, np.inf)
    w /= scale
    ss = np.isfinite(scale).astype(np.float32)   # |W_v| = 1 (to float32 rounding), 0 if constant
    x = reduce_to_complement(refl, basis[:, 0])
    x /= np.linalg.norm(x)
    out = np.ascontiguousarray(w, dtype=np.float32)
    del full, w
    return out, ss, np.ascontiguousarray(x, dtype=np.float32)


def _complement_basis(z):
    """Orthonormal basis Q (n, m) of the complement of span(Z), or None when Z is empty."""
    if not z.shape[1]:
        return None
    q = linalg.null_space(linalg.orth(z).T)
    return np.ascontiguousarray(q)


def prepare_model(data, design: Design, *, mask, options: PermutationOptions) -> PreparedModel:
    """Residualise the data on the nuisance model and precompute the observed t map.

    Parameters
    ----------
    data : (n_subjects, n_voxels) array (masked voxels, e.g. ``maps[:, mask]``)
    design : Design
    mask : 3-D bool array with ``n_voxels`` True voxels (their order = C order of ``argwhere``)
    options : PermutationOptions
    """
    y = _as_data(data, design)
    coords = _mask_coords(mask, y.shape[1])
    scheme = resolve_scheme(design, options.scheme)
    cluster_t = cluster_threshold_t(options.cluster_p, design.dof, two_sided=options.two_sided)
    if scheme == "huh_jhun":
        w, ss, x = huh_jhun_model(y, design)
        prepared = PreparedModel(residuals=w, basis=x, ss=ss, dof=design.dof, design=design, coords=coords,
                                 t_obs=np.zeros(0, np.float32), cluster_t=cluster_t, scheme=scheme)
        return _finish_prepared(prepared, options)
    z, basis = _nuisance_and_basis(design)
    q = _complement_basis(z)
    # W = Q' Y = Q' R: the reduced-model residuals in coordinates of the complement of span(Z)
    r = np.array(y, dtype=np.float64, copy=True) if q is None else q.T @ np.asarray(y, dtype=np.float64)
    # per-voxel scaling keeps float32 well conditioned; t is scale invariant
    scale = np.sqrt(np.einsum("ij,ij->j", r, r))
    scale[scale == 0] = 1.0
    r /= scale
    r32 = r.astype(np.float32)
    del r
    ss = np.einsum("ij,ij->j", r32, r32, dtype=np.float64).astype(np.float32)
    prepared = PreparedModel(residuals=np.ascontiguousarray(r32), basis=basis.astype(np.float32),
                             ss=ss, dof=design.dof, design=design, coords=coords,
                             t_obs=np.zeros(0, np.float32),
                             cluster_t=cluster_t, complement=q, scheme=scheme)
    return _finish_prepared(prepared, options)


def _finish_prepared(prepared: PreparedModel, options: PermutationOptions) -> PreparedModel:
    """Residual floor, TFCE neighbour pairs and the observed t (the identity permutation)."""
    ss = prepared.ss
    prepared.floor = (np.float32(1e-12) * ss + np.float32(1e-30)).astype(np.float32)
    if "tfce" in options.inference:
        prepared.pairs = neighbour_pairs(prepared.coords, connectivity_structure(options.connectivity))
    ident = np.arange(prepared.n_exchangeable)[None, :]
    prepared.t_obs = batch_t(prepared, ident if not prepared.design.sign_flip
                             else np.ones_like(ident, np.float32))[0]
    return prepared


def random_permutations(design: Design, n: int, rng: np.random.Generator, *,
                        size: int | None = None) -> np.ndarray:
    """``n`` random permutations (int (n, size)) or sign flips (float32 +-1) for the design.

    Permutations respect the exchangeability blocks: within-block shuffles,
    or (``whole_block``) shuffles of whole blocks keeping the order inside
    blocks. Sign flips are per subject, or per block when ``whole_block``.
    ``size``: permutation length, default the subjects; Huh-Jhun permutes the
    ``n - rank(Z)`` reduced-space rows (``PreparedModel.n_exchangeable``, no blocks).
    """
    ns = design.n_subjects if size is None else int(size)
    blocks = design.blocks
    if ns != design.n_subjects and blocks is not None:
        raise ValueError("exchangeability blocks need permutations of the subjects (scheme 'freedman_lane')")
    if design.sign_flip:
        if blocks is not None and design.whole_block:
            nb = blocks.max() + 1
            return (rng.integers(0, 2, size=(n, nb)) * 2 - 1).astype(np.float32)[:, blocks]
        return (rng.integers(0, 2, size=(n, ns)) * 2 - 1).astype(np.float32)
    base = np.tile(np.arange(ns), (n, 1))
    if blocks is None:
        return rng.permuted(base, axis=1)
    out = base.copy()
    if design.whole_block:
        nb = blocks.max() + 1
        members = np.stack([np.flatnonzero(blocks == b) for b in range(nb)])  # (nb, size)
        order = rng.permuted(np.tile(np.arange(nb), (n, 1)), axis=1)     # (n, nb)
        out[:, members.ravel()] = members[order].reshape(n, -1)
        return out
    for b in range(blocks.max() + 1):
        idx = np.flatnonzero(blocks == b)
        out[:, idx] = idx[rng.permuted(np.tile(np.arange(idx.size), (n, 1)), axis=1)]
    return out


def permutation_rows(prepared: PreparedModel, perms: np.ndarray) -> np.ndarray:
    """Rows ``(p * B, m)`` float32 of the product that gives ``g = U' P R`` for a batch.

    Row ``k * B + b`` is column ``k`` of the design basis ``U`` permuted (or sign
    flipped) by ``perms[b]``, expressed in the residual coordinates (times ``Q``):
    the first ``B`` rows give the tested effect, the others the nuisance refit.
    """
    if perms.ndim != 2 or perms.shape[1] != prepared.n_exchangeable:
        raise ValueError(f"perms must have shape (B, {prepared.n_exchangeable}) for scheme "
                         f"{prepared.scheme!r}, got {perms.shape}")
    u = prepared.basis.astype(np.float64)
    if np.issubdtype(perms.dtype, np.floating):
        rows = u[None, :, :] * perms[:, :, None].astype(np.float64)
    else:
        rows = u[perms]                              # (B, n, p)
    rows = rows.transpose(2, 0, 1)                   # (p, B, n)
    if prepared.complement is not None:
        rows = rows @ prepared.complement            # (p, B, m)
    return np.ascontiguousarray(rows.reshape(-1, rows.shape[-1]), dtype=np.float32)


def batch_t(prepared: PreparedModel, perms: np.ndarray) -> np.ndarray:
    """t maps (B, V) float32 for a batch of permutations (int) or sign flips (float).

    ``perms[b]`` is the row order applied to the design basis (equivalently,
    the inverse permutation of the residuals), or the signs of the residuals.
    """
    num, var = _batch_parts(prepared, perms)
    np.sqrt(var, out=var)
    num /= var
    return num


def _batch_parts(prepared: PreparedModel, perms: np.ndarray, *, scaled: bool = True):
    """Numerator g_1 (B, V) and residual variance (B, V) of the permuted fits (t = g_1 / sqrt(var)).

    ``scaled=False`` leaves the variance as a residual sum of squares (not divided by the dof).
    """
    nb = perms.shape[0]
    p = prepared.basis.shape[1]
    g = permutation_rows(prepared, perms) @ prepared.residuals   # (p B, V)
    num = g[:nb].copy()
    np.square(g, out=g)
    var = np.subtract(prepared.ss[None, :], g[:nb])
    for k in range(1, p):
        var -= g[k * nb:(k + 1) * nb]
    del g
    np.maximum(var, prepared.floor[None, :], out=var)
    if scaled:
        var *= np.float32(1.0 / prepared.dof)
    return num, var


def voxel_null_block(rows: np.ndarray, residuals: np.ndarray, ss: np.ndarray, floor: np.ndarray,
                     observed: np.ndarray, n_perm: int, *, two_sided: bool,
                     max_out: np.ndarray | None = None, count_out: np.ndarray | None = None,
                     block_voxels: int = 1024):
    """Max-T null statistics of ``n_perm`` permutations on a set of voxels, in cache-sized blocks.

    Parameters
    ----------
    rows : (p * n_perm, m) float32, from :func:`permutation_rows`
    residuals : (m, V) float32 (any voxel slice of ``PreparedModel.residuals``)
    ss, floor : (V,) float32, the matching slices of ``PreparedModel.ss`` / ``.floor``
    observed : (V,) float32, the observed statistic in the kernel's scale:
        ``t_obs**2 / dof`` (two-sided) or ``t_obs * |t_obs| / dof`` (one-sided)
    n_perm : permutations in ``rows``
    max_out : (n_perm,) float32, updated in place with the maximum over these voxels
    count_out : (V,) int32/int64, incremented in place with the number of permutations
        whose statistic is >= ``observed``
    block_voxels : voxels per block (the block's products stay in cache). For results that are
        bit-identical however the voxels are split, pass slices starting at multiples of
        :data:`BLOCK_VOXELS` and keep the default.

    Returns
    -------
    (max_out, count_out): the maximum is in the kernel's scale (``t**2 / dof``, or
    ``t |t| / dof`` one-sided); convert with :func:`kernel_to_t`.
    """
    m, nv = residuals.shape
    p = rows.shape[0] // n_perm
    if rows.shape != (p * n_perm, m):
        raise ValueError(f"rows must have shape (p * {n_perm}, {m}), got {rows.shape}")
    if max_out is None:
        max_out = np.full(n_perm, -np.inf, np.float32)
    if count_out is None:
        count_out = np.zeros(nv, np.int64)
    bv = max(1, min(int(block_voxels), nv))
    g = np.empty((p * n_perm, bv), np.float32)
    den = np.empty((n_perm, bv), np.float32)
    num = np.empty((n_perm, bv), np.float32) if not two_sided else None
    ge = np.empty((n_perm, bv), bool)
    for v0 in range(0, nv, bv):
        v1 = min(nv, v0 + bv)
        w = v1 - v0
        gb, db, eb = g[:, :w], den[:, :w], ge[:, :w]
        np.matmul(rows, residuals[:, v0:v1], out=gb)
        if not two_sided:
            nb = num[:, :w]
            np.abs(gb[:n_perm], out=nb)
            nb *= gb[:n_perm]                        # g1 |g1|: the sign of t, the scale of t^2
        np.square(gb, out=gb)
        np.subtract(ss[v0:v1], gb[:n_perm], out=db)
        for k in range(1, p):
            db -= gb[k * n_perm:(k + 1) * n_perm]
        np.maximum(db, floor[v0:v1], out=db)
        np.divide(gb[:n_perm] if two_sided else num[:, :w], db, out=db)
        np.maximum(max_out, db.max(axis=1), out=max_out)
        np.greater_equal(db, observed[v0:v1], out=eb)
        count_out[v0:v1] += eb.view(np.uint8).sum(axis=0, dtype=np.int32)
    return max_out, count_out


def hj_null_block(rows: np.ndarray, residuals: np.ndarray, threshold: np.ndarray, n_perm: int, *,
                  two_sided: bool, max_out: np.ndarray | None = None,
                  count_out: np.ndarray | None = None, block_voxels: int = 1024):
    """Huh-Jhun max-T null statistics: one float32 product per voxel block and an abs-max.

    Parameters
    ----------
    rows : (n_perm, m) float32, the permuted unit-norm effect ``P x`` (:func:`permutation_rows`)
    residuals : (m, V) float32 unit-norm reduced-space data (a voxel slice of ``PreparedModel.residuals``)
    threshold : (V,) float32, the observed statistic in the correlation scale,
        :func:`hj_threshold` (tie tolerance included)
    max_out : (n_perm,) float32, updated in place with the maximum of ``|g|`` (``g`` one-sided)
    count_out : (V,) int, incremented in place with the permutations whose statistic reaches the threshold
    block_voxels : voxels per block (see :func:`voxel_null_block`)

    Returns
    -------
    (max_out, count_out): maxima in the correlation scale, convert with :func:`hj_to_t`.
    ``t = sqrt(dof) g / sqrt(1 - g^2)`` is increasing in ``g``, so the maximum t of a permutation
    is that of its maximum ``g``: no per-voxel t is formed.
    """
    m, nv = residuals.shape
    if rows.shape != (n_perm, m):
        raise ValueError(f"rows must have shape ({n_perm}, {m}), got {rows.shape}")
    if max_out is None:
        max_out = np.full(n_perm, -np.inf, np.float32)
    if count_out is None:
        count_out = np.zeros(nv, np.int64)
    bv = max(1, min(int(block_voxels), nv))
    g = np.empty((n_perm, bv), np.float32)
    ge = np.empty((n_perm, bv), bool)
    for v0 in range(0, nv, bv):
        v1 = min(nv, v0 + bv)
        w = v1 - v0
        gb, eb = g[:, :w], ge[:, :w]
        np.matmul(rows, residuals[:, v0:v1], out=gb)
        if two_sided:
            np.abs(gb, out=gb)
        np.maximum(max_out, gb.max(axis=1), out=max_out)
        np.greater_equal(gb, threshold[v0:v1], out=eb)
        count_out[v0:v1] += eb.view(np.uint8).sum(axis=0, dtype=np.int32)
    return max_out, count_out


def hj_to_t(g, dof: int) -> np.ndarray:
    """t (float64) of a Huh-Jhun correlation ``g``: ``g / sqrt((1 - g^2) / dof)``, the formula of
    :func:`batch_t` with unit-norm data."""
    g = np.asarray(g, dtype=np.float64)
    return g / np.sqrt(np.maximum(1.0 - g * g, 1e-12) / dof)


def hj_threshold(prepared: PreparedModel, two_sided: bool) -> np.ndarray:
    """The observed t lowered by the tie tolerance (:func:`tie_lowered_t`), in the correlation
    scale of :func:`hj_null_block` (``s / sqrt(dof + s^2)``, the inverse of :func:`hj_to_t`)."""
    t = prepared.t_obs.astype(np.float64)
    s = tie_lowered_t(np.abs(t) if two_sided else t)
    g = s / np.sqrt(prepared.dof + s * s)
    if two_sided:
        g = np.where(s > 0, g, -1.0)
    return g.astype(np.float32)


def kernel_to_t(stat, dof: int, two_sided: bool) -> np.ndarray:
    """Inverse of the kernel scale of :func:`voxel_null_block` (float64 t, |t| when two-sided)."""
    s = np.asarray(stat, dtype=np.float64) * dof
    return np.sqrt(s) if two_sided else np.sign(s) * np.sqrt(np.abs(s))


# A permuted t within TIE_ATOL + TIE_RTOL * |t| of the observed one counts as a tie (>=):
# permutations equivalent to the identity (e.g. within-block shuffles that keep the groups)
# give the observed t up to float32 rounding, which depends on the product's shape.
TIE_RTOL = 1e-5
TIE_ATOL = 1e-5


def tie_lowered_t(t) -> np.ndarray:
    """``t - (TIE_ATOL + TIE_RTOL * |t|)``: the threshold a permuted t must reach to count."""
    t = np.asarray(t)
    return t - (np.asarray(TIE_ATOL, t.dtype) + np.asarray(TIE_RTOL, t.dtype) * np.abs(t))


def observed_kernel_stat(prepared: PreparedModel, two_sided: bool) -> np.ndarray:
    """The observed t in the scale :func:`voxel_null_block` compares against, lowered by the
    tie tolerance (:func:`tie_lowered_t`)."""
    inv = np.float32(1.0 / prepared.dof)
    if two_sided:
        s = tie_lowered_t(np.abs(prepared.t_obs))
        return np.where(s > 0, np.square(s) * inv, np.float32(-1.0)).astype(np.float32)
    s = tie_lowered_t(prepared.t_obs)
    return (s * np.abs(s) * inv).astype(np.float32)


def default_threads() -> int:
    """Cores this process may use (the default ``n_threads`` of the in-process test)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


# voxels per block of the max-T product. BLAS may round an element differently depending
# on where it falls in the product's tiling, so blocks start at fixed multiples of this
# (threads and voxel chunks take whole blocks): results do not depend on the split.
BLOCK_VOXELS = 1024


def _voxel_null(prepared: PreparedModel, perms: np.ndarray, two_sided: bool, n_threads: int = 1):
    """Max statistic per permutation and per-voxel exceedance counts (the t of the prepared scheme).

    The voxel blocks (:data:`BLOCK_VOXELS`) are shared among ``n_threads`` threads with
    single-threaded BLAS; maxima and integer counts do not depend on the number of threads.
    """
    nb = perms.shape[0]
    rows = permutation_rows(prepared, perms)
    hj = prepared.scheme == "huh_jhun"
    obs = hj_threshold(prepared, two_sided) if hj else observed_kernel_stat(prepared, two_sided)
    nv = prepared.residuals.shape[1]
    cnt = np.zeros(nv, np.int64)
    n_blocks = -(-nv // BLOCK_VOXELS)
    n_threads = max(1, min(int(n_threads), n_blocks))
    edges = np.linspace(0, n_blocks, n_threads + 1).astype(int) * BLOCK_VOXELS

    def part(i):
        sl = slice(int(edges[i]), int(min(edges[i + 1], nv)))
        if hj:
            mx, _ = hj_null_block(rows, prepared.residuals[:, sl], obs[sl], nb, two_sided=two_sided,
                                  count_out=cnt[sl], block_voxels=BLOCK_VOXELS)
            return mx
        mx, _ = voxel_null_block(rows, prepared.residuals[:, sl], prepared.ss[sl], prepared.floor[sl],
                                 obs[sl], nb, two_sided=two_sided, count_out=cnt[sl],
                                 block_voxels=BLOCK_VOXELS)
        return mx

    from threadpoolctl import threadpool_limits
    with threadpool_limits(1, user_api="blas"):
        if n_threads == 1:
            maxima = [part(0)]
        else:
            with ThreadPoolExecutor(n_threads) as ex:
                maxima = list(ex.map(part, range(n_threads)))
    mx = np.max(np.stack(maxima), axis=0)
    if hj:
        return hj_to_t(mx, prepared.dof), cnt
    return kernel_to_t(mx, prepared.dof, two_sided), cnt


def batch_sizes(n_perm: int, batch_size: int) -> list[int]:
    """Sizes of the batches covering ``n_perm`` permutations."""
    full, rest = divmod(int(n_perm), int(batch_size))
    return [batch_size] * full + ([rest] if rest else [])


# permutations per matrix product in the max-T kernel: consecutive batches are stacked into
# one product (its efficiency grows with its row count). BLAS may round a row differently
# depending on the product's shape, so the stacking is canonical: batch i always goes into
# product group i // product_group_batches(batch_size), whoever computes it.
_PERMS_PER_PRODUCT = 256


def product_group_batches(batch_size: int) -> int:
    """Batches stacked into one max-T product (batch ``i`` belongs to group ``i // this``)."""
    return max(1, _PERMS_PER_PRODUCT // int(batch_size))


def null_batches(prepared: PreparedModel, options: PermutationOptions, jobs, *,
                 n_threads: int = 1) -> dict:
    """Null statistics of batches ``jobs = [(batch_index, size), ...]`` in increasing index order.

    Returns the batches' results combined (maxima concatenated in job order, counts
    summed). Voxel-only inference stacks the batches of one canonical product group
    (:func:`product_group_batches`) into one matrix product: results are bit-identical
    however the jobs are split among calls, as long as each call gets whole groups.
    """
    jobs = [(int(i), int(b)) for i, b in jobs]
    if not jobs:
        raise ValueError("jobs must not be empty")
    if options.inference != ("voxel",):
        acc = NullAccumulator()
        for i, b in jobs:
            acc.add(i, null_batch(prepared, options, i, b))
        return acc.result()
    per = product_group_batches(options.batch_size)
    maxima, count = [], None
    k = 0
    while k < len(jobs):
        grp = jobs[k][0] // per
        perms = []
        while k < len(jobs) and jobs[k][0] // per == grp:
            i, b = jobs[k]
            perms.append(random_permutations(prepared.design, b, np.random.default_rng((int(options.seed), i)),
                                             size=prepared.n_exchangeable))
            k += 1
        mx, cnt = _voxel_null(prepared, np.concatenate(perms), options.two_sided, n_threads)
        maxima.append(mx)
        count = cnt if count is None else count + cnt
    return {"max_t": np.concatenate(maxima), "count_unc": count}


def null_batch(prepared: PreparedModel, options: PermutationOptions, batch_index: int,
               n_in_batch: int, *, n_threads: int = 1) -> dict:
    """Null statistics of one deterministic batch of permutations (in a product of its own;
    :func:`null_batches` stacks batches into canonical products, which may differ from this
    in the last bit of a maximum).

    Returns a dict with ``max_t`` (B,), ``count_unc`` (V,) int counts of
    permuted statistics at least as extreme as the observed one per voxel,
    and, as requested, ``max_size``, ``max_mass``, ``max_tfce`` (B,).
    """
    rng = np.random.default_rng((int(options.seed), int(batch_index)))
    perms = random_permutations(prepared.design, n_in_batch, rng, size=prepared.n_exchangeable)
    if options.inference == ("voxel",):
        mx, cnt = _voxel_null(prepared, perms, options.two_sided, n_threads)
        return {"max_t": mx, "count_unc": cnt}
    t = batch_t(prepared, perms)
    stat = np.abs(t) if options.two_sided else t
    obs = tie_lowered_t(np.abs(prepared.t_obs) if options.two_sided else prepared.t_obs)
    out = {"max_t": stat.max(axis=1).astype(np.float64),
           "count_unc": (stat >= obs[None, :]).sum(axis=0, dtype=np.int32)}
    del stat
    structure = connectivity_structure(options.connectivity)
    if "cluster" in options.inference:
        sz = np.zeros(n_in_batch)
        ms = np.zeros(n_in_batch)
        for b in range(n_in_batch):
            sz[b], ms[b] = max_cluster_statistics(
                t[b], prepared.coords, threshold=prepared.cluster_t, two_sided=options.two_sided,
                structure=structure, min_size=options.min_cluster_voxels)
        out["max_size"], out["max_mass"] = sz, ms
    if "tfce" in options.inference:
        mt = np.zeros(n_in_batch)
        for b in range(n_in_batch):
            tf = tfce_values(t[b], prepared.coords, structure=structure, two_sided=options.two_sided,
                             E=options.tfce_E, H=options.tfce_H, dh=options.tfce_dh,
                             pairs=prepared.pairs)
            mt[b] = np.abs(tf).max()
        out["max_tfce"] = mt
    return out


class NullAccumulator:
    """Running combination of batch results: exceedance counts summed on arrival (exact
    integers, any order), null maxima kept per batch index and concatenated in index
    order, so memory stays O(n_voxels + n_perm) and the result is order independent."""

    def __init__(self):
        self.count = None
        self.maxima: dict = {}

    def add(self, batch_index: int, result: dict) -> None:
        c = result["count_unc"].astype(np.int64)
        self.count = c if self.count is None else self.count + c
        self.maxima[int(batch_index)] = {k: v for k, v in result.items() if k != "count_unc"}

    def result(self) -> dict:
        if self.count is None:
            raise ValueError("no batch results were added")
        ordered = [self.maxima[i] for i in sorted(self.maxima)]
        out = {"count_unc": self.count}
        for key in ordered[0]:
            out[key] = np.concatenate([r[key] for r in ordered])
        return out


def _fwe_p(observed, null):
    """(1 + #{null >= observed}) / (1 + n_null), vectorised."""
    srt = np.sort(np.asarray(null, dtype=np.float64))
    n_ge = srt.size - np.searchsorted(srt, np.asarray(observed, dtype=np.float64), side="left")
    return (1.0 + n_ge) / (1.0 + srt.size)


def fwe_t_threshold(null_max_t, alpha: float = 0.05) -> float:
    """Voxel-level FWE threshold: the smallest t whose max-T permutation p (``_fwe_p``) is < alpha.

    ``null_max_t`` holds the permutation maxima (the identity included or not, as stored).
    Returns inf when no t can reach alpha with this many permutations."""
    srt = np.sort(np.asarray(null_max_t, dtype=np.float64))
    if not (0 < alpha < 1) or srt.size == 0:
        raise ValueError(f"need 0 < alpha < 1 and a non-empty null, got alpha={alpha!r}, {srt.size} maxima")
    # p(t) = (1 + #{null >= t}) / (1 + B) < alpha  <=>  #{null >= t} <= k
    k = int(np.ceil(alpha * (1 + srt.size) - 1)) - 1
    if k < 0:
        return float("inf")
    return float(np.nextafter(srt[srt.size - 1 - k], np.inf))


def detectable_effect_size(t_threshold: float, n1: int, n2: int, *, dof: int | None = None,
                           power: float = 0.8) -> float:
    """Smallest standardised group difference (Cohen's d, in within-group SDs) that a two-group
    t statistic thresholded at ``t_threshold`` detects with probability ``power``.

    The t of a true difference d follows a noncentral t with ``dof`` degrees of freedom
    (default n1 + n2 - 2; covariates remove one each) and noncentrality
    d * sqrt(n1 n2 / (n1 + n2)). Used to say what a voxel-wise analysis could have found when
    it found nothing (power at the FWE threshold)."""
    from scipy.optimize import brentq

    n1, n2 = int(n1), int(n2)
    df = int(dof) if dof is not None else n1 + n2 - 2
    if n1 < 1 or n2 < 1 or df < 1 or not (0 < power < 1) or not np.isfinite(t_threshold):
        raise ValueError(f"need n1, n2, dof >= 1, 0 < power < 1 and a finite threshold, got "
                         f"n1={n1}, n2={n2}, dof={df}, power={power!r}, t={t_threshold!r}")
    scale = np.sqrt(n1 * n2 / (n1 + n2))

    def excess(d):
        # at thresholds of hundreds of t units with 1-2 dof (tiny pilot cohorts) scipy's noncentral
        # t series stops short of convergence and warns, returning its closest value; the bracket
        # search below only needs the sign, and a non-finite value ends it as "undetectable"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Error in function", RuntimeWarning)
            return stats.nct.sf(t_threshold, df, d * scale) - power

    if excess(0.0) >= 0:  # a threshold at or below the null's own quantile: any effect
        return 0.0
    hi = 10.0
    while not excess(hi) > 0:  # tiny samples and high FWE thresholds need very large effects
        if hi >= 1e6 or not np.isfinite(excess(hi)):
            return float("inf")  # undetectable at this n and threshold
        hi *= 10.0
    return float(brentq(excess, 0.0, hi))


@dataclass
class PermutationResult:
    """Outputs as masked vectors (n_voxels,) plus the mask to put them back in 3-D.

    ``logp_*`` are -log10 p (``logp_unc``: permutation, ``logp_unc_param``:
    t distribution; ``logp_fwe_t``: voxel max-T; ``logp_fwe_size`` /
    ``logp_fwe_mass``: cluster extent / mass, per voxel of each cluster;
    ``logp_fwe_tfce``). ``cluster_labels`` numbers clusters 1..K by decreasing
    size; ``clusters`` is the cluster table (pandas). Null distributions are
    kept in ``null`` (``max_t``, ``max_size``, ...); ``extras["affine"]`` holds
    the affine when one was given.
    """

    mask: np.ndarray
    t: np.ndarray
    z: np.ndarray
    dof: int
    logp_unc: np.ndarray
    logp_unc_param: np.ndarray
    logp_fwe_t: np.ndarray
    null: dict
    options: PermutationOptions
    cluster_t: float
    cluster_labels: np.ndarray | None = None
    logp_fwe_size: np.ndarray | None = None
    logp_fwe_mass: np.ndarray | None = None
    clusters: object = None
    tfce: np.ndarray | None = None
    logp_fwe_tfce: np.ndarray | None = None
    extras: dict = field(default_factory=dict)

    def to_volume(self, name: str, fill=0.0) -> np.ndarray:
        """3-D array of one output (e.g. ``"t"``, ``"logp_fwe_t"``, ``"cluster_labels"``)."""
        v = getattr(self, name)
        if v is None:
            raise ValueError(f"output {name!r} was not computed")
        vol = np.full(self.mask.shape, fill, dtype=np.asarray(v).dtype)
        vol[self.mask] = v
        return vol


def finalize(prepared: PreparedModel, options: PermutationOptions, null: dict, *, mask, affine=None,
             atlas=None, atlas_names=None) -> PermutationResult:
    """Observed-statistic maps, p-value maps and the cluster table from the combined null.

    Parameters
    ----------
    affine : (4, 4) voxel -> MNI mm (for the cluster table; identity if None)
    atlas : 3-D int array on the mask's grid (optional), atlas_names : mapping label -> name
    """
    t = prepared.t_obs.astype(np.float64)
    n = null["max_t"].size
    stat = np.abs(t) if options.two_sided else t
    dof = prepared.dof
    p_unc_param = (2.0 * stats.t.sf(np.abs(t), dof)) if options.two_sided else stats.t.sf(t, dof)
    res = PermutationResult(
        mask=np.asarray(mask, dtype=bool), t=t, z=t_to_z(t, dof), dof=dof,
        logp_unc=-np.log10((1.0 + null["count_unc"]) / (1.0 + n)),
        logp_unc_param=-np.log10(np.clip(p_unc_param, 1e-300, 1.0)),
        logp_fwe_t=-np.log10(_fwe_p(tie_lowered_t(stat), null["max_t"])),
        null=null, options=options, cluster_t=prepared.cluster_t)
    if affine is not None:
        res.extras["affine"] = np.asarray(affine, dtype=np.float64)
    structure = connectivity_structure(options.connectivity)
    if "cluster" in options.inference:
        labels, sizes, masses, signs = cluster_statistics(
            t, prepared.coords, threshold=prepared.cluster_t, two_sided=options.two_sided,
            structure=structure, min_size=options.min_cluster_voxels)
        p_size = _fwe_p(sizes, null["max_size"])
        p_mass = _fwe_p(masses, null["max_mass"])
        res.cluster_labels = labels
        lp_size = np.concatenate([[0.0], -np.log10(p_size)])
        lp_mass = np.concatenate([[0.0], -np.log10(p_mass)])
        res.logp_fwe_size = lp_size[labels]
        res.logp_fwe_mass = lp_mass[labels]
        atlas_vec = None
        if atlas is not None:
            atlas = np.asarray(atlas)
            if atlas.shape != res.mask.shape:
                raise ValueError(f"atlas must have the mask's shape {res.mask.shape}, got {atlas.shape}")
            atlas_vec = atlas[res.mask].astype(np.int64)
        res.clusters = cluster_table(labels, t, prepared.coords,
                                     affine=np.eye(4) if affine is None else affine,
                                     sizes=sizes, signs=signs, masses=masses, p_size=p_size,
                                     p_mass=p_mass, atlas_labels=atlas_vec, atlas_names=atlas_names)
    if "tfce" in options.inference:
        tf = tfce_values(t, prepared.coords, structure=structure, two_sided=options.two_sided,
                         E=options.tfce_E, H=options.tfce_H, dh=options.tfce_dh,
                         pairs=prepared.pairs)
        res.tfce = tf
        res.logp_fwe_tfce = -np.log10(_fwe_p(np.abs(tf) if options.two_sided else tf, null["max_tfce"]))
    return res


def permutation_test(data, design: Design, *, mask, n_perm: int = 5000, seed: int = 0,
                     two_sided: bool = True, inference=("voxel",), cluster_p: float = 0.005,
                     min_cluster_voxels: int = 10, connectivity: int = 6, tfce_E: float = 0.5,
                     tfce_H: float = 2.0, tfce_dh="auto", batch_size: int = 32, affine=None,
                     atlas=None, atlas_names=None, n_threads: int | None = None,
                     scheme: str | None = None) -> PermutationResult:
    """Voxel-wise permutation test of a GLM contrast (Huh-Jhun or Freedman-Lane), in-process.

    Parameters
    ----------
    data : (n_subjects, n_voxels) float array, the masked maps (``maps[:, mask]``)
    design : :class:`qsmdask.perm.glm.Design`
    mask : 3-D bool array, ``mask.sum() == n_voxels``
    n_perm, seed, two_sided, inference, cluster_p, min_cluster_voxels, connectivity,
    tfce_E, tfce_H, tfce_dh, batch_size : see :class:`PermutationOptions`
    affine : voxel -> MNI mm affine for the cluster table
    atlas, atlas_names : atlas label volume on the mask grid and label names (optional)
    n_threads : threads sharing the voxels of the max-T products (default: the cores this
        process may use; results are identical for any value)
    scheme : "huh_jhun" or "freedman_lane"; None: the design's default (:func:`resolve_scheme`:
        Huh-Jhun unless the design has exchangeability blocks or sign flips)

    Returns
    -------
    PermutationResult
    """
    if n_threads is None:
        n_threads = default_threads()
    if int(n_threads) != n_threads or n_threads < 1:
        raise ValueError(f"n_threads must be a positive integer, got {n_threads!r}")
    options = PermutationOptions(n_perm=n_perm, seed=seed, batch_size=batch_size, two_sided=two_sided,
                                 inference=inference, cluster_p=cluster_p,
                                 min_cluster_voxels=min_cluster_voxels, connectivity=connectivity,
                                 tfce_E=tfce_E, tfce_H=tfce_H, tfce_dh=tfce_dh,
                                 scheme=resolve_scheme(design, scheme))
    prepared = prepare_model(data, design, mask=mask, options=options)
    jobs = list(enumerate(batch_sizes(options.n_perm, options.batch_size)))
    null = null_batches(prepared, options, jobs, n_threads=int(n_threads))
    return finalize(prepared, options, null, mask=mask, affine=affine,
                    atlas=atlas, atlas_names=atlas_names)

"""Between-group comparison of ROI values: Wilcoxon rank-sum (Mann-Whitney U).

References
----------
Mann HB, Whitney DR (1947). On a test of whether one of two random variables is
stochastically larger than the other. Ann Math Stat 18:50-60.
Kerby DS (2014). The simple difference formula: an approach to teaching nonparametric
correlation. Compr Psychol 3:11.IT.3.1 (rank-biserial correlation r = 2U1/(n1 n2) - 1).
Hanley JA, McNeil BJ (1982). The meaning and use of the area under a ROC curve.
Radiology 143:29-36 (analytic standard error of the AUC = (r + 1) / 2).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from ._common import (CORRECTIONS, apply_correction, long_table, merge_participants,
                      tidy_frame, validate_choice)

__all__ = ["group_wilcoxon", "rank_biserial", "rank_biserial_ci"]

_Z975 = stats.norm.ppf(0.975)


def rank_biserial(x, y) -> float:
    """Rank-biserial correlation of samples ``x`` (group 1) and ``y`` (group 2).

    ``r = 2 U1 / (n1 n2) - 1`` with ``U1`` the Mann-Whitney U of ``x`` (ties get half
    credit). ``r`` is in [-1, 1]; positive when ``x`` tends to be larger than ``y``.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if x.size == 0 or y.size == 0:
        raise ValueError("x and y must be non-empty")
    u1 = _u1(x, y)
    return float(2.0 * u1 / (x.size * y.size) - 1.0)


def _u1(x, y, axis=-1):
    n1 = x.shape[axis]
    ranks = stats.rankdata(np.concatenate([x, y], axis=axis), axis=axis)
    r1 = np.take(ranks, np.arange(n1), axis=axis).sum(axis=axis)
    return r1 - n1 * (n1 + 1) / 2.0


def _u1_resampled(x, y, ix, iy, *, rows_per_chunk: int = 256) -> np.ndarray:
    """``_u1(x[ix], y[iy], axis=1)`` for bootstrap index arrays ``ix`` (B, n1), ``iy`` (B, n2),
    without sorting a resample: ``U1 = #{x > y} + #{x = y} / 2`` over the resampled pairs is
    ``sum_i c_i (D(< x_i) + D(= x_i) / 2)`` with ``c`` the resample counts of x and ``D`` the
    cumulative counts of the resampled y in sorted order (O(B (n1 + n2)); the sums are of
    half-integers below 2^53, so the result equals the rank-sum formula exactly)."""
    n1, n2 = x.size, y.size
    order = np.argsort(y, kind="stable")
    ys = y[order]
    lo = np.searchsorted(ys, x, side="left")
    hi = np.searchsorted(ys, x, side="right")
    rank_of = np.empty(n2, np.intp)
    rank_of[order] = np.arange(n2)
    out = np.empty(ix.shape[0])
    for r0 in range(0, ix.shape[0], int(rows_per_chunk)):
        r1 = min(ix.shape[0], r0 + int(rows_per_chunk))
        b = r1 - r0
        offs = np.arange(b)[:, None]
        c = np.bincount((offs * n1 + ix[r0:r1]).ravel(), minlength=b * n1).reshape(b, n1)
        d = np.bincount((offs * n2 + rank_of[iy[r0:r1]]).ravel(), minlength=b * n2).reshape(b, n2)
        cum = np.zeros((b, n2 + 1))
        np.cumsum(d, axis=1, out=cum[:, 1:])
        less = cum[:, lo]
        eq = cum[:, hi] - less
        out[r0:r1] = np.einsum("ij,ij->i", c, less + 0.5 * eq)
    return out


def rank_biserial_ci(x, y, *, ci_method: str = "bootstrap", n_boot: int = 2000,
                     seed: int | None = 0, confidence: float = 0.95) -> tuple[float, float]:
    """Confidence interval of the rank-biserial correlation.

    Parameters
    ----------
    x, y : array-like
        Group 1 and group 2 samples.
    ci_method : {"bootstrap", "analytic"}
        ``"bootstrap"``: percentile interval of ``n_boot`` stratified resamples (each
        group resampled with replacement). ``"analytic"``: Wald interval of the AUC with
        the Hanley-McNeil (1982) standard error, mapped to ``r = 2 AUC - 1`` and clipped to
        [-1, 1].
    n_boot : int
        Bootstrap resamples (bootstrap only).
    seed : int or None
        Seed of ``numpy.random.default_rng`` (bootstrap only).
    confidence : float
        Coverage, in (0, 1).

    Returns
    -------
    (low, high)
    """
    validate_choice("ci_method", ci_method, ("bootstrap", "analytic"))
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    n1, n2 = x.size, y.size
    if n1 < 1 or n2 < 1:
        return (np.nan, np.nan)
    if ci_method == "analytic":
        a = _u1(x, y) / (n1 * n2)
        q1 = a / (2 - a)
        q2 = 2 * a * a / (1 + a)
        var = (a * (1 - a) + (n1 - 1) * (q1 - a * a) + (n2 - 1) * (q2 - a * a)) / (n1 * n2)
        z = stats.norm.ppf(0.5 + confidence / 2)
        se = np.sqrt(max(var, 0.0))
        lo, hi = 2 * (a - z * se) - 1, 2 * (a + z * se) - 1
        return (float(max(lo, -1.0)), float(min(hi, 1.0)))
    n_boot = int(n_boot)
    if n_boot < 100:
        raise ValueError(f"n_boot must be >= 100, got {n_boot}")
    rng = np.random.default_rng(seed)
    ix = rng.integers(0, n1, size=(n_boot, n1))
    iy = rng.integers(0, n2, size=(n_boot, n2))
    r = 2.0 * _u1_resampled(x, y, ix, iy) / (n1 * n2) - 1.0
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(r, [tail, 100 - tail])
    return (float(lo), float(hi))


def group_wilcoxon(roi_table: pd.DataFrame, participants: pd.DataFrame, *,
                   value: str = "mean_ppm", level: str | None = "group", session=None,
                   correction: str = "bonferroni", groups=("patient", "control"),
                   group_column: str = "group", measures=None, atlas=None,
                   ci_method: str = "bootstrap", n_boot: int = 2000, seed: int | None = 0,
                   mwu_method: str = "auto") -> pd.DataFrame:
    """Wilcoxon rank-sum (Mann-Whitney U) test of ``groups[0]`` vs ``groups[1]`` per ROI.

    One two-sided test per (measure, session_id, roi, hemisphere) using
    ``scipy.stats.mannwhitneyu``. Every session present (after the ``session`` filter) is
    analysed separately.

    Parameters
    ----------
    roi_table : DataFrame
        ROI table (rows per subject-session x ROI; see ``docs/architecture.md``).
    participants : DataFrame
        ``participants.tsv`` with ``participant_id`` and ``group_column``.
    value : str
        ROI value column (``"mean_ppm"`` default, or ``"median_ppm"``, ...).
    level : {"group", "label", None}
        ROI level to analyse (None: all rows).
    session : str, sequence of str or None
        Session(s) to analyse; None analyses each session present separately.
    correction : {"bonferroni", "holm", "fdr_bh", "none"}
        Multiple-comparison correction. **Family**: all ROI x hemisphere rows tested for one
        measure in one session (rows whose test could not run, p = NaN, are not counted).
    groups : (str, str)
        Labels of group 1 and group 2 in ``participants[group_column]``. ``statistic`` is
        U of group 1; ``effect_size`` (rank-biserial r) is positive when group 1 is higher.
    group_column : str
        Column of ``participants`` holding the group label.
    measures : sequence of str or None
        Measures to analyse (None: all).
    atlas : str or None
        Atlas to analyse (None: all; ROI names are qualified when several).
    ci_method : {"bootstrap", "analytic"}
        95 % CI of the rank-biserial correlation (see :func:`rank_biserial_ci`).
    n_boot, seed : int
        Bootstrap resamples and seed (reproducible by default).
    mwu_method : {"auto", "asymptotic", "exact"}
        Passed to ``scipy.stats.mannwhitneyu(method=...)``.

    Returns
    -------
    DataFrame
        Tidy schema (:data:`qsmdask.stats.TIDY_COLUMNS`), ``test="group_wilcoxon"``,
        ``dof`` NaN. ROIs where a group has fewer than 2 values get NaN p.
    """
    validate_choice("correction", correction, CORRECTIONS)
    validate_choice("mwu_method", mwu_method, ("auto", "asymptotic", "exact"))
    validate_choice("ci_method", ci_method, ("bootstrap", "analytic"))
    groups = tuple(groups)
    if len(groups) != 2 or groups[0] == groups[1]:
        raise ValueError(f"groups must be two distinct labels, got {groups!r}")
    long = long_table(roi_table, value=value, level=level, session=session, measures=measures,
                      atlas=atlas)
    df = merge_participants(long, participants, [group_column])
    df = df[df[group_column].isin(groups)]
    ci_txt = f"bootstrap percentile, {int(n_boot)}" if ci_method == "bootstrap" else "Hanley-McNeil"
    method = (f"scipy.stats.mannwhitneyu(alternative='two-sided', method='{mwu_method}'); "
              f"{groups[0]} vs {groups[1]}; CI {ci_txt}")
    es_name = "rank_biserial"
    rows = []
    values = df["value"].to_numpy(float)
    in1 = (df[group_column] == groups[0]).to_numpy(bool)
    for (measure, ses, roi, hemi), idx in sorted(df.groupby(["measure", "session_id", "roi",
                                                             "hemisphere"]).indices.items()):
        x = values[idx[in1[idx]]]
        y = values[idx[~in1[idx]]]
        row = dict(test="group_wilcoxon", measure=measure, roi=roi, hemisphere=hemi,
                   session_id=ses, n=x.size + y.size, n1=x.size, n2=y.size, dof=np.nan,
                   method=method, effect_size_name=es_name)
        if x.size >= 2 and y.size >= 2:
            res = stats.mannwhitneyu(x, y, alternative="two-sided", method=mwu_method)
            row["statistic"] = float(res.statistic)
            row["p"] = float(res.pvalue)
            row["effect_size"] = 2.0 * float(res.statistic) / (x.size * y.size) - 1.0
            row["ci_low"], row["ci_high"] = rank_biserial_ci(x, y, ci_method=ci_method,
                                                             n_boot=n_boot, seed=seed)
        rows.append(row)
    out = tidy_frame(rows)
    return apply_correction(out, correction=correction, family=["measure", "session_id"])

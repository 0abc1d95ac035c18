"""Interhemispheric asymmetry: Wilcoxon signed-rank test of left vs right per ROI.

References
----------
Wilcoxon F (1945). Individual comparisons by ranking methods. Biometrics Bull 1:80-83.
Kerby DS (2014). The simple difference formula. Compr Psychol 3:11.IT.3.1
(matched-pairs rank-biserial r = (W+ - W-) / (W+ + W-)).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from ._common import (CORRECTIONS, apply_correction, long_table, merge_participants,
                      subset_group, tidy_frame, validate_choice)

__all__ = ["hemisphere_wilcoxon", "matched_rank_biserial"]


def matched_rank_biserial(d, axis=-1):
    """Matched-pairs rank-biserial correlation of differences ``d`` (zeros discarded).

    ``r = (W+ - W-) / (W+ + W-)``; positive when the differences tend to be positive.
    Works along ``axis`` for batches; NaN where all differences are zero.
    """
    d = np.asarray(d, dtype=float)
    a = np.where(d == 0, np.nan, np.abs(d))
    ranks = stats.rankdata(a, axis=axis, nan_policy="omit")
    ranks = np.where(np.isnan(a), 0.0, ranks)
    wp = np.where(d > 0, ranks, 0.0).sum(axis=axis)
    wm = np.where(d < 0, ranks, 0.0).sum(axis=axis)
    tot = wp + wm
    with np.errstate(invalid="ignore", divide="ignore"):
        return (wp - wm) / tot


def _matched_rank_biserial_resampled(d, idx, *, rows_per_chunk: int = 256) -> np.ndarray:
    """``matched_rank_biserial(d[idx], axis=1)`` for bootstrap indices ``idx`` (B, n) without
    ranking each resample: a resampled copy of a nonzero ``|d_i|`` has the midrank
    ``C(< |d_i|) + (C(= |d_i|) + 1) / 2`` with ``C`` the resample counts per distinct ``|d|``,
    so ``W+ = sum_{d_i > 0} c_i rank_i`` (O(B n); half-integer sums, exact)."""
    d = np.asarray(d, dtype=float)
    n = d.size
    a = np.abs(d)
    nz = np.flatnonzero(d != 0)
    order = nz[np.argsort(a[nz], kind="stable")]
    vals = a[order]
    starts = np.flatnonzero(np.r_[True, vals[1:] != vals[:-1]]) if vals.size else np.zeros(0, np.intp)
    group = np.full(n, -1, np.intp)
    group[order] = np.cumsum(np.r_[True, vals[1:] != vals[:-1]]) - 1 if vals.size else group[order]
    sign = np.sign(d)
    out = np.empty(idx.shape[0])
    n_groups = starts.size
    for r0 in range(0, idx.shape[0], int(rows_per_chunk)):
        r1 = min(idx.shape[0], r0 + int(rows_per_chunk))
        b = r1 - r0
        if n_groups == 0:
            out[r0:r1] = np.nan
            continue
        c = np.bincount((np.arange(b)[:, None] * n + idx[r0:r1]).ravel(), minlength=b * n).reshape(b, n)
        g = np.add.reduceat(c[:, order], starts, axis=1).astype(float)      # (b, groups)
        less = np.zeros_like(g)
        np.cumsum(g[:, :-1], axis=1, out=less[:, 1:])
        rank = less + (g + 1.0) / 2.0
        r_el = np.zeros((b, n))
        r_el[:, nz] = rank[:, group[nz]]
        w = c * r_el
        wp = w[:, sign > 0].sum(axis=1)
        wm = w[:, sign < 0].sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[r0:r1] = (wp - wm) / (wp + wm)
    return out


def hemisphere_wilcoxon(roi_table: pd.DataFrame, participants: pd.DataFrame | None = None, *,
                        value: str = "mean_ppm", level: str | None = "group", session=None,
                        measures=None, atlas=None, group=None, group_column: str = "group",
                        hemispheres=("L", "R"), correction: str = "bonferroni",
                        n_boot: int = 2000, seed: int | None = 0) -> pd.DataFrame:
    """Two-sided Wilcoxon signed-rank test of left vs right hemisphere values per ROI.

    Pairs are the subject-sessions that have both hemispheres of a ROI; one test per
    (measure, session_id, roi), with ``scipy.stats.wilcoxon(left, right,
    zero_method="wilcox", method="auto")``.

    Parameters
    ----------
    roi_table : DataFrame
        ROI table.
    participants : DataFrame or None
        Needed only when ``group`` is given.
    value, level, session, measures, atlas
        Row selection (see :func:`qsmdask.stats.group_wilcoxon`).
    group : str or None
        Analyse only this group (e.g. ``"patient"``); None: everybody.
    hemispheres : (str, str)
        Codes of the two hemispheres; differences are ``first - second``.
    correction : {"bonferroni", "holm", "fdr_bh", "none"}
        Family: all ROIs tested for one measure and session.
    n_boot, seed : int
        Percentile bootstrap (resampling pairs) of the effect-size CI.

    Returns
    -------
    DataFrame
        Tidy schema, ``test="hemisphere_wilcoxon"``, ``hemisphere="L-R"``, ``statistic`` the
        scipy W (two-sided: the smaller rank sum), ``effect_size`` matched-pairs
        rank-biserial (positive: left > right), ``n1``/``n2`` NaN, and an extra column
        ``mean_difference`` (left - right, value units).
    """
    validate_choice("correction", correction, CORRECTIONS)
    hemispheres = tuple(hemispheres)
    if len(hemispheres) != 2 or hemispheres[0] == hemispheres[1]:
        raise ValueError(f"hemispheres must be two distinct codes, got {hemispheres!r}")
    if int(n_boot) < 100:
        raise ValueError(f"n_boot must be >= 100, got {n_boot!r}")
    long = long_table(roi_table, value=value, level=level, session=session, measures=measures,
                      atlas=atlas)
    if group is not None:
        if participants is None:
            raise ValueError("group needs participants")
        long = subset_group(merge_participants(long, participants, [group_column]), group,
                            group_column)
    long = long[long["hemisphere"].isin(hemispheres)]
    wide = long.pivot_table(index=["measure", "session_id", "roi", "participant_id"],
                            columns="hemisphere", values="value", aggfunc="first")
    hl, hr = hemispheres
    rows = []
    rng = np.random.default_rng(seed)
    tag = f"{hl}-{hr}"
    for (measure, ses, roi), sub in wide.groupby(level=["measure", "session_id", "roi"],
                                                 sort=True):
        if hl not in sub.columns or hr not in sub.columns:
            continue
        pair = sub[[hl, hr]].dropna()
        d = (pair[hl] - pair[hr]).to_numpy(float)
        row = dict(test="hemisphere_wilcoxon", measure=measure, roi=roi, hemisphere=tag,
                   session_id=ses, n=d.size, dof=np.nan, effect_size_name="rank_biserial",
                   method=("scipy.stats.wilcoxon(zero_method='wilcox', method='auto'); "
                           f"{hl} - {hr}; CI bootstrap percentile, {int(n_boot)}"),
                   mean_difference=float(d.mean()) if d.size else np.nan)
        if np.count_nonzero(d) >= 2:
            res = stats.wilcoxon(pair[hl].to_numpy(float), pair[hr].to_numpy(float),
                                 zero_method="wilcox", alternative="two-sided")
            row["statistic"] = float(res.statistic)
            row["p"] = float(res.pvalue)
            row["effect_size"] = float(matched_rank_biserial(d))
            boot = _matched_rank_biserial_resampled(d, rng.integers(0, d.size, size=(int(n_boot), d.size)))
            boot = boot[np.isfinite(boot)]
            row["ci_low"], row["ci_high"] = (np.percentile(boot, [2.5, 97.5]) if boot.size
                                             else (np.nan, np.nan))
        rows.append(row)
    out = tidy_frame(rows, extra=["mean_difference"])
    return apply_correction(out, correction=correction, family=["measure", "session_id"])

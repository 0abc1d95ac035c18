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
            boot = matched_rank_biserial(d[rng.integers(0, d.size, size=(int(n_boot), d.size))],
                                         axis=1)
            boot = boot[np.isfinite(boot)]
            row["ci_low"], row["ci_high"] = (np.percentile(boot, [2.5, 97.5]) if boot.size
                                             else (np.nan, np.nan))
        rows.append(row)
    out = tidy_frame(rows, extra=["mean_difference"])
    return apply_correction(out, correction=correction, family=["measure", "session_id"])

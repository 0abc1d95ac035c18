"""Correlations of ROI values with clinical variables and inflammation markers.

- :func:`clinical_correlation`: Pearson and Spearman correlation with symptom/course
  variables (hdrs, relapse_count, episode_weeks, disease_weeks), plus the least-squares
  line; :func:`regression_band` gives the line and its 95 % confidence band on a grid.
- :func:`partial_correlation`: partial Pearson (or Spearman) correlation with markers,
  adjusted for covariates (residual method; equals ``pingouin.partial_corr``).
- :func:`sex_stratified_correlation`: Pearson correlation with markers within each sex.

References
----------
Fisher RA (1921). On the probable error of a coefficient of correlation. Metron 1:3-32.
Fieller EC, Hartley HO, Pearson ES (1957). Tests for rank correlation coefficients I.
Biometrika 44:470-481 (Spearman Fisher-z standard error sqrt(1.06 / (n - 3))).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from ._common import (CORRECTIONS, apply_correction, attach_variables, encode_columns,
                      fisher_ci, long_table, subset_group, tidy_frame, validate_choice)

__all__ = ["clinical_correlation", "partial_correlation", "sex_stratified_correlation",
           "regression_band", "correlation_plot_data"]

_KEYS = ["measure", "session_id", "roi", "hemisphere"]
_METHODS = ("pearson", "spearman")


def _corr(x, y, method):
    if method == "pearson":
        res = stats.pearsonr(x, y)
    else:
        res = stats.spearmanr(x, y)
    return float(res.statistic), float(res.pvalue)


def regression_band(x, y, *, grid=None, n_grid: int = 50, confidence: float = 0.95
                    ) -> pd.DataFrame:
    """Least-squares line ``y = a + b x`` and the confidence band of its mean on a grid.

    ``se(x0) = s * sqrt(1/n + (x0 - mean(x))^2 / Sxx)`` with ``s^2`` the residual variance
    (n - 2 dof), band = fit +/- t_{n-2} se.

    Parameters
    ----------
    x, y : array-like
        Data (pairs with a NaN are dropped; at least 3 pairs, x not constant).
    grid : array-like or None
        Evaluation points (None: ``n_grid`` points spanning the range of ``x``).
    n_grid : int
        Grid size when ``grid`` is None.
    confidence : float
        Band coverage.

    Returns
    -------
    DataFrame with columns ``x, fit, lower, upper`` (and attributes ``slope``,
    ``intercept`` in ``.attrs``).
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError("x and y must be 1-D arrays of the same length")
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = x.size
    if n < 3 or np.ptp(x) == 0:
        raise ValueError("x and y need at least 3 complete pairs and a non-constant x")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    xm = x.mean()
    sxx = np.sum((x - xm) ** 2)
    slope = np.sum((x - xm) * (y - y.mean())) / sxx
    intercept = y.mean() - slope * xm
    resid = y - (intercept + slope * x)
    s = np.sqrt(np.sum(resid ** 2) / (n - 2))
    g = (np.linspace(x.min(), x.max(), int(n_grid)) if grid is None
         else np.asarray(grid, dtype=float))
    fit = intercept + slope * g
    half = stats.t.ppf(0.5 + confidence / 2, n - 2) * s * np.sqrt(1 / n + (g - xm) ** 2 / sxx)
    out = pd.DataFrame({"x": g, "fit": fit, "lower": fit - half, "upper": fit + half})
    out.attrs.update(slope=float(slope), intercept=float(intercept), n=int(n))
    return out


def clinical_correlation(roi_table: pd.DataFrame, participants: pd.DataFrame,
                         sessions: pd.DataFrame | None = None, *,
                         variables=("hdrs", "relapse_count", "episode_weeks", "disease_weeks"),
                         methods=_METHODS, group="patient", group_column: str = "group",
                         value: str = "mean_ppm", level: str | None = "group", session=None,
                         measures=None, atlas=None, correction: str = "bonferroni"
                         ) -> pd.DataFrame:
    """Pearson and Spearman correlation of ROI values with clinical variables.

    Parameters
    ----------
    roi_table, participants : DataFrame
        ROI table and participants.tsv.
    sessions : DataFrame or None
        sessions.tsv; a variable present there (e.g. ``hdrs``) is taken per session.
    variables : sequence of str
        Clinical variables.
    methods : subset of ("pearson", "spearman")
        Correlation types (``scipy.stats.pearsonr`` / ``spearmanr``).
    group : str or None
        Group analysed (default patients; None: everybody).
    correction : {"bonferroni", "holm", "fdr_bh", "none"}
        Family: all ROI x hemisphere rows of one measure, session, variable and method.

    Returns
    -------
    DataFrame
        Tidy schema, ``test="clinical_correlation"``, ``statistic`` = ``effect_size`` = r,
        ``dof`` = n - 2, CI by Fisher z (Spearman with the Fieller 1.06 factor); extra
        columns ``variable``, ``correlation`` ("pearson"/"spearman"), ``slope`` and
        ``intercept`` of the least-squares line value = intercept + slope * variable.
    """
    validate_choice("correction", correction, CORRECTIONS)
    methods = tuple(methods)
    for m in methods:
        validate_choice("methods", m, _METHODS)
    long = long_table(roi_table, value=value, level=level, session=session, measures=measures,
                      atlas=atlas)
    need = list(variables) + ([group_column] if group is not None else [])
    df = subset_group(attach_variables(long, participants, sessions, need), group, group_column)
    rows = []
    for key, sub in df.groupby(_KEYS, sort=True):
        for var in variables:
            x = pd.to_numeric(sub[var], errors="coerce").to_numpy(float)
            y = sub["value"].to_numpy(float)
            ok = np.isfinite(x) & np.isfinite(y)
            x, y = x[ok], y[ok]
            n = int(x.size)
            line = (np.nan, np.nan)
            if n >= 3 and np.ptp(x) > 0:
                lr = stats.linregress(x, y)
                line = (float(lr.slope), float(lr.intercept))
            for meth in methods:
                row = dict(zip(_KEYS, key), test="clinical_correlation", variable=var,
                           correlation=meth, n=n, dof=n - 2.0, effect_size_name="r",
                           method=f"scipy.stats.{'pearsonr' if meth == 'pearson' else 'spearmanr'}",
                           slope=line[0], intercept=line[1])
                if n >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0:
                    r, p = _corr(x, y, meth)
                    lo, hi = fisher_ci(r, n, se_scale=1.0 if meth == "pearson" else np.sqrt(1.06))
                    row.update(statistic=r, effect_size=r, p=p, ci_low=lo, ci_high=hi)
                rows.append(row)
    out = tidy_frame(rows, extra=["variable", "correlation", "slope", "intercept"])
    return apply_correction(out, correction=correction,
                            family=["measure", "session_id", "variable", "correlation"])


def _residualize(v, Z):
    beta, *_ = np.linalg.lstsq(Z, v, rcond=None)
    return v - Z @ beta


def partial_correlation(roi_table: pd.DataFrame, participants: pd.DataFrame,
                        sessions: pd.DataFrame | None = None, *,
                        markers=("crp", "il6", "tnfa", "il1b"), covariates=("age", "sex"),
                        method: str = "pearson", group=None, group_column: str = "group",
                        value: str = "mean_ppm", level: str | None = "group", session=None,
                        measures=None, atlas=None, correction: str = "bonferroni"
                        ) -> pd.DataFrame:
    """Partial correlation of ROI values with markers, adjusted for covariates.

    Both the ROI value and the marker are residualised on ``1 + covariates`` (ranks first
    for ``method="spearman"``); r is the correlation of the residuals, its p value from
    ``t = r sqrt(dof / (1 - r^2))`` with ``dof = n - 2 - k`` (k covariate columns) and the
    CI by Fisher z with ``n - k`` as the sample size, as ``pingouin.partial_corr``.

    Parameters
    ----------
    markers : sequence of str
        Marker columns (participants or sessions).
    covariates : sequence of str
        Adjustment columns (``sex`` coded F=1; text columns treatment-coded).
    method : {"pearson", "spearman"}
        Correlation type.
    group : str or None
        Restrict to one group (None: everybody).
    correction : {"bonferroni", "holm", "fdr_bh", "none"}
        Family: all ROI x hemisphere rows of one measure, session and marker.

    Returns
    -------
    DataFrame
        Tidy schema, ``test="partial_correlation"``; extra columns ``variable`` and
        ``covariates`` (comma-separated).
    """
    validate_choice("correction", correction, CORRECTIONS)
    validate_choice("method", method, _METHODS)
    long = long_table(roi_table, value=value, level=level, session=session, measures=measures,
                      atlas=atlas)
    covs = list(covariates)
    need = list(markers) + covs + ([group_column] if group is not None else [])
    df = subset_group(attach_variables(long, participants, sessions, need), group, group_column)
    rows = []
    for key, sub in df.groupby(_KEYS, sort=True):
        Zdf = encode_columns(sub, covs)
        for mk in markers:
            frame = pd.concat([sub[["value"]], pd.to_numeric(sub[mk], errors="coerce")
                               .rename("__x"), Zdf], axis=1).dropna()
            n = len(frame)
            k = Zdf.shape[1]
            row = dict(zip(_KEYS, key), test="partial_correlation", variable=mk,
                       covariates=",".join(covs), n=n, dof=n - 2.0 - k,
                       effect_size_name=f"partial_r_{method}",
                       method=f"residual {method} correlation, covariates {list(Zdf.columns)}")
            if n - 2 - k >= 1:
                data = frame.rank() if method == "spearman" else frame
                Z = np.column_stack([np.ones(n), data[Zdf.columns].to_numpy(float)])
                ry = _residualize(data["value"].to_numpy(float), Z)
                rx = _residualize(data["__x"].to_numpy(float), Z)
                if np.std(rx) > 0 and np.std(ry) > 0:
                    r = float(np.clip(np.corrcoef(rx, ry)[0, 1], -1, 1))
                    dof = n - 2 - k
                    t = r * np.sqrt(dof / max(1 - r * r, 1e-300))
                    p = float(2 * stats.t.sf(abs(t), dof))
                    lo, hi = fisher_ci(r, n - k)
                    row.update(statistic=r, effect_size=r, p=p, ci_low=lo, ci_high=hi)
            rows.append(row)
    out = tidy_frame(rows, extra=["variable", "covariates"])
    return apply_correction(out, correction=correction,
                            family=["measure", "session_id", "variable"])


def sex_stratified_correlation(roi_table: pd.DataFrame, participants: pd.DataFrame,
                               sessions: pd.DataFrame | None = None, *,
                               markers=("crp", "il6", "tnfa", "il1b"), method: str = "pearson",
                               group=None, group_column: str = "group", value: str = "mean_ppm",
                               level: str | None = "group", session=None, measures=None,
                               atlas=None, correction: str = "bonferroni") -> pd.DataFrame:
    """Correlation of ROI values with markers within each sex separately.

    Returns
    -------
    DataFrame
        Tidy schema, ``test="sex_stratified_correlation"``; extra columns ``variable``
        (marker) and ``stratum`` ("F"/"M"). Family: all ROI x hemisphere rows of one
        measure, session, marker and stratum.
    """
    validate_choice("correction", correction, CORRECTIONS)
    validate_choice("method", method, _METHODS)
    long = long_table(roi_table, value=value, level=level, session=session, measures=measures,
                      atlas=atlas)
    need = list(markers) + ["sex"] + ([group_column] if group is not None else [])
    df = subset_group(attach_variables(long, participants, sessions, need), group, group_column)
    df = df.assign(sex=df["sex"].astype(str).str.upper())
    rows = []
    for key, sub in df.groupby(_KEYS + ["sex"], sort=True):
        base_key, sx = key[:4], key[4]
        for mk in markers:
            x = pd.to_numeric(sub[mk], errors="coerce").to_numpy(float)
            y = sub["value"].to_numpy(float)
            ok = np.isfinite(x) & np.isfinite(y)
            x, y = x[ok], y[ok]
            n = int(x.size)
            row = dict(zip(_KEYS, base_key), test="sex_stratified_correlation", variable=mk,
                       stratum=sx, n=n, dof=n - 2.0, effect_size_name="r",
                       method=f"scipy.stats.{'pearsonr' if method == 'pearson' else 'spearmanr'}")
            if n >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0:
                r, p = _corr(x, y, method)
                lo, hi = fisher_ci(r, n, se_scale=1.0 if method == "pearson" else np.sqrt(1.06))
                row.update(statistic=r, effect_size=r, p=p, ci_low=lo, ci_high=hi)
            rows.append(row)
    out = tidy_frame(rows, extra=["variable", "stratum"])
    return apply_correction(out, correction=correction,
                            family=["measure", "session_id", "variable", "stratum"])


def correlation_plot_data(roi_table: pd.DataFrame, participants: pd.DataFrame,
                          sessions: pd.DataFrame | None = None, *, roi: str, hemisphere: str,
                          variable: str, measure: str = "chi", session=None,
                          group="patient", group_column: str = "group",
                          value: str = "mean_ppm", level: str | None = "group",
                          n_grid: int = 50) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Numbers for a scatter plot with regression line and 95 % band (report layer plots).

    Returns
    -------
    (points, band)
        ``points``: participant_id, session_id, x (variable), y (value);
        ``band``: :func:`regression_band` output on a grid over x.
    """
    long = long_table(roi_table, value=value, level=level, session=session,
                      measures=[measure])
    long = long[(long["roi"] == roi) & (long["hemisphere"] == hemisphere)]
    need = [variable] + ([group_column] if group is not None else [])
    df = subset_group(attach_variables(long, participants, sessions, need), group, group_column)
    pts = pd.DataFrame({"participant_id": df["participant_id"], "session_id": df["session_id"],
                        "x": pd.to_numeric(df[variable], errors="coerce"), "y": df["value"]})
    pts = pts.dropna().reset_index(drop=True)
    return pts, regression_band(pts["x"], pts["y"], n_grid=n_grid)

"""Covariate-adjusted regression analyses (ordinary least squares, statsmodels).

``group_ols``: value ~ group + covariates [+ site] per ROI (the group coefficient).
``sex_interaction``: value ~ marker * sex + covariates per ROI (the interaction term).

Coding: group is the indicator of ``groups[0]`` (``group[patient]``), ``sex`` is
``sex[F]`` (F=1, M=0), other text covariates get treatment-coded indicators
(see :func:`qsmdask.stats._common.encode_columns`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import statsmodels.api as sm

from ._common import (CORRECTIONS, apply_correction, attach_variables, encode_columns,
                      full_rank_columns, long_table, subset_group, tidy_frame, validate_choice)

__all__ = ["group_ols", "sex_interaction", "ols_fit"]

_KEYS = ["measure", "session_id", "roi", "hemisphere"]


def ols_fit(y, X: pd.DataFrame):
    """Fit ``y ~ 1 + X`` by OLS on complete rows; returns the statsmodels results.

    Columns collinear with earlier ones are dropped (:func:`full_rank_columns`), so list
    the term of interest first; ``fit.model.exog_names`` tells what was fitted.

    Parameters
    ----------
    y : array-like
        Response.
    X : DataFrame
        Numeric predictors (no intercept column).
    """
    X = sm.add_constant(X.astype(float), has_constant="add")
    y = pd.Series(np.asarray(y, dtype=float), index=X.index)
    ok = y.notna() & X.notna().all(axis=1)
    cols = full_rank_columns(X[ok])
    return sm.OLS(y[ok], X.loc[ok, cols]).fit()


def _row_from_fit(fit, term, base, confidence=0.95):
    if term not in fit.params.index:  # the term itself was collinear with the intercept
        return dict(base, n=int(fit.nobs), term=term)
    ci = fit.conf_int(alpha=1 - confidence).loc[term]
    names = [c for c in fit.model.exog_names if c != "const"]
    base = dict(base, method="statsmodels.OLS: value ~ " + " + ".join(names))
    return dict(base, n=int(fit.nobs), statistic=float(fit.tvalues[term]),
                dof=float(fit.df_resid), p=float(fit.pvalues[term]),
                effect_size=float(fit.params[term]), ci_low=float(ci.iloc[0]),
                ci_high=float(ci.iloc[1]), se=float(fit.bse[term]), term=term)


def group_ols(roi_table: pd.DataFrame, participants: pd.DataFrame, *, value: str = "mean_ppm",
              level: str | None = "group", session=None, measures=None, atlas=None,
              covariates=("age", "sex", "medication"), site_covariate: bool = False,
              groups=("patient", "control"), group_column: str = "group",
              correction: str = "bonferroni") -> pd.DataFrame:
    """Covariate-adjusted group comparison per ROI by OLS.

    Model per (measure, session_id, roi, hemisphere)::

        value ~ 1 + group[groups[0]] + covariates (+ site indicators)

    Parameters
    ----------
    covariates : sequence of str
        participants columns to adjust for (constant columns are dropped).
    site_covariate : bool
        Add ``site`` (treatment-coded) to the covariates (alternative to ComBat).
    groups : (str, str)
        Groups compared; the coefficient is ``groups[0]`` minus ``groups[1]``.
    correction : {"bonferroni", "holm", "fdr_bh", "none"}
        Family: all ROI x hemisphere rows of one measure and session.

    Returns
    -------
    DataFrame
        Tidy schema, ``test="group_ols"``, ``statistic`` = t of the group coefficient,
        ``dof`` residual degrees of freedom, ``effect_size`` = the coefficient (adjusted
        difference in value units) with its t-based 95 % CI; extra columns ``term``, ``se``.
    """
    validate_choice("correction", correction, CORRECTIONS)
    groups = tuple(groups)
    if len(groups) != 2 or groups[0] == groups[1]:
        raise ValueError(f"groups must be two distinct labels, got {groups!r}")
    covs = list(covariates) + (["site"] if site_covariate else [])
    long = long_table(roi_table, value=value, level=level, session=session, measures=measures,
                      atlas=atlas)
    df = attach_variables(long, participants, None, [group_column] + covs)
    df = df[df[group_column].isin(groups)]
    term = f"group[{groups[0]}]"
    rows = []
    for key, sub in df.groupby(_KEYS, sort=True):
        X = pd.concat([pd.DataFrame({term: (sub[group_column] == groups[0]).astype(float)}),
                       encode_columns(sub, covs)], axis=1)
        base = dict(zip(_KEYS, key), test="group_ols", effect_size_name="coefficient",
                    method="statsmodels.OLS: value ~ " + " + ".join(X.columns),
                    n1=int((sub[group_column] == groups[0]).sum()),
                    n2=int((sub[group_column] == groups[1]).sum()))
        fit = ols_fit(sub["value"], X)
        if fit.df_resid < 1 or X[term].nunique() < 2:
            rows.append(dict(base, n=int(fit.nobs), term=term))
            continue
        rows.append(_row_from_fit(fit, term, base))
    out = tidy_frame(rows, extra=["term", "se"])
    return apply_correction(out, correction=correction, family=["measure", "session_id"])


def sex_interaction(roi_table: pd.DataFrame, participants: pd.DataFrame, *,
                    markers=("crp", "il6", "tnfa", "il1b"), value: str = "mean_ppm",
                    level: str | None = "group", session=None, measures=None, atlas=None,
                    covariates=("age",), group=None, group_column: str = "group",
                    correction: str = "bonferroni") -> pd.DataFrame:
    """Sex differences in the marker association: ``value ~ marker * sex + covariates``.

    Per (measure, session_id, roi, hemisphere, marker) the OLS model
    ``value ~ 1 + marker + sex[F] + marker:sex[F] + covariates`` is fitted and the
    interaction coefficient (difference of the marker slope, women minus men) reported.

    Parameters
    ----------
    markers : sequence of str
        Marker columns of participants.
    covariates : sequence of str
        Further adjustment (``sex`` is already in the model and is ignored here).
    group : str or None
        Restrict to one group (None: everybody).
    correction : {"bonferroni", "holm", "fdr_bh", "none"}
        Family: all ROI x hemisphere rows of one measure, session and marker.

    Returns
    -------
    DataFrame
        Tidy schema, ``test="sex_interaction"``; extra columns ``variable`` (marker),
        ``term`` (``"<marker>:sex[F]"``), ``se``.
    """
    validate_choice("correction", correction, CORRECTIONS)
    covs = [c for c in covariates if c != "sex"]
    long = long_table(roi_table, value=value, level=level, session=session, measures=measures,
                      atlas=atlas)
    need = list(markers) + ["sex"] + covs + ([group_column] if group is not None else [])
    df = subset_group(attach_variables(long, participants, None, need), group, group_column)
    rows = []
    for key, sub in df.groupby(_KEYS, sort=True):
        sexf = encode_columns(sub, ["sex"])
        if "sex[F]" not in sexf.columns:
            continue
        cov = encode_columns(sub, covs)
        for m in markers:
            xm = pd.to_numeric(sub[m], errors="coerce").astype(float)
            term = f"{m}:sex[F]"
            X = pd.concat([pd.DataFrame({m: xm, "sex[F]": sexf["sex[F]"],
                                         term: xm * sexf["sex[F]"]}), cov], axis=1)
            base = dict(zip(_KEYS, key), test="sex_interaction", variable=m,
                        effect_size_name="interaction_coefficient",
                        method="statsmodels.OLS: value ~ " + " + ".join(X.columns),
                        n1=int((sexf["sex[F]"] == 1).sum()), n2=int((sexf["sex[F]"] == 0).sum()))
            fit = ols_fit(sub["value"], X)
            if fit.df_resid < 1:
                rows.append(dict(base, n=int(fit.nobs), term=term))
                continue
            rows.append(_row_from_fit(fit, term, base))
    out = tidy_frame(rows, extra=["variable", "term", "se"])
    return apply_correction(out, correction=correction,
                            family=["measure", "session_id", "variable"])

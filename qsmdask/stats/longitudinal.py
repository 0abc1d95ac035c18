"""Longitudinal analyses: paired t-test between two sessions and a linear mixed model.

References
----------
Laird NM, Ware JH (1982). Random-effects models for longitudinal data. Biometrics
38:963-974. (Fitted with ``statsmodels.regression.mixed_linear_model.MixedLM``, REML.)
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import statsmodels.api as sm
from scipy import stats

from ._common import (CORRECTIONS, apply_correction, attach_variables, encode_columns,
                      full_rank_columns, long_table, merge_participants, order_sessions,
                      subset_group, tidy_frame, validate_choice)

__all__ = ["paired_ttest", "mixed_model"]


def paired_ttest(roi_table: pd.DataFrame, participants: pd.DataFrame | None = None,
                 sessions: pd.DataFrame | None = None, *, session_order=None,
                 group="patient", group_column: str = "group", value: str = "mean_ppm",
                 level: str | None = "group", measures=None, atlas=None,
                 correction: str = "bonferroni") -> pd.DataFrame:
    """Paired t-test of follow-up vs baseline per ROI (``scipy.stats.ttest_rel``).

    Parameters
    ----------
    roi_table : DataFrame
        ROI table with at least two sessions.
    participants : DataFrame or None
        Needed when ``group`` is given.
    sessions : DataFrame or None
        sessions.tsv (``acq_time`` orders the sessions).
    session_order : (str, str) or None
        (baseline, follow-up); None: the first and last session in chronological order
        (see :func:`qsmdask.stats._common.order_sessions`).
    group : str or None
        Subjects analysed (default patients; None: everybody with both sessions).
    correction : {"bonferroni", "holm", "fdr_bh", "none"}
        Family: all ROI x hemisphere rows of one measure.

    Returns
    -------
    DataFrame
        Tidy schema, ``test="paired_ttest"``, ``session_id`` = ``"<follow-up>-<baseline>"``,
        ``statistic`` t (follow-up minus baseline), ``dof`` n - 1, ``effect_size`` the mean
        difference (value units) with its t-based 95 % CI; extra column ``cohen_dz``
        (mean difference / SD of differences). Empty when fewer than two sessions.
    """
    validate_choice("correction", correction, CORRECTIONS)
    long = long_table(roi_table, value=value, level=level, measures=measures, atlas=atlas)
    if group is not None:
        if participants is None:
            raise ValueError("group needs participants")
        long = subset_group(merge_participants(long, participants, [group_column]), group,
                            group_column)
    order = order_sessions(long["session_id"].unique(), sessions, session_order)
    rows = []
    if len(order) >= 2:
        pre, post = order[0], order[-1]
        wide = long[long["session_id"].isin([pre, post])].pivot_table(
            index=["measure", "roi", "hemisphere", "participant_id"], columns="session_id",
            values="value", aggfunc="first")
        for key, sub in wide.groupby(level=["measure", "roi", "hemisphere"], sort=True):
            if pre not in sub.columns or post not in sub.columns:
                continue
            pair = sub[[pre, post]].dropna()
            d = (pair[post] - pair[pre]).to_numpy(float)
            n = d.size
            row = dict(zip(["measure", "roi", "hemisphere"], key), test="paired_ttest",
                       session_id=f"{post}-{pre}", n=n, dof=n - 1.0,
                       effect_size_name="mean_difference",
                       method=f"scipy.stats.ttest_rel({post}, {pre})")
            if n >= 2 and np.std(d) > 0:
                res = stats.ttest_rel(pair[post].to_numpy(float), pair[pre].to_numpy(float))
                ci = res.confidence_interval(0.95)
                row.update(statistic=float(res.statistic), p=float(res.pvalue),
                           effect_size=float(d.mean()), ci_low=float(ci.low),
                           ci_high=float(ci.high), cohen_dz=float(d.mean() / d.std(ddof=1)))
            rows.append(row)
    out = tidy_frame(rows, extra=["cohen_dz"])
    return apply_correction(out, correction=correction, family=["measure"])


def mixed_model(roi_table: pd.DataFrame, participants: pd.DataFrame,
                sessions: pd.DataFrame | None = None, *, covariates=("age", "sex"),
                session_order=None, groups=("patient", "control"), group_column: str = "group",
                value: str = "mean_ppm", level: str | None = "group", measures=None, atlas=None,
                reml: bool = True, correction: str = "bonferroni") -> pd.DataFrame:
    """Linear mixed model with a subject random intercept per ROI.

    Model per (measure, roi, hemisphere)::

        value ~ 1 + visit + group[g1] + visit:group[g1] + covariates + (1 | participant_id)

    ``visit`` is the session index in chronological order (0 = baseline, 1, 2, ...),
    fitted with ``statsmodels MixedLM(endog, exog, groups=participant_id).fit(reml=reml)``.

    Parameters
    ----------
    covariates : sequence of str
        Time-invariant participant covariates (``sex`` coded F=1).
    session_order : sequence of str or None
        Chronological session ids (None: from sessions.tsv ``acq_time`` or names).
    groups : (str, str)
        Groups; ``group[groups[0]]`` is the indicator of ``groups[0]``.
    reml : bool
        REML (default) or ML.
    correction : {"bonferroni", "holm", "fdr_bh", "none"}
        Family: all ROI x hemisphere rows of one measure and term.

    Returns
    -------
    DataFrame
        Tidy schema, one row per fixed effect, ``test="mixed_model"``, ``session_id="*"``,
        ``statistic`` the Wald z, ``dof`` NaN, ``effect_size`` the coefficient with its
        Wald 95 % CI; extra columns ``term``, ``se``, ``converged``, ``group_var``
        (random-intercept variance), ``contrast_of_interest`` (True for ``visit``, the group
        term and their interaction; False for the intercept and the covariates, which the
        report never highlights). Empty when fewer than two sessions.
    """
    validate_choice("correction", correction, CORRECTIONS)
    groups = tuple(groups)
    if len(groups) != 2 or groups[0] == groups[1]:
        raise ValueError(f"groups must be two distinct labels, got {groups!r}")
    long = long_table(roi_table, value=value, level=level, measures=measures, atlas=atlas)
    order = order_sessions(long["session_id"].unique(), sessions, session_order)
    rows = []
    if len(order) >= 2:
        long = long[long["session_id"].isin(order)]
        covs = list(covariates)
        df = attach_variables(long, participants, None, [group_column] + covs)
        df = df[df[group_column].isin(groups)]
        gterm = f"group[{groups[0]}]"
        for key, sub in df.groupby(["measure", "roi", "hemisphere"], sort=True):
            visit = sub["session_id"].map({s: i for i, s in enumerate(order)}).astype(float)
            g = (sub[group_column] == groups[0]).astype(float)
            X = pd.concat([pd.DataFrame({"const": 1.0, "visit": visit, gterm: g,
                                         f"visit:{gterm}": visit * g}, index=sub.index),
                           encode_columns(sub, covs)], axis=1)
            ok = X.notna().all(axis=1) & sub["value"].notna()
            X = X[full_rank_columns(X[ok])]
            Xo, yo, grp = X[ok], sub.loc[ok, "value"], sub.loc[ok, "participant_id"]
            base = dict(zip(["measure", "roi", "hemisphere"], key), test="mixed_model",
                        session_id="*", n=int(ok.sum()), n1=int(grp[g[ok] == 1].nunique()),
                        n2=int(grp[g[ok] == 0].nunique()), dof=np.nan,
                        effect_size_name="coefficient",
                        method=("statsmodels.MixedLM(reml=%s): value ~ " % reml
                                + " + ".join(Xo.columns[1:]) + " + (1 | participant_id)"))
            if len(yo) <= Xo.shape[1] + 1 or grp.nunique() < 3:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fit = sm.MixedLM(yo.to_numpy(float), Xo, groups=grp.to_numpy()).fit(reml=reml)
            ci = fit.conf_int()
            for term in Xo.columns:
                rows.append(dict(base, term=term, statistic=float(fit.tvalues[term]),
                                 p=float(fit.pvalues[term]), effect_size=float(fit.params[term]),
                                 se=float(fit.bse[term]), ci_low=float(ci.loc[term, 0]),
                                 ci_high=float(ci.loc[term, 1]), converged=bool(fit.converged),
                                 group_var=float(np.asarray(fit.cov_re)[0, 0]),
                                 contrast_of_interest=term in ("visit", gterm, f"visit:{gterm}")))
    out = tidy_frame(rows, extra=["term", "se", "converged", "group_var", "contrast_of_interest"])
    return apply_correction(out, correction=correction, family=["measure", "term"])

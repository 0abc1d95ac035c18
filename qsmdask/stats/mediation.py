"""Simple mediation X -> M -> Y with the ROI value as mediator M (any measure).

Paths (all with ``1 + covariates``): a from ``M ~ X``, b and c' (direct) from
``Y ~ X + M``, c (total) from ``Y ~ X``; indirect effect ``a * b``. Its CI comes from a
nonparametric bootstrap of subjects (percentile or bias-corrected), as in Preacher & Hayes.

References
----------
Baron RM, Kenny DA (1986). The moderator-mediator variable distinction. J Pers Soc Psychol
51:1173-1182.
Preacher KJ, Hayes AF (2008). Asymptotic and resampling strategies for assessing and
comparing indirect effects in multiple mediator models. Behav Res Methods 40:879-891.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from ._common import (CORRECTIONS, apply_correction, attach_variables, encode_columns,
                      full_rank_columns, long_table, subset_group, tidy_frame, validate_choice)

__all__ = ["mediation", "mediation_effects"]

_KEYS = ["measure", "session_id", "roi", "hemisphere"]


def _ols(X, y):
    """OLS coefficients and two-sided t-test p values (X includes the intercept)."""
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)
    dof = X.shape[0] - X.shape[1]
    if dof < 1:
        return beta, np.full(beta.shape, np.nan)
    resid = y - X @ beta
    s2 = resid @ resid / dof
    se = np.sqrt(s2 * np.diag(np.linalg.inv(X.T @ X)))
    with np.errstate(divide="ignore", invalid="ignore"):
        p = 2 * stats.t.sf(np.abs(beta / se), dof)
    return beta, p


def _batched_coef(X, y, col):
    """Least-squares coefficient ``col`` for a batch: X (B, n, p), y (B, n)."""
    xt = X.transpose(0, 2, 1)
    try:
        return np.linalg.solve(xt @ X, xt @ y[..., None])[:, col, 0]
    except np.linalg.LinAlgError:  # a degenerate resample (e.g. constant covariate)
        return (np.linalg.pinv(X) @ y[..., None])[:, col, 0]


def mediation_effects(x, m, y, covariates=None, *, n_boot: int = 2000, seed: int | None = 0,
                      ci_method: str = "percentile", confidence: float = 0.95) -> dict:
    """Mediation effects of one X -> M -> Y triple.

    Parameters
    ----------
    x, m, y : array-like, shape (n,)
        Predictor, mediator and outcome (complete cases only).
    covariates : array-like, shape (n, k) or None
        Adjustment variables entering every path.
    n_boot : int
        Bootstrap resamples of subjects for the indirect effect.
    seed : int or None
        Seed of ``numpy.random.default_rng``.
    ci_method : {"percentile", "bias_corrected"}
        Bootstrap interval type.
    confidence : float
        Coverage.

    Returns
    -------
    dict
        ``a, a_p, b, b_p, total, total_p, direct, direct_p, indirect, indirect_se,
        indirect_ci (low, high), indirect_p`` (bootstrap two-sided
        ``2 (min(#(ab* <= 0), #(ab* >= 0)) + 1) / (n_boot + 1)``, never 0), ``n``.
    """
    validate_choice("ci_method", ci_method, ("percentile", "bias_corrected"))
    if int(n_boot) < 100:
        raise ValueError(f"n_boot must be >= 100, got {n_boot!r}")
    x, m, y = (np.asarray(v, dtype=float).ravel() for v in (x, m, y))
    n = x.size
    if not (m.size == n and y.size == n):
        raise ValueError("x, m and y must have the same length")
    C = np.zeros((n, 0)) if covariates is None else np.asarray(covariates, float).reshape(n, -1)
    if not (np.isfinite(x).all() and np.isfinite(m).all() and np.isfinite(y).all()
            and np.isfinite(C).all()):
        raise ValueError("x, m, y and covariates must be complete (no NaN)")
    one = np.ones((n, 1))
    if C.shape[1]:  # drop covariates collinear with the intercept, x, m or each other
        keep = full_rank_columns(pd.DataFrame(np.hstack([one, x[:, None], m[:, None], C])))
        C = C[:, [j - 3 for j in keep if j >= 3]]
    Xa = np.hstack([one, x[:, None], C])
    Xb = np.hstack([one, x[:, None], m[:, None], C])
    ba, pa = _ols(Xa, m)
    bb, pb = _ols(Xb, y)
    bc, pc = _ols(Xa, y)
    a, b = float(ba[1]), float(bb[2])
    ab = a * b
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(int(n_boot), n))
    Xa, Xb = Xa[idx], Xb[idx]
    boot = _batched_coef(Xa, m[idx], 1) * _batched_coef(Xb, y[idx], 2)
    alpha = 1 - confidence
    if ci_method == "percentile":
        lo, hi = np.percentile(boot, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    else:
        z0 = stats.norm.ppf(np.clip(np.mean(boot < ab), 1e-12, 1 - 1e-12))
        zq = stats.norm.ppf(1 - alpha / 2)
        lo, hi = np.percentile(boot, 100 * stats.norm.cdf([2 * z0 - zq, 2 * z0 + zq]))
    tail = min(np.sum(boot <= 0), np.sum(boot >= 0))
    p_boot = min(1.0, 2 * (tail + 1) / (boot.size + 1))
    return dict(n=n, a=a, a_p=float(pa[1]), b=b, b_p=float(pb[2]),
                total=float(bc[1]), total_p=float(pc[1]),
                direct=float(bb[1]), direct_p=float(pb[1]), indirect=ab,
                indirect_se=float(boot.std(ddof=1)), indirect_ci=(float(lo), float(hi)),
                indirect_p=float(p_boot))


def mediation(roi_table: pd.DataFrame, participants: pd.DataFrame,
              sessions: pd.DataFrame | None = None, *, paths=(("crp", "hdrs"),),
              covariates=("age", "sex"), group=None, group_column: str = "group",
              value: str = "mean_ppm", level: str | None = "group", session=None,
              measures=None, atlas=None, n_boot: int = 2000, seed: int | None = 0,
              ci_method: str = "percentile", correction: str = "bonferroni") -> pd.DataFrame:
    """Mediation ``x -> ROI value -> y`` for every ROI (modality-agnostic).

    Parameters
    ----------
    paths : sequence of (x, y)
        Predictor (e.g. a marker) and outcome (e.g. ``hdrs``; a sessions.tsv column is taken
        per session).
    covariates : sequence of str
        Adjustment in every path (``sex`` coded F=1).
    group : str or None
        Restrict to one group (None: everybody).
    n_boot, seed, ci_method
        Bootstrap of the indirect effect (see :func:`mediation_effects`).
    correction : {"bonferroni", "holm", "fdr_bh", "none"}
        Applied to the bootstrap p of the indirect effect; family: all ROI x hemisphere
        rows of one measure, session and path.

    Returns
    -------
    DataFrame
        Tidy schema, ``test="mediation"``, ``effect_size`` = ``statistic`` = indirect effect
        a*b with its bootstrap CI, ``p`` bootstrap p; extra columns ``x, y, a, a_p, b, b_p,
        total, total_p, direct, direct_p, se`` (bootstrap SE of a*b).
    """
    validate_choice("correction", correction, CORRECTIONS)
    validate_choice("ci_method", ci_method, ("percentile", "bias_corrected"))
    paths = [tuple(p) for p in paths]
    for p in paths:
        if len(p) != 2:
            raise ValueError(f"paths entries must be (x, y) pairs, got {p!r}")
    long = long_table(roi_table, value=value, level=level, session=session, measures=measures,
                      atlas=atlas)
    covs = list(covariates)
    need = [v for p in paths for v in p] + covs + ([group_column] if group is not None else [])
    df = subset_group(attach_variables(long, participants, sessions, need), group, group_column)
    rows = []
    for key, sub in df.groupby(_KEYS, sort=True):
        cdf = encode_columns(sub, covs)
        for xn, yn in paths:
            frame = pd.concat([pd.to_numeric(sub[xn], errors="coerce").rename("__x"),
                               sub["value"].rename("__m"),
                               pd.to_numeric(sub[yn], errors="coerce").rename("__y"), cdf],
                              axis=1).dropna()
            base = dict(zip(_KEYS, key), test="mediation", x=xn, y=yn, n=len(frame),
                        dof=np.nan, effect_size_name="indirect_effect",
                        method=(f"OLS paths, covariates {list(cdf.columns)}; bootstrap "
                                f"{ci_method} CI, {int(n_boot)} resamples"))
            if len(frame) < cdf.shape[1] + 5:
                rows.append(base)
                continue
            eff = mediation_effects(frame["__x"], frame["__m"], frame["__y"],
                                    frame[cdf.columns].to_numpy(float) if cdf.shape[1] else None,
                                    n_boot=n_boot, seed=seed, ci_method=ci_method)
            rows.append(dict(base, statistic=eff["indirect"], p=eff["indirect_p"],
                             effect_size=eff["indirect"], ci_low=eff["indirect_ci"][0],
                             ci_high=eff["indirect_ci"][1], se=eff["indirect_se"],
                             **{k: eff[k] for k in ("a", "a_p", "b", "b_p", "total", "total_p",
                                                    "direct", "direct_p")}))
    out = tidy_frame(rows, extra=["x", "y", "a", "a_p", "b", "b_p", "total", "total_p",
                                  "direct", "direct_p", "se"])
    return apply_correction(out, correction=correction, family=["measure", "session_id", "x", "y"])

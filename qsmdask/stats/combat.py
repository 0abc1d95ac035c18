"""Multi-site harmonisation with ComBat (parametric empirical Bayes).

:func:`combat` is the location/scale model of Johnson, Li & Rabinovic (2007) as adapted to
neuroimaging by Fortin et al. (2017/2018): per feature g, sample j of site i::

    y_ijg = alpha_g + X_j beta_g + gamma_ig + delta_ig * eps_ijg

Site effects gamma (additive) and delta (multiplicative) get normal / inverse-gamma priors
pooled across features and are shrunk by an iterative empirical-Bayes solution; the
protected covariates X (e.g. age, sex, diagnosis) are kept. The conventions follow the
reference implementations (R ``sva::ComBat``, Python ``neuroCombat``): grand mean weighted
by site sizes, pooled variance with divisor n, treatment-coded categorical covariates,
convergence when the largest relative change of gamma* and delta* is below ``conv``.

References
----------
Johnson WE, Li C, Rabinovic A (2007). Adjusting batch effects in microarray expression data
using empirical Bayes methods. Biostatistics 8:118-127.
Fortin JP et al. (2018). Harmonization of cortical thickness measurements across scanners
and sites. NeuroImage 167:104-120.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["combat", "combat_roi_table"]


def _design(batch_codes, n_batch, covariates, categorical, continuous):
    n = batch_codes.size
    parts = [np.eye(n_batch)[batch_codes]]
    for c in categorical:
        codes = np.unique(np.asarray(covariates[c]).astype(str), return_inverse=True)[1]
        parts.append(np.eye(codes.max() + 1)[codes][:, 1:])
    for c in continuous:
        parts.append(np.asarray(covariates[c], dtype=float).reshape(n, 1))
    return np.hstack(parts)


def _it_sol(sdat, g_hat, d_hat, g_bar, t2, a, b, conv, max_iter):
    n = sdat.shape[0]
    g_old, d_old = g_hat.copy(), d_hat.copy()
    for _ in range(max_iter):
        g_new = (t2 * n * g_hat + d_old * g_bar) / (t2 * n + d_old)
        sum2 = ((sdat - g_new) ** 2).sum(axis=0)
        d_new = (0.5 * sum2 + b) / (n / 2.0 + a - 1.0)
        # relative change as in sva::ComBat / neuroCombat (signed denominators)
        change = max(np.max(np.abs(g_new - g_old) / g_old), np.max(np.abs(d_new - d_old) / d_old))
        g_old, d_old = g_new, d_new
        if change <= conv:
            break
    return g_new, d_new


def combat(data, batch, covariates: pd.DataFrame | None = None, *, categorical=(),
           continuous=(), eb: bool = True, mean_only: bool = False, conv: float = 1e-4,
           max_iter: int = 1000, return_estimates: bool = False):
    """Harmonise features across sites with ComBat (parametric empirical Bayes).

    Parameters
    ----------
    data : array-like or DataFrame, shape (n_samples, n_features)
        One row per subject-session, one column per feature (e.g. ROI). Must be complete.
    batch : array-like, shape (n_samples,)
        Site/scanner label per row (at least 2 sites, each with >= 2 rows).
    covariates : DataFrame or None
        Rows aligned with ``data``; columns named in ``categorical``/``continuous`` are
        protected (their effects are kept).
    categorical, continuous : sequence of str
        Protected categorical (treatment coded, first sorted level dropped) and continuous
        covariates.
    eb : bool
        Empirical Bayes shrinkage (False: plain location/scale per site).
    mean_only : bool
        Adjust only the location (no scale).
    conv : float
        Convergence tolerance of the EB iteration.
    max_iter : int
        Iteration limit.
    return_estimates : bool
        Also return a dict of estimates (gamma_hat, delta_hat, gamma_star, delta_star,
        grand_mean, var_pooled, batches).

    Returns
    -------
    Harmonised data of the same shape and type (DataFrame in, DataFrame out); with
    ``return_estimates`` a tuple (data, estimates). Features with zero pooled variance are
    returned unchanged.
    """
    is_df = isinstance(data, pd.DataFrame)
    Y = np.array(data, dtype=float)
    if Y.ndim != 2:
        raise ValueError("data must be 2-D (n_samples, n_features)")
    if not np.isfinite(Y).all():
        raise ValueError("data must be complete (no NaN/inf)")
    n, G = Y.shape
    batch = np.asarray(batch)
    if batch.shape != (n,):
        raise ValueError(f"batch must have one label per row of data ({n}), got {batch.shape}")
    categorical, continuous = list(categorical), list(continuous)
    if (categorical or continuous) and covariates is None:
        raise ValueError("covariates is required when categorical/continuous are given")
    if covariates is not None:
        if len(covariates) != n:
            raise ValueError("covariates must have one row per row of data")
        missing = [c for c in categorical + continuous if c not in covariates.columns]
        if missing:
            raise ValueError(f"covariates lacks column(s) {missing}")
        if covariates[categorical + continuous].isna().any().any():
            raise ValueError("covariates must be complete for the protected columns")
    if float(conv) <= 0:
        raise ValueError(f"conv must be > 0, got {conv!r}")
    levels, codes = np.unique(batch.astype(str), return_inverse=True)
    K = levels.size
    counts = np.bincount(codes, minlength=K)
    if K < 2:
        raise ValueError("batch must contain at least 2 sites")
    if counts.min() < 2:
        raise ValueError(f"every site needs >= 2 rows; counts {dict(zip(levels, counts))}")
    D = _design(codes, K, covariates, categorical, continuous)
    if np.linalg.matrix_rank(D) < D.shape[1]:
        raise ValueError("design (site + protected covariates) is rank deficient: a "
                         "covariate is confounded with site")
    B, *_ = np.linalg.lstsq(D, Y, rcond=None)
    grand_mean = (counts / n) @ B[:K]
    var_pooled = np.mean((Y - D @ B) ** 2, axis=0)
    ok = var_pooled > 0
    mod_mean = D[:, K:] @ B[K:]
    out = Y.copy()
    Yo = Y[:, ok]
    sd = np.sqrt(var_pooled[ok])
    s = (Yo - grand_mean[ok] - mod_mean[:, ok]) / sd
    gamma_hat = np.vstack([s[codes == i].mean(axis=0) for i in range(K)])
    if mean_only:
        delta_hat = np.ones_like(gamma_hat)
    else:
        delta_hat = np.vstack([s[codes == i].var(axis=0, ddof=1) for i in range(K)])
        delta_hat[delta_hat == 0] = 1.0
    if eb:
        gamma_bar = gamma_hat.mean(axis=1)
        t2 = gamma_hat.var(axis=1, ddof=1)
        gamma_star = np.empty_like(gamma_hat)
        delta_star = np.empty_like(delta_hat)
        for i in range(K):
            if mean_only:
                gamma_star[i] = (t2[i] * gamma_hat[i] + gamma_bar[i]) / (t2[i] + 1.0)
                delta_star[i] = 1.0
                continue
            m_, s2 = delta_hat[i].mean(), delta_hat[i].var(ddof=1)
            a_prior = (2 * s2 + m_ ** 2) / s2
            b_prior = (m_ * s2 + m_ ** 3) / s2
            gamma_star[i], delta_star[i] = _it_sol(s[codes == i], gamma_hat[i], delta_hat[i],
                                                   gamma_bar[i], t2[i], a_prior, b_prior,
                                                   float(conv), int(max_iter))
    else:
        gamma_star, delta_star = gamma_hat, delta_hat
    adj = (s - gamma_star[codes]) / np.sqrt(delta_star[codes])
    out[:, ok] = adj * sd + grand_mean[ok] + mod_mean[:, ok]
    if is_df:
        out = pd.DataFrame(out, index=data.index, columns=data.columns)
    if return_estimates:
        est = dict(batches=levels, gamma_hat=gamma_hat, delta_hat=delta_hat,
                   gamma_star=gamma_star, delta_star=delta_star, grand_mean=grand_mean,
                   var_pooled=var_pooled, harmonised=ok)
        return out, est
    return out


def combat_roi_table(roi_table: pd.DataFrame, participants: pd.DataFrame, *,
                     value: str = "mean_ppm", site_column: str = "site",
                     protect=("age", "sex", "group"), eb: bool = True) -> pd.DataFrame:
    """ComBat-harmonise one value column of the ROI table across sites.

    The table is made wide per (measure, level, atlas): rows subject-sessions, columns
    (roi, hemisphere); each such block is harmonised separately (so that modalities with
    different scales do not share priors). Features missing for some subject-sessions and
    subject-sessions with missing site/protected covariates are left unchanged.

    Parameters
    ----------
    roi_table : DataFrame
        ROI table.
    participants : DataFrame
        With ``site_column`` and the ``protect`` columns (text columns are categorical,
        numeric ones continuous).
    value : str
        Column harmonised.
    site_column : str
        Site label column of participants.
    protect : sequence of str
        Covariates whose effects are preserved (age, sex, diagnosis by default).
    eb : bool
        Empirical Bayes (see :func:`combat`).

    Returns
    -------
    DataFrame
        A copy of ``roi_table`` with ``value`` harmonised; ``.attrs["combat"]`` records the
        options and the blocks harmonised.
    """
    protect = list(protect)
    need = ["participant_id", site_column] + protect
    missing = [c for c in need if c not in participants.columns]
    if missing:
        raise ValueError(f"participants lacks column(s) {missing} needed for ComBat")
    if value not in roi_table.columns:
        raise ValueError(f"roi_table lacks value column {value!r}")
    out = roi_table.copy()
    work = out.reset_index(drop=True).copy()
    work["__row"] = np.arange(len(work))
    if "session_id" not in work.columns:
        work["session_id"] = ""
    work["session_id"] = work["session_id"].fillna("").astype(str)
    block_keys = [c for c in ("measure", "level", "atlas") if c in work.columns]
    feat_keys = [c for c in ("roi", "hemisphere", "label") if c in work.columns]
    part = participants[need].drop_duplicates("participant_id").set_index("participant_id")
    cat = [c for c in protect if not pd.api.types.is_numeric_dtype(part[c])]
    cont = [c for c in protect if c not in cat]
    newvals = work[value].to_numpy(float).copy()
    done = []
    groups = work.groupby(block_keys, sort=True) if block_keys else [((), work)]
    for bkey, blk in groups:
        wide = blk.pivot_table(index=["participant_id", "session_id"], columns=feat_keys,
                               values=value, aggfunc="first")
        rowsmap = blk.pivot_table(index=["participant_id", "session_id"], columns=feat_keys,
                                  values="__row", aggfunc="first")
        cov = part.reindex(wide.index.get_level_values("participant_id"))
        cov.index = wide.index
        keep_rows = cov.notna().all(axis=1)
        wide, rowsmap, cov = wide[keep_rows], rowsmap[keep_rows], cov[keep_rows]
        complete = wide.columns[wide.notna().all(axis=0)]
        if len(complete) < 2 or cov[site_column].nunique() < 2:
            continue
        harm = combat(wide[complete], cov[site_column].to_numpy(), cov.reset_index(drop=True)
                      .set_index(wide.index), categorical=cat, continuous=cont, eb=eb)
        idx = rowsmap[complete].to_numpy().astype(int).ravel()
        newvals[idx] = harm.to_numpy().ravel()
        done.append(bkey)
    out[value] = newvals if out.index.equals(pd.RangeIndex(len(out))) else pd.Series(
        newvals, index=out.index)
    out.attrs["combat"] = dict(value=value, site_column=site_column, protect=protect, eb=eb,
                               blocks=[str(b) for b in done])
    return out

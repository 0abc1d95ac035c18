"""Design diagnostics: rank, variance inflation and per-group covariate coverage.

A covariate that is nearly nested in the tested effect changes the question a model
answers: with medication given to 7 of 8 patients and 0 of 8 controls, "patients vs
controls adjusted for medication" compares the one unmedicated patient with the controls.
:func:`design_diagnostics` measures this for one design; :func:`screen_covariates` applies
the rule the group analysis uses (left out when VIF > ``vif_max`` or constant/absent in one
group, unless the design keeps it).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ._common import encode_columns

__all__ = ["vif", "design_diagnostics", "screen_covariates", "VIF_MAX"]

#: Variance inflation above which a covariate counts as nearly nested in the tested effect.
VIF_MAX = 5.0


def vif(X: pd.DataFrame) -> pd.Series:
    """Variance inflation factor of every column of ``X`` (an intercept is added).

    ``VIF_j = 1 / (1 - R^2_j)`` with ``R^2_j`` from regressing column j on the others and an
    intercept; inf for a column that the others (or the intercept) determine exactly.
    """
    X = X.astype(float)
    out = {}
    n = len(X)
    for c in X.columns:
        y = X[c].to_numpy()
        others = np.column_stack([np.ones(n), X.drop(columns=c).to_numpy()])
        ss_tot = float(((y - y.mean()) ** 2).sum())
        if ss_tot <= 1e-12 * max(n, 1):
            out[c] = np.inf
            continue
        beta, *_ = np.linalg.lstsq(others, y, rcond=None)
        r2 = 1.0 - float(((y - others @ beta) ** 2).sum()) / ss_tot
        out[c] = np.inf if r2 >= 1 - 1e-12 else 1.0 / (1.0 - r2)
    return pd.Series(out, dtype=float)


def _coverage(frame: pd.DataFrame, col: str, group: pd.Series | None) -> dict:
    """Per group: non-missing count and the share of non-zero (or distinct-level) values."""
    res = {}
    parts = [("all", frame)] if group is None else [(str(g), frame[group == g])
                                                   for g in sorted(group.dropna().unique())]
    for g, sub in parts:
        v = sub[col]
        ok = v.notna()
        num = pd.to_numeric(v[ok], errors="coerce")
        if num.notna().all() and len(num):
            res[g] = f"{int((num != 0).sum())}/{int(ok.sum())} non-zero, {num.nunique()} levels"
        else:
            res[g] = f"{int(ok.sum())} present, {v[ok].nunique()} levels"
    return res


def design_diagnostics(frame: pd.DataFrame, *, model: str, tested: str, covariates,
                       group_column: str | None = None) -> pd.DataFrame:
    """Diagnostics of ``value ~ tested + covariates`` fitted on the rows of ``frame``.

    Parameters
    ----------
    frame : one row per observation (subject), with the tested column and the covariates.
    model : name written to the ``model`` column.
    tested : the tested effect's column (numeric, e.g. a 0/1 group indicator or a marker).
    covariates : covariate columns (text columns are treatment coded, see ``encode_columns``).
    group_column : column defining the groups for coverage and nesting (None: no groups).

    Returns
    -------
    DataFrame, one row per design column: ``model, term, role ("tested"|"covariate"),
    vif, rank, n_columns, n, constant_in_group`` (the group where a covariate takes one
    value, "" if none) and ``coverage`` (per group, e.g. ``"patient: 7/8 non-zero, 2 levels;
    control: 0/8 non-zero, 1 levels"``).
    """
    cov = [c for c in covariates if c in frame.columns]
    X = pd.concat([frame[[tested]].astype(float).rename(columns={tested: tested}),
                   encode_columns(frame, cov)], axis=1)
    ok = X.notna().all(axis=1)
    X, f = X[ok], frame[ok]
    design = np.column_stack([np.ones(len(X)), X.to_numpy(float)]) if len(X) else np.zeros((0, 1))
    rank = int(np.linalg.matrix_rank(design)) if len(X) else 0
    v = vif(X) if len(X) > X.shape[1] + 1 else pd.Series(np.inf, index=X.columns)
    group = f[group_column] if group_column and group_column in f.columns else None
    rows = []
    for col in X.columns:
        src = next((c for c in cov if col == c or col.startswith(f"{c}[")), col)
        const_in = ""
        cover = ""
        if src != tested and src in f.columns:
            cv = _coverage(f, src, group)
            cover = "; ".join(f"{g}: {s}" for g, s in cv.items())
            if group is not None:
                for g in sorted(group.dropna().unique()):
                    vals = f.loc[group == g, src].dropna()
                    if len(vals) == 0 or vals.nunique() < 2:
                        const_in = str(g)
                        break
        rows.append({"model": model, "term": col, "role": "tested" if src == tested else "covariate",
                     "covariate": "" if src == tested else src, "vif": float(v.get(col, np.inf)),
                     "rank": rank, "n_columns": design.shape[1], "n": int(len(X)),
                     "constant_in_group": const_in, "coverage": cover})
    return pd.DataFrame(rows)


def screen_covariates(frame: pd.DataFrame, *, model: str, tested: str, covariates,
                      group_column: str | None = None, keep=(), vif_max: float = VIF_MAX
                      ) -> tuple[list[str], list[tuple[str, str]], pd.DataFrame]:
    """Leave out covariates nearly nested in the tested effect.

    A covariate is left out when one of its design columns has VIF > ``vif_max`` or it is
    constant (or absent) within one group of ``group_column``; the worst is removed first
    and the design re-examined. Covariates named in ``keep`` stay (their diagnostics still
    show the problem).

    Returns
    -------
    (kept covariates, [(covariate, reason)] left out, diagnostics of the final design with
    the left-out covariates' rows from the design they were judged in, ``left_out`` True)
    """
    covs = [c for c in covariates if c in frame.columns]
    dropped: list[tuple[str, str]] = []
    dropped_rows = []
    while True:
        d = design_diagnostics(frame, model=model, tested=tested, covariates=covs,
                               group_column=group_column)
        cand = d[(d.role == "covariate") & ~d.covariate.isin(keep)
                 & ((d.vif > vif_max) | (d.constant_in_group != ""))]
        if cand.empty:
            d["left_out"] = False
            if dropped_rows:
                d = pd.concat([d, *dropped_rows], ignore_index=True)
            return covs, dropped, d
        worst = cand.sort_values("vif", ascending=False).iloc[0]
        c = worst.covariate
        why = []
        if worst.vif > vif_max:
            why.append(f"VIF {worst.vif:.1f} > {vif_max:g}")
        if worst.constant_in_group:
            why.append(f"constant in group {worst.constant_in_group!r}")
        reason = (f"{model}: covariate {c!r} left out, nearly nested in {tested!r} "
                  f"({', '.join(why)}; {worst.coverage}); keep it with keep_covariates")
        dropped.append((c, reason))
        rows = d[d.covariate == c].copy()
        rows["left_out"] = True
        dropped_rows.append(rows)
        covs = [x for x in covs if x != c]

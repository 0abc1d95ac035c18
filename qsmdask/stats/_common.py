"""Shared helpers for cohort statistics: the tidy schema, validation, tables, correction.

All public statistics functions in :mod:`qsmdask.stats` return a tidy
:class:`pandas.DataFrame` whose first columns are :data:`TIDY_COLUMNS`
(see ``docs/architecture.md``, "Group tables"). Some families add columns after
those (for example ``term`` for regression coefficients, or ``variable`` for
correlations); the common columns always keep their meaning:

``test``            name of the analysis family (``"group_wilcoxon"``, ...)
``measure``         modality of the ROI value (``"chi"``, ``"fa"``, ...)
``roi``             ROI name (``"<atlas>:<roi>"`` when several atlases are analysed);
                    ``hemisphere`` ``"L"``, ``"R"``, ``"B"`` (``"L-R"`` for asymmetry)
``session_id``      session analysed (``""`` when the dataset has no sessions;
                    ``"<follow-up>-<baseline>"`` for paired tests, ``"*"`` for the mixed
                    model, which uses all sessions)
``n``               observations used (``n1``/``n2`` per group, NaN if not applicable)
``statistic``       the test statistic (U, W, t, r, ...); ``dof`` its degrees of freedom
                    (NaN where not applicable)
``p``               two-sided p value; ``p_corrected`` adjusted within the correction
                    family, ``correction`` the method. A family is all ROI x hemisphere
                    rows of one test and measure and session (and variable/marker/term
                    where the test has several); rows with p = NaN are not counted
``method``          the exact routine that produced the numbers
``effect_size``     with ``effect_size_name``, and its 95 % CI ``ci_low``, ``ci_high``
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
from statsmodels.stats.multitest import multipletests

__all__ = ["TIDY_COLUMNS", "CORRECTIONS", "adjust_pvalues", "apply_correction", "tidy_frame",
           "encode_columns", "order_sessions", "attach_variables", "subset_group", "fisher_ci",
           "validate_choice", "long_table", "merge_participants"]

TIDY_COLUMNS = ["test", "measure", "roi", "hemisphere", "session_id", "n", "n1", "n2",
                "statistic", "dof", "p", "p_corrected", "correction", "method", "effect_size",
                "effect_size_name", "ci_low", "ci_high"]

#: Multiple-comparison methods (statsmodels ``multipletests`` names; "none" disables).
CORRECTIONS = ("bonferroni", "holm", "fdr_bh", "none")

ROI_KEY = ["measure", "roi", "hemisphere"]
_ROI_REQUIRED = ["participant_id", "roi", "hemisphere"]


def validate_choice(name: str, value, allowed: Iterable):
    """Return ``value`` if it is one of ``allowed``; else raise ValueError naming ``name``."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed!r}, got {value!r}")
    return value


def validate_alpha(alpha: float, name: str = "alpha") -> float:
    alpha = float(alpha)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {alpha!r}")
    return alpha


def adjust_pvalues(p, *, correction: str) -> np.ndarray:
    """Adjust a vector of p values for multiple comparisons.

    Parameters
    ----------
    p : array-like of float
        Raw p values; NaN entries (tests that could not be run) are left NaN and are
        not counted in the family size.
    correction : {"bonferroni", "holm", "fdr_bh", "none"}
        Bonferroni (FWER), Holm step-down (FWER, Holm 1979) or Benjamini-Hochberg
        (FDR, Benjamini & Hochberg 1995), via ``statsmodels.stats.multitest.multipletests``
        with the method passed explicitly (its default is Holm-Sidak).

    Returns
    -------
    numpy.ndarray
        Adjusted p values, same shape as ``p``.
    """
    validate_choice("correction", correction, CORRECTIONS)
    p = np.asarray(p, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if not ok.any():
        return out
    if correction == "none":
        out[ok] = p[ok]
    else:
        out[ok] = multipletests(p[ok], method=correction)[1]
    return out


def apply_correction(df: pd.DataFrame, *, correction: str, family: Sequence[str]) -> pd.DataFrame:
    """Fill ``p_corrected`` and ``correction`` of ``df`` within families (``family`` columns).

    Returns a new frame (``df`` is not modified).
    """
    validate_choice("correction", correction, CORRECTIONS)
    df = df.copy()
    df["correction"] = correction
    df["p_corrected"] = np.nan
    if len(df) == 0:
        return df
    family = list(family)
    if family:
        for _, idx in df.groupby(family, sort=False, dropna=False).groups.items():
            df.loc[idx, "p_corrected"] = adjust_pvalues(df.loc[idx, "p"].to_numpy(float),
                                                        correction=correction)
    else:
        df["p_corrected"] = adjust_pvalues(df["p"].to_numpy(float), correction=correction)
    return df


def tidy_frame(rows: list[dict], extra: Sequence[str] = ()) -> pd.DataFrame:
    """Build a frame with the tidy columns first (missing ones NaN), then ``extra`` columns."""
    cols = list(TIDY_COLUMNS) + [c for c in extra if c not in TIDY_COLUMNS]
    df = pd.DataFrame(rows, columns=cols)
    for c in ("n", "n1", "n2", "statistic", "dof", "p", "p_corrected", "effect_size",
              "ci_low", "ci_high"):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    for c in ("test", "measure", "roi", "hemisphere", "session_id", "correction", "method",
              "effect_size_name"):
        df[c] = df[c].astype(object)
    return df


def long_table(roi_table: pd.DataFrame, *, value: str = "mean_ppm", level: str | None = "group",
               session=None, measures=None, atlas=None) -> pd.DataFrame:
    """Select and normalise ROI rows for analysis.

    Parameters
    ----------
    roi_table : DataFrame
        The ROI table (see ``docs/architecture.md``).
    value : str
        Column holding the ROI value (``"mean_ppm"``, ``"median_ppm"``, ...).
    level : {"label", "group", None}
        Keep only rows of this ``level`` (None keeps all).
    session : str, sequence of str or None
        Keep only these ``session_id`` values (None keeps all).
    measures : sequence of str or None
        Keep only these measures (None keeps all).
    atlas : str or None
        Keep only this atlas. When None and the table holds several atlases, ROI names
        are qualified as ``"<atlas>:<roi>"`` so that they stay unique.

    Returns
    -------
    DataFrame with columns ``participant_id, session_id, measure, roi, hemisphere, value``.
    """
    if not isinstance(roi_table, pd.DataFrame):
        raise ValueError("roi_table must be a pandas DataFrame")
    missing = [c for c in _ROI_REQUIRED + [value] if c not in roi_table.columns]
    if missing:
        raise ValueError(f"roi_table lacks column(s) {missing} (value={value!r})")
    if level is not None:
        validate_choice("level", level, ("label", "group"))
    df = roi_table.copy()
    if "session_id" not in df.columns:
        df["session_id"] = ""
    df["session_id"] = df["session_id"].fillna("").astype(str)
    if "measure" not in df.columns:
        df["measure"] = "chi"
    if level is not None and "level" in df.columns:
        df = df[df["level"] == level]
    if session is not None:
        sessions = [session] if isinstance(session, str) else list(session)
        df = df[df["session_id"].isin(sessions)]
    if measures is not None:
        measures = [measures] if isinstance(measures, str) else list(measures)
        df = df[df["measure"].isin(measures)]
    if "atlas" in df.columns:
        if atlas is not None:
            df = df[df["atlas"] == atlas]
        elif df["atlas"].nunique() > 1:
            df = df.assign(roi=df["atlas"].astype(str) + ":" + df["roi"].astype(str))
    out = df[["participant_id", "session_id", "measure", "roi", "hemisphere"]].copy()
    out["value"] = pd.to_numeric(df[value], errors="coerce").astype(float)
    out = out.dropna(subset=["value"])
    dup = out.duplicated(["participant_id", "session_id", "measure", "roi", "hemisphere"])
    if dup.any():
        first = out[dup].iloc[0]
        raise ValueError(
            "roi_table has several rows for one subject-session and ROI "
            f"(e.g. {first['participant_id']} {first['session_id']!r} {first['roi']} "
            f"{first['hemisphere']}); select one atlas/level first")
    return out.reset_index(drop=True)


def merge_participants(long: pd.DataFrame, participants: pd.DataFrame, columns) -> pd.DataFrame:
    """Attach participant columns to a long table (inner join on ``participant_id``)."""
    if not isinstance(participants, pd.DataFrame):
        raise ValueError("participants must be a pandas DataFrame")
    columns = [c for c in dict.fromkeys(columns) if c != "participant_id"]
    missing = [c for c in ["participant_id"] + columns if c not in participants.columns]
    if missing:
        raise ValueError(f"participants lacks column(s) {missing}")
    part = participants[["participant_id"] + columns]
    if part["participant_id"].duplicated().any():
        raise ValueError("participants has duplicate participant_id rows")
    return long.merge(part, on="participant_id", how="inner", validate="many_to_one")


def encode_columns(df: pd.DataFrame, columns) -> pd.DataFrame:
    """Numeric model columns for ``columns`` of ``df`` (no intercept).

    Numeric columns are used as they are. ``sex`` is coded ``sex[F]`` (F=1, M=0). Other
    non-numeric columns become indicator columns ``name[level]`` for every sorted level but
    the first (treatment coding). Constant columns are dropped (they cannot be estimated).
    """
    parts = []
    for c in columns:
        if c not in df.columns:
            raise ValueError(f"covariate {c!r} is not a column of participants")
        s = df[c]
        if c == "sex" and not pd.api.types.is_numeric_dtype(s):
            levels = set(s.dropna().astype(str).str.upper())
            if not levels <= {"M", "F"}:
                raise ValueError(f"sex must be coded 'M'/'F', got levels {sorted(levels)}")
            parts.append(pd.DataFrame({"sex[F]": (s.astype(str).str.upper() == "F")
                                       .astype(float).where(s.notna())}, index=df.index))
        elif pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s):
            parts.append(pd.DataFrame({c: s.astype(float)}, index=df.index))
        else:
            levels = sorted(s.dropna().astype(str).unique())
            cols = {f"{c}[{lv}]": (s.astype(str) == lv).astype(float).where(s.notna())
                    for lv in levels[1:]}
            parts.append(pd.DataFrame(cols, index=df.index))
    if not parts:
        return pd.DataFrame(index=df.index)
    out = pd.concat(parts, axis=1)
    const = [c for c in out.columns if out[c].dropna().nunique() <= 1]
    return out.drop(columns=const)


def order_sessions(session_ids, sessions: pd.DataFrame | None = None,
                   session_order=None) -> list[str]:
    """Chronological order of session ids.

    ``session_order`` (explicit) wins; else the median ``acq_time`` per session in
    ``sessions``; else "pre"/"baseline" first and "post"/"follow" last; else by name.
    """
    ids = [s for s in dict.fromkeys(session_ids) if s != ""]
    if session_order is not None:
        order = [s for s in session_order if s in ids]
        return order
    if sessions is not None and "acq_time" in sessions.columns and len(sessions):
        t = pd.to_datetime(sessions["acq_time"], errors="coerce")
        med = t.groupby(sessions["session_id"].astype(str)).median()
        if all(s in med.index and pd.notna(med[s]) for s in ids):
            return sorted(ids, key=lambda s: (med[s], s))

    def rank(s):
        low = s.lower()
        if any(k in low for k in ("pre", "base", "bl")):
            return 0
        if any(k in low for k in ("post", "follow", "fu")):
            return 2
        return 1
    return sorted(ids, key=lambda s: (rank(s), s))


def attach_variables(df: pd.DataFrame, participants: pd.DataFrame,
                     sessions: pd.DataFrame | None, columns) -> pd.DataFrame:
    """Attach participant columns; session-level values from ``sessions`` override them.

    A column present in ``sessions`` (e.g. ``hdrs`` per session) is taken per
    (participant_id, session_id) where available, and from participants otherwise.
    """
    columns = list(dict.fromkeys(c for c in columns if c != "participant_id"))
    from_part = [c for c in columns if c in participants.columns]
    out = merge_participants(df, participants, from_part)
    if sessions is not None and len(sessions):
        ses_cols = [c for c in columns if c in sessions.columns and c != "session_id"]
        if ses_cols:
            s = sessions[["participant_id", "session_id"] + ses_cols].copy()
            s["session_id"] = s["session_id"].fillna("").astype(str)
            s = s.drop_duplicates(["participant_id", "session_id"])
            s = s.rename(columns={c: f"__ses_{c}" for c in ses_cols})
            out = out.merge(s, on=["participant_id", "session_id"], how="left")
            for c in ses_cols:
                sc = pd.to_numeric(out.pop(f"__ses_{c}"), errors="coerce")
                out[c] = sc.where(sc.notna(), out[c]) if c in out.columns else sc
    missing = [c for c in columns if c not in out.columns]
    if missing:
        raise ValueError(f"variable(s) {missing} not found in participants or sessions")
    return out


def subset_group(df: pd.DataFrame, group, group_column: str = "group") -> pd.DataFrame:
    """Rows whose ``group_column`` equals ``group`` (None: all rows)."""
    if group is None:
        return df
    if group_column not in df.columns:
        raise ValueError(f"group={group!r} needs a {group_column!r} column in participants")
    return df[df[group_column] == group]


def fisher_ci(r: float, n_eff: float, *, se_scale: float = 1.0, confidence: float = 0.95):
    """Fisher-z confidence interval of a correlation; ``n_eff - 3`` is the z variance
    denominator (``se = se_scale / sqrt(n_eff - 3)``)."""
    from scipy import stats
    if not np.isfinite(r) or n_eff <= 3:
        return (np.nan, np.nan)
    z = np.arctanh(np.clip(r, -1 + 1e-15, 1 - 1e-15))
    se = se_scale / np.sqrt(n_eff - 3)
    q = stats.norm.ppf(0.5 + confidence / 2)
    return (float(np.tanh(z - q * se)), float(np.tanh(z + q * se)))


def full_rank_columns(X: pd.DataFrame, *, tol: float = 1e-10) -> list[str]:
    """Columns of ``X`` kept greedily in order so that the kept set has full column rank.

    Used to drop covariates that are collinear with earlier model terms (e.g. medication
    when every patient is medicated), instead of letting a pseudo-inverse split the effect.
    Rows with NaN are ignored.
    """
    A = X.dropna().to_numpy(float)
    kept: list[int] = []
    for j in range(A.shape[1]):
        cand = A[:, kept + [j]]
        if cand.shape[0] and np.linalg.matrix_rank(cand, tol=tol * max(1.0, np.abs(cand).max())) \
                == len(kept) + 1:
            kept.append(j)
    return [X.columns[j] for j in kept]

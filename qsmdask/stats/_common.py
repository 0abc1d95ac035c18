"""Shared helpers for cohort statistics: the tidy schema, validation, tables, correction.

All public statistics functions in :mod:`qsmdask.stats` return a tidy
:class:`pandas.DataFrame` whose first columns are :data:`TIDY_COLUMNS`
(see ``docs/architecture.md``, "Group tables"). Some families add columns after
those (for example ``term`` for regression coefficients, or ``variable`` for
correlations); the common columns always keep their meaning:

``test``            name of the analysis family (``"group_wilcoxon"``, ...)
``measure``         modality of the ROI value (``"chi"``, ``"fa"``, ...)
``roi``             ROI name; ``hemisphere`` ``"L"``, ``"R"`` or ``"B"``
``session_id``      session analysed (``""`` when the dataset has no sessions,
                    ``"*"`` when the analysis spans sessions)
``n``               observations used (``n1``/``n2`` per group, NaN if not applicable)
``statistic``       the test statistic (U, W, t, r, ...); ``dof`` its degrees of freedom
                    (NaN where not applicable)
``p``               two-sided p value; ``p_corrected`` adjusted within the correction
                    family, ``correction`` the method
``method``          the exact routine that produced the numbers
``effect_size``     with ``effect_size_name``, and its 95 % CI ``ci_low``, ``ci_high``
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
from statsmodels.stats.multitest import multipletests

__all__ = ["TIDY_COLUMNS", "CORRECTIONS", "adjust_pvalues", "apply_correction", "tidy_frame",
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
    """Fill ``p_corrected`` and ``correction`` of ``df`` within families given by columns ``family``.

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

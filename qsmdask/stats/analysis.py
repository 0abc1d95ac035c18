"""Orchestration: run every analysis of a :class:`GroupDesign` that the data allow."""

from __future__ import annotations

import pandas as pd

from .design import GroupDesign
from .group import group_wilcoxon

__all__ = ["run_group_analysis"]


def _sessions_present(roi_table: pd.DataFrame) -> list[str]:
    if "session_id" not in roi_table.columns:
        return [""]
    return sorted(roi_table["session_id"].fillna("").astype(str).unique())


def run_group_analysis(roi_table: pd.DataFrame, participants: pd.DataFrame,
                       sessions: pd.DataFrame | None = None, *,
                       design: GroupDesign = GroupDesign()) -> dict[str, pd.DataFrame]:
    """Run the analyses of ``design`` that apply to the data.

    Parameters
    ----------
    roi_table : DataFrame
        ROI table (all subject-sessions).
    participants : DataFrame
        participants.tsv.
    sessions : DataFrame or None
        sessions.tsv rows (participant_id, session_id, hdrs, acq_time), or None.
    design : GroupDesign
        Which analyses and options.

    Returns
    -------
    dict[str, DataFrame]
        One tidy table per analysis run, keyed by the test name, plus ``"skipped"``
        (columns ``test, reason``) listing requested analyses that did not apply.
    """
    if not isinstance(design, GroupDesign):
        raise ValueError("design must be a GroupDesign")
    out: dict[str, pd.DataFrame] = {}
    skipped = []
    common = dict(value=design.value, level=design.level, measures=design.measures,
                  atlas=design.atlas)
    for test in design.tests:
        if test == "group_wilcoxon":
            if "group" not in participants.columns:
                skipped.append((test, "participants has no group column"))
                continue
            out[test] = group_wilcoxon(roi_table, participants, correction=design.correction,
                                       groups=design.groups, ci_method=design.ci_method,
                                       n_boot=design.n_boot, seed=design.seed, **common)
        else:
            skipped.append((test, "not available in this version"))
    out["skipped"] = pd.DataFrame(skipped, columns=["test", "reason"])
    return out

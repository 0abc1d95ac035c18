"""Orchestration: run every analysis of a :class:`GroupDesign` that the data allow."""

from __future__ import annotations

import logging

import pandas as pd

from ._common import encode_columns, long_table
from .combat import combat_roi_table
from .correlation import clinical_correlation, partial_correlation, sex_stratified_correlation
from .design import GroupDesign
from .diagnostics import screen_covariates
from .group import group_wilcoxon
from .hemisphere import hemisphere_wilcoxon
from .longitudinal import mixed_model, paired_ttest
from .mediation import mediation
from .regression import group_ols, sex_interaction

__all__ = ["run_group_analysis"]

log = logging.getLogger("qsmdask.stats")


def _has(df, col):
    return df is not None and col in df.columns and df[col].notna().any()


def run_group_analysis(roi_table: pd.DataFrame, participants: pd.DataFrame,
                       sessions: pd.DataFrame | None = None, *,
                       design: GroupDesign = GroupDesign()) -> dict[str, pd.DataFrame]:
    """Run the analyses of ``design`` that apply to the data.

    Applicability (an analysis that does not apply is listed in ``"skipped"`` with the
    reason): group comparisons need both groups; the hemisphere test needs L and R rows;
    ``paired_ttest`` and ``mixed_model`` need two or more sessions (the paired test uses the
    patients, ``design.groups[0]``, when they have two sessions, else everybody);
    correlations need the clinical variables / markers (participants or sessions columns);
    sex analyses need ``sex``; covariates missing from participants are dropped (and
    reported). With ``design.combat`` the value column is ComBat-harmonised across sites
    first (protecting age, sex and group where present); ``design.site_covariate`` adds site
    to the regression covariates instead.

    Designs (issue 14): every regression family's design is examined on the subjects it
    uses (:func:`qsmdask.stats.diagnostics.screen_covariates`: VIF, rank, per-group
    coverage, in ``"design_diagnostics"``); a covariate nearly nested in the tested effect
    (VIF > 5, or constant in one group) is left out of that family with a warning in the
    log and a ``skipped`` row, unless ``design.keep_covariates`` names it. Mediation paths,
    interaction markers and sex-stratified markers whose models would have fewer than
    ``design.min_residual_dof`` residual degrees of freedom (or strata under
    ``design.min_stratum_n`` subjects) are not run and are listed in ``skipped``.

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
        (columns ``test, reason``) and ``"design_diagnostics"`` (see
        :func:`qsmdask.stats.diagnostics.design_diagnostics`).
    """
    if not isinstance(design, GroupDesign):
        raise ValueError("design must be a GroupDesign")
    if not isinstance(roi_table, pd.DataFrame) or not isinstance(participants, pd.DataFrame):
        raise ValueError("roi_table and participants must be pandas DataFrames")
    d = design
    participants = d.label_groups(participants)
    if d.rois is not None:
        roi_table = roi_table[roi_table["roi"].isin(d.rois)]
    if d.hemispheres is not None:
        roi_table = roi_table[roi_table["hemisphere"].isin(d.hemispheres)]
    skipped: list[tuple[str, str]] = []
    sel = dict(value=d.value, level=d.level, measures=d.measures, atlas=d.atlas)
    long = long_table(roi_table, **sel)
    n_sessions = long["session_id"].nunique()
    n_sites = participants["site"].nunique() if _has(participants, "site") else 0

    covs = [c for c in d.covariates if _has(participants, c)]
    if len(covs) < len(d.covariates):
        skipped.append(("covariates", "missing from participants: "
                        + ", ".join(c for c in d.covariates if c not in covs)))
    if d.site_covariate:
        if n_sites >= 2:
            covs.append("site")
        else:
            skipped.append(("site_covariate", "fewer than 2 sites"))
    if d.combat:
        if n_sites >= 2:
            protect = [c for c in ("age", "sex", "group") if _has(participants, c)]
            roi_table = combat_roi_table(roi_table, participants, value=d.value,
                                         protect=protect)
        else:
            skipped.append(("combat", "fewer than 2 sites"))

    has_groups = _has(participants, "group") and all(
        (participants["group"] == g).any() for g in d.groups)
    variables = [v for v in d.clinical_variables if _has(participants, v) or _has(sessions, v)]
    markers = [m for m in d.markers if _has(participants, m) or _has(sessions, m)]
    has_sex = _has(participants, "sex")
    clin_group = d.clinical_group if _has(participants, "group") else None
    corr = dict(correction=d.correction, **sel)

    # -- design diagnostics and nested covariates ------------------------------------------
    ids = set(long["participant_id"])
    subj = participants[participants["participant_id"].isin(ids)].reset_index(drop=True)
    diagnostics = []

    def screen(model, frame, tested, group_column=None):
        kept, dropped, diag = screen_covariates(frame, model=model, tested=tested,
                                                covariates=covs, group_column=group_column,
                                                keep=d.keep_covariates)
        diagnostics.append(diag)
        for _, why in dropped:
            log.warning(why)
            skipped.append((model, why))
        return kept

    covs_group = covs
    if has_groups and any(t in d.tests for t in ("group_ols", "mixed_model")):
        gterm = f"group[{d.groups[0]}]"
        gframe = subj[subj["group"].isin(d.groups)].copy()
        gframe[gterm] = (gframe["group"] == d.groups[0]).astype(float)
        covs_group = screen("group_ols, mixed_model", gframe, gterm, "group")
    cframe = subj if clin_group is None else subj[subj["group"] == clin_group]
    covs_clin = list(covs)
    tested_clin = list(dict.fromkeys(
        [m for m in markers if m in cframe.columns]
        + [p[0] for p in d.mediation_paths if p[0] in cframe.columns]))
    if any(t in d.tests for t in ("partial_correlation", "sex_interaction", "mediation")):
        for x in tested_clin:
            frame = cframe.assign(**{x: pd.to_numeric(cframe[x], errors="coerce")})
            kept = screen(f"{x} models (partial_correlation, sex_interaction, mediation)",
                          frame, x)
            covs_clin = [c for c in covs_clin if c in kept]

    def n_with(frame, variables):
        ok = pd.Series(True, index=frame.index)
        for v in variables:
            if v in frame.columns and frame[v].notna().any():
                ok &= frame[v].notna()
            elif _has(sessions, v):
                have = set(sessions.loc[sessions[v].notna(), "participant_id"])
                ok &= frame["participant_id"].isin(have)
            else:
                ok &= False
        return ok

    def n_params(frame, covariates):
        return encode_columns(frame, list(covariates)).shape[1] if len(frame) else 0

    out: dict[str, pd.DataFrame] = {}
    for test in d.tests:
        why = None
        if test in ("group_wilcoxon", "group_ols", "mixed_model") and not has_groups:
            why = f"needs both groups {d.groups} in participants.group"
        elif test in ("paired_ttest", "mixed_model") and n_sessions < 2:
            why = "needs two or more sessions"
        elif test == "hemisphere_wilcoxon" and not {"L", "R"} <= set(long["hemisphere"]):
            why = "needs L and R hemisphere rows"
        elif test == "clinical_correlation" and not variables:
            why = "no clinical variables present"
        elif test in ("partial_correlation", "sex_interaction", "sex_stratified_correlation") \
                and not markers:
            why = "no inflammation markers present"
        elif test in ("sex_interaction", "sex_stratified_correlation") and not has_sex:
            why = "needs participants.sex"
        if why:
            skipped.append((test, why))
            continue
        if test == "group_wilcoxon":
            res = group_wilcoxon(roi_table, participants, groups=d.groups,
                                 ci_method=d.ci_method, n_boot=d.n_boot, seed=d.seed, **corr)
        elif test == "group_ols":
            res = group_ols(roi_table, participants, covariates=covs_group, groups=d.groups, **corr)
        elif test == "hemisphere_wilcoxon":
            res = hemisphere_wilcoxon(roi_table, participants, n_boot=d.n_boot, seed=d.seed,
                                      **corr)
        elif test == "paired_ttest":
            grp = d.groups[0] if has_groups else None
            res = paired_ttest(roi_table, participants, sessions, session_order=d.session_order,
                               group=grp, **corr)
            if grp is not None and res["p"].notna().sum() == 0:
                res = paired_ttest(roi_table, participants, sessions,
                                   session_order=d.session_order, group=None, **corr)
        elif test == "mixed_model":
            res = mixed_model(roi_table, participants, sessions, covariates=covs_group,
                              session_order=d.session_order, groups=d.groups, **corr)
        elif test == "clinical_correlation":
            res = clinical_correlation(roi_table, participants, sessions, variables=variables,
                                       group=clin_group, **corr)
        elif test == "partial_correlation":
            res = partial_correlation(roi_table, participants, sessions, markers=markers,
                                      covariates=covs_clin, group=clin_group, **corr)
        elif test == "sex_interaction":
            icovs = [c for c in covs_clin if c != "sex"]
            ok_markers = []
            for m in markers:
                sel_ = n_with(cframe, [m, "sex", *icovs])
                n = int(sel_.sum())
                dof = n - 4 - n_params(cframe[sel_], icovs)
                if dof < d.min_residual_dof:
                    skipped.append((test, f"{m}: not interpretable, {dof} residual degrees of "
                                          f"freedom (n = {n}; needs >= {d.min_residual_dof})"))
                else:
                    ok_markers.append(m)
            if not ok_markers:
                continue
            res = sex_interaction(roi_table, participants, markers=ok_markers,
                                  covariates=icovs, group=clin_group, **corr)
        elif test == "sex_stratified_correlation":
            ok_markers = []
            for m in markers:
                sel_ = n_with(cframe, [m, "sex"])
                sexes = cframe.loc[sel_, "sex"].astype(str).str.upper()
                counts = {sx: int((sexes == sx).sum()) for sx in ("F", "M")}
                small = min(counts.values())
                if small < d.min_stratum_n or small - 2 < d.min_residual_dof:
                    skipped.append((test, f"{m}: not interpretable, strata F {counts['F']}, "
                                          f"M {counts['M']} subjects (needs >= {d.min_stratum_n} "
                                          f"per stratum and >= {d.min_residual_dof} residual "
                                          "degrees of freedom)"))
                else:
                    ok_markers.append(m)
            if not ok_markers:
                continue
            res = sex_stratified_correlation(roi_table, participants, sessions,
                                             markers=ok_markers, group=clin_group, **corr)
        elif test == "mediation":
            paths = [p for p in d.mediation_paths
                     if all(_has(participants, v) or _has(sessions, v) for v in p)]
            if not paths:
                skipped.append((test, "no mediation path with both variables present"))
                continue
            ok_paths = []
            for p in paths:
                sel_ = n_with(cframe, [*p, *covs_clin])
                n = int(sel_.sum())
                dof = n - 3 - n_params(cframe[sel_], covs_clin)
                if dof < d.min_residual_dof:
                    skipped.append((test, f"{p[0]} -> ROI -> {p[1]}: not interpretable, {dof} "
                                          f"residual degrees of freedom (n = {n}; needs >= "
                                          f"{d.min_residual_dof})"))
                else:
                    ok_paths.append(p)
            if not ok_paths:
                continue
            res = mediation(roi_table, participants, sessions, paths=ok_paths,
                            covariates=covs_clin, group=clin_group, n_boot=d.n_boot,
                            seed=d.seed, **corr)
        else:  # pragma: no cover - GroupDesign validates test names
            raise ValueError(f"unknown test {test!r}")
        out[test] = res
    out["skipped"] = pd.DataFrame(skipped, columns=["test", "reason"])
    out["design_diagnostics"] = (pd.concat(diagnostics, ignore_index=True) if diagnostics
                                 else pd.DataFrame(columns=["model", "term", "role", "covariate",
                                                            "vif", "rank", "n_columns", "n",
                                                            "constant_in_group", "coverage",
                                                            "left_out"]))
    return out

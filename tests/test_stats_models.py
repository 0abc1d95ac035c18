"""Mediation (vs pingouin), ComBat (vs neuroCombat), power, and simulated-cohort checks."""

import numpy as np
import pandas as pd
import pingouin as pg
import pytest
from scipy import stats
from statsmodels.stats.power import TTestIndPower

from qsmdask.stats import (GroupDesign, combat, combat_roi_table, group_ols, group_wilcoxon,
                           mediation, mediation_effects, power_table, power_wilcoxon,
                           run_group_analysis, sample_size_for_power, simulate_roi_cohort)


# ---------------------------------------------------------------- mediation
def test_mediation_point_estimates_match_pingouin():
    rng = np.random.default_rng(4)
    n = 80
    d = pd.DataFrame({"x": rng.normal(size=n), "c1": rng.normal(size=n),
                      "c2": rng.integers(0, 2, n).astype(float)})
    d["m"] = 0.8 * d.x + 0.2 * d.c1 + rng.normal(size=n)
    d["y"] = 0.6 * d.m + 0.1 * d.x - 0.3 * d.c2 + rng.normal(size=n)
    eff = mediation_effects(d.x, d.m, d.y, d[["c1", "c2"]].to_numpy(), n_boot=2000, seed=1)
    ref = pg.mediation_analysis(data=d, x="x", m="m", y="y", covar=["c1", "c2"], n_boot=500,
                                seed=0).set_index("path")
    assert eff["a"] == pytest.approx(ref.loc["m ~ X", "coef"], rel=1e-8)
    assert eff["total"] == pytest.approx(ref.loc["Total", "coef"], rel=1e-8)
    assert eff["direct"] == pytest.approx(ref.loc["Direct", "coef"], rel=1e-8)
    assert eff["indirect"] == pytest.approx(ref.loc["Indirect", "coef"], rel=1e-8)
    for mine, path in (("a_p", "m ~ X"), ("total_p", "Total"), ("direct_p", "Direct")):
        assert eff[mine] == pytest.approx(ref.loc[path, "pval"], rel=1e-8)
    # total = direct + indirect for OLS mediation with identical covariates
    assert eff["total"] == pytest.approx(eff["direct"] + eff["indirect"], rel=1e-10)
    lo, hi = eff["indirect_ci"]
    assert 0 < lo < eff["indirect"] < hi
    assert eff["indirect_se"] == pytest.approx(ref.loc["Indirect", "se"], rel=0.15)
    bc = mediation_effects(d.x, d.m, d.y, d[["c1", "c2"]].to_numpy(), n_boot=2000, seed=1,
                           ci_method="bias_corrected")
    assert bc["indirect"] == eff["indirect"] and bc["indirect_ci"] != eff["indirect_ci"]
    with pytest.raises(ValueError, match="ci_method"):
        mediation_effects(d.x, d.m, d.y, ci_method="bca")


def test_mediation_on_roi_table_finds_planted_path():
    # crp -> putamen chi -> hdrs with no direct path (hdrs depends on crp only through chi)
    roi, part, _ = simulate_roi_cohort(n_patients=60, n_controls=5, rois={"putamen": 0.05},
                                       hemispheres=("B",), marker_effect_ppm=0.01,
                                       symptom_effect=2.0, seed=2)
    res = mediation(roi, part, paths=[("crp", "hdrs"), ("il6", "hdrs")], covariates=("age",),
                    group="patient", n_boot=1000)
    assert len(res) == 2 and (res.n == 60).all()
    crp = res[res.x == "crp"].iloc[0]
    assert crp.ci_low > 0 and crp.a > 0 and crp.b > 0 and crp.p < 0.01
    assert abs(crp.direct) < crp.effect_size / 3
    il6 = res[res.x == "il6"].iloc[0]
    assert il6.ci_low < 0 < il6.ci_high
    np.testing.assert_allclose(res.total, res.direct + res.effect_size, rtol=1e-10)


# ---------------------------------------------------------------- ComBat
@pytest.fixture(scope="module")
def site_data():
    rng = np.random.default_rng(0)
    n, g = 72, 10
    site = np.repeat(["s1", "s2", "s3"], 24)
    age = rng.integers(20, 70, n).astype(float)  # integers: neuroCombat casts ages to float32
    sex = rng.choice(["M", "F"], n)
    grp = rng.choice(["patient", "control"], n)
    k = np.repeat([0, 1, 2], 24)
    y = (rng.normal(size=(n, g)) * np.array([1.0, 2.0, 0.5])[k][:, None]
         + np.array([0.0, 1.5, -1.0])[k][:, None] + 0.02 * age[:, None]
         + 0.8 * (grp == "patient")[:, None])
    cov = pd.DataFrame({"site": site, "age": age, "sex": sex, "group": grp})
    return y, cov


@pytest.mark.parametrize("eb,mean_only", [(True, False), (False, False), (True, True)])
def test_combat_matches_neurocombat(site_data, eb, mean_only):
    neuro = pytest.importorskip("neuroCombat")
    y, cov = site_data
    ref = neuro.neuroCombat(y.T.copy(), cov, "site", categorical_cols=["sex", "group"],
                            continuous_cols=["age"], eb=eb, mean_only=mean_only)["data"].T
    mine = combat(y, cov.site, cov, categorical=["sex", "group"], continuous=["age"], eb=eb,
                  mean_only=mean_only)
    np.testing.assert_allclose(mine, ref, rtol=0, atol=1e-9)
    assert not np.shares_memory(mine, y)


def test_combat_validates(site_data):
    y, cov = site_data
    with pytest.raises(ValueError, match="at least 2 sites"):
        combat(y, np.repeat("s", len(y)))
    with pytest.raises(ValueError, match="confounded"):
        combat(y, cov.site, cov.assign(dx=cov.site), categorical=["dx"])
    with pytest.raises(ValueError, match="complete"):
        combat(np.where(np.eye(*y.shape) > 0, np.nan, y), cov.site)


def test_combat_removes_site_offsets_and_keeps_group_effect():
    roi, part, _ = simulate_roi_cohort(n_patients=45, n_controls=45, n_sites=3,
                                       site_offset_ppm=[0.0, 0.03, -0.03],
                                       site_scale=[1.0, 1.5, 0.7],
                                       group_effect_ppm={"putamen": 0.02}, seed=5)
    harm = combat_roi_table(roi, part)
    assert list(harm.columns) == list(roi.columns) and len(harm) == len(roi)
    pd.testing.assert_frame_equal(harm.drop(columns="mean_ppm"), roi.drop(columns="mean_ppm"))

    def site_spread(t):
        m = t.merge(part).groupby(["roi", "hemisphere", "site"]).mean_ppm.mean()
        return m.groupby(level=[0, 1]).agg(lambda v: v.max() - v.min()).max()

    assert site_spread(roi) > 0.04
    assert site_spread(harm) < 0.006
    ols = group_ols(harm, part, covariates=("age", "sex"))
    put = ols[ols.roi == "putamen"]
    np.testing.assert_allclose(put.effect_size, 0.02, atol=0.006)
    assert (put.p_corrected < 0.05).all()
    other = ols[ols.roi != "putamen"]
    assert (other.effect_size.abs() < 0.008).all()
    # site as covariate instead of ComBat finds the same effect
    cov = group_ols(roi, part, covariates=("age", "sex"), site_covariate=True)
    np.testing.assert_allclose(cov[cov.roi == "putamen"].effect_size, 0.02, atol=0.006)


# ---------------------------------------------------------------- power
def test_power_wilcoxon_null_and_against_t_approximation():
    null = power_wilcoxon(15, 0.0, 0.01, n_sim=4000, seed=1)
    assert abs(null["power"] - 0.05) < 3 * np.sqrt(0.05 * 0.95 / 4000) + 0.005
    pw = power_wilcoxon(20, 0.01, 0.01, n_sim=4000, seed=2)
    # Wilcoxon power ~ t-test power at n * 3/pi (asymptotic relative efficiency)
    approx = TTestIndPower().power(1.0, nobs1=20 * 3 / np.pi, alpha=0.05)
    assert pw["power"] == pytest.approx(approx, abs=0.04)
    bonf = power_wilcoxon(20, 0.01, 0.01, n_rois=10, n_sim=4000, seed=2)
    assert bonf["alpha_per_roi"] == 0.005 and bonf["power"] < pw["power"]
    with pytest.raises(ValueError, match="sd_ppm"):
        power_wilcoxon(10, 0.01, 0.0)


def test_sample_size_for_power_is_minimal():
    res = sample_size_for_power(0.01, 0.01, power=0.8, n_sim=2000, seed=0)
    n = res["n_per_group"]
    curve = res["curve"].set_index("n_per_group")["power"]
    assert res["power"] >= 0.8 and curve.loc[n - 1] < 0.8
    assert 14 <= n <= 24  # t-test needs 17 per group at d = 1
    assert sample_size_for_power(0.001, 0.01, n_max=50, n_sim=200)["n_per_group"] is None


def test_power_table_uses_observed_effects():
    roi, part, _ = simulate_roi_cohort(n_patients=12, n_controls=12,
                                       rois={"putamen": 0.05}, group_effect_ppm=0.02, seed=8)
    tab = power_table(roi, part, n_sim=500)
    assert len(tab) == 2 and (tab.n_rois == 2).all()
    assert (tab.effect_ppm > 0.01).all() and (tab.power > 0.5).all()
    assert (tab.n_for_target >= 3).all()


# ---------------------------------------------------------------- simulated cohorts
@pytest.mark.slow
def test_bonferroni_family_wise_error_under_null():
    """200 null cohorts (10 vs 10, 8 ROI x hemisphere tests each): FWER <= 5 %."""
    _, p, _ = simulate_roi_cohort(n_patients=10, n_controls=10, seed=0)
    rng = np.random.default_rng(1000)
    n_rep, n_sub, rois, hemis = 200, 20, ["caudate", "putamen", "pallidum", "thalamus"], "LR"
    shape = (n_rep, n_sub, len(rois), len(hemis))
    ix = np.indices(shape).reshape(4, -1)
    table = pd.DataFrame({
        "participant_id": p.participant_id.to_numpy()[ix[1]],
        # each repeat is its own session, hence its own correction family
        "session_id": np.char.add("rep", ix[0].astype(str)),
        "roi": np.array(rois)[ix[2]], "hemisphere": np.array(list(hemis))[ix[3]],
        "level": "group", "measure": "chi",
        "mean_ppm": rng.normal(0.05, 0.01, size=shape).ravel()})
    res = group_wilcoxon(table, p, ci_method="analytic")
    assert len(res) == 200 * 8
    hits = int(res.groupby("session_id").p_corrected.min().lt(0.05).sum())
    lo = stats.binomtest(hits, 200).proportion_ci(0.95).low
    assert lo <= 0.05, f"{hits}/200 false positives"
    print(f"Bonferroni FWER {hits}/200")
    # uncorrected, the family-wise error would be far above 5 %
    raw = int(res.groupby("session_id").p.min().lt(0.05).sum())
    assert raw > hits and raw / 200 > 0.15


def test_run_group_analysis_full_design():
    roi, part, ses = simulate_roi_cohort(n_patients=32, n_controls=12,
                                         rois={"putamen": 0.05, "caudate": 0.06},
                                         sessions=("ses-pre", "ses-post"), n_sites=2,
                                         site_offset_ppm=[0.0, 0.01],
                                         group_effect_ppm=0.02, seed=9)
    design = GroupDesign(combat=True, n_boot=200, mediation_paths=[["crp", "hdrs"]])
    before = (roi.copy(), part.copy(), ses.copy())
    out = run_group_analysis(roi, part, ses, design=design)
    for a, b in zip(before, (roi, part, ses)):  # inputs are not modified
        pd.testing.assert_frame_equal(a, b)
    assert set(out) == set(design.tests) | {"skipped", "design_diagnostics"}
    # medication: 14/32 patients, 0/12 controls -> constant in the controls, so it is left
    # out of the group models (and only of them), with the reason listed
    sk = out["skipped"]
    assert list(sk.test) == ["group_ols, mixed_model"], sk
    assert "'medication' left out" in sk.reason.iloc[0] and "control" in sk.reason.iloc[0]
    assert "medication" not in out["group_ols"].method.iloc[0]
    diag = out["design_diagnostics"]
    assert {"vif", "rank", "coverage", "left_out"} <= set(diag.columns)
    med = diag[(diag.covariate == "medication") & diag.model.str.startswith("group_ols")]
    assert med.left_out.all() and (med.constant_in_group == "control").all()
    other = diag[(diag.covariate == "medication") & ~diag.model.str.startswith("group_ols")]
    assert len(other) and not other.left_out.any()  # within patients it is not nested
    for name, df in out.items():
        if name not in ("skipped", "design_diagnostics"):
            assert len(df) > 0 and df["test"].eq(name).all(), name
    gw = out["group_wilcoxon"]
    assert (gw.effect_size > 0).all()
    # one session, no markers, no sex: the inapplicable analyses are skipped with reasons
    one = run_group_analysis(roi[roi.session_id == "ses-pre"],
                             part.drop(columns=["crp", "il6", "tnfa", "il1b", "sex"]),
                             design=GroupDesign(n_boot=200))
    skipped = dict(zip(one["skipped"].test, one["skipped"].reason))
    for t in ("paired_ttest", "mixed_model", "partial_correlation", "sex_interaction",
              "sex_stratified_correlation", "mediation"):
        assert t in skipped and t not in one
    assert "covariates" in skipped and "sex" in skipped["covariates"]
    assert {"group_wilcoxon", "group_ols", "hemisphere_wilcoxon",
            "clinical_correlation"} <= set(one)


def test_uninterpretable_models_are_listed_not_run():
    """Issue 14: 14 patients give mediation and interaction models < 10 residual dof and
    sex strata < 10 subjects: they are not run (never reported as findings), but listed."""
    roi, part, ses = simulate_roi_cohort(n_patients=14, n_controls=12,
                                         rois={"putamen": 0.05}, sessions=("ses-pre",),
                                         group_effect_ppm=0.02, seed=9)
    design = GroupDesign(n_boot=200, mediation_paths=[["crp", "hdrs"]],
                         tests=["group_ols", "sex_interaction", "sex_stratified_correlation",
                                "mediation"])
    out = run_group_analysis(roi, part, ses, design=design)
    for t in ("sex_interaction", "sex_stratified_correlation", "mediation"):
        assert t not in out
    reasons = out["skipped"].groupby("test").reason.apply(" | ".join)
    assert "residual degrees of freedom" in reasons["mediation"]
    assert "residual degrees of freedom" in reasons["sex_interaction"]
    assert "strata" in reasons["sex_stratified_correlation"]
    # the design file can keep a nested covariate on purpose
    kept = run_group_analysis(roi, part, ses, design=GroupDesign(
        tests=["group_ols"], keep_covariates=["medication"]))
    assert "medication" in kept["group_ols"].method.iloc[0]
    assert kept["skipped"].empty
    dropped = run_group_analysis(roi, part, ses, design=GroupDesign(tests=["group_ols"]))
    assert "medication" not in dropped["group_ols"].method.iloc[0]


def test_modality_agnostic_measures_are_analysed_separately():
    chi, part, _ = simulate_roi_cohort(n_patients=12, n_controls=12, rois={"putamen": 0.05},
                                       group_effect_ppm=0.02, seed=21)
    fa, _, _ = simulate_roi_cohort(n_patients=12, n_controls=12, rois={"putamen": 0.45},
                                   sd_ppm=0.03, measure="fa", seed=22)
    both = pd.concat([chi, fa], ignore_index=True)
    gw = group_wilcoxon(both, part, ci_method="analytic")
    assert sorted(gw.measure.unique()) == ["chi", "fa"] and len(gw) == 4
    # Bonferroni family is per measure: 2 ROI x hemisphere rows each
    np.testing.assert_allclose(gw.p_corrected, np.minimum(2 * gw.p, 1), rtol=1e-12)
    med = mediation(both, part, paths=[("crp", "hdrs")], covariates=(), n_boot=200)
    assert sorted(med.measure.unique()) == ["chi", "fa"]
    harm = combat_roi_table(both.merge(part[["participant_id"]]),
                            part.assign(site=np.where(np.arange(24) % 2, "a", "b")))
    assert len(harm.attrs["combat"]["blocks"]) == 2

"""Hemisphere, longitudinal, correlation and regression families against scipy,
statsmodels and pingouin on the same inputs (1e-8)."""

import warnings

import numpy as np
import pingouin as pg
import pytest
import statsmodels.api as sm
import statsmodels.formula.api as smf
from scipy import stats

from qsmdask.stats import TIDY_COLUMNS
from qsmdask.stats.correlation import (clinical_correlation, correlation_plot_data,
                                       partial_correlation, regression_band,
                                       sex_stratified_correlation)
from qsmdask.stats.hemisphere import hemisphere_wilcoxon, matched_rank_biserial
from qsmdask.stats.longitudinal import mixed_model, paired_ttest
from qsmdask.stats.regression import group_ols, sex_interaction
from qsmdask.stats.simulate import simulate_roi_cohort

TOL = dict(rel=1e-8, abs=1e-12)


@pytest.fixture(scope="module")
def long_cohort():
    rois = {"caudate": 0.06, "putamen": 0.05}
    return simulate_roi_cohort(n_patients=16, n_controls=14, rois=rois,
                               sessions=("ses-pre", "ses-post"), subject_sd_ppm=0.01,
                               time_effect_ppm=0.012, hemisphere_effect_ppm=0.006,
                               group_effect_ppm=0.01, marker_effect_ppm=0.006, seed=11)


def _sel(roi, part, name, hemi, ses="ses-pre"):
    s = roi[(roi.roi == name) & (roi.hemisphere == hemi) & (roi.session_id == ses)]
    return s.merge(part, on="participant_id")


def _check_schema(df):
    assert list(df.columns[:len(TIDY_COLUMNS)]) == TIDY_COLUMNS
    assert len(df) > 0


def test_hemisphere_wilcoxon_matches_scipy_pingouin(long_cohort):
    roi, part, _ = long_cohort
    res = hemisphere_wilcoxon(roi, part, group="patient", n_boot=500)
    _check_schema(res)
    assert len(res) == 2 * 2  # 2 sessions x 2 rois
    for _, row in res.iterrows():
        s = roi[(roi.roi == row.roi) & (roi.session_id == row.session_id)].merge(part)
        s = s[s.group == "patient"].pivot(index="participant_id", columns="hemisphere",
                                          values="mean_ppm")
        ref = stats.wilcoxon(s.L, s.R)
        assert row.statistic == pytest.approx(ref.statistic, **TOL)
        assert row.p == pytest.approx(ref.pvalue, **TOL)
        pgr = pg.wilcoxon(s.L, s.R)
        assert row.effect_size == pytest.approx(pgr["RBC"].iloc[0], **TOL)
        assert row.ci_low <= row.effect_size <= row.ci_high
        assert row.n == 16
    # planted left > right effect is positive everywhere
    assert (res.mean_difference > 0).all()
    assert matched_rank_biserial(np.array([1.0, 2.0, -0.5, 0.0])) == pytest.approx((5 - 1) / 6)


def test_paired_ttest_matches_scipy_pingouin(long_cohort):
    roi, part, ses = long_cohort
    res = paired_ttest(roi, part, ses)
    _check_schema(res)
    assert set(res.session_id) == {"ses-post-ses-pre"}
    for _, row in res.iterrows():
        s = roi[(roi.roi == row.roi) & (roi.hemisphere == row.hemisphere)].merge(part)
        w = s[s.group == "patient"].pivot(index="participant_id", columns="session_id",
                                          values="mean_ppm")
        ref = stats.ttest_rel(w["ses-post"], w["ses-pre"])
        assert row.statistic == pytest.approx(ref.statistic, **TOL)
        assert row.p == pytest.approx(ref.pvalue, **TOL)
        assert row.dof == 15
        pgr = pg.ttest(w["ses-post"], w["ses-pre"], paired=True)
        assert row.p == pytest.approx(pgr["p_val"].iloc[0], **TOL)
        d = w["ses-post"] - w["ses-pre"]
        assert row.effect_size == pytest.approx(d.mean(), **TOL)
        half = stats.t.ppf(0.975, 15) * d.std(ddof=1) / 4
        assert row.ci_low == pytest.approx(d.mean() - half, **TOL)
    # explicit order reverses the sign
    rev = paired_ttest(roi, part, ses, session_order=("ses-post", "ses-pre"))
    np.testing.assert_allclose(rev.statistic, -res.statistic, rtol=1e-12)
    # one session: nothing to test
    assert len(paired_ttest(roi[roi.session_id == "ses-pre"], part)) == 0


def test_clinical_correlation_and_band(long_cohort):
    roi, part, ses = long_cohort
    res = clinical_correlation(roi, part, ses, session="ses-pre")
    _check_schema(res)
    assert len(res) == 2 * 2 * 4 * 2
    for _, row in res.sample(12, random_state=0).iterrows():
        s = _sel(roi, part, row.roi, row.hemisphere)
        s = s[s.group == "patient"]
        x = s[row.variable].to_numpy(float)
        if row.variable == "hdrs":  # session-level hdrs from sessions.tsv wins
            x = s[["participant_id"]].merge(ses[ses.session_id == "ses-pre"])["hdrs"]
            x = x.to_numpy(float)
        y = s.mean_ppm.to_numpy()
        pgr = pg.corr(x, y, method=row.correlation)
        assert row.effect_size == pytest.approx(pgr["r"].iloc[0], **TOL)
        assert row.p == pytest.approx(pgr["p_val"].iloc[0], **TOL)
        lr = stats.linregress(x, y)
        assert row.slope == pytest.approx(lr.slope, **TOL)
        if row.correlation == "pearson":
            lo, hi = pgr["CI95"].iloc[0]  # pingouin.corr rounds its CI to 2 decimals
            assert (row.ci_low, row.ci_high) == pytest.approx((lo, hi), abs=0.005 + 1e-9)
    # band against statsmodels' mean prediction interval
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 10, 25)
    y = 0.3 * x + rng.normal(0, 1, 25)
    band = regression_band(x, y, grid=[0.0, 5.0, 10.0])
    fit = sm.OLS(y, sm.add_constant(x)).fit()
    pred = fit.get_prediction(sm.add_constant(np.array([0.0, 5.0, 10.0]))).summary_frame(0.05)
    np.testing.assert_allclose(band.fit, pred["mean"], rtol=1e-10)
    np.testing.assert_allclose(band.lower, pred["mean_ci_lower"], rtol=1e-10)
    np.testing.assert_allclose(band.upper, pred["mean_ci_upper"], rtol=1e-10)
    pts, b = correlation_plot_data(roi, part, ses, roi="putamen", hemisphere="L",
                                   variable="disease_weeks", session="ses-pre")
    assert len(pts) == 16 and len(b) == 50
    assert b.attrs["slope"] == pytest.approx(stats.linregress(pts.x, pts.y).slope)


def test_partial_correlation_matches_pingouin(long_cohort):
    roi, part, ses = long_cohort
    for method in ("pearson", "spearman"):
        res = partial_correlation(roi, part, ses, covariates=("age", "sex", "medication"),
                                  method=method, session="ses-pre")
        _check_schema(res)
        for _, row in res.iterrows():
            s = _sel(roi, part, row.roi, row.hemisphere)
            s = s.assign(sexf=(s.sex == "F").astype(float))
            pgr = pg.partial_corr(s, x=row.variable, y="mean_ppm",
                                  covar=["age", "sexf", "medication"], method=method)
            assert row.effect_size == pytest.approx(pgr["r"].iloc[0], rel=1e-8, abs=1e-10)
            assert row.p == pytest.approx(pgr["p_val"].iloc[0], rel=1e-7, abs=1e-10)
            lo, hi = pgr["CI95"].iloc[0]
            assert (row.ci_low, row.ci_high) == pytest.approx((lo, hi), abs=0.005 + 1e-9)
    # the planted crp effect is found in every ROI
    crp = partial_correlation(roi, part, ses, markers=("crp",), session="ses-pre")
    assert (crp.effect_size > 0).all() and crp.effect_size.mean() > 0.25


def test_sex_stratified_correlation(long_cohort):
    roi, part, ses = long_cohort
    res = sex_stratified_correlation(roi, part, ses, markers=("il6",), session="ses-pre")
    _check_schema(res)
    assert set(res.stratum) == {"F", "M"}
    for _, row in res.iterrows():
        s = _sel(roi, part, row.roi, row.hemisphere)
        s = s[s.sex == row.stratum]
        ref = stats.pearsonr(s.il6, s.mean_ppm)
        assert row.effect_size == pytest.approx(ref.statistic, **TOL)
        assert row.p == pytest.approx(ref.pvalue, **TOL)
        assert row.n == len(s)


def test_group_ols_and_sex_interaction_match_statsmodels_formula(long_cohort):
    roi, part, _ = long_cohort
    part = part.assign(site=np.where(np.arange(len(part)) % 3 == 0, "a", "b"))
    res = group_ols(roi, part, session="ses-pre", site_covariate=True)
    _check_schema(res)
    for _, row in res.iterrows():
        s = _sel(roi, part, row.roi, row.hemisphere)
        fit = smf.ols("mean_ppm ~ C(group, Treatment('control')) + age + C(sex) + medication"
                      " + C(site)", data=s).fit()
        term = "C(group, Treatment('control'))[T.patient]"
        assert row.statistic == pytest.approx(fit.tvalues[term], **TOL)
        assert row.p == pytest.approx(fit.pvalues[term], **TOL)
        assert row.dof == fit.df_resid
        assert row.effect_size == pytest.approx(fit.params[term], **TOL)
        assert row.ci_low == pytest.approx(fit.conf_int().loc[term, 0], **TOL)
    si = sex_interaction(roi, part, markers=("crp",), session="ses-pre")
    _check_schema(si)
    for _, row in si.iterrows():
        s = _sel(roi, part, row.roi, row.hemisphere)
        s = s.assign(female=(s.sex == "F").astype(float))
        fit = smf.ols("mean_ppm ~ crp * female + age", data=s).fit()
        assert row.statistic == pytest.approx(fit.tvalues["crp:female"], **TOL)
        assert row.p == pytest.approx(fit.pvalues["crp:female"], **TOL)
        assert row.effect_size == pytest.approx(fit.params["crp:female"], **TOL)


def test_mixed_model_matches_statsmodels_formula_and_finds_time_effect(long_cohort):
    roi, part, ses = long_cohort
    res = mixed_model(roi, part, ses, covariates=("age",))
    _check_schema(res)
    terms = set(res.term)
    assert terms == {"const", "visit", "group[patient]", "visit:group[patient]", "age"}
    row = res[(res.roi == "putamen") & (res.hemisphere == "L")].set_index("term")
    s = roi[(roi.roi == "putamen") & (roi.hemisphere == "L")].merge(part)
    s = s.assign(visit=(s.session_id == "ses-post").astype(float),
                 pat=(s.group == "patient").astype(float))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = smf.mixedlm("mean_ppm ~ visit * pat + age", s, groups=s["participant_id"]).fit()
    for mine, ref in (("visit", "visit"), ("group[patient]", "pat"),
                      ("visit:group[patient]", "visit:pat"), ("age", "age")):
        assert row.loc[mine, "effect_size"] == pytest.approx(fit.params[ref], rel=1e-8)
        assert row.loc[mine, "p"] == pytest.approx(fit.pvalues[ref], rel=1e-8)
        assert row.loc[mine, "ci_low"] == pytest.approx(fit.conf_int().loc[ref, 0], rel=1e-8)
    inter = res[res.term == "visit:group[patient]"]
    # planted patient x time effect 0.012 ppm: positive everywhere, mostly significant
    assert (inter.effect_size > 0).all() and (inter.p < 0.05).sum() >= 3
    assert inter.effect_size.mean() == pytest.approx(0.012, abs=0.005)
    assert len(mixed_model(roi[roi.session_id == "ses-pre"], part)) == 0


def test_collinear_covariate_is_dropped_not_split(long_cohort):
    roi, part, ses = long_cohort
    part = part.assign(medication=(part.group == "patient").astype(int))  # = group
    res = group_ols(roi, part, session="ses-pre", covariates=("age", "medication"))
    ref = group_ols(roi, part, session="ses-pre", covariates=("age",))
    np.testing.assert_allclose(res.effect_size, ref.effect_size, rtol=1e-10)
    assert not res.method.str.contains("medication").any()
    mm = mixed_model(roi, part, ses, covariates=("age", "medication"))
    assert "medication" not in set(mm.term)

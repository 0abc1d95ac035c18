"""Group comparison (Mann-Whitney U), correction, design parsing and orchestration."""

import json

import numpy as np
import pandas as pd
import pingouin as pg
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from qsmdask.stats import (TIDY_COLUMNS, GroupDesign, adjust_pvalues, group_wilcoxon,
                           rank_biserial, rank_biserial_ci, run_group_analysis)
from qsmdask.stats.simulate import simulate_roi_cohort


@pytest.fixture(scope="module")
def cohort():
    return simulate_roi_cohort(n_patients=15, n_controls=17, group_effect_ppm={"putamen": 0.02},
                               seed=3)


def test_wilcoxon_matches_scipy_and_pingouin(cohort):
    roi, part, _ = cohort
    res = group_wilcoxon(roi, part, ci_method="analytic")
    assert list(res.columns[:len(TIDY_COLUMNS)]) == TIDY_COLUMNS
    assert len(res) == 4 * 2
    for _, row in res.iterrows():
        sel = roi[(roi.roi == row.roi) & (roi.hemisphere == row.hemisphere)].merge(part)
        x = sel.loc[sel.group == "patient", "mean_ppm"].to_numpy()
        y = sel.loc[sel.group == "control", "mean_ppm"].to_numpy()
        ref = stats.mannwhitneyu(x, y, alternative="two-sided")
        assert row.statistic == pytest.approx(ref.statistic, abs=1e-12)
        assert row.p == pytest.approx(ref.pvalue, rel=1e-12)
        pgr = pg.mwu(x, y, alternative="two-sided")
        assert row.effect_size == pytest.approx(pgr["RBC"].iloc[0], abs=1e-8)
        assert row.p == pytest.approx(pgr["p_val"].iloc[0], rel=1e-8)
        assert (row.n1, row.n2, row.n) == (15, 17, 32)
        assert np.isnan(row.dof)
        assert row.ci_low <= row.effect_size <= row.ci_high
    bonf = np.minimum(res.p.to_numpy() * len(res), 1.0)
    np.testing.assert_allclose(res.p_corrected, bonf, rtol=1e-12)
    put = res[res.roi == "putamen"]
    assert (put.p_corrected < 0.05).all() and (put.effect_size > 0.5).all()


@pytest.mark.parametrize("method", ["bonferroni", "holm", "fdr_bh"])
def test_adjust_pvalues_matches_statsmodels_and_skips_nan(method):
    p = np.array([0.001, 0.02, np.nan, 0.04, 0.3])
    out = adjust_pvalues(p, correction=method)
    ref = multipletests(p[[0, 1, 3, 4]], method=method)[1]
    np.testing.assert_allclose(out[[0, 1, 3, 4]], ref, rtol=1e-12)
    assert np.isnan(out[2])


def test_correction_options_and_family_per_session(cohort):
    roi, part, _ = cohort
    two = pd.concat([roi.assign(session_id="ses-pre"), roi.assign(session_id="ses-post")])
    res = group_wilcoxon(two, part, correction="holm", ci_method="analytic")
    assert sorted(res.session_id.unique()) == ["ses-post", "ses-pre"]
    for _, fam in res.groupby("session_id"):
        np.testing.assert_allclose(fam.p_corrected,
                                   multipletests(fam.p, method="holm")[1], rtol=1e-12)
    only = group_wilcoxon(two, part, session="ses-pre", ci_method="analytic")
    assert set(only.session_id) == {"ses-pre"}
    with pytest.raises(ValueError, match="correction"):
        group_wilcoxon(roi, part, correction="sidak")
    with pytest.raises(ValueError, match="groups"):
        group_wilcoxon(roi, part, groups=("patient", "patient"))
    with pytest.raises(ValueError, match="value"):
        group_wilcoxon(roi, part, value="nope")


def test_rank_biserial_analytic_and_bootstrap_ci():
    rng = np.random.default_rng(0)
    x, y = rng.normal(0.5, 1, 40), rng.normal(0, 1, 40)
    r = rank_biserial(x, y)
    u = stats.mannwhitneyu(x, y).statistic
    assert r == pytest.approx(2 * u / 1600 - 1)
    lo_a, hi_a = rank_biserial_ci(x, y, ci_method="analytic")
    lo_b, hi_b = rank_biserial_ci(x, y, n_boot=4000, seed=1)
    assert lo_a < r < hi_a and lo_b < r < hi_b
    # both intervals have similar width (~0.5 for n=40+40 near r=0.3)
    assert abs((hi_a - lo_a) - (hi_b - lo_b)) < 0.1
    assert rank_biserial_ci(x, y, seed=5) == rank_biserial_ci(x, y, seed=5)
    # complete separation: r = 1 and the interval stays inside [-1, 1]
    lo, hi = rank_biserial_ci(x + 100, y, ci_method="analytic")
    assert rank_biserial(x + 100, y) == 1.0 and hi <= 1.0 and lo > 0.8


def test_missing_group_members_give_nan_p(cohort):
    roi, part, _ = cohort
    one_patient = part[(part.group == "control") | (part.participant_id == "sub-001")]
    res = group_wilcoxon(roi, one_patient, ci_method="analytic")
    assert res.p.isna().all() and res.p_corrected.isna().all()
    assert (res.n1 == 1).all()


def test_design_from_json_and_yaml(tmp_path):
    d = {"tests": ["group_wilcoxon"], "correction": "fdr_bh", "covariates": ["age"],
         "mediation_paths": [["crp", "hdrs"]], "combat": True, "alpha": 0.01}
    (tmp_path / "d.json").write_text(json.dumps(d))
    (tmp_path / "d.yaml").write_text(
        "tests: [group_wilcoxon]\ncorrection: fdr_bh\ncovariates: [age]\n"
        "mediation_paths:\n  - [crp, hdrs]\ncombat: true\nalpha: 0.01\n")
    a = GroupDesign.from_file(tmp_path / "d.json")
    b = GroupDesign.from_file(tmp_path / "d.yaml")
    assert a == b
    assert a.mediation_paths == (("crp", "hdrs"),) and a.covariates == ("age",)
    assert GroupDesign.from_dict(a.to_dict()) == a
    (tmp_path / "bad.yaml").write_text("correction: !!python/object/apply:os.system [ls]\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        GroupDesign.from_file(tmp_path / "bad.yaml")
    (tmp_path / "u.json").write_text('{"corection": "holm"}')
    with pytest.raises(ValueError, match="corection"):
        GroupDesign.from_file(tmp_path / "u.json")
    with pytest.raises(ValueError, match="correction"):
        GroupDesign(correction="sidak")
    with pytest.raises(ValueError, match="tests"):
        GroupDesign(tests=("magic",))


def test_run_group_analysis_runs_wilcoxon(cohort):
    roi, part, ses = cohort
    out = run_group_analysis(roi, part, ses, design=GroupDesign(tests=("group_wilcoxon",),
                                                                ci_method="analytic", rois=None,
                                                                hemispheres=None))
    direct = group_wilcoxon(roi, part, ci_method="analytic")
    pd.testing.assert_frame_equal(out["group_wilcoxon"], direct)
    assert "skipped" in out


def test_default_family_is_the_studys_rois_left_and_right(cohort):
    from qsmdask.stats.design import STUDY_ROIS
    roi, part, ses = cohort
    roi = pd.concat([roi, roi.assign(roi="caudate"), roi.assign(hemisphere="B")], ignore_index=True)
    out = run_group_analysis(roi, part, ses, design=GroupDesign(tests=("group_wilcoxon",),
                                                                ci_method="analytic"))
    g = out["group_wilcoxon"]
    assert set(g["roi"]) <= set(STUDY_ROIS) and "caudate" not in set(g["roi"])
    assert set(g["hemisphere"]) <= {"L", "R"}
    # Bonferroni over exactly the rows tested
    assert np.allclose(g["p_corrected"], np.minimum(g["p"] * len(g), 1.0))


def test_no_session_column_multiple_atlases_and_all_tests(cohort):
    roi, part, _ = cohort
    flat = roi.drop(columns=["session_id"])
    res = group_wilcoxon(flat, part, ci_method="analytic")
    assert set(res.session_id) == {""} and len(res) == 8
    two = pd.concat([flat, flat.assign(atlas="other")])
    both = group_wilcoxon(two, part, ci_method="analytic")
    assert len(both) == 16 and both.roi.str.contains(":").all()
    one = group_wilcoxon(two, part, atlas="other", ci_method="analytic")
    np.testing.assert_allclose(one.p, res.p, rtol=1e-12)
    assert GroupDesign(tests="all").tests == GroupDesign().tests
    assert GroupDesign.from_dict({"tests": "all"}).tests == GroupDesign().tests


def test_bootstrap_effect_sizes_without_ranking_each_resample_are_exact():
    """The O(B n) bootstrap of the rank-biserial (group) and matched-pairs rank-biserial
    (hemisphere) correlations equals ranking every resample (scipy rankdata), ties included."""
    from qsmdask.stats.group import _u1, _u1_resampled
    from qsmdask.stats.hemisphere import _matched_rank_biserial_resampled, matched_rank_biserial

    rng = np.random.default_rng(5)
    for x, y in [(rng.normal(size=37), rng.normal(size=23)),
                 (rng.integers(0, 6, 40).astype(float), rng.integers(0, 6, 31).astype(float))]:
        ix, iy = rng.integers(0, x.size, (300, x.size)), rng.integers(0, y.size, (300, y.size))
        np.testing.assert_array_equal(_u1_resampled(x, y, ix, iy, rows_per_chunk=7),
                                      _u1(x[ix], y[iy], axis=1))
    for d in [rng.normal(size=45), np.r_[rng.integers(-3, 4, 50).astype(float), 0.0, 0.0],
              np.zeros(6)]:
        idx = rng.integers(0, d.size, (300, d.size))
        with np.errstate(invalid="ignore", divide="ignore"):
            ref = matched_rank_biserial(d[idx], axis=1)
        np.testing.assert_array_equal(_matched_rank_biserial_resampled(d, idx, rows_per_chunk=11), ref)

"""ROI statistics: erosion against scipy, exact statistics on constructed volumes, helpers."""

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from qsmdask.roi import (ROI_COLUMNS, erode_labels, hemisphere_average,
                         roi_statistics, sphere_offsets)


def _ellipsoid(radius_mm, vs):
    n = np.floor(radius_mm / np.asarray(vs) + 1e-9).astype(int)
    g = np.meshgrid(*[np.arange(-k, k + 1) * v for k, v in zip(n, vs)], indexing="ij")
    return sum(x**2 for x in g) <= radius_mm**2 * (1 + 1e-9)


def test_sphere_offsets():
    assert len(sphere_offsets(1.0, (1, 1, 1))) == 6
    assert len(sphere_offsets(0.5, (1, 1, 1))) == 0
    # 1 mm radius with 0.5 mm in-plane voxels and 2 mm slices: no offsets along z
    off = sphere_offsets(1.0, (0.5, 0.5, 2.0))
    assert (off[:, 2] == 0).all() and len(off) == 12
    with pytest.raises(ValueError, match="voxel_size_mm"):
        sphere_offsets(1.0, (1, 0, 1))


@pytest.mark.parametrize("vs,r", [((1, 1, 1), 1.0), ((0.8, 0.8, 1.6), 1.7), ((1, 1, 1), 2.0)])
def test_erode_labels_matches_scipy_per_label(vs, r):
    rng = np.random.default_rng(1)
    seeds = ndimage.gaussian_filter(rng.normal(size=(30, 28, 26)), 3)
    lab = np.digitize(seeds, np.quantile(seeds, [0.2, 0.45, 0.7, 0.9])).astype(np.int32)
    before = lab.copy()
    out = erode_labels(lab, voxel_size_mm=vs, radius_mm=r)
    np.testing.assert_array_equal(lab, before)  # input untouched
    st = _ellipsoid(r, vs)
    expect = np.zeros_like(lab)
    for v in range(1, lab.max() + 1):
        expect[ndimage.binary_erosion(lab == v, structure=st, border_value=0)] = v
    np.testing.assert_array_equal(out, expect)
    assert (out > 0).sum() < (lab > 0).sum()


def _two_cubes():
    """Label 1 (left putamen) and 2 (right putamen) 8^3 cubes, label 3 a 2-voxel sliver."""
    lab = np.zeros((24, 12, 12), np.int16)
    lab[2:10, 2:10, 2:10] = 1
    lab[14:22, 2:10, 2:10] = 2
    lab[11, 5, 5:7] = 3
    rng = np.random.default_rng(0)
    vals = rng.normal(0.1, 0.02, lab.shape).astype(np.float32)
    vals[lab == 2] += 0.05
    table = pd.DataFrame({"index": [1, 2, 3, 4], "name": ["Pu_L", "Pu_R", "tiny", "absent"],
                          "roi": ["putamen", "putamen", "", "thalamus"],
                          "hemisphere": ["L", "R", "", "L"]})
    return lab, vals, table


def test_roi_statistics_exact_values():
    lab, vals, table = _two_cubes()
    df = roi_statistics(vals, lab, table, voxel_size_mm=(1, 1, 1), erode_mm=1.0,
                        min_voxels=10, atlas_name="toy")
    assert list(df.columns) == ROI_COLUMNS
    core1 = vals[3:9, 3:9, 3:9].astype(np.float64).ravel()  # 6-neighbourhood erosion of the cube
    r = df[(df.level == "label") & (df.label == 1)].iloc[0]
    assert r.n_voxels == 216 and r.atlas == "toy" and r["name"] == "Pu_L"
    assert r.mean_ppm == pytest.approx(core1.mean(), rel=1e-12)
    assert r.median_ppm == pytest.approx(np.median(core1), rel=1e-12)
    assert r.std_ppm == pytest.approx(core1.std(ddof=1), rel=1e-12)
    q = np.percentile(core1, [25, 75])
    assert r.iqr_ppm == pytest.approx(q[1] - q[0], rel=1e-12)
    # sliver erodes away, absent label has 0 voxels: rows kept with NaN statistics
    for lbl in (3, 4):
        rr = df[(df.level == "label") & (df.label == lbl)].iloc[0]
        assert rr.n_voxels == 0 and np.isnan(rr.mean_ppm)
    g = df[df.level == "group"].set_index(["roi", "hemisphere"])
    assert set(g.index) == {("putamen", "L"), ("putamen", "R"), ("putamen", "B"),
                            ("thalamus", "L"), ("thalamus", "B")}
    assert (g["label"] == -1).all()
    both = np.concatenate([core1, vals[15:21, 3:9, 3:9].astype(np.float64).ravel()])
    assert g.loc[("putamen", "B"), "n_voxels"] == 432
    assert g.loc[("putamen", "B"), "median_ppm"] == pytest.approx(np.median(both), rel=1e-12)
    assert g.loc[("putamen", "R"), "mean_ppm"] - g.loc[("putamen", "L"), "mean_ppm"] == \
        pytest.approx(0.05, abs=0.01)
    assert np.isnan(g.loc[("thalamus", "B"), "mean_ppm"])


def test_roi_statistics_anisotropic_mask_nan_and_no_erosion():
    lab, vals, table = _two_cubes()
    vals2 = vals.copy()
    vals2[5, 5, 5] = np.nan
    mask = np.ones(lab.shape, bool)
    mask[:, :, :4] = False  # cuts the cubes: erosion also works from the mask edge
    df = roi_statistics(vals2, lab, table, voxel_size_mm=(1, 1, 1), erode_mm=1.0, mask=mask)
    r = df[(df.level == "label") & (df.label == 1)].iloc[0]
    assert r.n_voxels == 6 * 6 * 4 - 1  # z 5..8 survive, one NaN voxel dropped
    # 2 mm slices: a 1 mm radius erodes in-plane only
    df2 = roi_statistics(vals, lab, table, voxel_size_mm=(1, 1, 2), erode_mm=1.0)
    assert df2[(df2.level == "label") & (df2.label == 1)].n_voxels.iloc[0] == 6 * 6 * 8
    df0 = roi_statistics(vals, lab, table, voxel_size_mm=(1, 1, 1), erode_mm=0, min_voxels=1)
    assert df0[(df0.level == "label") & (df0.label == 3)].n_voxels.iloc[0] == 2
    assert np.isfinite(df0[(df0.level == "label") & (df0.label == 3)].mean_ppm.iloc[0])


def test_roi_statistics_validation():
    lab, vals, table = _two_cubes()
    with pytest.raises(ValueError, match="labels shape"):
        roi_statistics(vals, lab[:-1], table, voxel_size_mm=(1, 1, 1))
    with pytest.raises(ValueError, match="integer dtype"):
        roi_statistics(vals, lab.astype(float), table, voxel_size_mm=(1, 1, 1))
    with pytest.raises(ValueError, match="erode_mm"):
        roi_statistics(vals, lab, table, voxel_size_mm=(1, 1, 1), erode_mm=-1)
    with pytest.raises(ValueError, match="label_table is missing"):
        roi_statistics(vals, lab, table.drop(columns="roi"), voxel_size_mm=(1, 1, 1))


def _table_for(subject, left, right, ref):
    rows = [("aal", "putamen", "L", "group", -1, "putamen", 100, left + 0.01, left, 0.01, 0.02),
            ("aal", "putamen", "R", "group", -1, "putamen", 100, right + 0.01, right, 0.01, 0.02),
            ("aal", "putamen", "B", "group", -1, "putamen", 200, 0, (left + right) / 2, 0.01, 0.02),
            ("aal", "csf", "B", "group", -1, "csf", 50, ref, ref, 0.01, 0.02)]
    df = pd.DataFrame(rows, columns=ROI_COLUMNS)
    df["participant_id"] = subject
    return df


def test_hemisphere_average():
    both = pd.concat([_table_for("sub-01", 0.06, 0.08, 0.01),
                      _table_for("sub-02", 0.10, np.nan, -0.02)], ignore_index=True)
    avg = hemisphere_average(both).set_index(["participant_id", "roi"])
    assert avg.loc[("sub-01", "putamen"), "median_ppm"] == pytest.approx(0.07)
    assert np.isnan(avg.loc[("sub-02", "putamen"), "median_ppm"])
    assert avg.loc[("sub-02", "putamen"), "n_hemispheres"] == 1
    lenient = hemisphere_average(both, require_both=False).set_index(["participant_id", "roi"])
    assert lenient.loc[("sub-02", "putamen"), "median_ppm"] == pytest.approx(0.10)
    with pytest.raises(ValueError, match="statistic"):
        hemisphere_average(both, statistic="max")


def test_smooth_gaussian_fwhm_and_mask():
    from qsmdask.roi import smooth_gaussian

    delta = np.zeros((41, 41, 21), np.float32)
    delta[20, 20, 10] = 1.0
    vs = (1.0, 1.0, 2.0)
    out = smooth_gaussian(delta, voxel_size_mm=vs, fwhm_mm=3.0)
    assert out.sum() == pytest.approx(1.0, rel=1e-4)
    sigma_mm = 3.0 / (2 * np.sqrt(2 * np.log(2)))
    for axis, v in enumerate(vs):
        prof = out.sum(axis=tuple(a for a in range(3) if a != axis))
        x = (np.arange(prof.size) - prof.size // 2) * v
        var = (prof * x**2).sum() / prof.sum()
        assert np.sqrt(var) == pytest.approx(sigma_mm, rel=0.1 if v == 2.0 else 0.02)
    # mask-aware: a constant inside the mask stays constant up to the edge
    const = np.full((30, 30, 30), 0.1, np.float32)
    mask = np.zeros(const.shape, bool)
    mask[5:25, 5:25, 5:25] = True
    sm = smooth_gaussian(const * mask, voxel_size_mm=(1, 1, 1), fwhm_mm=3.0, mask=mask)
    np.testing.assert_allclose(sm[mask], 0.1, rtol=1e-5)
    assert (sm[~mask] == 0).all()
    plain = smooth_gaussian(const * mask, voxel_size_mm=(1, 1, 1), fwhm_mm=3.0)
    assert plain[5, 15, 15] < 0.07  # without the mask the edge is dimmed
    with pytest.raises(ValueError, match="fwhm_mm"):
        smooth_gaussian(const, voxel_size_mm=(1, 1, 1), fwhm_mm=0)


def test_postmortem_iron_validation_recovers_linear_relation():
    from qsmdask.atlas import load_iron_reference
    from qsmdask.roi import postmortem_iron_validation

    ref = load_iron_reference()
    assert ref.loc[ref["region"] == "globus_pallidus", "iron_mg_per_100g"].iloc[0] == 21.30
    assert ref.loc[ref["region"] == "putamen", "iron_mg_per_100g"].iloc[0] == 13.32
    rows = []
    rng = np.random.default_rng(4)
    mapped = ref[ref["roi"].isin(["pallidum", "putamen", "caudate", "thalamus", "frontal",
                                  "temporal", "occipital", "parietal", "cerebellum"])]
    for sub, grp in (("sub-01", "control"), ("sub-02", "control"), ("sub-03", "patient")):
        for r in mapped.itertuples():
            chi = -0.02 + 0.01 * r.iron_mg_per_100g + rng.normal(0, 0.001)
            if grp == "patient":
                chi += 0.5  # must be excluded by `participants`
            rows.append(("aal", r.roi, "B", "group", -1, r.roi, 100, chi, chi, 0.01, 0.01, sub))
    table = pd.DataFrame(rows, columns=[*ROI_COLUMNS, "participant_id"])
    res = postmortem_iron_validation(table, participants=["sub-01", "sub-02"])
    assert res["n"] == 9
    assert res["slope"] == pytest.approx(0.01, rel=0.05)
    assert res["intercept"] == pytest.approx(-0.02, abs=0.005)
    assert res["r"] > 0.99 and res["p"] < 1e-6
    assert (res["table"]["n_subjects"] == 2).all()
    few = postmortem_iron_validation(table[table["roi"].isin(["putamen", "caudate"])])
    assert few["n"] == 2 and np.isnan(few["r"])

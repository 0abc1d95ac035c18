"""Cluster, TFCE and FWE inference against nilearn and against the null."""

import nibabel as nib
import numpy as np
import pytest
from nilearn.maskers import NiftiMasker
from nilearn.mass_univariate import permuted_ols
from nilearn.mass_univariate._utils import calculate_cluster_measures, calculate_tfce
from scipy import ndimage, stats

from qsmdask.perm import correlation_design, one_sample_design, permutation_test, two_group_design
from qsmdask.perm.cluster import (cluster_statistics, cluster_table, cluster_threshold_t,
                                  connectivity_structure, max_cluster_statistics)
from qsmdask.perm.tfce import tfce_values, tfce_values_bylabel


def _smooth_map(shape, seed, sigma=1.0, scale=3.0):
    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return scale * x / x.std()


def _maps(n, shape, seed, sigma=0.8):
    rng = np.random.default_rng(seed)
    return np.stack([ndimage.gaussian_filter(rng.standard_normal(shape), sigma) for _ in range(n)])


@pytest.mark.parametrize("connectivity", [6, 18, 26])
@pytest.mark.parametrize("two_sided", [True, False])
def test_tfce_matches_nilearn(connectivity, two_sided):
    shape = (14, 14, 14)
    mask = np.zeros(shape, bool)
    mask[1:13, 1:13, 1:13] = True
    x = np.where(mask, _smooth_map(shape, connectivity), 0.0)
    st = connectivity_structure(connectivity)
    ours = tfce_values(x[mask], np.argwhere(mask), structure=st, two_sided=two_sided, multiply_dh=False)
    ref = calculate_tfce(x[..., None], bin_struct=st, two_sided_test=two_sided)[..., 0][mask]
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-9)
    slow = tfce_values_bylabel(x[mask], np.argwhere(mask), structure=st, two_sided=two_sided, dh=0.25)
    fast = tfce_values(x[mask], np.argwhere(mask), structure=st, two_sided=two_sided, dh=0.25)
    np.testing.assert_allclose(fast, slow, rtol=1e-9, atol=1e-9)


def test_tfce_single_cluster_analytic():
    """A flat cluster of m voxels at height h: TFCE = sum_k m^E (k dh)^H dh."""
    values = np.zeros(27)
    values[:8] = 2.0
    coords = np.argwhere(np.ones((3, 3, 3), bool))
    tf = tfce_values(values, coords, structure=connectivity_structure(26), two_sided=False, dh=0.5)
    hs = 0.5 * np.arange(1, 5)
    np.testing.assert_allclose(tf[:8], np.sum(8 ** 0.5 * hs ** 2 * 0.5))
    assert np.all(tf[8:] == 0)


@pytest.mark.parametrize("two_sided", [True, False])
def test_cluster_maxima_match_nilearn(two_sided):
    shape = (16, 16, 16)
    x = _smooth_map(shape, 7)
    mask = np.ones(shape, bool)
    st = connectivity_structure(6)
    size, mass = max_cluster_statistics(x[mask], np.argwhere(mask), threshold=2.0, two_sided=two_sided,
                                        structure=st)
    ref_size, ref_mass = calculate_cluster_measures(x[..., None], 2.0, st, two_sided_test=two_sided)
    assert size == ref_size[0]
    assert mass == pytest.approx(ref_mass[0], rel=1e-9)


def test_cluster_labels_sizes_and_table():
    shape = (12, 12, 12)
    vol = np.zeros(shape)
    vol[1:4, 1:4, 1:4] = 5.0          # 27 voxels, positive
    vol[7:9, 7:9, 7:11] = -4.0        # 16 voxels, negative
    vol[10, 1, 1] = 6.0               # single voxel, dropped by min_size
    vol[2, 2, 2] = 7.0                # peak of the first cluster
    mask = np.ones(shape, bool)
    coords = np.argwhere(mask)
    labels, sizes, masses, signs = cluster_statistics(vol[mask], coords, threshold=3.0, two_sided=True,
                                                      structure=connectivity_structure(6), min_size=2)
    assert list(sizes) == [27, 16] and list(signs) == [1, -1]
    assert masses[0] == pytest.approx(26 * 2.0 + 4.0) and masses[1] == pytest.approx(16 * 1.0)
    assert labels.reshape(shape)[10, 1, 1] == 0 and labels.reshape(shape)[2, 2, 2] == 1
    affine = np.array([[-2, 0, 0, 90], [0, 2, 0, -126], [0, 0, 2, -72], [0, 0, 0, 1.0]])
    atlas = np.zeros(shape, int)
    atlas[:3] = 5
    atlas[3:] = 9
    tab = cluster_table(labels, vol[mask], coords, affine=affine, sizes=sizes, signs=signs, masses=masses,
                        p_size=np.array([0.01, 0.2]), atlas_labels=atlas[mask],
                        atlas_names={5: "Putamen_L", 9: "Caudate_L"})
    row = tab.iloc[0]
    assert row.size_voxels == 27 and row.size_mm3 == pytest.approx(27 * 8.0)
    assert (row.peak_x_mm, row.peak_y_mm, row.peak_z_mm) == (86.0, -122.0, -68.0)
    assert row.peak_stat == 7.0 and row.peak_label == "Putamen_L"
    assert row.labels_covered == "Putamen_L (18); Caudate_L (9)"
    assert tab.iloc[1].peak_stat == -4.0 and tab.iloc[1].p_fwe_size == 0.2


def test_cluster_threshold_from_p():
    assert cluster_threshold_t(0.005, 36, two_sided=False) == pytest.approx(stats.t.isf(0.005, 36))
    assert cluster_threshold_t(0.005, 36, two_sided=True) == pytest.approx(stats.t.isf(0.0025, 36))
    with pytest.raises(ValueError, match="cluster_p"):
        cluster_threshold_t(1.5, 36)


def _planted(n=24, shape=(10, 10, 10), seed=0, effect=1.2):
    rng = np.random.default_rng(seed)
    group = np.r_[np.zeros(n // 2), np.ones(n - n // 2)]
    age = rng.normal(60, 8, n)
    maps = _maps(n, shape, seed)
    maps /= maps.std()
    blob = np.zeros(shape, bool)
    blob[2:6, 2:6, 2:6] = True
    maps[:, blob] += effect * group[:, None]
    maps += 0.02 * (age[:, None, None, None] - 60)
    mask = np.ones(shape, bool)
    mask[0] = False
    return maps[:, mask], mask, blob[mask], group, age


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Data array used to create a new image")
def test_fwe_pvalues_agree_with_nilearn():
    y, mask, blob, group, age = _planted(effect=2.0)
    n_perm = 1000
    d = two_group_design(group, covariates={"age": age})
    ours = permutation_test(y, d, mask=mask, n_perm=n_perm, inference=("voxel", "cluster"), cluster_p=0.01,
                            min_cluster_voxels=1, seed=1)
    masker = NiftiMasker(nib.Nifti1Image(mask.astype(np.uint8), np.eye(4), dtype=np.uint8)).fit()
    ref = permuted_ols(group[:, None], y, age[:, None], n_perm=n_perm, random_state=0, masker=masker,
                       threshold=0.01, output_type="dict")
    np.testing.assert_allclose(ours.t, ref["t"][0], rtol=1e-4, atol=1e-4)
    p_ours = 10 ** -ours.logp_fwe_t
    p_ref = 10 ** -ref["logp_max_t"][0]
    mc = 4 * np.sqrt(2 * p_ref * (1 - p_ref) / n_perm) + 2.0 / n_perm
    assert np.all(np.abs(p_ours - p_ref) <= mc)
    assert np.mean(p_ours[blob] < 0.05) > 0.5
    # cluster-size FWE p of the planted cluster
    k = ours.cluster_labels[blob]
    k = np.bincount(k[k > 0]).argmax()
    ps_ours = 10 ** -ours.logp_fwe_size[ours.cluster_labels == k][0]
    ps_ref = 10 ** -ref["logp_max_size"][0][ours.cluster_labels == k].max()
    assert abs(ps_ours - ps_ref) <= 4 * np.sqrt(2 * ps_ref * (1 - ps_ref) / n_perm) + 2.0 / n_perm
    # null maxima distributions agree (two-sample KS on the two Monte-Carlo samples)
    assert stats.ks_2samp(ours.null["max_t"], ref["h0_max_t"][0]).pvalue > 0.001


def test_planted_effect_end_to_end():
    y, mask, blob, group, age = _planted(seed=3, effect=1.5)
    d = two_group_design(group, covariates={"age": age})
    res = permutation_test(y, d, mask=mask, n_perm=200, inference=("voxel", "cluster", "tfce"),
                           cluster_p=0.005, min_cluster_voxels=10, affine=np.diag([2.0, 2.0, 2.0, 1.0]),
                           seed=2, tfce_dh=0.2)
    tab = res.clusters
    assert len(tab) >= 1 and tab.iloc[0].p_fwe_size < 0.05 and tab.iloc[0].sign == 1
    assert (tab.size_voxels >= 10).all()
    # peak in mm lies in the blob (voxels 2..5 -> 4..10 mm; mask drops x=0 so coords are full-grid)
    assert 4 <= tab.iloc[0].peak_x_mm <= 10 and 4 <= tab.iloc[0].peak_y_mm <= 10
    assert np.mean(res.logp_fwe_tfce[blob] > -np.log10(0.05)) > 0.5
    assert np.mean(res.logp_fwe_tfce[~blob] > -np.log10(0.05)) < 0.2
    np.testing.assert_array_equal(res.extras["affine"], np.diag([2.0, 2.0, 2.0, 1.0]))
    vol = res.to_volume("z")
    assert vol.shape == mask.shape and np.all(vol[~mask] == 0)
    assert np.all((res.logp_unc >= 0) & (res.logp_unc <= np.log10(201) + 1e-9))


@pytest.mark.slow
def test_null_familywise_error_rate():
    """Under H0 the FWE rejection rate at 0.05 lies in its binomial 95% interval."""
    n_sim, n_perm, n = 200, 99, 14
    shape = (9, 9, 9)
    mask = np.ones(shape, bool)
    x = np.random.default_rng(99).normal(size=n)
    d = correlation_design(x)
    d1 = one_sample_design(n)
    rej = np.zeros((n_sim, 3), bool)
    for s in range(n_sim):
        y = _maps(n, shape, 1000 + s).reshape(n, -1)
        r = permutation_test(y, d, mask=mask, n_perm=n_perm, inference=("voxel", "cluster"),
                             cluster_p=0.01, min_cluster_voxels=1, seed=s, batch_size=50)
        r1 = permutation_test(y, d1, mask=mask, n_perm=n_perm, seed=s, batch_size=50)
        alpha = -np.log10(0.05)
        rej[s] = [r.logp_fwe_t.max() > alpha, r.logp_fwe_size.max() > alpha, r1.logp_fwe_t.max() > alpha]
    lo, hi = stats.binom.ppf([0.025, 0.975], n_sim, 0.05) / n_sim
    rate = rej.mean(axis=0)
    assert np.all((rate >= lo) & (rate <= hi)), rate


def test_one_sided_ignores_opposite_effect():
    y, mask, blob, group, age = _planted(seed=5, effect=-2.0)   # patients lower in the blob
    d = two_group_design(group, covariates={"age": age})
    two = permutation_test(y, d, mask=mask, n_perm=200, seed=1, two_sided=True)
    one = permutation_test(y, d, mask=mask, n_perm=200, seed=1, two_sided=False)
    alpha = -np.log10(0.05)
    assert np.mean(two.logp_fwe_t[blob] > alpha) > 0.5 and np.all(two.t[blob].mean() < 0)
    assert not np.any(one.logp_fwe_t > alpha)
    # same seed -> same permutations: max t <= max |t| permutation by permutation
    assert np.all(one.null["max_t"] <= two.null["max_t"] + 1e-5)

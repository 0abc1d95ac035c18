"""GLM designs, exchangeability and the batched Freedman-Lane / Huh-Jhun t statistics."""

import numpy as np
import pytest
from nilearn.mass_univariate import permuted_ols
from scipy import stats

from qsmdask.perm import (Design, correlation_design, glm_t, one_sample_design, paired_design, t_to_z,
                          two_group_design)
from qsmdask.perm.permute import PermutationOptions, batch_t, prepare_model, random_permutations


def _cohort(n=41, v=300, seed=0):
    rng = np.random.default_rng(seed)
    group = np.r_[np.zeros(n // 2), np.ones(n - n // 2)]
    age = rng.normal(60, 8, n)
    sex = rng.integers(0, 2, n)
    med = rng.integers(0, 2, n)
    y = rng.normal(size=(n, v)) + 0.03 * age[:, None] + 0.4 * group[:, None] * (np.arange(v) < 30)
    return y, group, age, sex, med


def _mask(v):
    m = np.zeros(v, bool)
    m[:] = True
    return m.reshape(v, 1, 1)


def test_two_group_t_matches_nilearn():
    y, group, age, sex, med = _cohort()
    d = two_group_design(group, covariates={"age": age, "sex": sex, "medication": med})
    t, dof = glm_t(y, d)
    ref = permuted_ols(group[:, None], y, np.column_stack([age, sex, med]), n_perm=0, output_type="dict")
    np.testing.assert_allclose(t, ref["t"][0], rtol=1e-10, atol=1e-10)
    assert dof == 41 - 5


def test_correlation_and_one_sample_t_match_nilearn():
    y, group, age, sex, med = _cohort(n=30, seed=1)
    score = np.random.default_rng(2).normal(size=30)
    d = correlation_design(score, covariates={"age": age})
    t, _ = glm_t(y, d)
    ref = permuted_ols(score[:, None], y, age[:, None], n_perm=0, output_type="dict")
    np.testing.assert_allclose(t, ref["t"][0], rtol=1e-10, atol=1e-10)
    t1, dof1 = glm_t(y, one_sample_design(30))
    ref1 = permuted_ols(np.ones((30, 1)), y, n_perm=0, output_type="dict")
    np.testing.assert_allclose(t1, ref1["t"][0], rtol=1e-10, atol=1e-10)
    # analytic one-sample t
    np.testing.assert_allclose(t1, stats.ttest_1samp(y, 0.0).statistic, rtol=1e-10)
    assert dof1 == 29


def test_paired_design_is_one_sample_on_differences():
    rng = np.random.default_rng(3)
    pre, post = rng.normal(size=(12, 20)), rng.normal(size=(12, 20)) + 0.5
    t, _ = glm_t(post - pre, paired_design(12))
    np.testing.assert_allclose(t, stats.ttest_rel(post, pre).statistic, rtol=1e-10)
    assert paired_design(12).sign_flip


def test_categorical_site_is_dummy_coded():
    site = np.array(["a", "b", "c"] * 5)
    d = two_group_design(np.r_[np.zeros(7), np.ones(8)], covariates={"site": site})
    assert d.matrix.shape == (15, 4) and d.names == ("intercept", "group", "site[b]", "site[c]")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"matrix": np.ones((5, 2)), "contrast": [0, 1]}, "full column rank"),
        ({"matrix": np.eye(3), "contrast": [1, 0, 0]}, "more subjects"),
        ({"matrix": np.c_[np.ones(6), np.arange(6)], "contrast": [1]}, "contrast must have 2"),
        ({"matrix": np.c_[np.ones(6), np.arange(6)], "contrast": [0, 0]}, "all zeros"),
        ({"matrix": np.c_[np.ones(6), np.arange(6)], "contrast": [0, 1], "whole_block": True}, "needs blocks"),
        ({"matrix": np.c_[np.ones(6), np.arange(6)], "contrast": [0, 1], "blocks": [0, 0, 0, 1, 1, 2],
          "whole_block": True}, "equal size"),
    ],
)
def test_design_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Design(**kwargs)


def test_builder_validation():
    with pytest.raises(ValueError, match="exactly 2"):
        two_group_design([0, 1, 2, 0, 1, 2])
    with pytest.raises(ValueError, match="covariates\\['age'\\]"):
        two_group_design([0, 1] * 3, covariates={"age": [1, 2, 3]})
    with pytest.raises(ValueError, match="n_perm"):
        PermutationOptions(n_perm=0)
    with pytest.raises(ValueError, match="connectivity"):
        PermutationOptions(connectivity=8)
    with pytest.raises(ValueError, match="inference"):
        PermutationOptions(inference=("voxel", "peaks"))
    with pytest.raises(ValueError, match="tfce_dh"):
        PermutationOptions(tfce_dh="fine")


def test_exchangeability_blocks():
    rng = np.random.default_rng(0)
    x = np.c_[np.ones(12), rng.normal(size=12)]
    blocks = np.repeat([0, 1, 2], 4)
    within = random_permutations(Design(x, [0, 1], blocks=blocks), 200, rng)
    assert np.all(blocks[within] == blocks[None, :])          # stays inside its block
    assert np.any(within != np.arange(12))
    whole = random_permutations(Design(x, [0, 1], blocks=blocks, whole_block=True), 200, rng)
    for p in whole:
        moved = p.reshape(3, 4)
        # each block receives one whole block, order inside kept
        assert all(np.array_equal(r, np.arange(4) + 4 * (r[0] // 4)) for r in moved)
    assert len({tuple(p) for p in whole}) == 6                # all 3! block orders appear
    flips = random_permutations(Design(np.ones((12, 1)), [1], sign_flip=True, blocks=blocks,
                                       whole_block=True), 100, rng)
    assert np.all(flips.reshape(100, 3, 4).std(axis=2) == 0)  # one sign per block
    assert set(np.unique(flips)) == {-1.0, 1.0}


def test_freedman_lane_batch_matches_refit():
    """t of each permuted batch == OLS refit of Y* = P R_z + Z g_z (Freedman & Lane 1983)."""
    y, group, age, sex, med = _cohort(n=20, v=50, seed=4)
    d = two_group_design(group, covariates={"age": age, "sex": sex})
    opts = PermutationOptions(n_perm=8, scheme="freedman_lane")
    prep = prepare_model(y, d, mask=_mask(50), options=opts)
    np.testing.assert_allclose(prep.t_obs, glm_t(y, d)[0], rtol=2e-4, atol=2e-4)
    perms = random_permutations(d, 8, np.random.default_rng(5))
    t_batch = batch_t(prep, perms)
    z = d.matrix[:, [0, 2, 3]]                      # nuisance: intercept, age, sex
    fit = np.linalg.lstsq(z, y, rcond=None)[0]
    r = y - z @ fit
    for b, perm in enumerate(perms):
        # the batch applies perm to the design rows == inverse permutation of the residuals
        inv = np.argsort(perm)
        t_ref, _ = glm_t(r[inv] + z @ fit, d)
        np.testing.assert_allclose(t_batch[b], t_ref, rtol=2e-4, atol=2e-4)


def test_sign_flip_batch_matches_refit():
    rng = np.random.default_rng(6)
    y = rng.normal(size=(15, 40)) + 0.3
    d = one_sample_design(15)
    prep = prepare_model(y, d, mask=_mask(40), options=PermutationOptions(n_perm=4))
    flips = random_permutations(d, 4, rng)
    tb = batch_t(prep, flips)
    for b in range(4):
        np.testing.assert_allclose(tb[b], stats.ttest_1samp(flips[b][:, None] * y, 0).statistic,
                                   rtol=2e-4, atol=2e-4)


def test_t_to_z():
    t = np.array([-3.0, -1.0, 0.0, 0.5, 2.5, 40.0])
    z = t_to_z(t, 20)
    np.testing.assert_allclose(z[:5], stats.norm.isf(stats.t.sf(t[:5], 20)), rtol=1e-8, atol=1e-12)
    assert np.isfinite(z[5]) and z[5] > 8
    with pytest.raises(ValueError, match="dof"):
        t_to_z(t, 0)


@pytest.mark.parametrize("scheme", ["huh_jhun", "freedman_lane"])
def test_fused_max_t_path_matches_t_maps(scheme):
    """The voxel-only path (t^2 or the correlation, without forming t) gives the same null as
    the t-map path."""
    from qsmdask.perm import permutation_test

    y, group, age, sex, med = _cohort(n=20, v=64, seed=8)
    d = two_group_design(group, covariates={"age": age})
    mask = np.ones((4, 4, 4), bool)
    for two_sided in (True, False):
        a = permutation_test(y, d, mask=mask, n_perm=50, seed=3, two_sided=two_sided, batch_size=16,
                             scheme=scheme)
        b = permutation_test(y, d, mask=mask, n_perm=50, seed=3, two_sided=two_sided, batch_size=16,
                             inference=("voxel", "cluster"), min_cluster_voxels=1, scheme=scheme)
        assert a.options.scheme == b.options.scheme == scheme
        np.testing.assert_allclose(a.null["max_t"], b.null["max_t"], rtol=1e-5)
        assert np.abs(a.null["count_unc"] - b.null["count_unc"]).max() <= 1


def test_max_t_null_matches_nilearn_with_three_covariates():
    """The blocked max-T engine draws the exact Freedman-Lane null: nilearn's ``permuted_ols``
    (which refits the permuted nuisance regressors) gives the same max-T distribution; the
    single-product shortcut (tested effect only, Kennedy's statistic) would not."""
    from scipy import ndimage

    from qsmdask.perm import permutation_test
    from qsmdask.perm.permute import kernel_to_t, permutation_rows, voxel_null_block

    n, shape, n_perm = 20, (8, 8, 6), 2000
    rng = np.random.default_rng(21)
    maps = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape), 1.0) for _ in range(n)])
    y = maps.reshape(n, -1)
    group = np.r_[np.zeros(10), np.ones(10)]
    age, sex, med = rng.normal(60, 8, n), rng.integers(0, 2, n), rng.integers(0, 2, n)
    y = y + 0.02 * (age - 60)[:, None]
    d = two_group_design(group, covariates={"age": age, "sex": sex, "medication": med})
    mask = np.ones(shape, bool)
    ours = permutation_test(y, d, mask=mask, n_perm=n_perm, seed=5, n_threads=2, scheme="freedman_lane")
    ref = permuted_ols(group[:, None], y, np.column_stack([age, sex, med]), n_perm=n_perm,
                       random_state=3, n_jobs=1, output_type="dict")
    np.testing.assert_allclose(ours.t, ref["t"][0], rtol=1e-4, atol=1e-4)
    assert stats.ks_2samp(ours.null["max_t"], ref["h0_max_t"][0]).pvalue > 0.001
    # one row per permutation (no nuisance refit) has a visibly narrower null
    prep = prepare_model(y, d, mask=mask, options=PermutationOptions(n_perm=n_perm, scheme="freedman_lane"))
    perms = random_permutations(d, n_perm, np.random.default_rng(5))
    rows = permutation_rows(prep, perms)[:n_perm]
    obs = np.square(prep.t_obs) / prep.dof
    mx, _ = voxel_null_block(np.ascontiguousarray(rows), prep.residuals, prep.ss, prep.floor, obs,
                             n_perm, two_sided=True)
    kennedy = kernel_to_t(mx, prep.dof, True)
    assert stats.ks_2samp(kennedy, ref["h0_max_t"][0]).pvalue < 1e-6
    assert np.median(kennedy) < np.median(ref["h0_max_t"][0])


def test_blocked_engine_independent_of_threads_grouping_and_blocks():
    """Maxima and counts do not depend on threads, on how batches are stacked into one
    product, nor on the voxel block size; they equal the t-map path."""
    from qsmdask.perm.permute import (kernel_to_t, null_batch, null_batches, observed_kernel_stat,
                                      permutation_rows, voxel_null_block)

    from qsmdask.perm.permute import batch_sizes, product_group_batches

    y, group, age, sex, med = _cohort(n=24, v=5000, seed=9)
    d = two_group_design(group, covariates={"age": age, "sex": sex})
    opts = PermutationOptions(n_perm=1000, seed=4, batch_size=64, scheme="freedman_lane")
    prep = prepare_model(y, d, mask=_mask(5000), options=opts)
    jobs = list(enumerate(batch_sizes(1000, 64)))
    per = product_group_batches(64)
    assert per == 4
    one = null_batches(prep, opts, jobs, n_threads=1)
    two = null_batches(prep, opts, jobs, n_threads=2)
    parts = [null_batches(prep, opts, jobs[k:k + per], n_threads=1) for k in range(0, len(jobs), per)]
    np.testing.assert_array_equal(one["max_t"], two["max_t"])
    np.testing.assert_array_equal(one["count_unc"], two["count_unc"])
    np.testing.assert_array_equal(one["max_t"], np.concatenate([s["max_t"] for s in parts]))
    np.testing.assert_array_equal(one["count_unc"], sum(s["count_unc"] for s in parts))
    single = [null_batch(prep, opts, i, b) for i, b in jobs[:1]]
    # a batch in a product of its own: the same up to the last bit of a maximum
    np.testing.assert_allclose(one["max_t"][:64], single[0]["max_t"], rtol=1e-6)
    perms = random_permutations(d, 64, np.random.default_rng((4, 0)))
    t = np.abs(batch_t(prep, perms))
    np.testing.assert_allclose(one["max_t"][:64], t.max(axis=1), rtol=1e-5)
    rows = permutation_rows(prep, perms)
    for bv in (7, 1000, 5000):
        mx, cnt = voxel_null_block(rows, prep.residuals, prep.ss, prep.floor,
                                   observed_kernel_stat(prep, True), 64, two_sided=True, block_voxels=bv)
        np.testing.assert_allclose(kernel_to_t(mx, prep.dof, True), single[0]["max_t"], rtol=1e-6)
        assert np.abs(cnt - single[0]["count_unc"]).max() <= 1
    with pytest.raises(ValueError, match="rows must have shape"):
        voxel_null_block(rows[:-1], prep.residuals, prep.ss, prep.floor, prep.ss, 64, two_sided=True)


def test_n_threads_validation():
    from qsmdask.perm import permutation_test

    y, group, age, sex, med = _cohort(n=12, v=20, seed=2)
    with pytest.raises(ValueError, match="n_threads"):
        permutation_test(y, two_group_design(group), mask=_mask(20), n_perm=10, n_threads=0)


@pytest.mark.parametrize("two_sided", [True, False])
def test_blocked_engine_sign_flips_and_blocks_match_t_maps(two_sided):
    """Sign flips (one-sample with a covariate) and within-block permutations through the
    max-T kernel give the maxima and counts of the full t maps."""
    from qsmdask.perm.permute import null_batches, tie_lowered_t

    rng = np.random.default_rng(12)
    y = rng.normal(size=(18, 2500)) + 0.2
    cases = [one_sample_design(18, covariates={"age": rng.normal(size=18)}),
             two_group_design(np.r_[np.zeros(9), np.ones(9)], blocks=np.repeat([0, 1, 2], 6))]
    for d in cases:
        opts = PermutationOptions(n_perm=64, seed=2, batch_size=32, two_sided=two_sided)
        prep = prepare_model(y, d, mask=_mask(2500), options=opts)
        got = null_batches(prep, opts, [(0, 32), (1, 32)], n_threads=2)
        t = np.concatenate([batch_t(prep, random_permutations(d, 32, np.random.default_rng((2, i))))
                            for i in range(2)])
        stat = np.abs(t) if two_sided else t
        obs = np.abs(prep.t_obs) if two_sided else prep.t_obs
        obs = tie_lowered_t(obs)                   # ties (identity-equivalent permutations) count
        np.testing.assert_allclose(got["max_t"], stat.max(axis=1), rtol=1e-5)
        np.testing.assert_array_equal(got["count_unc"], (stat >= obs).sum(axis=0))


# ------------------------------------------------------------------------------------------
# Huh-Jhun (permutations in the complement of the nuisance space)
# ------------------------------------------------------------------------------------------

def test_huh_jhun_identity_is_the_glm_and_permutations_are_reduced_space_fits():
    """P = I reproduces the ordinary GLM t on [x, Z]; a permuted batch is the no-intercept fit
    of the reduced data Q'Y on P Q'a with n - k - 1 dof; Q is orthonormal, orthogonal to Z and
    the same on every call (reproducible)."""
    from qsmdask.perm.permute import householder_reflectors, reduce_to_complement

    y, group, age, sex, med = _cohort(n=23, v=60, seed=14)
    d = two_group_design(group, covariates={"age": age, "sex": sex, "medication": med})
    prep = prepare_model(y, d, mask=_mask(60), options=PermutationOptions(n_perm=8, scheme="huh_jhun"))
    assert prep.scheme == "huh_jhun" and prep.n_exchangeable == 23 - 4 and prep.dof == 23 - 5
    np.testing.assert_allclose(prep.t_obs, glm_t(y, d)[0], rtol=1e-5, atol=1e-5)
    z = d.matrix[:, [0, 2, 3, 4]]
    q = reduce_to_complement(householder_reflectors(z), np.eye(23)).T          # (n, n - k) = Q
    np.testing.assert_allclose(q.T @ q, np.eye(19), atol=1e-12)
    np.testing.assert_allclose(q.T @ z, 0, atol=1e-10)
    np.testing.assert_array_equal(q, reduce_to_complement(householder_reflectors(z), np.eye(23)).T)
    w, x = q.T @ y, q.T @ d.matrix[:, 1]
    perms = random_permutations(d, 8, np.random.default_rng(3), size=prep.n_exchangeable)
    t_batch = batch_t(prep, perms)
    for b, perm in enumerate(perms):
        xp = x[perm]
        beta = xp @ w / (xp @ xp)
        res = w - np.outer(xp, beta)
        t_ref = beta / np.sqrt((res * res).sum(axis=0) / (19 - 1) / (xp @ xp))
        np.testing.assert_allclose(t_batch[b], t_ref, rtol=2e-4, atol=2e-4)
    with pytest.raises(ValueError, match=r"perms must have shape \(B, 19\)"):
        batch_t(prep, random_permutations(d, 2, np.random.default_rng(0)))


def test_scheme_defaults_and_refusals():
    from qsmdask.perm import permutation_test
    from qsmdask.perm.permute import resolve_scheme

    x = np.c_[np.ones(12), np.r_[np.zeros(6), np.ones(6)]]
    assert resolve_scheme(Design(x, [0, 1])) == "huh_jhun"
    assert resolve_scheme(Design(x, [0, 1], blocks=np.repeat([0, 1], 6))) == "freedman_lane"
    assert resolve_scheme(one_sample_design(12)) == "freedman_lane"
    with pytest.raises(ValueError, match="exchangeability blocks"):
        resolve_scheme(Design(x, [0, 1], blocks=np.repeat([0, 1], 6)), "huh_jhun")
    with pytest.raises(ValueError, match="sign flips"):
        resolve_scheme(one_sample_design(12), "huh_jhun")
    with pytest.raises(ValueError, match="scheme must be one of"):
        PermutationOptions(scheme="kennedy")
    y = np.random.default_rng(0).normal(size=(12, 20))
    with pytest.raises(ValueError, match="scheme must be one of"):
        permutation_test(y, Design(x, [0, 1]), mask=_mask(20), n_perm=10, scheme="huh-jhun")


def _null_maps(n, shape, rng, sigma=1.0):
    from scipy import ndimage
    return np.stack([ndimage.gaussian_filter(rng.standard_normal(shape), sigma) for _ in range(n)]).reshape(n, -1)


def test_max_t_null_huh_jhun_matches_nilearn_with_three_covariates():
    """At the study's size (41 subjects, group + 3 covariates) the Huh-Jhun max-T null (one
    product per permutation and voxel) is the null of nilearn's Freedman-Lane ``permuted_ols``
    (KS), and of ours. (With 20 subjects and 4 nuisance columns the two schemes' nulls differ
    visibly; over 1,000 null datasets the Huh-Jhun one is the sampling distribution of the
    observed max-T and Freedman-Lane's is narrower: ``bench/permutation_null.py``.)"""
    from qsmdask.perm import permutation_test

    n, shape, n_perm = 41, (8, 8, 6), 2000
    rng = np.random.default_rng(21)
    y = _null_maps(n, shape, rng)
    group = np.r_[np.zeros(20), np.ones(21)]
    age, sex, med = rng.normal(60, 8, n), rng.integers(0, 2, n), rng.integers(0, 2, n)
    y = y + 0.02 * (age - 60)[:, None]
    d = two_group_design(group, covariates={"age": age, "sex": sex, "medication": med})
    mask = np.ones(shape, bool)
    hj = permutation_test(y, d, mask=mask, n_perm=n_perm, seed=5, n_threads=2)
    assert hj.options.scheme == "huh_jhun"
    fl = permutation_test(y, d, mask=mask, n_perm=n_perm, seed=6, n_threads=2, scheme="freedman_lane")
    ref = permuted_ols(group[:, None], y, np.column_stack([age, sex, med]), n_perm=n_perm,
                       random_state=3, n_jobs=1, output_type="dict")
    np.testing.assert_allclose(hj.t, ref["t"][0], rtol=1e-4, atol=1e-4)
    assert stats.ks_2samp(hj.null["max_t"], ref["h0_max_t"][0]).pvalue > 0.001
    assert stats.ks_2samp(hj.null["max_t"], fl.null["max_t"]).pvalue > 0.001
    # the uncorrected permutation p of each voxel agrees with the t distribution's
    p_perm = 10 ** -hj.logp_unc
    p_par = 10 ** -hj.logp_unc_param
    assert np.abs(p_perm - p_par).max() < 4 * np.sqrt(0.25 / n_perm) + 1.0 / n_perm


def test_huh_jhun_familywise_error_rate_under_the_null():
    """Under H0 (3 nuisance covariates that carry signal) the max-T FWE rejection rate at 0.05 of
    200 null datasets lies in its binomial 95% interval, for Huh-Jhun and Freedman-Lane."""
    from qsmdask.perm import permutation_test

    n_sim, n_perm, n, shape = 200, 99, 16, (6, 6, 5)
    rng = np.random.default_rng(77)
    group = np.r_[np.zeros(8), np.ones(8)]
    age, sex, med = rng.normal(60, 8, n), rng.integers(0, 2, n), rng.integers(0, 2, n)
    d = two_group_design(group, covariates={"age": age, "sex": sex, "medication": med})
    mask = np.ones(shape, bool)
    alpha = -np.log10(0.05)
    rej = np.zeros((n_sim, 2), bool)
    for s in range(n_sim):
        y = _null_maps(n, shape, rng) + (0.05 * (age - 60) + 0.5 * sex)[:, None]
        for k, scheme in enumerate(("huh_jhun", "freedman_lane")):
            r = permutation_test(y, d, mask=mask, n_perm=n_perm, seed=s, scheme=scheme, n_threads=1)
            rej[s, k] = r.logp_fwe_t.max() > alpha
    lo, hi = stats.binom.ppf([0.025, 0.975], n_sim, 0.05) / n_sim
    rate = rej.mean(axis=0)
    assert np.all((rate >= lo) & (rate <= hi)), rate


@pytest.mark.parametrize("two_sided", [True, False])
def test_huh_jhun_kernel_independent_of_threads_grouping_and_blocks(two_sided):
    """The Huh-Jhun max-T kernel: maxima and counts independent of threads, product grouping
    and voxel blocks, equal to the t-map path."""
    from qsmdask.perm.permute import (batch_sizes, hj_null_block, hj_threshold, hj_to_t, null_batches,
                                      permutation_rows, tie_lowered_t)

    y, group, age, sex, med = _cohort(n=24, v=3000, seed=19)
    d = two_group_design(group, covariates={"age": age, "sex": sex})
    opts = PermutationOptions(n_perm=512, seed=4, batch_size=64, two_sided=two_sided)
    prep = prepare_model(y, d, mask=_mask(3000), options=opts)
    assert prep.scheme == "huh_jhun"
    jobs = list(enumerate(batch_sizes(512, 64)))
    one = null_batches(prep, opts, jobs, n_threads=1)
    two = null_batches(prep, opts, jobs, n_threads=2)
    halves = [null_batches(prep, opts, jobs[:4]), null_batches(prep, opts, jobs[4:])]
    np.testing.assert_array_equal(one["max_t"], two["max_t"])
    np.testing.assert_array_equal(one["count_unc"], two["count_unc"])
    np.testing.assert_array_equal(one["max_t"], np.concatenate([h["max_t"] for h in halves]))
    np.testing.assert_array_equal(one["count_unc"], halves[0]["count_unc"] + halves[1]["count_unc"])
    perms = np.concatenate([random_permutations(d, 64, np.random.default_rng((4, i)), size=prep.n_exchangeable)
                            for i in range(8)])
    t = batch_t(prep, perms)
    stat = np.abs(t) if two_sided else t
    obs = tie_lowered_t(np.abs(prep.t_obs) if two_sided else prep.t_obs)
    np.testing.assert_allclose(one["max_t"], stat.max(axis=1), rtol=1e-5)
    assert np.abs(one["count_unc"] - (stat >= obs).sum(axis=0)).max() <= 1
    rows = permutation_rows(prep, perms)
    for bv in (7, 1000, 3000):
        mx, cnt = hj_null_block(rows, prep.residuals, hj_threshold(prep, two_sided), 512,
                                two_sided=two_sided, block_voxels=bv)
        np.testing.assert_allclose(hj_to_t(mx, prep.dof), one["max_t"], rtol=1e-6)
        assert np.abs(cnt - one["count_unc"]).max() <= 1


@pytest.mark.filterwarnings("error::RuntimeWarning")  # scipy's "Series did not converge" reached the log
def test_detectable_effect_size_is_total_at_tiny_samples():
    """Found by the pods run (4 subjects, 2 vs 2): the FWE threshold is so high that no effect
    below 100 SDs reaches 80 % power, and brentq's fixed bracket failed the whole voxel-wise
    analysis. The bracket now grows; an unreachable threshold is inf, a trivial one 0."""
    from scipy import stats

    from qsmdask.perm.permute import detectable_effect_size

    d = detectable_effect_size(30.0, 2, 2, dof=2)
    assert 100 > d > 10
    scale = np.sqrt(2 * 2 / 4)
    assert stats.nct.sf(30.0, 2, d * scale) == pytest.approx(0.8, abs=1e-6)
    assert 100 < detectable_effect_size(200.0, 2, 2, dof=1) < np.inf
    assert detectable_effect_size(-5.0, 8, 8) == 0.0  # any effect passes a threshold below the null
    assert detectable_effect_size(1e9, 2, 2, dof=1) == np.inf

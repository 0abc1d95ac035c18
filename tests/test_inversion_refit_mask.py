"""The least-squares refit of TV with the field fitted inside the mask (``tv_admm(mask_data=True,
debias="refit")``) and Bregman steps that add back part of the residual (``bregman_fraction``)."""

from __future__ import annotations

import numpy as np
import pytest

from qsmdask import inversion
from qsmdask.chain import ChainConfig
from qsmdask.inversion.tv_admm import _refit, _refit_masked
from qsmdask.kernels import dipole_kernel

from .conftest import rfft_ops as _ops
from qsmdask.sim.geometric import make_phantom

SHAPE = (32, 32, 32)


def _blocks():
    chi = np.zeros(SHAPE, np.float32)
    chi[10:20, 12:18, 8:22] = 0.1
    chi[22:26, 5:25, 14:18] = -0.05
    return chi


def test_masked_refit_solves_its_normal_equations():
    """The result x minimises ||W (D x - f)||^2 + mu ||x - k chi||^2 with k the weighted
    least-squares amplitude: the gradient of that objective vanishes (CG converged)."""
    rng = np.random.default_rng(1)
    d = dipole_kernel(SHAPE, (1.0, 1.0, 2.0), (0.2, 0.1, 0.97), real=True)
    fwd, inv = _ops(SHAPE)
    chi = 0.6 * _blocks() + 0.01 * rng.standard_normal(SHAPE).astype(np.float32)
    w2 = np.zeros(SHAPE, np.float32)
    w2[4:28, 4:28, 4:28] = rng.uniform(0.5, 1.5, (24, 24, 24)).astype(np.float32)
    field = inv(fwd(_blocks()) * d) + 0.002 * rng.standard_normal(SHAPE).astype(np.float32)
    mu = np.float32(0.1)
    x = _refit_masked(chi, field, w2, d, mu, fwd, inv, tol=1e-6)
    dchi = inv(fwd(chi) * d).astype(np.float64)
    k = float((w2 * dchi * field).sum() / (w2 * dchi * dchi).sum())
    assert k > 1.2  # the shrunk solution is scaled up
    grad = inv(fwd(w2 * (inv(fwd(x) * d) - field)) * d) + mu * (x - np.float32(k) * chi)
    rhs = inv(fwd(w2 * field) * d)
    assert np.linalg.norm(grad) < 1e-3 * np.linalg.norm(rhs), np.linalg.norm(grad) / np.linalg.norm(rhs)


def test_masked_refit_with_unit_weights_is_the_closed_form():
    """With the data term on the whole grid (W = 1) the CG refit equals the closed-form refit."""
    d = dipole_kernel(SHAPE, (1.0, 1.0, 1.0), (0.0, 0.3, 0.95), real=True)
    fwd, inv = _ops(SHAPE)
    truth = _blocks()
    field = inv(fwd(truth) * d)
    shrunk = np.float32(0.7) * truth
    shrunk[5:8, 5:8, 5:8] += 0.02  # not exactly on the truth's span: the Tikhonov step matters
    closed = _refit(shrunk, field, d, np.float32(0.1), fwd, inv)
    cg = _refit_masked(shrunk, field, np.ones(SHAPE, np.float32), d, np.float32(0.1), fwd, inv, tol=1e-6)
    assert np.linalg.norm(cg - closed) < 1e-3 * np.linalg.norm(closed - shrunk)  # float32 CG


@pytest.fixture(scope="module")
def noisy():
    p = make_phantom(snr=40, seed=5)
    rng = np.random.default_rng(0)
    f = p["local_field_ppm"] + 0.003 * rng.standard_normal(p["brain_mask"].shape).astype(np.float32)
    return p, f


def test_masked_refit_restores_contrast_of_tv_fitted_inside_the_mask(noisy):
    """With the field fitted inside the mask (the default chain's data term), the refit gives back
    most of the deep-grey contrast TV shrinks and lowers the error (measured on this phantom:
    mean ROI error 30 % -> 8 %, NRMSE 0.32 -> 0.21)."""
    from tests.test_recon_accuracy import _roi_rel_errors

    p, f = noisy
    m, vs, b = p["brain_mask"], p["voxel_size_mm"], p["b0_dir"]
    truth = p["chi_ppm"][m] - p["chi_ppm"][m].mean()

    def nrmse(chi):
        a = chi[m] - chi[m].mean()
        return float(np.linalg.norm(a - truth) / np.linalg.norm(truth))

    opts = dict(b0_dir=b, lam=3e-3, max_iter=30, mask_data=True)
    plain = inversion.tv_admm(f, m, vs, **opts)
    refit = inversion.tv_admm(f, m, vs, debias="refit", **opts)
    assert np.all(refit[~m] == 0)
    e_plain = np.abs(_roi_rel_errors(plain, m, p)).mean()
    e_refit = np.abs(_roi_rel_errors(refit, m, p)).mean()
    assert e_plain > 0.15 and e_refit < 0.5 * e_plain, (e_plain, e_refit)
    assert nrmse(refit) < 0.8 * nrmse(plain), (nrmse(plain), nrmse(refit))
    with pytest.raises(ValueError, match="laplacian_data"):
        inversion.tv_admm(f, m, vs, b0_dir=b, debias="refit", laplacian_data=True)


def test_bregman_fraction_zero_continues_the_solve_and_applies_the_correction(noisy):
    """bregman_fraction 0 adds no residual back: without a data correction the step is the same
    solve continued (10 + 10 iterations == 20); with one, the second solve fits the corrected data."""
    p, f = noisy
    m, vs, b = p["brain_mask"], p["voxel_size_mm"], p["b0_dir"]
    opts = dict(b0_dir=b, lam=3e-3, mask_data=True, tol=0.0)
    one = inversion.tv_admm(f, m, vs, max_iter=20, **opts)
    two = inversion.tv_admm(f, m, vs, max_iter=10, bregman_iterations=1, bregman_max_iter=10,
                            bregman_fraction=0.0, **opts)
    np.testing.assert_allclose(two, one, atol=1e-5 * float(np.abs(one).max()))
    full = inversion.tv_admm(f, m, vs, max_iter=10, bregman_iterations=1, bregman_max_iter=10, **opts)
    assert np.abs(full - one).max() > 0.05 * np.abs(one).max()  # a full Bregman step is not that
    # a field c added to the data at the step (as the chain's boundary-field correction): the
    # second solve converges to the solution of f + c, as a solve of f + c from the start does
    c = np.where(m, np.float32(0.01) * p["local_field_ppm"] / np.abs(p["local_field_ppm"][m]).max(), 0)
    corr = inversion.tv_admm(f, m, vs, max_iter=10, bregman_iterations=1, bregman_max_iter=30,
                             bregman_fraction=0.0, data_correction=lambda est: c.astype(np.float32), **opts)
    fresh = inversion.tv_admm((f + c).astype(np.float32), m, vs, max_iter=40, **opts)
    assert np.linalg.norm(corr - fresh) < 0.05 * np.linalg.norm(fresh - one), \
        (np.linalg.norm(corr - fresh), np.linalg.norm(fresh - one))
    for bad in (-0.1, 1.5, np.nan):
        with pytest.raises(ValueError, match="bregman_fraction"):
            inversion.tv_admm(f, m, vs, b0_dir=b, bregman_fraction=bad)


def test_tv_refit_mask_preset_keeps_the_issue14_data_term():
    from qsmdask.report.html import methods_paragraph
    from qsmdask.report.references import chain_method

    c = ChainConfig.preset("tv_refit_mask")
    assert c.tv_mask_data and c.tv_debias == "refit" and c.tv_bregman_fraction == 0.0
    assert c.tv_bregman_iterations == 1 and c.lbv_boundary_depth_mm > 0  # the correction's solve
    meth = chain_method({"preset": "tv_refit_mask"})["Method"]
    assert "Bregman" not in meth and "data refit (mu 0.1" in meth
    text, _ = methods_paragraph({"chain": {"preset": "tv_refit_mask"}})
    assert "more iterations on the data with the boundary-field correction" in text and "Before the second solve" in text
    assert "Bregman" not in text
    with pytest.raises(ValueError, match="tv_bregman_fraction"):
        ChainConfig(tv_bregman_fraction=2.0)

"""Priority-2 methods (BET-style mask, regularised inversion, ...) against phantom truth."""

from __future__ import annotations

import numpy as np
import pytest

from qsmdask import inversion
from qsmdask.chain import ChainConfig, reconstruct
from qsmdask.mask import bet_mask, threshold_mask
from tests.test_recon_phantom import make_phantom


def _dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def noisy():
    return make_phantom(snr=40, seed=5)


@pytest.mark.parametrize("fraction, min_dice", [(0.2, 0.95), (0.5, 0.97)])
def test_bet_mask_dice(noisy, fraction, min_dice):
    m = bet_mask(noisy["magnitude"][..., 0], noisy["voxel_size_mm"], fractional_threshold=fraction)
    assert _dice(m, noisy["brain_mask"]) >= min_dice


def test_masks_on_anisotropic_voxels_with_scalp():
    p = make_phantom(shape=(56, 56, 32), voxel_size_mm=(1.0, 1.0, 2.0), snr=40, seed=2)
    assert _dice(threshold_mask(p["magnitude"][..., 0], p["voxel_size_mm"]), p["brain_mask"]) >= 0.95
    m = bet_mask(p["magnitude"][..., 0], p["voxel_size_mm"], fractional_threshold=0.2)
    assert _dice(m, p["brain_mask"]) >= 0.95
    with pytest.raises(ValueError, match="fractional_threshold"):
        bet_mask(p["magnitude"][..., 0], p["voxel_size_mm"], fractional_threshold=1.5)


def test_tv_admm_beats_tkd_on_noisy_field(noisy):
    p = noisy
    m = p["brain_mask"]
    rng = np.random.default_rng(0)
    f = p["local_field_ppm"] + 0.003 * rng.standard_normal(m.shape).astype(np.float32)
    truth = p["chi_ppm"][m] - p["chi_ppm"][m].mean()

    def nrmse(chi):
        a = chi[m] - chi[m].mean()
        return np.linalg.norm(a - truth) / np.linalg.norm(truth)

    c_tkd = inversion.tkd(f, m, p["voxel_size_mm"], b0_dir=p["b0_dir"])
    c_tv = inversion.tv_admm(f, m, p["voxel_size_mm"], b0_dir=p["b0_dir"], lam=1e-3, max_iter=40,
                             mask_data=False)
    assert np.all(c_tv[~m] == 0)
    assert nrmse(c_tv) < 0.25 and nrmse(c_tv) < 0.6 * nrmse(c_tkd)
    gp = (p["labels"] == 3)
    assert abs(c_tv[gp].mean() - c_tv[m].mean() - 0.18) < 0.04
    # magnitude edge weights (MEDI-like) and the masked data term also work
    c_e = inversion.tv_admm(f, m, p["voxel_size_mm"], b0_dir=p["b0_dir"], lam=1e-3, max_iter=40,
                            magnitude=p["magnitude"][..., 0], edge_fraction=0.3)
    assert nrmse(c_e) < 0.3
    with pytest.raises(ValueError, match="lam"):
        inversion.tv_admm(f, m, p["voxel_size_mm"], lam=-1)


@pytest.mark.slow
def test_chain_bet_tv(noisy):
    p = noisy
    r = reconstruct(p["magnitude"], p["phase_rad"], p["echo_times_s"], p["voxel_size_mm"],
                    b0_dir=p["b0_dir"], b0_tesla=3.0,
                    config=ChainConfig(mask_method="bet", inversion_method="tv", tv_max_iter=30))
    assert _dice(r.brain_mask, p["brain_mask"]) >= 0.95
    m = r.mask
    assert np.corrcoef(r.chi_ppm[m], p["chi_ppm"][m])[0, 1] >= 0.8

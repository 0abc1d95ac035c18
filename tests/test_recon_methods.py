"""Priority-2 methods (BET-style mask, regularised inversion, ...) against phantom truth."""

from __future__ import annotations

import numpy as np
import pytest

from qsmdask import inversion
from qsmdask.chain import ChainConfig, reconstruct
from qsmdask.mask import bet_mask, threshold_mask
from qsmdask.sim.geometric import make_phantom


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
                            magnitude=p["magnitude"][..., 0], edge_fraction=0.3, mask_data=True)
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


def test_region_growing_unwrap_exact_for_steep_valid_gradients():
    from qsmdask.unwrap import laplacian_unwrap, region_growing_unwrap

    shape = (40, 40, 40)
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    r2 = (x - 20.0) ** 2 + (y - 20) ** 2 + (z - 20) ** 2
    true = 45 * np.exp(-r2 / 300) + 0.2 * x  # up to ~2.4 rad per voxel
    wrapped = np.angle(np.exp(1j * true)).astype(np.float32)
    u = region_growing_unwrap(wrapped)
    d = u - true
    assert np.abs(d - np.median(d)).max() < 1e-3
    # congruent with the input
    np.testing.assert_allclose(np.angle(np.exp(1j * (u - wrapped))), 0, atol=1e-4)
    lap = laplacian_unwrap(wrapped, (1, 1, 1))
    assert np.abs(lap - true - (lap - true).mean()).max() > 1.0  # Laplacian smooths steep wraps
    # masked: voxels outside keep their wrapped value
    m = r2 < 15 ** 2
    um = region_growing_unwrap(wrapped, mask=m)
    np.testing.assert_array_equal(um[~m], wrapped[~m])
    dm = (um - true)[m]
    assert np.abs(dm - np.median(dm)).max() < 1e-3


def test_rescale_phase_vendor_ranges():
    from qsmdask.unwrap import rescale_phase

    true = np.random.default_rng(0).uniform(-np.pi, np.pi, 2000)
    cases = {
        "signed": np.round(true / np.pi * 4096).clip(-4096, 4095).astype(np.int16),
        "unsigned": np.round((true + np.pi) / (2 * np.pi) * 4096).clip(0, 4095).astype(np.uint16),
        "GE": np.round(true * 1000).astype(np.int16),
        "radians": true,
    }
    for key, enc in cases.items():
        rad, note = rescale_phase(enc)
        assert rad.dtype == np.float32 and isinstance(note, str) and note
        assert np.abs(np.angle(np.exp(1j * (rad - true)))).max() < 2e-3, key
    assert "12-bit signed" in rescale_phase(cases["signed"])[1]
    assert "GE" in rescale_phase(cases["GE"])[1]
    assert "already" in rescale_phase(cases["radians"])[1]
    with pytest.raises(ValueError, match="phase"):
        rescale_phase(np.array([]))


def test_rescale_phase_is_the_one_detector_of_the_bids_reader():
    """One table for the library and the reader: 12-bit signed is not read as GE milliradians,
    unknown ranges are rejected (strict) or min/max-rescaled with a note (strict=False)."""
    from qsmdask.io.bids import phase_to_radians
    from qsmdask.unwrap import rescale_phase

    twelve = np.arange(-2048, 2048, dtype=np.int16)
    rad, note = rescale_phase(twelve)
    assert "4096 levels, 12-bit signed" in note and np.isclose(rad[2048], 0.0, atol=1e-6)
    rad_reader, note_reader = phase_to_radians(twelve, "p.nii")
    np.testing.assert_array_equal(rad, rad_reader)
    assert note_reader == note
    assert phase_to_radians(np.array([-1.0, 2.0]), "p.nii")[1] is None  # radians: no note
    odd = np.array([0.5, 7.3, 12.1])
    with pytest.raises(ValueError, match="neither radians"):
        rescale_phase(odd)
    rad, note = rescale_phase(odd, strict=False)
    assert "not recognised" in note and np.isclose(rad.min(), -np.pi)
    with pytest.raises(ValueError, match="non-finite"):
        rescale_phase(np.array([0.0, np.nan]))


def test_pdf_background_removal(noisy):
    from qsmdask import bgremove
    from qsmdask.kernels import erode_mask_mm

    p = make_phantom(snr=None)
    bm = p["brain_mask"]
    local, m = bgremove.pdf(p["field_ppm"], bm, p["voxel_size_mm"], b0_dir=p["b0_dir"], max_iter=20)
    np.testing.assert_array_equal(m, bm)  # PDF keeps the whole mask
    inner = erode_mask_mm(bm, 3.0, p["voxel_size_mm"])
    a = local[inner] - local[inner].mean()
    b = p["local_field_ppm"][inner] - p["local_field_ppm"][inner].mean()
    assert np.corrcoef(a, b)[0, 1] > 0.95
    assert np.linalg.norm(a - b) < 0.3 * np.linalg.norm(b)


def test_iterative_tkd_reduces_underestimation(noisy):
    p = noisy
    m = p["brain_mask"]
    f = p["local_field_ppm"]
    c0 = inversion.tkd(f, m, p["voxel_size_mm"], b0_dir=p["b0_dir"], threshold=0.19)
    c1 = inversion.iterative_tkd(f, m, p["voxel_size_mm"], b0_dir=p["b0_dir"], threshold=0.19,
                                 max_iter=20)
    assert np.all(c1[~m] == 0)
    gp = p["labels"] == 3
    err0 = abs(c0[gp].mean() - c0[m].mean() - 0.18)
    err1 = abs(c1[gp].mean() - c1[m].mean() - 0.18)
    assert err1 < err0
    assert np.corrcoef(c1[m], p["chi_ppm"][m])[0, 1] > 0.93


@pytest.mark.parametrize("changes", [{"unwrap_method": "region_growing"}, {"bgremove_method": "pdf"},
                                     {"inversion_method": "iterative_tkd"},
                                     {"inversion_method": "tv_laplacian"},
                                     {"tv_mask_data": True, "lbv_boundary_depth_mm": 10.0}])
def test_chain_method_options(changes):
    p = make_phantom(shape=(48, 48, 48), voxel_size_mm=(1.3, 1.3, 1.3), snr=80, seed=4,
                     echo_times_s=(0.005, 0.01, 0.015))
    r = reconstruct(p["magnitude"], p["phase_rad"], p["echo_times_s"], p["voxel_size_mm"],
                    b0_dir=p["b0_dir"], b0_tesla=3.0, config=ChainConfig(**changes))
    m = r.mask
    assert np.corrcoef(r.chi_ppm[m], p["chi_ppm"][m])[0, 1] >= 0.7
    if changes.get("lbv_boundary_depth_mm"):  # the boundary field was added to the local field
        assert r.qc["lbv_boundary_field_rms_ppm"] > 0


@pytest.mark.slow  # four 2 mm TV inversions: ~25 s idle, 90 s on the loaded shared machine
def test_tv_laplacian_single_step_keeps_a_deep_source_local():
    """Issue 14 halo: LBV's boundary condition (local field 0 at the mask edge) removes the part
    of a deep source's field that is harmonic in the brain, and the inversion turns it into a
    broad shift of everything else. The single-step inversion (``laplacian_data``: the
    Laplacian of the total field is the data) imposes no boundary condition: the far shift is
    smaller, the source is recovered, and a strong background field drops out."""
    from qsmdask import bgremove
    from qsmdask.sim.geometric import forward_field

    shape, vs, b0 = (56, 64, 52), (2.0, 2.0, 2.0), (0.0, 0.1, 0.995)
    x, y, z = np.meshgrid(*[(np.arange(n) - (n - 1) / 2.0) * d for n, d in zip(shape, vs)], indexing="ij")
    brain = (x / 48) ** 2 + (y / 58) ** 2 + (z / 44) ** 2 <= 1
    src = (np.abs(x) - 12) ** 2 + (y + 4) ** 2 + z ** 2 <= 8 ** 2  # two deep "nuclei", +0.05 ppm
    bgchi = np.zeros(shape, np.float32)
    bgchi[:, :2, :] = 9.4  # an air-like slab outside the brain
    bg = forward_field(bgchi, vs, b0).astype(np.float32)
    total = bg + forward_field(np.where(src, 0.05, 0.0), vs, b0).astype(np.float32)
    assert np.abs(bg[brain]).max() > 5 * np.abs((total - bg)[brain]).max()
    opts = dict(b0_dir=b0, max_iter=15, bregman_iterations=1, bregman_max_iter=15)

    def lbv_tv(f):
        local, inner = bgremove.lbv(np.where(brain, f, 0), brain, vs)
        return inversion.tv_admm(local, inner, vs, lam=2e-3, mask_data=True, **opts), inner

    def single(f):
        return inversion.tv_admm(np.where(brain, f, 0), brain, vs, lam=2e-4, laplacian_data=True, **opts)

    (c_lbv, inner), c_lbv0 = lbv_tv(total), lbv_tv(bg)[0]
    c_one, c_one0 = single(total), single(bg)
    assert not np.any(c_one[~inner])  # 0 outside the interior of the mask
    far = inner & (np.sqrt((np.abs(x) - 12) ** 2 + (y + 4) ** 2 + z ** 2) > 24)
    shift_lbv = (c_lbv - c_lbv0)[far].mean() / 0.05
    shift_one = (c_one - c_one0)[far].mean() / 0.05
    assert abs(shift_one) < 0.0025 and abs(shift_one) < 0.5 * abs(shift_lbv)
    assert abs((c_one - c_one0)[src & inner].mean() - 0.05) < 0.002
    assert np.abs(c_one0[inner]).max() < 0.01  # the background alone leaves (almost) nothing

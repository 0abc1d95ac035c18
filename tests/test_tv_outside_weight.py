"""The data term outside the mask (``tv_admm(outside_weight=)``, ``ChainConfig.tv_outside_weight``).

With the field fitted inside the mask only (issue 14) the 2016 challenge score is 7 nrmse points
worse than with the field taken as 0 outside; taking it as 0 outside forces the field of every
deep source to 0 there, a halo. ``outside_weight`` fits the field outside the mask too, as 0 plus
the deep estimate's own field from the boundary-field correction
(``lbv_boundary_field(exterior=True)``), so the deep sources' field is not forced to 0 there.
"""

from __future__ import annotations

import numpy as np
import pytest

from qsmdask import bgremove, inversion
from qsmdask.bgremove.boundary import dipole_field, lbv_boundary_field
from qsmdask.chain import ChainConfig
from qsmdask.kernels import distance_to_edge_mm
from qsmdask.sim.geometric import forward_field

# the two-nuclei phantom of the boundary-field correction's tests
from .test_bgremove_boundary import B0, SHAPE, VS, _head


def test_exterior_boundary_field_is_the_estimate_field_outside_the_interior():
    brain, src, _ = _head()
    chi = np.where(src, 0.05, 0.0).astype(np.float32)
    h, inner = lbv_boundary_field(chi, src, brain, VS, b0_dir=B0, tol=1e-6)
    he, inner2 = lbv_boundary_field(chi, src, brain, VS, b0_dir=B0, tol=1e-6, exterior=True)
    assert np.array_equal(inner, inner2)
    np.testing.assert_array_equal(he[inner], h[inner])  # inside: LBV's missing harmonic part, as before
    box = np.zeros(SHAPE, bool)
    box[tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(brain))] = True
    g = dipole_field(chi, src, VS, b0_dir=B0, within=box)
    out = box & ~inner
    np.testing.assert_allclose(he[out], g[out], atol=1e-7)  # outside: the estimate's own field
    assert np.abs(g[out]).max() > 1e-4  # a deep source's field reaches beyond the brain
    assert not he[~box].any()


def test_outside_weight_one_solves_the_zero_field_data_term():
    """Weight 1 outside with no correction is the data term of ``mask_data=False`` (field 0
    outside the mask, solved in closed form there): the two solutions agree far better than
    either agrees with the field fitted inside the mask only."""
    brain, src, _ = _head()
    chi = np.where(src, 0.05, 0.0) + np.where(brain, 0.01 * np.sin(np.arange(SHAPE[0]) / 5.0)[:, None, None], 0)
    f = np.where(brain, forward_field(chi.astype(np.float32), VS, B0), 0).astype(np.float32)
    opts = dict(b0_dir=B0, lam=2e-3, max_iter=60, tol=1e-4)
    zero = inversion.tv_admm(f, brain, VS, mask_data=False, **opts)
    w1 = inversion.tv_admm(f, brain, VS, mask_data=True, outside_weight=1.0, **opts)
    w0 = inversion.tv_admm(f, brain, VS, mask_data=True, **opts)

    def d(a, b):
        return float(np.linalg.norm((a - b)[brain]) / np.linalg.norm(zero[brain]))

    assert d(w1, zero) < 0.1
    assert d(w1, zero) < 0.5 * d(w0, zero)


@pytest.mark.slow  # six 2 mm TV inversions and LBV solves: ~25 s idle
def test_exterior_correction_shrinks_the_halo_of_the_zero_field_outside():
    """A deep +0.05 ppm source, LBV + TV with one Bregman step and the boundary-field correction.
    With the field taken as 0 outside the mask (``mask_data=False``) the deep source's field is
    forced to 0 there and the far brain shifts (-0.66 % of the source here); with
    ``outside_weight=1`` the correction also gives the deep estimate's field outside the mask and
    the far shift is smaller (-0.57 %). On this smooth phantom fitting the field inside the mask
    only is better still (-0.08 %); on simulated heads ``tv_outside_weight: 1`` had the smaller
    worst shift (docs/benchmarks.md, recon-accuracy), so this test pins only the mechanism."""
    brain, src, dist_src = _head()
    bgchi = np.zeros(SHAPE, np.float32)
    bgchi[:, :2, :] = 9.4  # an air-like slab outside the brain
    bg = forward_field(bgchi, VS, B0).astype(np.float32)
    total = bg + forward_field(np.where(src, 0.05, 0.0), VS, B0).astype(np.float32)
    opts = dict(b0_dir=B0, lam=2e-3, max_iter=15, bregman_iterations=1, bregman_max_iter=15)

    def run(f, ext, **kw):
        local, inner = bgremove.lbv(np.where(brain, f, 0), brain, VS)
        deep = inner & (distance_to_edge_mm(inner, VS) > 20.0)

        def corr(x):  # the chain's rule: deep voxels away from the deep median by more than 0.01 ppm
            d = np.where(deep, x - np.median(x[deep]), 0)
            d = np.where(np.abs(d) > 0.01, d, 0).astype(np.float32)
            return lbv_boundary_field(d, deep, brain, VS, b0_dir=B0, exterior=ext)[0]

        return inversion.tv_admm(local, inner, VS, data_correction=corr, **opts, **kw), inner

    shift = {}
    for name, (ext, kw) in {"zero outside": (False, dict(mask_data=False)),
                            "outside weight 1, no exterior": (False, dict(mask_data=True, outside_weight=1.0)),
                            "outside weight 1": (True, dict(mask_data=True, outside_weight=1.0))}.items():
        (c1, inner), c0 = run(total, ext, **kw), run(bg, ext, **kw)[0]
        far = inner & (dist_src > 24)
        shift[name] = float((c1 - c0)[far].mean() / 0.05)
    print({k: f"{100 * v:.2f} %" for k, v in shift.items()})
    assert shift["zero outside"] < -0.003  # the halo of forcing the field to 0 outside the mask
    assert abs(shift["outside weight 1"]) < abs(shift["zero outside"]) - 0.0005
    assert abs(shift["outside weight 1"]) < abs(shift["outside weight 1, no exterior"]) - 0.0005


def test_outside_weight_is_validated():
    brain, _, _ = _head()
    f = np.zeros(SHAPE, np.float32)
    with pytest.raises(ValueError, match="outside_weight must be >= 0"):
        inversion.tv_admm(f, brain, VS, mask_data=True, outside_weight=-0.5)
    with pytest.raises(ValueError, match="needs mask_data=True"):
        inversion.tv_admm(f, brain, VS, mask_data=False, outside_weight=1.0)
    with pytest.raises(ValueError, match="needs mask_data=True"):
        inversion.tv_admm(f, brain, VS, outside_weight=1.0, laplacian_data=True)
    with pytest.raises(ValueError, match="tv_outside_weight must be in"):
        ChainConfig(tv_outside_weight=1.5)
    with pytest.raises(ValueError, match="with tv_mask_data false .* tv_outside_weight then can only be 1"):
        ChainConfig(tv_outside_weight=1.0, tv_mask_data=False)  # (the correction at the Bregman step)
    with pytest.raises(ValueError, match="tv_outside_weight needs"):
        ChainConfig(tv_outside_weight=1.0, inversion_method="tgv")
    cfg = ChainConfig(tv_outside_weight=0.5)
    assert ChainConfig.from_dict(cfg.to_dict()) == cfg


def test_chain_with_outside_weight_uses_the_exterior_correction(monkeypatch):
    from qsmdask.chain import reconstruct
    from qsmdask.sim.geometric import make_phantom

    p = make_phantom(shape=(48, 48, 48), voxel_size_mm=(1.3, 1.3, 1.3), snr=80, seed=4,
                     echo_times_s=(0.005, 0.01, 0.015))
    seen = []
    real = bgremove.lbv_boundary_field

    def spy(*a, **kw):
        seen.append(kw.get("exterior"))
        return real(*a, **kw)

    monkeypatch.setattr(bgremove, "lbv_boundary_field", spy)
    r = reconstruct(p["magnitude"], p["phase_rad"], p["echo_times_s"], p["voxel_size_mm"], b0_dir=p["b0_dir"],
                    b0_tesla=3.0, config=ChainConfig(tv_outside_weight=1.0, lbv_boundary_depth_mm=10.0))
    assert seen == [True]
    assert r.qc["lbv_boundary_field_rms_ppm"] > 0
    assert np.corrcoef(r.chi_ppm[r.mask], p["chi_ppm"][r.mask])[0, 1] >= 0.7


def test_methods_text_and_sidecar_method_name_the_outside_weight():
    from qsmdask.report.html import methods_paragraph
    from qsmdask.report.references import chain_method

    text, _ = methods_paragraph({"chain": {"tv_outside_weight": 1.0}})
    assert "also fitted outside the mask with weight 1" in text and "field of the deep sources" in text
    assert "inside the mask only" not in text
    plain, _ = methods_paragraph({"chain": {}})
    assert "inside the mask only" in plain and "outside the mask with weight" not in plain
    meth = chain_method({"tv_outside_weight": 0.3})["Method"]
    assert "field also fitted outside the mask (weight 0.3; 0 there plus the deep sources' field)" in meth
    assert "outside the mask" not in chain_method({})["Method"]


EARLY = {"lbv_boundary_estimate_iter": 3, "lbv_boundary_depth_mm": 8.0, "lbv_boundary_threshold_ppm": 0.02}


def test_outside_field_is_the_data_outside_the_mask():
    """``tv_admm(outside_field_ppm=)``: the values outside the mask are the data there, with
    ``outside_weight`` > 0 or ``mask_data=False``: given the true field of a deep source outside
    the mask, the far brain shifts less than with that field taken as 0 there (-0.41 % of the
    source against -0.46 % here: the field is given on the mask's bounding box only, 0 in the
    solver's padding beyond it, so this pins the mechanism, not the size)."""
    brain, src, dist_src = _head()
    chi = np.where(src, 0.05, 0.0).astype(np.float32)
    g = forward_field(chi, VS, B0).astype(np.float32)
    far = brain & (dist_src > 24)
    opts = dict(b0_dir=B0, lam=2e-3, max_iter=30)
    for kw in (dict(mask_data=True, outside_weight=1.0), dict(mask_data=False)):
        zero = inversion.tv_admm(g, brain, VS, **kw, **opts)
        given = inversion.tv_admm(g, brain, VS, outside_field_ppm=g, **kw, **opts)
        shift = {k: float(x[far].mean() / 0.05) for k, x in (("zero", zero), ("given", given))}
        assert shift["zero"] < -0.003 and abs(shift["given"]) < abs(shift["zero"]) - 0.0003, (kw, shift)
        # only the values outside the mask count: inside, the field argument is the data
        again = inversion.tv_admm(g, brain, VS, outside_field_ppm=np.where(brain, 7.0, g), **kw, **opts)
        np.testing.assert_array_equal(again, given)
    f = np.zeros(SHAPE, np.float32)
    with pytest.raises(ValueError, match="outside_field_ppm needs outside_weight > 0"):
        inversion.tv_admm(f, brain, VS, mask_data=True, outside_field_ppm=f)
    with pytest.raises(ValueError, match="outside_field_ppm needs"):
        inversion.tv_admm(f, brain, VS, laplacian_data=True, outside_field_ppm=f)
    with pytest.raises(ValueError, match="outside_field_ppm shape"):
        inversion.tv_admm(f, brain, VS, mask_data=False, outside_field_ppm=f[:-1])


def test_early_correction_combines_with_the_outside_weight_and_the_refits(monkeypatch):
    """The boundary-field correction in the data from the start (``lbv_boundary_estimate_iter``)
    with ``tv_outside_weight`` (it was an error): the early estimate's field outside the mask is
    the data there, the corrected field inside; with the refit presets too, and with
    ``tv_mask_data: false`` (``tv_refit``) where ``tv_outside_weight: 1`` means that field instead
    of 0 outside the mask. What is still unsupported is an error that says what to set."""
    from qsmdask.chain import invert_tv, reconstruct
    from qsmdask.sim.geometric import make_phantom

    p = make_phantom(shape=(48, 48, 48), voxel_size_mm=(1.3, 1.3, 1.3), snr=80, seed=4,
                     echo_times_s=(0.005, 0.01, 0.015))
    args = (p["magnitude"], p["phase_rad"], p["echo_times_s"], p["voxel_size_mm"])
    seen = []
    real = inversion.tv_admm

    def spy(*a, **kw):
        seen.append(kw.get("outside_field_ppm"))
        return real(*a, **kw)

    monkeypatch.setattr(inversion, "tv_admm", spy)
    for cfg in (ChainConfig(tv_outside_weight=1.0, **EARLY),
                ChainConfig.preset("tv_refit_mask", tv_outside_weight=1.0, **EARLY),
                ChainConfig.preset("tv_refit", tv_outside_weight=1.0, **EARLY)):
        assert cfg.boundary_correction_stage == "start"
        seen.clear()
        r = reconstruct(*args, b0_dir=p["b0_dir"], b0_tesla=3.0, config=cfg)
        assert seen[0] is None and seen[1] is not None  # the early estimate, then the inversion
        out = seen[1]
        inner = r.local_field_ppm != 0
        assert not out[inner].any() and np.abs(out[~inner]).max() > 0  # the estimate's field outside
        assert r.qc["lbv_boundary_field_rms_ppm"] > 0
        assert np.corrcoef(r.chi_ppm[r.mask], p["chi_ppm"][r.mask])[0, 1] >= 0.7
    with pytest.raises(ValueError, match="invert_tv needs inversion_method 'tv' or 'tgv'"):
        invert_tv(r.local_field_ppm, r.mask, r.mask, p["voxel_size_mm"], p["b0_dir"],
                  ChainConfig(inversion_method="tkd"))
    with pytest.raises(ValueError, match="tv_outside_weight then can only be 1"):
        ChainConfig.preset("tv_refit", tv_outside_weight=0.5, **EARLY)
    with pytest.raises(ValueError, match="lbv_boundary_estimate_iter > 0"):
        ChainConfig.preset("tv_refit", tv_outside_weight=1.0)
    with pytest.raises(ValueError, match="tv_outside_weight needs inversion_method 'tv'"):
        ChainConfig(inversion_method="tgv", tv_outside_weight=1.0, **EARLY)


def test_methods_text_names_the_outside_field_of_the_early_correction():
    from qsmdask.report.html import methods_paragraph
    from qsmdask.report.references import chain_method

    opts = {"tv_outside_weight": 1.0, **EARLY}
    text, _ = methods_paragraph({"chain": opts})
    assert "outside the mask with weight 1, taken as 0 there plus the field of the deep sources" in text
    assert "early-stopped TV estimate (3 iterations)" in text
    meth = chain_method(opts)["Method"]
    assert "(weight 1; 0 there plus the deep sources' field)" in meth and "from the start" in meth
    # the rim sentence: no data on the rim, although the data term reaches outside the mask
    assert "the data term leaves it out, although it covers the solver's grid outside the mask" in text
    plain, _ = methods_paragraph({"chain": {}})
    assert "the data term leaves it out)" in plain and "inside the eroded mask only" not in plain

"""Where does the halo come from? Background removal vs inversion on one simulated head (issue 14).

``bench/reference.py`` found that a deep-nuclei increase (+0.05 ppm in putamen, thalamus and
hippocampus) moves non-adjacent ROIs by 3-6 % of itself through the whole chain, but by
only ~1 % when the TV inversion (``tv_mask_data``) is given the simulator's true local
field. This benchmark splits the difference on one head (same seed with and without the
effect, so the difference is the effect's own image), noise-free and at SNR 50. Every row
but the last feeds the same TV inversion (the chain's parameters, field fitted inside the
final mask) a different local field, all restricted to the chain's final mask:

- ``true local field``: the field of the brain's own susceptibility (the simulator's chi in its
  brain label) on the chain's whole quality mask (:func:`brain_local_field`; the simulator's
  ``local_field_ppm`` is 0 outside its brain label, on 2-3 % of the quality mask at its rim, which
  biased the rows of the table measured at commit 85fd4aa): a perfect background removal
  (noise-free whatever the row's noise level);
- ``LBV of the true local field``: LBV is linear, so this is the part of the local field that
  LBV keeps; what it drops is the harmonic function inside the mask that takes the local
  field's values on the mask boundary (LBV's boundary condition: local field 0 there);
- ``LBV / V-SHARP / PDF of the chain's field``: each background removal of the chain's
  unwrapped, echo-fitted field on the chain's brain mask (LBV = the default chain without the
  boundary-field correction);
- ``single step``: ``inversion_method="tv_laplacian"`` (no separate background removal: TV
  fitted to the Laplacian of the chain's field, ``tv_admm(laplacian_data=True)``).

Field columns (noise-free only): the planted effect's local field (planted - unplanted), the
part of it each background removal loses, RMS over the mask, and its mean over the non-adjacent
ROIs, in ppb. Shift columns: as ``bench/reference.py`` (non-planted AAL ROI groups, % of the
planted effect), no reference. Accuracy columns (unplanted run): correlation of chi with the
truth in the final mask inside the simulator's brain label (:func:`brain_corr`), and the mean absolute error of the deep-grey ROI means (putamen,
thalamus, caudate, pallidum, hippocampus, amygdala; L and R; each map's own mean over these
ROIs removed, so the undetermined offset does not count), in ppb.

The boundary-field correction (issue 14; ``ChainConfig.lbv_boundary_depth_mm``): ``--fix``
compares whole chains only (each chain's own final mask, ROIs on the unplanted run's mask):
the chain without the correction (``tv_mask_data`` off, the default before it, and on) and with
it, per head (``--seeds``), noise-free and SNR 50, with the chain's time per reconstruction.

Command: ``nice python bench/halo.py [--seed 101] [--write-doc]`` (~20 min on the loaded 2-core
machine); ``nice python bench/halo.py --fix --seeds 101 102 [--write-doc]``;
``nice python bench/halo.py --floor --seeds 101 [--write-doc]`` (how close the correction is to a perfect one);
``nice python bench/halo.py --fix --seeds 101 102 --chains '{"name": {options}}'`` (other chains, printed only);
``python bench/halo.py --floor-heads 8 [--write-doc]`` (the same decomposition on the null heads of
``bench/reference.py --null-heads``, with the white-matter reference; ~5.5 min idle).

Every given local field is inverted as the chain inverts its own (``invert_as_chain``): the data term
on the background removal's output mask, chi also on LBV's rim, which the chain keeps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._report import machine_description, markdown_table, update_section  # noqa: E402
from bench.reference import EFFECT_PPM, PLANTED, STUDY_ROIS, _adjacent_rois, _roi_means, _simulate  # noqa: E402


DEEP = ("putamen", "thalamus", "caudate", "pallidum", "hippocampus", "amygdala")


def brain_local_field(s, quality_mask, vs, *, rim_sources: bool = False) -> np.ndarray:
    """The field of the brain's own chi on the chain's quality mask (0 outside it).

    The simulator's ``local_field_ppm`` is 0 outside its brain label; the chain's quality mask
    holds a rim of other voxels (2-3 %, at the edge, where LBV reads its boundary values), where
    the brain's field is not 0, so the benchmark recomputes it there. ``rim_sources``: the chi of
    that rim (bone, air) counts as a source too, as it does in the chain's measured field."""
    from qsmdask import bgremove

    support = (s.brain | quality_mask) if rim_sources else s.brain
    f = bgremove.dipole_field(np.where(support, s.chi_ppm, 0), support, vs, b0_dir=s.b0_dir,
                              within=quality_mask | s.brain, pad_voxels=(24, 24, 24))
    return np.where(quality_mask, f, 0).astype(np.float32)


def brain_corr(chi, truth, final, brain) -> float:
    """Correlation of chi with the truth on the final mask's voxels inside the simulator's brain
    label. The quality mask (the final mask since the rim-kept default) holds a rim of voxels
    outside that label (about 3 %), where the simulator's chi is bone or air (down to -1 ppm
    against a brain range of about +-0.06 ppm): counted, they dominate the correlation (head 101
    noise-free: 0.31 with the rim against 0.83 in the brain)."""
    m = np.asarray(final, bool) & np.asarray(brain, bool)
    return float(np.corrcoef(chi[m], truth[m])[0, 1])


def invert_as_chain(local, data_mask, brain, vs, b0_dir, cfg) -> np.ndarray:
    """TV inversion of a given local field as the chain inverts its own (:func:`qsmdask.chain.invert_tv`):
    the data term on ``data_mask`` (the background removal's output mask), chi on ``brain`` (the mask the
    background removal ran on) when the chain keeps LBV's rim, as the default does. Feeding LBV's output
    with the rim in the data mask would fit a field of 0 there (LBV's boundary condition), which is not
    what the chain does and adds a halo of its own (docs/benchmarks.md, session 10 reading)."""
    from qsmdask.chain import invert_tv

    local = np.where(data_mask, local, 0).astype(np.float32)
    return invert_tv(local, np.asarray(data_mask, bool), np.asarray(brain, bool), vs, b0_dir, cfg)[0]


def _accuracy(chi, truth, labels, atlas, vs, final, brain) -> dict:
    t = _roi_means(np.where(final, chi, 0), labels, atlas.table, vs, final)
    tr = _roi_means(np.where(final, truth, 0), labels, atlas.table, vs, final)
    deep = [k for k in t.index if k.split("_")[0] in DEEP]
    a, b = t[deep] - t[deep].mean(), tr[deep] - tr[deep].mean()
    return {"chi corr with truth (brain label)": brain_corr(chi, truth, final, brain),
            "deep-grey ROI MAE (ppb)": 1e3 * float(np.mean(np.abs(a - b)))}


def head_table(seed: int, noise: str, snr: float, atlas, adjacent) -> list[dict]:
    from qsmdask import bgremove
    from qsmdask.chain import ChainConfig, reconstruct
    from qsmdask.inversion import tv_admm
    from qsmdask.kernels import voxel_size_from_affine

    # LBV + TV fitted inside the mask, WITHOUT the boundary-field correction (the stages below
    # compare background removals; the correction is measured by --fix and --floor)
    cfg = ChainConfig(tv_mask_data=True, lbv_boundary_depth_mm=0.0)
    sims = {e: _simulate(seed, e, snr, t1w=False) for e in (0.0, EFFECT_PPM)}
    s0 = sims[0.0]
    vs = voxel_size_from_affine(s0.affine)
    recon = {}
    for e, s in sims.items():
        t0 = time.perf_counter()
        recon[e] = reconstruct(s.magnitude, s.phase_rad, s.echo_times_s, vs, b0_dir=s.b0_dir,
                               b0_tesla=s.b0_tesla, config=cfg)
        print(f"{noise}: chain effect {e}: {time.perf_counter() - t0:.0f} s", flush=True)
    final = recon[0.0].mask            # one ROI / inversion mask for every row
    brain_q = recon[0.0].quality_mask  # the mask the chain's background removal used
    labels = s0.dseg.astype(np.int32)

    def invert(local_and_mask):  # the data term on the background removal's own output mask, as the chain
        local, data_mask = local_and_mask
        return invert_as_chain(local, data_mask & brain_q, brain_q, vs, s0.b0_dir, cfg)

    def field(e):
        return np.where(brain_q, recon[e].field_ppm, 0).astype(np.float32)

    true_local = {e: brain_local_field(s, brain_q, vs) for e, s in sims.items()}
    lbv_true = {e: bgremove.lbv(true_local[e], brain_q, vs) for e in sims}  # (local field, LBV's interior)
    stages = {  # each: the local field of run e (0.0 or EFFECT_PPM) and the mask it is given on
        "true local field (perfect background removal)": lambda e: (true_local[e], brain_q),
        "LBV of the true local field": lambda e: lbv_true[e],
        "LBV of the chain's field (no correction)": lambda e: (recon[e].local_field_ppm, lbv_true[e][1]),
        "V-SHARP of the chain's field": lambda e: bgremove.vsharp(
            field(e), brain_q, vs, max_radius_mm=cfg.sharp_radius_mm),
        "PDF of the chain's field": lambda e: bgremove.pdf(field(e), brain_q, vs, b0_dir=s0.b0_dir),
    }
    true_delta = np.where(final, true_local[EFFECT_PPM] - true_local[0.0], 0)
    far_labels = atlas.table.loc[[f"{r}_{h}" not in adjacent and r not in PLANTED and r in STUDY_ROIS
                                  for r, h in zip(atlas.table.roi, atlas.table.hemisphere)], "index"]
    far_mask = np.isin(labels, far_labels.to_numpy()) & final
    rows = [{"noise": noise, "stage": "truth chi", **_ref_shift(
        {e: np.where(final, sims[e].chi_ppm, 0) for e in sims}, labels, atlas, vs, final, adjacent)}]
    for name, make in stages.items():
        t0 = time.perf_counter()
        loc = {e: make(e) for e in sims}
        chi = {e: invert(loc[e]) for e in sims}
        row = {"noise": noise, "stage": name, **_ref_shift(chi, labels, atlas, vs, final, adjacent),
               **_accuracy(chi[0.0], s0.chi_ppm, labels, atlas, vs, final, s0.brain)}
        if noise == "noise-free":
            d = np.where(final, loc[EFFECT_PPM][0] - loc[0.0][0], 0)
            lost = np.where(final, true_delta - d, 0)
            row.update({"effect field RMS (ppb)": 1e3 * float(np.sqrt(np.mean(d[final] ** 2))),
                        "lost field RMS (ppb)": 1e3 * float(np.sqrt(np.mean(lost[final] ** 2))),
                        "lost field, non-adjacent ROIs (ppb)": 1e3 * float(lost[far_mask].mean())})
        rows.append(row)
        print(f"{noise}: {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    # single step: no separate background removal
    t0 = time.perf_counter()
    one = ChainConfig(inversion_method="tv_laplacian")
    chi = {e: tv_admm(np.where(brain_q, recon[e].field_ppm, 0), brain_q, vs, b0_dir=s0.b0_dir,
                      lam=one.tv_laplacian_lambda, max_iter=one.tv_max_iter, laplacian_data=True,
                      bregman_iterations=one.tv_bregman_iterations,
                      bregman_max_iter=one.tv_bregman_max_iter, pad_voxels=one.pad_voxels) for e in sims}
    rows.append({"noise": noise, "stage": f"single step (tv_laplacian, lambda {one.tv_laplacian_lambda:g})",
                 **_ref_shift(chi, labels, atlas, vs, final, adjacent),
                 **_accuracy(chi[0.0], s0.chi_ppm, labels, atlas, vs, final, s0.brain)})
    print(f"{noise}: single step: {time.perf_counter() - t0:.0f} s", flush=True)
    return rows


#: whole chains compared by ``--fix`` (explicit options, not the defaults of the moment)
FIX_CHAINS = {
    "LBV + TV (no correction)": {"tv_mask_data": False, "lbv_boundary_depth_mm": 0.0},
    "LBV + TV mask data (no correction)": {"tv_mask_data": True, "lbv_boundary_depth_mm": 0.0},
    "LBV + TV + boundary correction (20 mm, 0.01 ppm)": {"tv_mask_data": False, "lbv_boundary_depth_mm": 20.0,
                                                          "lbv_boundary_threshold_ppm": 0.01},
    "LBV + TV mask data + boundary correction (20 mm, 0.01 ppm)": {
        "tv_mask_data": True, "lbv_boundary_depth_mm": 20.0, "lbv_boundary_threshold_ppm": 0.01},
    # the option lbv_boundary_estimate_iter: sources from a 5-iteration TV solve, correction in the
    # data from the first iteration (docs/benchmarks.md, "How far the correction is from a perfect one")
    "LBV + TV mask data + early-estimate correction (5 it, 15 mm, 0.02 ppm)": {
        "tv_mask_data": True, "lbv_boundary_depth_mm": 15.0, "lbv_boundary_threshold_ppm": 0.02,
        "lbv_boundary_estimate_iter": 5},
    # the preset tv_exterior: no TV penalty outside the mask, no correction (docs/benchmarks.md, recon-exterior)
    "LBV + TV mask data, free exterior sources (preset tv_exterior)": {"preset": "tv_exterior"},
}


def fix_table(seed: int, noise: str, snr: float, atlas, adjacent, chains=None) -> list[dict]:
    """Whole chains with and without the boundary-field correction on one head (``chains``: name ->
    ChainConfig options, default :data:`FIX_CHAINS`)."""
    from qsmdask.chain import ChainConfig, reconstruct
    from qsmdask.kernels import voxel_size_from_affine

    sims = {e: _simulate(seed, e, snr, t1w=False) for e in (0.0, EFFECT_PPM)}
    s0 = sims[0.0]
    vs = voxel_size_from_affine(s0.affine)
    labels = s0.dseg.astype(np.int32)
    rows, final = [], None
    for name, opts in (FIX_CHAINS if chains is None else chains).items():
        chi, secs = {}, []
        for e, s in sims.items():
            t0 = time.process_time()
            r = reconstruct(s.magnitude, s.phase_rad, s.echo_times_s, vs, b0_dir=s.b0_dir,
                            b0_tesla=s.b0_tesla, config=ChainConfig.from_dict(opts))
            secs.append(time.process_time() - t0)
            if final is None:
                final = r.mask  # one ROI mask for every chain of this head and noise level
            chi[e] = r.chi_ppm
        rows.append({"seed": seed, "noise": noise, "chain": name,
                     **_ref_shift(chi, labels, atlas, vs, final, adjacent),
                     **_accuracy(chi[0.0], s0.chi_ppm, labels, atlas, vs, final, s0.brain),
                     "chain CPU s": float(np.mean(secs))})
        print(rows[-1], flush=True)
    return rows


def _true_source_field(s, interior, quality_mask, vs, depth_mm, cfg) -> np.ndarray:
    """The boundary-field correction with the chain's source selection (deeper than ``depth_mm`` in
    LBV's interior, median removed, threshold; ``chain.boundary_correction``) applied to the TRUE chi."""
    from qsmdask import bgremove
    from qsmdask.kernels import distance_to_edge_mm

    region = interior & (distance_to_edge_mm(interior, vs) > depth_mm)
    dev = np.where(region, s.chi_ppm - np.median(s.chi_ppm[region]), 0)
    src = np.where(np.abs(dev) > cfg.lbv_boundary_threshold_ppm, dev, 0).astype(np.float32)
    return bgremove.lbv_boundary_field(src, region, quality_mask, vs, b0_dir=s.b0_dir,
                                       pad_voxels=cfg.pad_voxels)[0]


def floor_rows(seed: int, noise: str, snr: float, atlas, adjacent) -> list[dict]:
    """How much of the default chain's halo is LBV's boundary condition (``--floor``).

    The simulator's ``local_field_ppm`` is 0 outside its brain label, but the chain's quality mask
    holds a rim of other voxels (about 3 % of it, at the edge, where LBV reads its boundary
    values), where the brain's own field is not 0. So the local field is recomputed here as the
    dipole field of the brain's chi on the whole quality mask (``dipole_field``), and rows are:
    the default chain; the chain's LBV output (no correction) plus the EXACT boundary field of
    that local field (what a perfect correction would add); the chain's source selection (region
    deeper than ``lbv_boundary_depth_mm``, resp. 10 mm, median removed, threshold) applied to the
    TRUE chi instead of the first TV estimate; that local field itself on the chain's masks (a
    perfect background removal). Each run uses its own masks; TV as the chain. ``share``: the
    projection of each correction's planted-minus-unplanted part on the exact one's."""
    from qsmdask import bgremove
    from qsmdask.chain import ChainConfig, reconstruct
    from qsmdask.kernels import voxel_size_from_affine

    cfg = ChainConfig()
    sims = {e: _simulate(seed, e, snr, t1w=False) for e in (0.0, EFFECT_PPM)}
    s0 = sims[0.0]
    vs = voxel_size_from_affine(s0.affine)
    labels = s0.dseg.astype(np.int32)

    def rec(opts):
        return {e: reconstruct(s.magnitude, s.phase_rad, s.echo_times_s, vs, b0_dir=s.b0_dir,
                               b0_tesla=s.b0_tesla, config=ChainConfig(**opts)) for e, s in sims.items()}

    no_correction = ChainConfig(lbv_boundary_depth_mm=0.0)

    def invert(local, data_mask, brain):  # as the chain: the data term on data_mask, chi on brain
        return invert_as_chain(local, data_mask, brain, vs, s0.b0_dir, no_correction)

    default, plain = rec({}), rec({"lbv_boundary_depth_mm": 0.0})
    final = default[0.0].mask
    depth = cfg.lbv_boundary_depth_mm
    names = {"default": "default chain",
             "exact": "chain's LBV (no correction) + exact boundary field",
             "deep": f"chain's LBV + boundary field of the TRUE chi deeper than {depth:g} mm (chain's threshold)",
             "deep10": "chain's LBV + boundary field of the TRUE chi deeper than 10 mm (chain's threshold)",
             "true": "true local field (whole quality mask) on the chain's masks"}
    chi = {k: {} for k in names}
    h_eff = {k: {} for k in ("exact", "chain", "deep", "deep10")}
    outside = []
    for e, s in sims.items():
        q, m = plain[e].quality_mask, plain[e].mask
        outside.append(float((q & ~s.brain).mean() / q.mean()))
        f = brain_local_field(s, q, vs)
        kept, interior = bgremove.lbv(f, q, vs)
        h_eff["exact"][e] = np.where(interior, f - kept, 0)
        h_eff["chain"][e] = np.where(m, default[e].local_field_ppm - plain[e].local_field_ppm, 0)
        for key, d_mm in (("deep", depth), ("deep10", 10.0)):
            h_eff[key][e] = _true_source_field(s, interior, q, vs, d_mm, cfg)
        chi["default"][e] = default[e].chi_ppm
        for key in ("exact", "deep", "deep10"):  # LBV's output and the corrections: data on LBV's interior
            chi[key][e] = invert(plain[e].local_field_ppm + h_eff[key][e], interior, q)
        chi["true"][e] = invert(f, q, q)  # a perfect local field: data on the whole quality mask
    ex = h_eff["exact"][EFFECT_PPM] - h_eff["exact"][0.0]
    share = {}  # projection of each correction's planted-effect part on the exact one
    for key, h in h_eff.items():
        dh = h[EFFECT_PPM] - h[0.0]
        share[key] = float(np.sum(dh[final] * ex[final]) / np.sum(ex[final] ** 2))
    share["default"] = share.pop("chain")
    rows = []
    for key, name in names.items():
        rows.append({"seed": seed, "noise": noise, "row": name,
                     **_ref_shift(chi[key], labels, atlas, vs, final, adjacent),
                     **_accuracy(chi[key][0.0], s0.chi_ppm, labels, atlas, vs, final, s0.brain),
                     "share of the effect's lost field given back": share.get(key, np.nan),
                     "quality mask outside the brain label %": 100 * float(np.mean(outside))})
        print(rows[-1], flush=True)
    return rows


def main(argv=None):
    from qsmdask.atlas import load_atlas

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=101)
    ap.add_argument("--fix", action="store_true", help="whole chains with and without the boundary correction")
    ap.add_argument("--seeds", type=int, nargs="+", default=[101, 102])
    ap.add_argument("--floor", action="store_true",
                    help="the default chain beside a perfect boundary-field correction (printed only)")
    ap.add_argument("--floor-heads", type=int, default=0, metavar="N",
                    help="the floor's decomposition on the first N null heads of bench/reference.py "
                         "--null-heads, with the white-matter reference")
    ap.add_argument("--chains", metavar="JSON", default=None,
                    help="--fix: compare these chains (JSON object: name -> ChainConfig options) instead of "
                         "FIX_CHAINS; printed only (no --write-doc)")
    ap.add_argument("--write-doc", action="store_true")
    a = ap.parse_args(argv)
    if a.chains is not None and (a.write_doc or not a.fix):
        ap.error("--chains goes with --fix and without --write-doc (the committed table is FIX_CHAINS')")
    machine = machine_description()
    t_start = time.perf_counter()
    atlas = load_atlas("aal")
    adjacent = _adjacent_rois(atlas)
    if a.fix:
        return fix_main(a, atlas, adjacent, machine, t_start)
    if a.floor_heads:
        table = floor_heads_rows(a.floor_heads)
        pd.set_option("display.width", 250)
        print(table.to_string(index=False))
        wall = time.perf_counter() - t_start
        print(f"{machine}; wall {wall:.0f} s")
        if a.write_doc:
            text = ("## The floor on the null heads (`bench/halo.py --floor-heads`, issue 14)\n\n"
                    f"Command: `python bench/halo.py --floor-heads {a.floor_heads} --write-doc`. Machine: "
                    f"{machine}. Wall {wall:.0f} s. The null heads of `bench/reference.py --null-heads` "
                    f"(seeds 201..{200 + a.floor_heads}, SNR 50, 2 mm), each without and with "
                    f"+{EFFECT_PPM} ppm in putamen, thalamus and hippocampus; rows as in "
                    "`bench/halo.py::floor_heads_rows`, every inversion as the chain inverts its own LBV "
                    "output (`invert_as_chain`). Shift: % of the planted effect, mean over the heads, as "
                    "the null-heads table.\n\n" + markdown_table(table.to_dict("records"), floatfmt=".2f"))
            update_section("halo-floor-heads", text)
        return None
    if a.floor:
        rows = []
        for seed in a.seeds:
            for noise, snr in (("noise-free", 1e6), ("SNR 50", 50.0)):
                rows += floor_rows(seed, noise, snr, atlas, adjacent)
        pd.set_option("display.width", 250)
        print(pd.DataFrame(rows).to_string(index=False))
        wall = time.perf_counter() - t_start
        print(f"{machine}; wall {wall:.0f} s")
        if a.write_doc:
            seeds = " ".join(str(x) for x in a.seeds)
            text = ("## How far the correction is from a perfect one (`bench/halo.py --floor`, issue 14)\n\n"
                    f"Command: `nice python bench/halo.py --floor --seeds {seeds} --write-doc`. Machine: "
                    f"{machine} (shared, loaded). Wall {wall:.0f} s. Head(s) {seeds}, without and with "
                    f"+{EFFECT_PPM} ppm in putamen, thalamus and hippocampus; rows as in "
                    "`bench/halo.py::floor_rows` (the local field recomputed as the field of the brain's chi "
                    "on the whole quality mask). Shift: % of the planted effect, no reference; ROIs on the "
                    "default chain's final mask of the unplanted run.\n\n"
                    + markdown_table(rows, floatfmt=".2f"))
            update_section("halo-floor", text)
        return None
    rows = []
    for noise, snr in (("noise-free", 1e6), ("SNR 50", 50.0)):
        rows += head_table(a.seed, noise, snr, atlas, adjacent)
    table = pd.DataFrame(rows)
    pd.set_option("display.width", 250)
    print(table.to_string(index=False))
    wall = time.perf_counter() - t_start
    if a.write_doc:
        text = ("## Where the halo comes from (`bench/halo.py`, issue 14)\n\n"
                f"Command: `nice python bench/halo.py --seed {a.seed} --write-doc`. Machine: {machine} "
                f"(shared, loaded). Wall {wall:.0f} s. One simulated head (seed {a.seed}) without and "
                f"with +{EFFECT_PPM} ppm in putamen, thalamus and hippocampus, noise-free and SNR 50; "
                "every row but the last is the same TV inversion (chain parameters, `tv_mask_data`) of a "
                "different local field on the chain's final mask; the last is the single-step "
                "inversion (see the module docstring). Shift: % of the planted effect, non-planted "
                "ROIs, no reference. Adjacent: amygdala, caudate, insula, pallidum (as in the "
                "referencing table).\n\n"
                + markdown_table(table.to_dict("records"), floatfmt=".2f"))
        update_section("halo", text)
    print(f"wall {wall:.0f} s")


def fix_main(a, atlas, adjacent, machine, t_start):
    rows = []
    for seed in a.seeds:
        for noise, snr in (("noise-free", 1e6), ("SNR 50", 50.0)):
            rows += fix_table(seed, noise, snr, atlas, adjacent,
                              None if a.chains is None else json.loads(a.chains))
    table = pd.DataFrame(rows)
    num = table.select_dtypes("number").columns.drop("seed")
    mean = table.groupby(["noise", "chain"], sort=False)[list(num)].mean().reset_index()
    mean.insert(0, "seed", "mean")
    pd.set_option("display.width", 250)
    print(table.to_string(index=False))
    print(mean.to_string(index=False))
    wall = time.perf_counter() - t_start
    if a.write_doc:
        seeds = " ".join(str(x) for x in a.seeds)
        text = ("## The boundary-field correction (`bench/halo.py --fix`, issue 14)\n\n"
                f"Command: `nice python bench/halo.py --fix --seeds {seeds} --write-doc`. Machine: "
                f"{machine} (shared, loaded). Wall {wall:.0f} s. Heads {seeds} (`bench.reference._simulate`, "
                f"2 mm), each without and with +{EFFECT_PPM} ppm in putamen, thalamus and hippocampus, "
                "noise-free and SNR 50, reconstructed by whole chains (the options in "
                "`bench/halo.py::FIX_CHAINS`; each chain's own masks, ROI means on the first chain's final "
                "mask of the unplanted run). Shift: % of the planted effect, no reference; columns as in "
                "the table above. `chain CPU s`: process CPU time of one reconstruction (the 2 mm head, "
                "not the 256x256x80 budget of recon (c)).\n\n"
                + markdown_table(table.to_dict("records"), floatfmt=".2f")
                + "\nMean over the heads (of each head's value; the max columns are the mean of each head's max):\n\n"
                + markdown_table(mean.drop(columns=["seed"]).to_dict("records"), floatfmt=".2f"))
        update_section("halo-fix", text)
    print(f"wall {wall:.0f} s")


def floor_heads_rows(n_heads: int) -> "pd.DataFrame":
    """The floor on the null heads of ``bench/reference.py --null-heads`` (seeds 201..), SNR 50, 2 mm:
    the same decomposition as :func:`floor_rows`, with the references none and white matter (the
    prior brought to native space as there). Rows: the default chain; the chain without the
    boundary-field correction; the chain's LBV output plus the EXACT boundary field of the true
    local field (data on LBV's interior, as the chain); the default correction applied to LBV of the
    true local field; the true local field itself (field of the brain's chi and of the quality mask's
    rim, on the whole quality mask). Shift table as ``--null-heads`` (mean over heads)."""
    from qsmdask import bgremove
    from qsmdask.chain import ChainConfig, reconstruct
    from qsmdask.kernels import voxel_size_from_affine
    from bench.reference import Context, quick_white_matter_prior, referenced_roi_rows, shift_table

    ctx, cfg, plain_cfg = Context(), ChainConfig(), ChainConfig(lbv_boundary_depth_mm=0.0)
    rows = []
    for seed in range(201, 201 + n_heads):
        final = wm = None
        for e in (0.0, EFFECT_PPM):
            t0 = time.perf_counter()
            s = _simulate(seed, e, 50.0, t1w=False, local_field=False, voxel_size_mm=(2.0,) * 3)
            vs = voxel_size_from_affine(s.affine)
            r, p = (reconstruct(s.magnitude, s.phase_rad, s.echo_times_s, vs, b0_dir=s.b0_dir,
                                b0_tesla=s.b0_tesla, config=c) for c in (cfg, plain_cfg))
            if final is None:
                final = r.mask
                wm = quick_white_matter_prior(s, r.mask, ctx)
            q = p.quality_mask
            f = brain_local_field(s, q, vs, rim_sources=True)
            kept, interior = bgremove.lbv(f, q, vs)
            exact = np.where(interior, f - kept, 0)
            maps = {"default chain": r.chi_ppm,
                    "chain without the boundary-field correction": p.chi_ppm,
                    "chain's LBV output + EXACT boundary field": invert_as_chain(
                        p.local_field_ppm + exact, interior, q, vs, s.b0_dir, plain_cfg),
                    **{f"chain's LBV output + boundary field of the TRUE chi deeper than {d:g} mm": invert_as_chain(
                        p.local_field_ppm + _true_source_field(s, interior, q, vs, d, cfg), interior, q, vs,
                        s.b0_dir, plain_cfg) for d in (cfg.lbv_boundary_depth_mm, 10.0)},
                    "default correction on LBV of the true local field": invert_as_chain(
                        kept, interior, q, vs, s.b0_dir, cfg),
                    "true local field (perfect background removal)": invert_as_chain(f, q, q, vs, s.b0_dir,
                                                                                     plain_cfg)}
            for name, c in maps.items():
                rows += referenced_roi_rows(c, name, ("none", "white_matter"), final=final, wm=wm, vs=vs,
                                            labels=s.dseg.astype(np.int32), ctx=ctx, seed=seed, noise="SNR 50",
                                            effect=e)
            print(f"head {seed} effect {e}: {time.perf_counter() - t0:.0f} s", flush=True)
    return shift_table(pd.DataFrame(rows), ctx.adjacent)


def _ref_shift(chi: dict, labels, atlas, vs, final, adjacent) -> dict:
    means = {e: _roi_means(np.where(final, c, 0), labels, atlas.table, vs, final) for e, c in chi.items()}
    rois = [k for k in means[0.0].index if k.split("_")[0] in STUDY_ROIS and k.split("_")[0] not in PLANTED]
    pct = 100.0 * (means[EFFECT_PPM][rois] - means[0.0][rois]) / EFFECT_PPM
    far = [k for k in rois if k not in adjacent]
    near = [k for k in rois if k in adjacent]
    return {"non-adjacent max abs %": float(pct[far].abs().max()),
            "non-adjacent mean %": float(pct[far].mean()),
            "worst non-adjacent": pct[far].abs().idxmax(),
            "adjacent max abs %": float(pct[near].abs().max()),
            "worst adjacent": pct[near].abs().idxmax(),
            "cingulum L %": float(pct.get("cingulum_L", np.nan)),
            "frontal L %": float(pct.get("frontal_L", np.nan))}


if __name__ == "__main__":
    main()

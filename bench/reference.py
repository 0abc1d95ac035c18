"""Referencing and halo benchmark (issue 14): does a planted deep-nuclei increase move other ROIs?

Part 1, heads. For each of a few simulated heads (``qsmdask.sim.phantom``; 2 mm GRE, TE
4/12/20 ms, 3 T, T1w), the SAME head (same tissue values, pose, phase offsets and noise
draws, one seed) is simulated twice: without and with +EFFECT ppm planted in putamen,
thalamus and hippocampus (the demo's effect regions), noise-free (SNR 1e6) and with noise
(SNR 50). Both are reconstructed with two chains (``CHAINS``: LBV + TV with the field taken
as 0 outside the mask, the default before issue 14, and ``tv_mask_data``: the TV data term
inside the mask only). The shift of every non-planted ROI (AAL groups, L and R) is reported
as a percentage of the planted effect, per stage:

- ``truth``: the simulator's own chi map (partial volume of the planted nuclei on the
  oblique acquisition grid; the floor every later stage inherits);
- ``inversion of the true local field``: the chain's TV inversion applied to the simulator's
  local field (no unwrapping, no background removal);
- ``chain, ref <reference>``: the whole chain from the wrapped phase, referenced to each
  reference choice (background removal's share is ``chain, ref none - inversion``);
- ``template``: the referenced map in MNI space (one affine registration per head, computed
  on the unplanted data and applied to both, so only interpolation is measured), ROIs from the
  AAL atlas on the template grid inside the template-space brain mask;
- ``smooth``: the template map smoothed with 3 mm FWHM (mask-aware), as in the voxel-wise stack;
- erosion: native ROIs with erode 0 / 1 / 2 mm.

Native ROIs use the simulator's true AAL labels (``dseg``) inside the reconstruction's
final mask of the unplanted run, eroded 1 mm (the pipeline default), so registration error
does not enter the native stages. A ROI is "adjacent" to the planted ones when at least 5 %
of its AAL voxels lie within 4 mm of a planted label (MNI space, 1 mm atlas): amygdala,
caudate, insula and pallidum; frontal, temporal, occipital, parietal, cingulum and cerebellum
are not.

Part 2, null cohorts: see :func:`null_cohorts` (built from the heads' ROI values).

Command: ``nice python bench/reference.py [--heads 3] [--cohorts 200] [--write-doc]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._report import machine_description, markdown_table, update_section  # noqa: E402

# one ITK thread before ANTs first runs: the white-matter prior's registration is then the same
# from run to run (with the default thread count two runs of the same heads differed by up to
# 0.2 ppb per ROI with the white-matter reference)
os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")

EFFECT_PPM = 0.05
PLANTED = ("putamen", "thalamus", "hippocampus")
REFERENCES = ("none", "whole_brain", "white_matter", "csf", "roi:occipital")
#: chains compared (explicit, not the defaults of the moment): the TV data term with the field
#: taken as 0 outside the mask (the default before issue 14) and fitted inside the mask only
CHAINS = {"tv": {}, "tv_mask_data": {"tv_mask_data": True}}
SNRS = {"noise-free": 1e6, "SNR 50": 50.0}
STUDY_ROIS = ("frontal", "temporal", "occipital", "parietal", "cingulum", "cerebellum", "insula",
              "amygdala", "caudate", "pallidum")


def _simulate(seed: int, effect: float, snr: float, *, t1w: bool = True, local_field: bool = True,
              **session_kw):
    """Head ``seed`` with ``effect`` ppm planted in PLANTED (same values, pose and noise with and
    without it); ``session_kw`` goes to ``phantom.simulate_session`` (e.g. ``voxel_size_mm``)."""
    from qsmdask.sim import phantom

    rv = np.random.default_rng([seed, 2])
    values = phantom.sample_tissue_values(rv, age_years=40.0, effect_ppm=effect,
                                          effect_regions=PLANTED if effect else ())
    shape = phantom.random_shape(rv)
    rng = np.random.default_rng([seed, 4])
    pose = phantom.random_pose(rng, shape=shape)
    return phantom.simulate_session(values=values, pose=pose, rng=rng, snr=snr, t1w=t1w,
                                    local_field=local_field, **session_kw)


def _roi_means(chi, labels, table, vs, mask, erode_mm=1.0) -> pd.Series:
    from qsmdask.roi import roi_statistics

    t = roi_statistics(chi, labels.astype(np.int32), table, voxel_size_mm=vs, erode_mm=erode_mm,
                       min_voxels=5, mask=mask)
    t = t[(t.level == "group") & t.hemisphere.isin(["L", "R"])]
    return pd.Series(t.mean_ppm.to_numpy(), index=t.roi + "_" + t.hemisphere)


def _adjacent_rois(atlas) -> set:
    from scipy import ndimage

    planted = atlas.table.loc[atlas.table.roi.isin(PLANTED), "index"].to_numpy()
    vs = np.abs(np.diag(atlas.affine)[:3])
    dist = ndimage.distance_transform_edt(~np.isin(atlas.labels, planted), sampling=vs)
    near = set()
    for (roi, hemi), g in atlas.table.groupby(["roi", "hemisphere"]):
        m = np.isin(atlas.labels, g["index"].to_numpy())
        if m.any() and (dist[m] <= 4.0).mean() >= 0.05:
            near.add(f"{roi}_{hemi}")
    return near


class Context:
    def __init__(self):
        from qsmdask.atlas import load_atlas, load_template, load_template_mask, load_template_tissue
        from qsmdask.reference import lateral_ventricle_prior
        from qsmdask.registration import Transform, apply_transform

        self.atlas = load_atlas("aal")
        self.tpl, self.tpl_aff = load_template(2)
        self.tpl_mask = load_template_mask(2)[0]
        csf, aff = load_template_tissue("csf", 2)
        self.ventricles = lateral_ventricle_prior(csf, aff).astype(np.int32)
        self.wm = (load_template_tissue("wm", 2)[0] > 0.9).astype(np.int32)
        self.atlas_tpl = apply_transform(self.atlas.labels, self.atlas.affine, Transform.identity(),
                                         self.tpl.shape, self.tpl_aff,
                                         interpolation="nearest").astype(np.int32)
        self.adjacent = _adjacent_rois(self.atlas)


def head_rows(seed: int, ctx: Context) -> list[dict]:
    """Every stage's ROI means for one head, both noise levels, with and without the effect."""
    from qsmdask.chain import ChainConfig, reconstruct
    from qsmdask.inversion import tv_admm
    from qsmdask.kernels import voxel_size_from_affine
    from qsmdask.reference import r2star_map, reference_mask, reference_value
    from qsmdask.registration import standardise
    from qsmdask.roi import smooth_gaussian

    rows = []
    sn = None
    tab = ctx.atlas.table
    for noise, snr in SNRS.items():
        sims = {e: _simulate(seed, e, snr) for e in (0.0, EFFECT_PPM)}
        s0 = sims[0.0]
        vs = voxel_size_from_affine(s0.affine)
        if sn is None:  # one registration per head (T1w identical with and without the effect)
            t0 = time.perf_counter()
            sn = standardise(s0.magnitude[..., 0], s0.affine, t1w=s0.t1w, t1w_affine=s0.t1w_affine,
                             template=ctx.tpl, template_affine=ctx.tpl_aff, method="affine")
            print(f"  seed {seed}: registration {time.perf_counter() - t0:.0f} s", flush=True)
        labels = s0.dseg.astype(np.int32)
        vent = sn.labels_to_native(ctx.ventricles, ctx.tpl_aff, s0.brain.shape, s0.affine) > 0
        wm = sn.labels_to_native(ctx.wm, ctx.tpl_aff, s0.brain.shape, s0.affine) > 0
        final = None
        for e, s in sims.items():
            base = dict(seed=seed, noise=noise, effect=e)
            r2s = None
            for cname, opts in CHAINS.items():
                cfg = ChainConfig(**opts)
                t0 = time.perf_counter()
                r = reconstruct(s.magnitude, s.phase_rad, s.echo_times_s, vs, b0_dir=s.b0_dir,
                                b0_tesla=s.b0_tesla, config=cfg)
                if final is None:  # one ROI mask for every run of this head and noise level
                    final = r.mask
                if r2s is None:  # once per simulated session
                    r2s = r2star_map(s.magnitude, s.echo_times_s, final)
                    rows.append({**base, "stage": "truth",
                                 **_roi_means(np.where(s.brain, s.chi_ppm, 0), labels, tab, vs, final)})
                inv = tv_admm(np.where(final, s.local_field_ppm, 0).astype(np.float32), final, vs,
                              b0_dir=s.b0_dir, lam=cfg.tv_lambda, max_iter=cfg.tv_max_iter,
                              edge_fraction=0.0, mask_data=cfg.tv_mask_data,
                              bregman_iterations=cfg.tv_bregman_iterations,
                              bregman_max_iter=cfg.tv_bregman_max_iter, pad_voxels=cfg.pad_voxels)
                print(f"  seed {seed} {noise} effect {e} {cname}: {time.perf_counter() - t0:.0f} s",
                      flush=True)
                rows.append({**base, "stage": f"{cname}: inversion of the true local field",
                             **_roi_means(inv, labels, tab, vs, final)})
                for ref in REFERENCES:
                    prior = vent if ref == "csf" else wm
                    region, info = reference_mask(ref, mask=final, voxel_size_mm=vs, prior=prior,
                                                  labels=labels, label_table=tab, r2star_hz=r2s)
                    chi = np.where(final, r.chi_ppm - reference_value(r.chi_ppm, region), 0)
                    if ref == "csf":
                        csf_info = info
                    rows.append({**base, "stage": f"{cname}: chain, ref {ref}",
                                 **_roi_means(chi, labels, tab, vs, final)})
                    if cname != "tv_mask_data" or ref not in ("none", "whole_brain", "white_matter"):
                        continue
                    for er in (0.0, 2.0):
                        rows.append({**base, "stage": f"{cname}: chain, ref {ref}, erode {er:g} mm",
                                     **_roi_means(chi, labels, tab, vs, final, erode_mm=er)})
                    ctpl, _ = sn.to_template(chi, interpolation="linear")
                    mtpl = sn.to_template(final.astype(np.float32))[0] > 0.5
                    rows.append({**base, "stage": f"{cname}: template, ref {ref}",
                                 **_roi_means(ctpl, ctx.atlas_tpl, tab, (2, 2, 2), mtpl)})
                    sm = smooth_gaussian(ctpl, voxel_size_mm=(2, 2, 2), fwhm_mm=3.0, mask=mtpl)
                    rows.append({**base, "stage": f"{cname}: template smooth 3 mm, ref {ref}",
                                 **_roi_means(sm, ctx.atlas_tpl, tab, (2, 2, 2), mtpl)})
                if cname == "tv":
                    rows.append({**base, "stage": "_csf_info", "n_voxels": csf_info["n_voxels"],
                                 "r2star_refined": csf_info["r2star_refined"]})
    return rows


def quick_white_matter_prior(s, mask, ctx: Context) -> np.ndarray:
    """The template's white-matter prior in the native space of simulated session ``s``, brought
    there by the demo's quick direct affine (GRE magnitude -> 2 mm template), ``mask`` the brain."""
    from qsmdask.registration import standardise

    sn = standardise(s.magnitude[..., 0], s.affine, method="affine", quick=True, magnitude_mask=mask,
                     template=ctx.tpl, template_affine=ctx.tpl_aff)
    return sn.labels_to_native(ctx.wm, ctx.tpl_aff, s.brain.shape, s.affine) > 0


def referenced_roi_rows(chi, stage: str, refs, *, final, wm, vs, labels, ctx: Context, **keys) -> list[dict]:
    """ROI means of ``chi`` on ``final`` after subtracting each reference in ``refs`` (none /
    whole_brain / white_matter, the last from the prior ``wm``): one row per reference, its stage
    ``"<stage>, ref <reference>"``, with ``keys`` (seed, noise, effect)."""
    from qsmdask.reference import reference_mask, reference_value

    rows = []
    for ref in refs:
        region, _ = reference_mask(ref, mask=final, voxel_size_mm=vs, prior=wm)
        x = np.where(final, chi - reference_value(chi, region), 0)
        rows.append({**keys, "stage": f"{stage}, ref {ref}", **_roi_means(x, labels, ctx.atlas.table, vs, final)})
    return rows


def null_head_rows(seed: int, ctx: Context, chain: dict, snr: float = 50.0,
                   voxel_size_mm: float = 2.0) -> list[dict]:
    """Native ROI means of one head without and with the planted effect (one noise level, one
    chain, references none / whole_brain / white_matter): the cheaper per-head step of the
    null cohorts built from many heads (``--null-heads``). The white-matter prior is brought
    to native space by the demo's quick direct affine (GRE magnitude -> 2 mm template)."""
    from qsmdask.chain import ChainConfig, reconstruct
    from qsmdask.kernels import voxel_size_from_affine

    rows, final, wm = [], None, None
    for e in (0.0, EFFECT_PPM):
        s = _simulate(seed, e, snr, t1w=False, local_field=False, voxel_size_mm=(voxel_size_mm,) * 3)
        vs = voxel_size_from_affine(s.affine)
        t0 = time.perf_counter()
        r = reconstruct(s.magnitude, s.phase_rad, s.echo_times_s, vs, b0_dir=s.b0_dir,
                        b0_tesla=s.b0_tesla, config=ChainConfig.from_dict(chain))
        if final is None:
            final = r.mask
            wm = quick_white_matter_prior(s, r.mask, ctx)
        print(f"  head {seed} effect {e}: {time.perf_counter() - t0:.0f} s", flush=True)
        rows += referenced_roi_rows(r.chi_ppm, "heads: chain", ("none", "whole_brain", "white_matter"),
                                    final=final, wm=wm, vs=vs, labels=s.dseg.astype(np.int32), ctx=ctx,
                                    seed=seed, noise=f"SNR {snr:g}", effect=e)
    return rows


def shift_table(rows: pd.DataFrame, adjacent: set) -> pd.DataFrame:
    """Shift (% of the planted effect) of every non-planted ROI, mean over heads.

    ``any-reference floor %`` is half the range of the non-adjacent shifts: a reference subtracts
    one value per head from every ROI, i.e. one constant from these means, so no reference region
    (any mask, any weighting) can bring the worst non-adjacent shift below it. It is the same for
    every reference of one chain; with ``max abs`` it says how much of a row's shift a better
    reference could still remove.
    """
    rows = rows[~rows.stage.str.startswith("_")].dropna(axis=1, how="all")
    rois = [c for c in rows.columns if "_" in c and c.split("_")[0] not in PLANTED
            and c.split("_")[0] in STUDY_ROIS]
    out = []
    for (noise, stage), g in rows.groupby(["noise", "stage"], sort=False):
        a = g[g.effect == 0.0].set_index("seed")[rois]
        b = g[g.effect > 0].set_index("seed")[rois]
        pct = 100.0 * (b - a) / EFFECT_PPM
        mean = pct.mean()
        far = [c for c in rois if c not in adjacent]
        near = [c for c in rois if c in adjacent]
        out.append({"noise": noise, "stage": stage,
                    "non-adjacent max abs shift %": float(mean[far].abs().max()),
                    "non-adjacent mean shift %": float(mean[far].mean()),
                    "worst non-adjacent": mean[far].abs().idxmax(),
                    "any-reference floor %": float((mean[far].max() - mean[far].min()) / 2.0),
                    "adjacent max abs shift %": float(mean[near].abs().max()),
                    "worst adjacent": mean[near].abs().idxmax(),
                    "frontal L %": float(mean.get("frontal_L", np.nan)),
                    "cingulum L %": float(mean.get("cingulum_L", np.nan)),
                    "caudate L %": float(mean.get("caudate_L", np.nan)),
                    "pallidum L %": float(mean.get("pallidum_L", np.nan))})
    return pd.DataFrame(out)


def null_cohorts(rows: pd.DataFrame, adjacent: set, *, chain: str, reference: str, n_cohorts: int,
                 n_per_group: int = 8, seed: int = 0, alpha: float = 0.05, stage: str | None = None) -> dict:
    """Bonferroni-significant rate per non-planted ROI across simulated cohorts.

    Built from the reconstructed heads (noisy, SNR 50, native, erode 1 mm, ``reference``):
    a subject's ROI vector is ``u_k + b + s * (p_k - u_k)`` with ``k`` a head drawn at
    random, ``u_k``/``p_k`` that head's unplanted/planted ROI means, ``b`` the simulator's
    between-subject deviation (normal, SD 8 % of the tissue's base chi + 0.004 ppm, the
    ``sample_tissue_values`` model, drawn per ROI) and ``s`` = 0 for controls, a severity
    ~ N(1, 0.25) for patients (the planted deep-nuclei effect scaled, including whatever it
    does to the other ROIs in the reconstruction: the chain is linear to first order in chi).
    Per cohort: Mann-Whitney U per ROI x hemisphere over the 8 study ROIs (16 tests,
    Bonferroni), as ``qsmdask.stats.group_wilcoxon`` does.
    """
    from scipy import stats

    from qsmdask.sim.phantom import BASE_CHI_PPM

    stage = stage or f"{chain}: chain, ref {reference}"
    g = rows[(rows.noise == "SNR 50") & (rows.stage == stage)]
    study = ("frontal", "temporal", "occipital", "hippocampus", "putamen", "thalamus", "cingulum",
             "cerebellum")
    cols = [f"{r}_{h}" for r in study for h in "LR"]
    u = g[g.effect == 0.0].set_index("seed")[cols].to_numpy()
    p = g[g.effect > 0].set_index("seed")[cols].to_numpy()
    base = {"frontal": "gm", "temporal": "gm", "occipital": "gm", "cingulum": "gm",
            "cerebellum": "gm"}
    sd = np.array([0.08 * abs(BASE_CHI_PPM[base.get(c.split("_")[0], c.split("_")[0])]) + 0.004
                   for c in cols])
    rng = np.random.default_rng(seed)
    m = len(cols)
    hits = np.zeros(m, int)
    planted_cols = np.array([c.split("_")[0] in PLANTED for c in cols])
    any_hit = 0
    for _ in range(n_cohorts):
        n = 2 * n_per_group
        k = rng.integers(0, len(u), size=n)
        sev = np.r_[np.zeros(n_per_group), rng.normal(1.0, 0.25, n_per_group)]
        x = u[k] + rng.normal(0.0, sd, size=(n, m)) + sev[:, None] * (p[k] - u[k])
        pv = stats.mannwhitneyu(x[n_per_group:], x[:n_per_group], axis=0).pvalue
        sig = np.minimum(pv * m, 1.0) < alpha
        hits += sig
        any_hit += bool(sig[~planted_cols].any())
    rate = hits / n_cohorts
    nominal = alpha / m
    upper = stats.binom.ppf(0.975, n_cohorts, nominal) / n_cohorts
    res = {"chain": chain, "reference": reference, "heads": len(u), "cohorts": n_cohorts, "nominal per ROI": nominal,
           "95% upper band": upper}
    far, near = [], []
    for c, r in zip(cols, rate):
        if c.split("_")[0] in PLANTED:
            res[f"power {c}"] = r
        else:
            (near if c in adjacent else far).append((c, r))
    res["max rate non-planted"] = max(r for _, r in far + near)
    res["worst non-planted"] = max(far + near, key=lambda t: t[1])[0]
    res["non-planted within band"] = all(r <= upper for _, r in far + near)
    res["frontal_L rate"] = dict(far + near).get("frontal_L", np.nan)
    # family view: cohorts with at least one Bonferroni-significant non-planted ROI, against the
    # share of alpha those ROIs hold (alpha * non-planted tests / tests) and its binomial band
    fam = alpha * int((~planted_cols).sum()) / m
    res["any non-planted rate"] = any_hit / n_cohorts
    res["any non-planted nominal"] = fam
    res["any non-planted upper band"] = stats.binom.ppf(0.975, n_cohorts, fam) / n_cohorts
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--cohorts", type=int, default=400)
    ap.add_argument("--write-doc", action="store_true")
    ap.add_argument("--rows", default=None, help="reuse rows saved by an earlier run (CSV)")
    ap.add_argument("--save-rows", default=None)
    ap.add_argument("--null-heads", type=int, default=0,
                    help="instead of part 1: null cohorts from this many distinct heads (seeds 201..), "
                         "one chain (--null-chain), SNR 50, native ROIs")
    ap.add_argument("--null-chain", default="{}", help="ChainConfig options as JSON (default: the defaults)")
    ap.add_argument("--null-voxel-mm", type=float, default=2.0)
    a = ap.parse_args(argv)
    machine = machine_description()
    t0 = time.perf_counter()
    ctx = Context()
    if a.null_heads:
        return null_main(a, ctx, machine, t0)
    if a.rows:
        rows = pd.read_csv(a.rows)
    else:
        rows = []
        for seed in range(101, 101 + a.heads):
            rows += head_rows(seed, ctx)
        rows = pd.DataFrame(rows)
        if a.save_rows:
            rows.to_csv(a.save_rows, index=False)
    shifts = shift_table(rows, ctx.adjacent)
    pd.set_option("display.width", 250)
    print(shifts.to_string(index=False))
    csf = rows[rows.stage == "_csf_info"][["seed", "noise", "effect", "n_voxels", "r2star_refined"]]
    print(csf.to_string(index=False))
    nulls = [null_cohorts(rows, ctx.adjacent, chain=c, reference=ref, n_cohorts=a.cohorts)
             for c in CHAINS for ref in REFERENCES]
    ncols = ["chain", "reference", "cohorts", "nominal per ROI", "95% upper band", "max rate non-planted",
             "worst non-planted", "frontal_L rate", "non-planted within band",
             "power putamen_L", "power thalamus_L", "power hippocampus_L"]
    print(pd.DataFrame(nulls)[ncols].to_string(index=False))
    wall = time.perf_counter() - t0
    if a.write_doc:
        text = (f"Command: `nice python bench/reference.py --heads {a.heads} --cohorts {a.cohorts} "
                f"--write-doc`. Machine: {machine} (shared, loaded). Wall {wall:.0f} s.\n\n"
                f"{a.heads} simulated heads (seeds 101..{100 + a.heads}), each simulated without and "
                f"with +{EFFECT_PPM} ppm in putamen, thalamus and hippocampus (same seed: same "
                "values, pose and noise), noise-free (SNR 1e6) and SNR 50, two chains (`tv`: LBV + TV with the field taken as 0 outside the mask, the default; `tv_mask_data`: the TV data term inside the mask only). Shift = "
                "(planted - unplanted) mean of a non-planted AAL ROI group (L/R rows of frontal, "
                "temporal, occipital, parietal, cingulum, cerebellum, insula, amygdala, caudate, "
                "pallidum) as % of the planted effect, mean over heads. Adjacent = >= 5 % of the "
                f"ROI's AAL voxels within 4 mm of a planted label: {sorted(c for c in ctx.adjacent if c.split('_')[0] not in PLANTED)}.\n\n"
                + markdown_table(shifts.to_dict("records"), floatfmt=".2f")
                + "\nCSF reference voxels per run (eroded 2 mm, R2* <= 10/s refinement):\n\n"
                + markdown_table(csf.to_dict("records"))
                + "\nNull cohorts (how they are built: `bench/reference.py::null_cohorts`; 8 patients"
                  " + 8 controls each, 16 Bonferroni-corrected Mann-Whitney tests, alpha 0.05): "
                  "rate of Bonferroni-significant results per ROI; a non-planted ROI should stay "
                  "under the upper end of the 95 % binomial band of its nominal rate "
                  "(alpha / 16).\n\n"
                + markdown_table([{k: r[k] for k in ncols} for r in nulls], floatfmt=".4f"))
        update_section("reference", "## Referencing and halo (`bench/reference.py`, issue 14)\n\n" + text)
    print(f"wall {wall:.0f} s")


def null_main(a, ctx, machine, t0):
    """Null cohorts from ``a.null_heads`` distinct simulated heads (see :func:`null_head_rows`)."""
    chain = json.loads(a.null_chain)
    if a.rows:
        rows = pd.read_csv(a.rows)
    else:
        rows = []
        for seed in range(201, 201 + a.null_heads):
            rows += null_head_rows(seed, ctx, chain, voxel_size_mm=a.null_voxel_mm)
        rows = pd.DataFrame(rows)
        if a.save_rows:
            rows.to_csv(a.save_rows, index=False)
    shifts = shift_table(rows, ctx.adjacent)
    pd.set_option("display.width", 250)
    print(shifts.to_string(index=False))
    name = json.dumps(chain) if chain else "defaults"
    nulls = [null_cohorts(rows, ctx.adjacent, chain=name, reference=ref, n_cohorts=a.cohorts,
                          stage=f"heads: chain, ref {ref}") for ref in ("none", "whole_brain", "white_matter")]
    # control: the same cohorts with the halo taken out (non-planted ROIs of the planted runs set
    # to the unplanted values): what the null model gives without any leak
    ctl = rows[rows.stage == "heads: chain, ref white_matter"].copy()
    other = [c for c in ctl.columns if "_" in c and c.rsplit("_", 1)[-1] in ("L", "R")
             and c.split("_")[0] not in PLANTED]
    base = ctl[ctl.effect == 0.0].set_index("seed")[other]
    planted_rows = ctl.effect > 0
    ctl.loc[planted_rows, other] = base.loc[ctl.loc[planted_rows, "seed"]].to_numpy()
    ctl["stage"] = "control"
    nulls.append({**null_cohorts(ctl, ctx.adjacent, chain="control: halo removed", reference="white_matter",
                                 n_cohorts=a.cohorts, stage="control")})
    ncols = ["chain", "reference", "heads", "cohorts", "nominal per ROI", "95% upper band",
             "max rate non-planted", "worst non-planted", "frontal_L rate", "non-planted within band",
             "any non-planted rate", "any non-planted nominal", "any non-planted upper band",
             "power putamen_L", "power thalamus_L", "power hippocampus_L"]
    print(pd.DataFrame(nulls)[ncols].to_string(index=False))
    wall = time.perf_counter() - t0
    if a.write_doc:
        chain_arg = f" --null-chain '{a.null_chain}'" if chain else ""
        text = ("## Null cohorts from distinct heads (`bench/reference.py --null-heads`, issue 14)\n\n"
                f"Command: `nice python bench/reference.py --null-heads {a.null_heads}{chain_arg} "
                f"--null-voxel-mm {a.null_voxel_mm:g} --cohorts {a.cohorts} --write-doc`. Machine: {machine} "
                f"(shared, loaded). Wall {wall:.0f} s.\n\n"
                f"{a.null_heads} distinct simulated heads (seeds 201..{200 + a.null_heads}: each its own head "
                "shape, pose, tissue values, phase offset and noise), each reconstructed without and with "
                f"+{EFFECT_PPM} ppm in putamen, thalamus and hippocampus at SNR 50, {a.null_voxel_mm:g} mm, "
                f"chain `{name}`; white-matter prior by the quick direct affine. Shift of the non-planted ROIs "
                "(% of the planted effect, mean over the heads):\n\n"
                + markdown_table(shifts.to_dict("records"), floatfmt=".2f")
                + "\nNull cohorts (`null_cohorts`: each subject a head drawn from these, plus the "
                  "simulator's between-subject deviation; 8 patients + 8 controls, 16 Bonferroni-corrected "
                  "Mann-Whitney tests, alpha 0.05): a non-planted ROI should stay under the upper end of "
                  "the 95 % binomial band of its nominal rate (alpha / 16); `any non-planted`: cohorts "
                  "with at least one significant non-planted ROI, against alpha x 10 / 16.\n\n"
                + markdown_table([{k: r[k] for k in ncols} for r in nulls], floatfmt=".4f"))
        update_section("reference-null", text)
    print(f"wall {wall:.0f} s")


if __name__ == "__main__":
    main()

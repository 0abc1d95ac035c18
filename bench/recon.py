"""Benchmark of the QSM reconstruction library (section "recon" of docs/benchmarks.md).

(a) 2016 challenge in-vivo data (../shared/data/qsm2016): every dipole inversion on the
    given local field, scored with qsm_ci.qsm_eval.score_arrays against COSMOS and chi_33,
    runtime and peak memory (each method in a fresh child process);
(b) geometric phantoms (qsmdask.sim.geometric: small and adult-size brains, 1 mm iso and
    1x1x2 mm, oblique B0, SNR levels): the whole chain from wrapped multi-echo phase: NRMSE,
    deep-grey ROI mean errors relative to truth, mask Dice;
(c) timing of the whole chain at 256x256x80, single echo (study TKD path and default TV path);
(d) simulator heads (qsmdask.sim.simulate_cohort, 2 mm, 3 seeds): the default chain vs the
    study's (V-SHARP + TKD) and mixtures: local-field and chi correlation with truth in the
    final mask, deep-grey ROI mean errors relative to truth.

Section "recon-robustness" (``--robustness``; runs only these, leaves the tables above alone):
(e) phase-quality mask neighbour pairs ("all" vs "inside") on simulator heads: coverage of the
    true brain, chi correlation, ROI slope;
(f) 2016 challenge: the `study` preset's inversion (iterative TKD as Tang et al. 2013 published
    it) beside TKD and TV: qsm-ci nrmse vs COSMOS and ROI slope over the evaluation labels;
(g) single-echo and two-echo data vs three echoes of the same simulator heads.

Section "recon-debias" (``--debias``): the inversion's debiasing options (issue 15, "raise the bar"):
(h) 2016 challenge: plain TV, TV + Bregman and TV + least-squares refit (``tv_debias: refit``) over a
    few lambdas: qsm-ci nrmse vs COSMOS and ROI slope (the Pareto front of the two);
(i) simulator heads: the same inversions on the default chain's local field and final mask:
    chi correlation, ROI slope, deep-grey ROI errors.

Section "recon-coverage" (``--coverage``): where the final mask loses the true brain on simulator heads
with and without air cavities (threshold mask, phase-quality mask: voxels over the limit, the dilation
of the removed set; LBV's one-voxel erosion), and chain variants (``keep_boundary_layer``, the dilation's
``quality_dilate_min_gradient_rad``, no dilation) with coverage of the brain and cortex and accuracy
on the rim, on the default's voxels and next to air.

Section "recon-tgv" (``--tgv``): second-order TGV inversion (issue 15, "raise the bar"): (j) alpha grid
on the 2016 challenge, (k) the same settings on simulator heads, (l) chain timing at 256x256x80.

Section "recon-accuracy" (``--accuracy``): issue 15's bar with the field fitted as issue 14 needs it:
(m) the 2016 challenge inverted by the chain's inversion stage (boundary-field correction included),
default beside the data term outside the mask (``tv_outside_weight``), (n) simulator heads, whole
chains, (o) chain timing at 256x256x80.

Section "recon-refit-start" (``--refit-start``): the least-squares refits with the boundary-field
correction in the data from the start (``lbv_boundary_estimate_iter``) and the early estimate's field
outside the mask (``tv_outside_weight``): (p) 2016 challenge through ``chain.invert_tv``, (q) simulator
heads, whole chains, (r) chain timing at 256x256x80. The halo of the same chains: ``bench/halo.py
--fix --chains``.

Section "recon-refit-shape" (``--refit-shape``): the least-squares refit without its global amplitude
step (``tv_refit_amplitude: false``), the step that moves a planted deep increase into the other ROIs:
(s) 2016 challenge through ``chain.invert_tv``, (t) simulator heads, (u) chain timing at 256x256x80.
The halo of the same chains: ``bench/halo.py --fix --chains``.

Section "single-echo" (``--single-echo``): one, two and three echoes of the same simulator heads
with the physical (transceive) and the earlier (plane-wave) receiver phase offset, with and
without the single-echo offset fit (issue 15, defect 3).

Usage: python bench/recon.py [--quick] [--no-write] [--skip-2016] [--skip-timing] [--skip-heads]
       python bench/recon.py --robustness [--seeds 5 7] [--no-write]
       python bench/recon.py --single-echo [--seeds 5 7] [--no-write]
       python bench/recon.py --debias [--seeds 5 7 9] [--no-write]
       python bench/recon.py --coverage [--seeds 5 7] [--variants NAME ...] [--no-write]
       python bench/recon.py --tgv [--seeds 5 7] [--no-write] [--reading FILE]
       python bench/recon.py --refit-mask [--seeds 5 7 9] [--no-write] [--skip-2016] [--skip-heads] [--skip-timing]
       python bench/recon.py --accuracy [--seeds 5 7 9] [--no-write] [--skip-2016] [--skip-heads] [--skip-timing]
       python bench/recon.py --refit-start [--seeds 5 7 9] [--no-write] [--skip-2016] [--skip-heads] [--skip-timing]
       python bench/recon.py --refit-shape [--seeds 5 7 9] [--no-write] [--skip-2016] [--skip-heads] [--skip-timing]
       python bench/recon.py --pairs [--seeds 5 7]   (only (e), printed, with air-zone scores)
       python bench/recon.py --f-rows SUBSTR          (only those (f) rows, printed)
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _report import machine_description, markdown_table, update_section  # noqa: E402

from qsmdask import inversion  # noqa: E402
from qsmdask.chain import ChainConfig, reconstruct  # noqa: E402
from qsmdask.sim.geometric import HUMAN_BRAIN_AXES_MM, make_phantom  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "qsm2016"

DEFAULT = ChainConfig()


def _tv_default(f, m, vs):
    """The chain's default TV + Bregman step with the field taken as 0 outside the mask (the
    default before issue 14; the default now fits the field inside the mask: section (f))."""
    return inversion.tv_admm(f, m, vs, lam=DEFAULT.tv_lambda, max_iter=DEFAULT.tv_max_iter,
                             bregman_iterations=DEFAULT.tv_bregman_iterations,
                             bregman_max_iter=DEFAULT.tv_bregman_max_iter)


INVERSIONS_2016 = {
    "TKD thr 0.19": lambda f, m, vs: inversion.tkd(f, m, vs, threshold=0.19),
    "TKD thr 0.4 (TKD default in the chain)": lambda f, m, vs: inversion.tkd(f, m, vs, threshold=0.4),
    "iterative TKD (Tang 2013, default)": lambda f, m, vs: inversion.iterative_tkd(f, m, vs),
    "TV-ADMM lam 1e-3, 30 it (no Bregman)": lambda f, m, vs: inversion.tv_admm(f, m, vs, lam=1e-3),
    "TV-ADMM lam 1.5e-3, 30 it (no Bregman)": lambda f, m, vs: inversion.tv_admm(f, m, vs, lam=1.5e-3),
    "TV-ADMM + 1 Bregman step, lam 2e-3, 15+15 it (chain default before issue 14)": _tv_default,
    "TV-ADMM + 1 Bregman step, lam 3e-3, 15+15 it": lambda f, m, vs: inversion.tv_admm(
        f, m, vs, lam=3e-3, max_iter=15, bregman_iterations=1, bregman_max_iter=15),
}


def _child(fn, args):
    t0 = time.perf_counter()
    out = fn(*args)
    dt = time.perf_counter() - t0
    return out, dt, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_isolated(fn, *args):
    """Run fn(*args) in a fresh forked process: (result, seconds, child peak RSS MiB)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("fork")) as ex:
        return ex.submit(_child, fn, args).result()


def bench_2016(quick: bool):
    import nibabel as nib
    from qsm_ci.qsm_eval import score_arrays

    img = nib.load(DATA / "local_field_ppm.nii.gz")
    f = img.get_fdata(dtype=np.float32)
    vs = tuple(float(v) for v in img.header.get_zooms()[:3])
    m = nib.load(DATA / "mask.nii.gz").get_fdata() > 0
    cosmos = nib.load(DATA / "chi_cosmos.nii.gz").get_fdata(dtype=np.float32)
    chi33 = nib.load(DATA / "chi_33.nii.gz").get_fdata(dtype=np.float32)
    rows = []
    names = list(INVERSIONS_2016)[:2] if quick else list(INVERSIONS_2016)
    for name in names:
        chi, dt, rss = run_isolated(_invert_2016, name, f, m, vs)
        s_c, _ = score_arrays(chi, cosmos, m, kind="chi")
        s_33, _ = score_arrays(chi, chi33, m, kind="chi")
        rows.append({"method": name, "nrmse vs COSMOS": float(s_c["nrmse"]), "hfen": float(s_c["hfen"]),
                     "xsim": float(s_c["xsim"]), "corr": float(s_c["correlation"]),
                     "nrmse vs chi33": float(s_33["nrmse"]), "xsim chi33": float(s_33["xsim"]),
                     "time s": float(dt), "peak RSS MiB": float(rss)})
        print(rows[-1], flush=True)
    return rows


def _invert_2016(name, f, m, vs):
    return INVERSIONS_2016[name](f, m, vs)


ADULT = dict(brain_axes_mm=HUMAN_BRAIN_AXES_MM, structure_scale=2.0)
PHANTOMS = {
    "small: 1 mm iso 64^3, B0 (0.25,0.2,0.95)": dict(shape=(64, 64, 64), voxel_size_mm=(1, 1, 1)),
    "small: 1x1x2 mm 64x64x40, B0 tilted 25 deg, rotated 20 deg": dict(
        shape=(64, 64, 40), voxel_size_mm=(1, 1, 2), b0_dir=(0.42, 0.0, 0.906), rotation_deg=20.0),
    "small: 1 mm iso 64^3, flat brain (22,18,13 mm), B0 (0,0.3,0.95)": dict(
        shape=(64, 64, 64), voxel_size_mm=(1, 1, 1), brain_axes_mm=(22.0, 18.0, 13.0),
        b0_dir=(0.0, 0.3, 0.954)),
    "adult: 1x1x2 mm 160x192x68, B0 tilted 15 deg": dict(
        shape=(160, 192, 68), voxel_size_mm=(1, 1, 2), b0_dir=(0.26, 0.0, 0.966), **ADULT),
    "adult: 1 mm iso 160x192x136, B0 (0.25,0.2,0.95), rotated 10 deg": dict(
        shape=(160, 192, 136), voxel_size_mm=(1, 1, 1), rotation_deg=10.0, **ADULT),
}
SNRS = {"small": [None, 100, 40], "adult": [100]}

STUDY = ChainConfig(bgremove_method="vsharp", inversion_method="tkd")
CHAINS = {
    "default: LBV + TV-Bregman": DEFAULT,
    "study: V-SHARP + TKD 0.4": STUDY,
    "V-SHARP + TV-Bregman": DEFAULT.replace(bgremove_method="vsharp"),
    "LBV + TV lam 1e-3 (no Bregman)": DEFAULT.replace(tv_lambda=1e-3, tv_max_iter=30, tv_bregman_iterations=0),
    "V-SHARP + iterative TKD": STUDY.replace(inversion_method="iterative_tkd", tkd_threshold=0.19),
}


def _score_phantom(p, r):
    """NRMSE (%), deep-grey relative ROI errors (%, 5 structures), mask Dice."""
    m = r.mask
    truth = p["chi_ppm"]
    a = r.chi_ppm[m] - r.chi_ppm[m].mean()
    b = truth[m] - truth[m].mean()
    nrmse = 100 * np.linalg.norm(a - b) / np.linalg.norm(b)
    ref = r.chi_ppm[m & (p["labels"] == 0)].mean()
    errs = []
    for lab in range(1, 6):
        sel = (p["labels"] == lab) & m
        if sel.sum() >= 5:
            errs.append(100 * ((r.chi_ppm[sel].mean() - ref) / truth[sel].mean() - 1))
    bm = p["brain_mask"]
    dice = 2 * (r.brain_mask & bm).sum() / (r.brain_mask.sum() + bm.sum())
    return float(nrmse), np.array(errs), float(dice)


def bench_phantoms(quick: bool):
    rows = []
    geoms = list(PHANTOMS.items())[:1] if quick else list(PHANTOMS.items())
    chains = {k: CHAINS[k] for k in list(CHAINS)[:2]} if quick else CHAINS
    for gname, kw in geoms:
        snrs = SNRS[gname.split(":")[0]]
        for snr in (snrs[:2] if quick else snrs):
            p = make_phantom(snr=snr, seed=11, **kw)
            for cname, cfg in chains.items():
                t0 = time.perf_counter()
                r = reconstruct(p["magnitude"], p["phase_rad"], p["echo_times_s"], p["voxel_size_mm"],
                                b0_dir=p["b0_dir"], b0_tesla=p["b0_tesla"], config=cfg)
                dt = time.perf_counter() - t0
                nrmse, errs, dice = _score_phantom(p, r)
                rows.append({"phantom": gname, "SNR": "inf" if snr is None else str(snr), "chain": cname,
                             "NRMSE %": nrmse, "deep-GM ROI error % (5 structures)":
                             " ".join(f"{e:+.0f}" for e in errs),
                             "max abs ROI error %": float(np.abs(errs).max()),
                             "within 15 %": "yes" if np.abs(errs).max() <= 15 else "no",
                             "mask Dice": dice, "time s": float(dt)})
                print(rows[-1], flush=True)
    return rows


def _time_chain(cfg_dict, shape):
    adult = ADULT if shape[0] >= 200 else {}  # an adult-size brain fills the study's 256x256x80 FOV
    p = make_phantom(shape=shape, voxel_size_mm=(0.9375, 0.9375, 2.0), snr=100, echo_times_s=(0.02,),
                     seed=3, **adult)
    t0 = time.perf_counter()
    c0 = time.process_time()
    r = reconstruct(p["magnitude"][..., 0], p["phase_rad"][..., 0], p["echo_times_s"], p["voxel_size_mm"],
                    b0_dir=p["b0_dir"], b0_tesla=3.0, config=ChainConfig.from_dict(cfg_dict))
    dt = time.perf_counter() - t0
    stages = {k: v for k, v in r.qc.items() if k.startswith("time_")}
    stages["cpu_s"] = time.process_time() - c0
    return dt, stages


def bench_timing(quick: bool):
    shape = (96, 96, 32) if quick else (256, 256, 80)
    rows = []
    cfgs = {"study: V-SHARP + TKD 0.4": STUDY, "default: LBV + TV-Bregman (15+15 it)": DEFAULT}
    if quick:
        cfgs = {"study: V-SHARP + TKD 0.4": STUDY}
    for name, cfg in cfgs.items():
        (dt, stages), _, rss = run_isolated(_time_chain, cfg.to_dict(), shape)
        rows.append({"chain": name, "shape": "x".join(map(str, shape)), "total wall s": float(dt),
                     "total CPU s": float(stages["cpu_s"]),
                     "mask s": stages["time_mask_s"], "unwrap s": stages["time_unwrap_s"],
                     "bgremove s": stages["time_bgremove_s"], "inversion s": stages["time_inversion_s"],
                     "peak RSS MiB (incl. simulation)": rss})
        print(rows[-1], flush=True)
    return rows


HEAD_SEEDS = (5, 7, 9)
HEAD_CHAINS = {
    "default: LBV + TV-Bregman": DEFAULT,
    "study: V-SHARP + TKD 0.4": STUDY,
    "V-SHARP + TV-Bregman": DEFAULT.replace(bgremove_method="vsharp"),
    "LBV + TV lam 1e-3 (no Bregman)": DEFAULT.replace(tv_lambda=1e-3, tv_max_iter=30, tv_bregman_iterations=0),
}
DEEP_GREY = ("putamen", "pallidum", "caudate", "thalamus")


def _corr(a, b, m):
    x = a[m] - a[m].mean()
    y = b[m] - b[m].mean()
    return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))


def _deep_grey_errors(h, chi, m):
    """(ROI mean - mask mean) of ``chi`` relative to the same of the true chi, in %, per DEEP_GREY
    region (AAL labels of the head's desc-truth_dseg), in mask ``m``."""
    out = {}
    for reg in DEEP_GREY:
        sel = np.isin(h["dseg"], h["table"].loc[h["table"].region == reg, "label"].astype(int).to_numpy()) & m
        est = chi[sel].mean() - chi[m].mean()
        true = h["chi"][sel].mean() - h["chi"][m].mean()
        out[f"{reg} err %"] = float(100 * (est / true - 1))
    return out


def _head(seed, tmp):
    """Simulate one head and reconstruct it with every HEAD_CHAINS entry: rows of scores."""
    h = _load_head(seed, tmp)
    mag, ph, tes, vs, b0 = h["mag"], h["phase"], list(h["te"]), h["vs"], h["b0"]
    chi_t, local_t = h["chi"], h["local"]
    rows = []
    for name, cfg in HEAD_CHAINS.items():
        t0 = time.perf_counter()
        r = reconstruct(mag, ph, tes, vs, b0_dir=b0, b0_tesla=3.0, config=cfg)
        dt = time.perf_counter() - t0
        m = r.mask
        row = {"seed": seed, "chain": name, "final mask ml": float(m.sum() * np.prod(vs) / 1000),
               "local-field corr": _corr(r.local_field_ppm, local_t, m), "chi corr": _corr(r.chi_ppm, chi_t, m)}
        row.update(_deep_grey_errors(h, r.chi_ppm, m))
        row["time s"] = float(dt)
        rows.append(row)
        print(row, flush=True)
    return rows


def _timing_rows(chains: dict, names, shape=(256, 256, 80)) -> list[dict]:
    """Whole-chain timing rows (as (c)) of the named chains, each in its own child process."""
    trows = []
    for name in names:
        (dt, stages), _, rss = run_isolated(_time_chain, chains[name], shape)
        trows.append({"chain": name, "shape": "x".join(map(str, shape)), "total wall s": float(dt),
                      "total CPU s": float(stages["cpu_s"]), "inversion s": stages["time_inversion_s"],
                      "peak RSS MiB (incl. simulation)": rss})
        print(trows[-1], flush=True)
    return trows


def bench_heads(quick: bool):
    import tempfile

    seeds = HEAD_SEEDS[:1] if quick else HEAD_SEEDS
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            rows += _head(seed, tmp)
    summary = []
    for name in HEAD_CHAINS:
        sub = [r for r in rows if r["chain"] == name]
        out = {"chain": name, "chi corr mean": float(np.mean([r["chi corr"] for r in sub])),
               "local-field corr mean": float(np.mean([r["local-field corr"] for r in sub]))}
        for reg in DEEP_GREY:
            v = np.array([r[f"{reg} err %"] for r in sub])
            out[f"{reg} err mean / SD %"] = f"{v.mean():.1f} / {v.std(ddof=1) if v.size > 1 else 0.0:.1f}"
        summary.append(out)
    return rows, summary


# ------------------------------------------------------------------ section recon-robustness
def _load_head(seed, tmp):
    """One simulator head (simulate_cohort, 2 mm, TE 4/12/20 ms): inputs and truth (chi, local
    field, brain mask, labels with their tissue table, and the tissue regions of >= 20 voxels)."""
    import json

    import pandas as pd

    from qsmdask.io.nifti import load_nifti
    from qsmdask.kernels import b0_direction_from_affine, voxel_size_from_affine
    from qsmdask.sim.cohort import simulate_cohort

    root = Path(tmp) / f"seed{seed}"
    simulate_cohort(root, n_subjects=1, seed=seed, n_sessions=1, t1w=False)
    anat = root / "sub-01" / "anat"
    mags, phs, tes = [], [], []
    for e in (1, 2, 3):
        mag, aff = load_nifti(anat / f"sub-01_echo-{e}_part-mag_MEGRE.nii.gz")[:2]
        mags.append(mag)
        phs.append(load_nifti(anat / f"sub-01_echo-{e}_part-phase_MEGRE.nii.gz")[0])
        tes.append(json.loads((anat / f"sub-01_echo-{e}_part-phase_MEGRE.json").read_text())["EchoTime"])
    truth = root / "derivatives" / "qsmdask-sim" / "sub-01" / "anat"
    table = pd.read_csv(root / "derivatives" / "qsmdask-sim" / "tissue_table.tsv", sep="\t")
    dseg = load_nifti(truth / "sub-01_desc-truth_dseg.nii.gz")[0].astype(int)
    rois = []
    for reg in sorted(set(table.region)):
        sel = np.isin(dseg, table.loc[table.region == reg, "label"].astype(int).to_numpy())
        if sel.sum() >= 20:
            rois.append(sel)
    return {"mag": np.stack(mags, -1).astype(np.float32), "phase": np.stack(phs, -1).astype(np.float32),
            "te": np.asarray(tes), "vs": voxel_size_from_affine(aff), "b0": b0_direction_from_affine(aff),
            "chi": load_nifti(truth / "sub-01_desc-truth_Chimap.nii.gz")[0],
            "brain": load_nifti(truth / "sub-01_desc-truth_mask.nii.gz")[0] > 0, "rois": rois,
            "local": load_nifti(truth / "sub-01_desc-truthlocal_fieldmap.nii.gz")[0],
            "total": load_nifti(truth / "sub-01_desc-truthtotal_fieldmap.nii.gz")[0],
            "dseg": dseg, "table": table}


def _head_scores(h, r, air=False):
    """Coverage of the true brain, chi correlation and ROI slope (ROI mean - mask mean, estimate
    on truth, least squares over the simulator's tissue regions) in the final mask."""
    m = r.mask
    tb = h["brain"]
    est, tru = [], []
    for sel in h["rois"]:
        s = sel & m
        if s.sum() >= 10:
            est.append(r.chi_ppm[s].mean() - r.chi_ppm[m].mean())
            tru.append(h["chi"][s].mean() - h["chi"][m].mean())
    out = {"quality-mask coverage %": 100 * float((r.quality_mask & tb).sum() / tb.sum()),
            "final-mask coverage %": 100 * float((m & tb).sum() / tb.sum()),
            "chi corr": _corr(r.chi_ppm, h["chi"], m),
            "chi corr in true brain": _corr(r.chi_ppm, h["chi"], m & tb),
            "ROI slope": float(np.polyfit(tru, est, 1)[0]), "n ROIs": len(est)}
    if air:
        out.update(_air_scores(h, r))
    return out


def _air_scores(h, r):
    """Accuracy next to air-tissue interfaces: true-brain voxels whose true background field
    (total - local) differs most from its brain median (top decile: next to the sinuses and the
    mastoid air cells). Coverage of that zone by the final mask, chi correlation and demeaned
    NRMSE % there (in the final mask)."""
    tb = h["brain"]
    bg = np.abs(h["total"] - h["local"] - np.median((h["total"] - h["local"])[tb]))
    zone = tb & (bg >= np.percentile(bg[tb], 90))
    z = zone & r.mask
    e = r.chi_ppm[z] - r.chi_ppm[z].mean()
    t = h["chi"][z] - h["chi"][z].mean()
    return {"air-zone coverage %": 100 * float(z.sum() / zone.sum()),
            "air-zone chi corr": _corr(r.chi_ppm, h["chi"], z),
            "air-zone nrmse %": 100 * float(np.linalg.norm(e - t) / np.linalg.norm(t))}


def _pairs_rows(h, seed, *, air):
    """One head reconstructed with `quality_pairs` all and inside: its score rows (printed)."""
    rows = []
    for pairs in ("all", "inside"):
        t0 = time.perf_counter()
        r = reconstruct(h["mag"], h["phase"], h["te"], h["vs"], b0_dir=h["b0"], b0_tesla=3.0,
                        config=DEFAULT.replace(quality_pairs=pairs))
        rows.append({"seed": seed, "quality_pairs": pairs, **_head_scores(h, r, air=air),
                     "time s": time.perf_counter() - t0})
        print(rows[-1], flush=True)
    return rows


def bench_pairs(seeds):
    """(e) only: `quality_pairs` all vs inside, with the air-tissue zone scores."""
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            rows += _pairs_rows(_load_head(seed, tmp), seed, air=True)
    print(markdown_table(rows, floatfmt=".3g"))
    return 0


ECHO_SETS = {"3 echoes (4/12/20 ms)": [0, 1, 2], "2 echoes (4/12 ms)": [0, 1],
             "1 echo (20 ms)": [2], "1 echo (12 ms)": [1]}


def bench_robustness_heads(seeds):
    import tempfile

    pairs_rows, echo_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            h = _load_head(seed, tmp)
            pairs_rows += _pairs_rows(h, seed, air=False)
            for name, idx in ECHO_SETS.items():
                r = reconstruct(h["mag"][..., idx], h["phase"][..., idx], h["te"][idx], h["vs"],
                                b0_dir=h["b0"], b0_tesla=3.0, config=DEFAULT)
                echo_rows.append({"seed": seed, "echoes": name, **_head_scores(h, r)})
                print(echo_rows[-1], flush=True)
    return pairs_rows, echo_rows


STUDY_2016 = {
    "TKD thr 0.4 (tkd_threshold default)": dict(inversion_method="tkd", tkd_threshold=0.4),
    "iterative TKD as before (thr 0.19, 20 it, no structure mask)": dict(
        inversion_method="iterative_tkd", iterative_tkd_threshold=0.19, iterative_tkd_max_iter=20,
        iterative_tkd_tol=1e-3, iterative_tkd_structure_n_sd=0.0),
    "study preset: iterative TKD, Tang 2013 (thr 0.1, structure mask, <= 4 it)": dict(preset="study"),
    "iterative TKD thr 0.1, 4 it, no structure mask": dict(preset="study", iterative_tkd_structure_n_sd=0.0),
    "iterative TKD thr 0.19, structure mask, <= 4 it": dict(preset="study", iterative_tkd_threshold=0.19),
    "TV lam 1.5e-3, 30 it (no Bregman)": dict(inversion_method="tv", tv_lambda=1.5e-3, tv_max_iter=30,
                                              tv_bregman_iterations=0),
    "TV + Bregman, field taken as 0 outside the mask (the default before issue 14)": dict(tv_mask_data=False),
    "default chain inversion (TV + Bregman, field fitted inside the mask)": dict(),
    "tv_laplacian: TV on the field's Laplacian (chain defaults: lam 2e-4, Bregman)": dict(
        inversion_method="tv_laplacian"),
}


def _invert_cfg(cfg_dict, f, m, vs, b0_dir=(0.0, 0.0, 1.0), correction=False):
    """The inversion of ``cfg_dict`` on a given local field ``f`` in the mask ``m``. ``correction``:
    "tv" as the chain runs it on its own LBV output, with the boundary-field correction
    (:func:`qsmdask.chain.boundary_correction`, ``m`` as both LBV's mask and its eroded mask) and
    ``tv_outside_weight``; without it (the earlier sections) the correction is left out."""
    c = ChainConfig.from_dict(cfg_dict)
    if c.inversion_method == "tkd":
        return inversion.tkd(f, m, vs, b0_dir=b0_dir, threshold=c.tkd_threshold)
    if c.inversion_method == "iterative_tkd":
        n_sd = c.iterative_tkd_structure_n_sd
        return inversion.iterative_tkd(f, m, vs, b0_dir=b0_dir, threshold=c.iterative_tkd_threshold,
                                       max_iter=c.iterative_tkd_max_iter, tol=c.iterative_tkd_tol,
                                       structure_mask="initial" if n_sd > 0 else None,
                                       structure_n_sd=n_sd or 2.0)
    if c.inversion_method == "tv_laplacian":  # the given local field as the field, its Laplacian as data
        return inversion.tv_admm(f, m, vs, b0_dir=b0_dir, lam=c.tv_laplacian_lambda, max_iter=c.tv_max_iter,
                                 laplacian_data=True, bregman_iterations=c.tv_bregman_iterations,
                                 bregman_max_iter=c.tv_bregman_max_iter)
    if c.inversion_method == "tgv":
        return inversion.tgv_admm(f, m, vs, b0_dir=b0_dir, alpha1=c.tgv_alpha1, alpha0=c.tgv_alpha0,
                                  max_iter=c.tgv_max_iter, mask_data=c.tgv_mask_data,
                                  bregman_iterations=c.tgv_bregman_iterations,
                                  bregman_max_iter=c.tgv_bregman_max_iter)
    if correction:  # the chain's own inversion stage (the given field: its mask as LBV's and as the eroded one)
        from qsmdask.chain import invert_tv

        return invert_tv(f, m, m, vs, b0_dir, c)[0]
    return inversion.tv_admm(f, m, vs, b0_dir=b0_dir, lam=c.tv_lambda, max_iter=c.tv_max_iter,
                             bregman_iterations=c.tv_bregman_iterations, bregman_max_iter=c.tv_bregman_max_iter,
                             bregman_fraction=c.tv_bregman_fraction, mask_data=c.tv_mask_data,
                             debias=c.tv_debias, refit_mu=c.tv_refit_mu, refit_amplitude=bool(c.tv_refit_amplitude),
                             outside_reg_weight=c.tv_outside_reg_weight, rho_data=c.tv_rho_data,
                             pad_voxels=c.pad_voxels)


def bench_study_2016(only=None, configs=None, correction=False):
    import nibabel as nib
    from qsm_ci.qsm_eval import score_arrays

    img = nib.load(DATA / "local_field_ppm.nii.gz")
    f = img.get_fdata(dtype=np.float32)
    vs = tuple(float(v) for v in img.header.get_zooms()[:3])
    m = nib.load(DATA / "mask.nii.gz").get_fdata() > 0
    cosmos = nib.load(DATA / "chi_cosmos.nii.gz").get_fdata(dtype=np.float32)
    labels = nib.load(DATA / "evaluation_labels.nii.gz").get_fdata().astype(int)
    rows = []
    for name, cfg in (STUDY_2016 if configs is None else configs).items():
        if only and only not in name:
            continue
        chi, dt, rss = run_isolated(_invert_cfg, cfg, f, m, vs, (0.0, 0.0, 1.0), correction)
        s_c, _ = score_arrays(chi, cosmos, m, kind="chi")
        est = [chi[(labels == k) & m].mean() - chi[m].mean() for k in range(1, 12) if ((labels == k) & m).any()]
        ref = [cosmos[(labels == k) & m].mean() - cosmos[m].mean() for k in range(1, 12) if ((labels == k) & m).any()]
        rows.append({"inversion": name, "nrmse vs COSMOS": float(s_c["nrmse"]), "hfen": float(s_c["hfen"]),
                     "corr": float(s_c["correlation"]), "ROI slope vs COSMOS": float(np.polyfit(ref, est, 1)[0]),
                     "time s": float(dt), "peak RSS MiB": float(rss)})
        print(rows[-1], flush=True)
    return rows


def main_robustness(args):
    machine = machine_description()
    print(machine, flush=True)
    seeds = args.seeds
    parts = [f"## recon-robustness\n\nMachine: {machine} (shared machine, loaded by other jobs: times "
             f"are inflated)\n\nCommand: `python bench/recon.py --robustness --seeds "
             f"{' '.join(map(str, seeds))}` (runs only this section; the recon section above is from "
             f"its own earlier run)\n"]
    pairs_rows, echo_rows = bench_robustness_heads(seeds)
    parts.append("### (e) phase-quality mask: neighbour pairs compared (issue 15, defect 1)\n\n"
                 "Simulator heads (simulate_cohort, 2 mm, 3 echoes, SNR 50), default chain but "
                 "`quality_pairs`. Coverage: share of the true brain mask (desc-truth_mask) inside the "
                 "quality mask and inside the final (LBV-eroded) mask; the threshold mask covers all of "
                 "it plus ~250 ml of extra-cerebral CSF next to bone. ROI slope: ROI-mean estimate on "
                 "truth over the simulator's tissue regions.\n\n" + markdown_table(pairs_rows, floatfmt=".3g"))
    if (DATA / "local_field_ppm.nii.gz").exists():
        rows = bench_study_2016()
        parts.append("### (f) 2016 challenge: the `study` preset's inversion beside TKD and TV\n\n"
                     "The given local field and mask; qsm-ci `score_arrays` vs COSMOS; ROI slope: least "
                     "squares of (ROI mean - mask mean) of the estimate on COSMOS's over the 11 "
                     "evaluation labels.\n\n" + markdown_table(rows, floatfmt=".3g"))
    parts.append("### (g) fewer echoes, same heads (issue 15, defect 3)\n\n"
                 "Default chain on subsets of the same 3-echo acquisitions.\n\n"
                 + markdown_table(echo_rows, floatfmt=".3g"))
    body = "\n".join(parts)
    print(body)
    if not args.no_write:
        update_section("recon-robustness", body)
    return 0


# ------------------------------------------------------------------ section recon-debias
def _tv(lam, breg=0, debias="none", mu=0.1):
    """Rows measured with the field taken as 0 outside the mask (the refit needs it)."""
    it = dict(tv_max_iter=15, tv_bregman_max_iter=15) if breg else dict(tv_max_iter=30)
    return dict(inversion_method="tv", tv_lambda=lam, tv_bregman_iterations=breg, tv_debias=debias,
                tv_refit_mu=mu, tv_mask_data=False, **it)


DEBIAS = {
    "TV lam 1e-3, 30 it": _tv(1e-3),
    "TV lam 1.5e-3, 30 it": _tv(1.5e-3),
    "TV lam 2e-3, 30 it": _tv(2e-3),
    "TV lam 2e-3 + 1 Bregman step, 15+15 it (chain default before issue 14)": _tv(2e-3, breg=1),
    "TV lam 3e-3 + 1 Bregman step, 15+15 it": _tv(3e-3, breg=1),
    "TV lam 1e-3 + refit mu 0.1": _tv(1e-3, debias="refit"),
    "TV lam 1.5e-3 + refit mu 0.1": _tv(1.5e-3, debias="refit"),
    "TV lam 2e-3 + refit mu 0.1": _tv(2e-3, debias="refit"),
    "TV lam 2e-3 + refit mu 0.5": _tv(2e-3, debias="refit", mu=0.5),
    "TV lam 3e-3 + refit mu 0.1": _tv(3e-3, debias="refit"),
    "TV lam 2e-3 + 1 Bregman step + refit mu 0.1": _tv(2e-3, breg=1, debias="refit"),
}
DEBIAS_HEADS = ("TV lam 2e-3 + 1 Bregman step, 15+15 it (chain default before issue 14)", "TV lam 1.5e-3, 30 it",
                "TV lam 1e-3 + refit mu 0.1", "TV lam 1.5e-3 + refit mu 0.1", "TV lam 2e-3 + refit mu 0.1",
                "TV lam 2e-3 + refit mu 0.5", "TV lam 3e-3 + refit mu 0.1",
                "TV lam 2e-3 + 1 Bregman step + refit mu 0.1")


def bench_debias_heads(seeds):
    """Each DEBIAS_HEADS inversion on the default chain's local field and final mask of each head."""
    import tempfile
    from types import SimpleNamespace

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            h = _load_head(seed, tmp)
            r = reconstruct(h["mag"], h["phase"], h["te"], h["vs"], b0_dir=h["b0"], b0_tesla=3.0, config=DEFAULT)
            for name in DEBIAS_HEADS:
                t0 = time.perf_counter()
                chi = _invert_cfg(DEBIAS[name], r.local_field_ppm, r.mask, tuple(h["vs"]), tuple(h["b0"]))
                dt = time.perf_counter() - t0
                sc = _head_scores(h, SimpleNamespace(mask=r.mask, chi_ppm=chi, quality_mask=r.quality_mask))
                row = {"seed": seed, "inversion": name, "chi corr": sc["chi corr"], "ROI slope": sc["ROI slope"]}
                row.update(_deep_grey_errors(h, chi, r.mask))
                row["time s"] = dt
                rows.append(row)
                print(row, flush=True)
    summary = []
    for name in DEBIAS_HEADS:
        sub = [r for r in rows if r["inversion"] == name]
        out = {"inversion": name, "chi corr mean": float(np.mean([r["chi corr"] for r in sub])),
               "ROI slope mean": float(np.mean([r["ROI slope"] for r in sub]))}
        for reg in DEEP_GREY:
            out[f"{reg} err mean %"] = float(np.mean([r[f"{reg} err %"] for r in sub]))
        summary.append(out)
    return summary, rows


def main_debias(args):
    machine = machine_description()
    print(machine, flush=True)
    parts = [f"## recon-debias\n\nMachine: {machine} (shared machine, loaded by other jobs: times are "
             f"inflated)\n\nCommand: `python bench/recon.py --debias --seeds {' '.join(map(str, args.seeds))}`\n\n"
             "TV inversions (`qsmdask.inversion.tv_admm`) without debiasing, with Bregman steps, and with "
             "`debias=\"refit\"` (least-squares amplitude of the solution, then a Tikhonov-regularised data "
             "refit with weight mu; chain: `tv_debias: refit`, `tv_refit_mu`).\n"]
    if (DATA / "local_field_ppm.nii.gz").exists():
        rows = bench_study_2016(configs=DEBIAS)
        parts.append("### (h) 2016 challenge\n\nThe given local field and mask; qsm-ci `score_arrays` vs COSMOS; "
                     "ROI slope: least squares of (ROI mean - mask mean) of the estimate on COSMOS's over the 11 "
                     "evaluation labels. Target (issue 15): nrmse <= 58 and slope >= 0.9 at once.\n\n"
                     + markdown_table(rows, floatfmt=".3g"))
    summary, rows = bench_debias_heads(args.seeds)
    parts.append("### (i) simulator heads\n\nSimulator heads (simulate_cohort, 2 mm, TE 4/12/20 ms, SNR 50); each "
                 "inversion on the default chain's local field and final mask. Chi corr in the final mask; ROI "
                 "slope over the simulator's tissue regions; ROI error: (ROI mean - final-mask mean) relative to "
                 "the same for the true chi, AAL labels.\n\n" + markdown_table(summary, floatfmt=".3g")
                 + "\n\nPer head:\n\n" + markdown_table(rows, floatfmt=".3g"))
    body = "\n".join(parts)
    print(body)
    if not args.no_write:
        update_section("recon-debias", body)
    return 0


# ------------------------------------------------------------------ section recon-refit-mask
REFIT_MASK_2016 = {
    "default: TV lam 2e-3 + 1 Bregman step, field inside the mask": {},
    "TV lam 2e-3, 30 it, field inside the mask": dict(tv_max_iter=30, tv_bregman_iterations=0),
    "tv_refit (field 0 outside the mask)": {"preset": "tv_refit"},
    "tv_refit_mask (lam 2e-3, refit inside the mask)": {"preset": "tv_refit_mask"},
    "tv_refit_mask with lam 3e-3": {"preset": "tv_refit_mask", "tv_lambda": 3e-3},
}
REFIT_MASK_CHAINS = {"default": {}, "tv_refit_mask": {"preset": "tv_refit_mask"},
                     "tv_refit (field 0 outside the mask)": {"preset": "tv_refit"}}


def bench_refit_mask_heads(seeds, chains=None):
    """Whole chains (each its own local field, boundary correction where configured) on each head
    (``chains``: name -> ChainConfig dict, default ``REFIT_MASK_CHAINS``)."""
    chains = REFIT_MASK_CHAINS if chains is None else chains
    import tempfile
    from types import SimpleNamespace

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            h = _load_head(seed, tmp)
            for name, cfg in chains.items():
                c0 = time.process_time()
                r = reconstruct(h["mag"], h["phase"], h["te"], h["vs"], b0_dir=h["b0"], b0_tesla=3.0,
                                config=ChainConfig.from_dict(cfg))
                dt = time.process_time() - c0
                sc = _head_scores(h, SimpleNamespace(mask=r.mask, chi_ppm=r.chi_ppm, quality_mask=r.quality_mask))
                row = {"seed": seed, "chain": name, "chi corr": sc["chi corr"],
                       "chi corr in true brain": sc["chi corr in true brain"],
                       "final-mask coverage %": sc["final-mask coverage %"], "ROI slope": sc["ROI slope"]}
                row.update(_deep_grey_errors(h, r.chi_ppm, r.mask))
                row["chain CPU s"] = dt
                rows.append(row)
                print(row, flush=True)
    summary = []
    for name in chains:
        sub = [r for r in rows if r["chain"] == name]
        out = {"chain": name, "chi corr mean": float(np.mean([r["chi corr"] for r in sub])),
               "chi corr in true brain mean": float(np.mean([r["chi corr in true brain"] for r in sub])),
               "final-mask coverage % mean": float(np.mean([r["final-mask coverage %"] for r in sub])),
               "ROI slope mean": float(np.mean([r["ROI slope"] for r in sub]))}
        for reg in DEEP_GREY:
            v = np.array([r[f"{reg} err %"] for r in sub])
            out[f"{reg} err mean / SD %"] = f"{v.mean():.1f} / {v.std(ddof=1) if v.size > 1 else 0.0:.1f}"
        summary.append(out)
    return summary, rows


def _chains_section(args, name, flag, intro, *, table_2016, text_2016, chains, text_heads, timing, letters,
                    correction=True):
    """One section of whole-chain comparisons: (letters[0]) the 2016 challenge through the chain's
    inversion stage (``table_2016``: row name -> ChainConfig dict; skipped by ``--skip-2016`` or
    without the data), (letters[1]) the simulator heads end to end (``chains``; ``--skip-heads``),
    (letters[2]) the 256x256x80 timing of the chains named in ``timing`` (``--skip-timing``); the
    section ``name`` of docs/benchmarks.md is rewritten unless ``--no-write``."""
    machine = machine_description()
    print(machine, flush=True)
    seeds = " ".join(map(str, args.seeds))
    parts = [f"## {name}\n\nMachine: {machine} (shared machine, loaded by other jobs: times are "
             f"inflated)\n\nCommand: `python bench/recon.py {flag} --seeds {seeds}`\n\n{intro}\n"]
    if (DATA / "local_field_ppm.nii.gz").exists() and not args.skip_2016:
        rows = bench_study_2016(configs=table_2016, correction=correction)
        parts.append(f"### ({letters[0]}) {text_2016}\n\n" + markdown_table(rows, floatfmt=".3g"))
    if not args.skip_heads:
        summary, rows = bench_refit_mask_heads(args.seeds, chains)
        parts.append(f"### ({letters[1]}) {text_heads}\n\n" + markdown_table(summary, floatfmt=".3g")
                     + "\n\nPer head:\n\n" + markdown_table(rows, floatfmt=".3g"))
    if not args.skip_timing:
        trows = _timing_rows(chains, timing)
        parts.append(f"### ({letters[2]}) whole chain timing at 256x256x80, as (c)\n\nOne run each, one thread, "
                     "single echo; target <= 30 CPU s and <= 2 GB.\n\n" + markdown_table(trows, floatfmt=".3g"))
    body = "\n".join(parts)
    print(body)
    if not args.no_write:
        update_section(name, body)
    return 0


def main_refit_mask(args):
    return _chains_section(
        args, "recon-refit-mask", "--refit-mask",
        "The least-squares refit with the field fitted inside the mask (`tv_debias: refit` with "
        "`tv_mask_data: true`, conjugate gradients) and the preset `tv_refit_mask`: first TV solve, a "
        "second solve on the data plus the boundary-field correction with no residual added back "
        "(`tv_bregman_fraction: 0`), then the refit.",
        table_2016=REFIT_MASK_2016, correction=False,
        text_2016="2016 challenge\n\nThe given local field and mask (so no boundary-field correction); qsm-ci "
                  "`score_arrays` vs COSMOS; ROI slope over the 11 evaluation labels. Target (issue 15): nrmse "
                  "<= 58 and slope >= 0.9 at once.",
        chains=REFIT_MASK_CHAINS,
        text_heads="simulator heads, whole chains\n\nSimulator heads (simulate_cohort, 2 mm, TE 4/12/20 ms, "
                   "SNR 50), each chain end to end (its own local field and final mask). Chi corr in the final "
                   "mask; ROI slope over the simulator's tissue regions; ROI error as in (d).",
        timing=("default", "tv_refit_mask"), letters="jkl")


# ------------------------------------------------------------------ section recon-accuracy
#: 2016 rows of --accuracy: the chain's inversion stage with the boundary-field correction
ACCURACY_2016 = {
    "default, without the boundary-field correction (as recon-refit-mask (j))": {"lbv_boundary_depth_mm": 0.0},
    "default (field inside the mask, correction)": {},
    "tv_outside_weight 0.3": {"tv_outside_weight": 0.3},
    "tv_outside_weight 1": {"tv_outside_weight": 1.0},
    "tv_outside_weight 1, tv_bregman_fraction 0.5": {"tv_outside_weight": 1.0, "tv_bregman_fraction": 0.5},
    "tv_outside_weight 1, tv_lambda 4e-3": {"tv_outside_weight": 1.0, "tv_lambda": 4e-3},
    "tv_refit_mask + tv_outside_weight 1": {"preset": "tv_refit_mask", "tv_outside_weight": 1.0},
    "tv_refit_mask + tv_outside_weight 1, tv_refit_mu 0.3": {"preset": "tv_refit_mask", "tv_outside_weight": 1.0,
                                                             "tv_refit_mu": 0.3},
}
ACCURACY_CHAINS = {"default": {}, "tv_outside_weight 1": {"tv_outside_weight": 1.0},
                   "tv_refit_mask + tv_outside_weight 1": {"preset": "tv_refit_mask", "tv_outside_weight": 1.0}}


def main_accuracy(args):
    """Section recon-accuracy: issue 15's bar (2016 nrmse <= 58 and ROI slope >= 0.9) with the field
    fitted as issue 14 needs it, and the data term outside the mask (``tv_outside_weight``)."""
    return _chains_section(
        args, "recon-accuracy", "--accuracy",
        "`tv_outside_weight` w: the TV data term also covers the solver's grid outside the mask with "
        "weight w, where the field is 0 until the boundary-field correction and then the deep estimate's own "
        "field (`lbv_boundary_field(exterior=True)`): w = 0 is the default (field fitted inside the mask), "
        "w = 1 the data term of `tv_mask_data: false` (field 0 outside) except that the deep sources' "
        "field outside the mask is not forced to 0.",
        table_2016=ACCURACY_2016,
        text_2016="2016 challenge, the chain's inversion stage\n\nThe given local field and mask, inverted as "
                  "the chain inverts its own LBV output: the boundary-field correction "
                  "(`qsmdask.chain.boundary_correction`) with the 2016 mask as LBV's mask and as its eroded "
                  "mask (the given field was made with LBV: docs/benchmarks.md, reading of recon-accuracy); "
                  "qsm-ci `score_arrays` vs COSMOS; ROI slope over the 11 evaluation labels. Target (issue 15): "
                  "nrmse <= 58 and slope >= 0.9 at once.",
        chains=ACCURACY_CHAINS,
        text_heads="simulator heads, whole chains\n\nAs recon-refit-mask (k): simulator heads "
                   "(simulate_cohort, 2 mm, TE 4/12/20 ms, SNR 50), each chain end to end. Chi corr in the "
                   "final mask; ROI slope over the simulator's tissue regions.",
        timing=("default", "tv_outside_weight 1"), letters="mno")


# ------------------------------------------------------------------ section recon-refit-start
#: the boundary-field correction in the data from the start (early 5-iteration estimate, 15 mm, 0.02 ppm)
EARLY5 = {"lbv_boundary_estimate_iter": 5, "lbv_boundary_depth_mm": 15.0, "lbv_boundary_threshold_ppm": 0.02}
#: 2016 rows of --refit-start: the refits with the correction from the start (chain.invert_tv)
REFIT_START_2016 = {
    "default": {},
    "tv_refit (field 0 outside the mask, no correction on these data)": {"preset": "tv_refit",
                                                                          "lbv_boundary_depth_mm": 0.0},
    "tv_refit_mask + tv_outside_weight 1 (correction at the second solve)": {"preset": "tv_refit_mask",
                                                                              "tv_outside_weight": 1.0},
    "tv_refit_mask + early correction": {"preset": "tv_refit_mask", **EARLY5},
    "tv_refit_mask + early correction + tv_outside_weight 1": {"preset": "tv_refit_mask", "tv_outside_weight": 1.0,
                                                               **EARLY5},
    "the same, tv_lambda 2.2e-3 (preset tv_refit_early)": {"preset": "tv_refit_early"},
    "the same, tv_lambda 2.5e-3": {"preset": "tv_refit_mask", "tv_outside_weight": 1.0, "tv_lambda": 2.5e-3,
                                   **EARLY5},
    "the same, tv_lambda 3e-3": {"preset": "tv_refit_mask", "tv_outside_weight": 1.0, "tv_lambda": 3e-3, **EARLY5},
    "the same (lambda 2e-3), tv_refit_mu 0.3": {"preset": "tv_refit_mask", "tv_outside_weight": 1.0,
                                                "tv_refit_mu": 0.3, **EARLY5},
    "the same (lambda 2e-3), tv_refit_mu 0.05": {"preset": "tv_refit_mask", "tv_outside_weight": 1.0,
                                                 "tv_refit_mu": 0.05, **EARLY5},
    "tv_refit + early correction (field 0 outside the mask)": {"preset": "tv_refit", **EARLY5},
    "tv_refit + early correction + tv_outside_weight 1 (its field outside)": {"preset": "tv_refit",
                                                                               "tv_outside_weight": 1.0, **EARLY5},
}
REFIT_START_CHAINS = {
    "default": {},
    "tv_refit_early (lambda 2.2e-3)": {"preset": "tv_refit_early"},
    "the same, lambda 2.5e-3": REFIT_START_2016["the same, tv_lambda 2.5e-3"],
    "the same, lambda 2e-3": REFIT_START_2016["tv_refit_mask + early correction + tv_outside_weight 1"],
}


def main_refit_start(args):
    """Section recon-refit-start: the least-squares refits (the only chains that reached issue 15's
    2016 bar) with the boundary-field correction in the data from the start, so that the refit's
    residual no longer holds LBV's lost boundary field of deep sources (issue 14's halo)."""
    return _chains_section(
        args, "recon-refit-start", "--refit-start",
        "Early correction: the boundary-field correction with its sources from a 5-iteration TV solve "
        "(`lbv_boundary_estimate_iter: 5`, `lbv_boundary_depth_mm: 15`, `lbv_boundary_threshold_ppm: 0.02`), "
        "in the data from the first iteration; with `tv_outside_weight` the early estimate's own field "
        "outside the mask is the data there (`tv_admm(outside_field_ppm=)`; with `tv_mask_data: false`, "
        "`tv_outside_weight: 1` means that field instead of 0 there).",
        table_2016=REFIT_START_2016,
        text_2016="2016 challenge, the chain's inversion stage\n\nAs recon-accuracy (m): the given local field "
                  "and mask through `qsmdask.chain.invert_tv` (the 2016 mask as LBV's mask and as its eroded "
                  "mask); qsm-ci `score_arrays` vs COSMOS; ROI slope over the 11 evaluation labels. Target "
                  "(issue 15): nrmse <= 58 and slope >= 0.9 at once.",
        chains=REFIT_START_CHAINS,
        text_heads="simulator heads, whole chains\n\nAs recon-refit-mask (k): simulator heads "
                   "(simulate_cohort, 2 mm, TE 4/12/20 ms, SNR 50), each chain end to end. Chi corr in the "
                   "final mask and in the final mask within the true brain; ROI slope over the simulator's "
                   "tissue regions.",
        timing=list(REFIT_START_CHAINS)[:2], letters="pqr")


# ------------------------------------------------------------------ section recon-refit-shape
#: the refit without its global amplitude step (tv_refit_amplitude false) on top of the default's
#: Bregman step with a larger lambda and the data term outside the mask
NOAMP = {"tv_debias": "refit", "tv_refit_amplitude": False}
#: 2016 rows of --refit-shape (chain.invert_tv, as recon-accuracy (m))
REFIT_SHAPE_2016 = {
    "default": {},
    "tv_refit_mask + tv_outside_weight 1 (amplitude and data refit)": {"preset": "tv_refit_mask",
                                                                       "tv_outside_weight": 1.0},
    "the same, no amplitude step": {"preset": "tv_refit_mask", "tv_outside_weight": 1.0, "tv_refit_amplitude": False},
    "the same, no amplitude step, tv_bregman_fraction 0.5": {"preset": "tv_refit_mask", "tv_outside_weight": 1.0,
                                                            "tv_bregman_fraction": 0.5, "tv_refit_amplitude": False},
    "default + tv_outside_weight 1 + refit without amplitude, lambda 5e-3": {"tv_outside_weight": 1.0,
                                                                          "tv_lambda": 5e-3, **NOAMP},
    "the same, lambda 5.5e-3": {"tv_outside_weight": 1.0, "tv_lambda": 5.5e-3, **NOAMP},
    "the same, lambda 6e-3": {"tv_outside_weight": 1.0, "tv_lambda": 6e-3, **NOAMP},
    "default + tv_outside_weight 1 + refit with amplitude, lambda 6e-3": {"tv_outside_weight": 1.0, "tv_lambda": 6e-3,
                                                                       "tv_debias": "refit"},
}
REFIT_SHAPE_CHAINS = {
    "default": {},
    "default + tv_outside_weight 1 + refit without amplitude, lambda 5.5e-3": REFIT_SHAPE_2016["the same, lambda 5.5e-3"],
    "tv_refit_mask + tv_outside_weight 1, no amplitude step": REFIT_SHAPE_2016["the same, no amplitude step"],
}


def main_refit_shape(args):
    """Section recon-refit-shape: where the least-squares refit's halo comes from (its global
    amplitude step) and the refit without it (``tv_refit_amplitude: false``)."""
    return _chains_section(
        args, "recon-refit-shape", "--refit-shape",
        "The least-squares refit (`tv_debias: refit`) is two steps: one amplitude k for the whole map, "
        "then a Tikhonov data refit. `tv_refit_amplitude: false` skips the first. Rows with \"default +\" are "
        "the default chain (TV, one Bregman step with the boundary-field correction) with the options named.",
        table_2016=REFIT_SHAPE_2016,
        text_2016="2016 challenge, the chain's inversion stage\n\nAs recon-accuracy (m): the given local field "
                  "and mask through `qsmdask.chain.invert_tv`; qsm-ci `score_arrays` vs COSMOS; ROI slope over "
                  "the 11 evaluation labels. Target (issue 15): nrmse <= 58 and slope >= 0.9 at once.",
        chains=REFIT_SHAPE_CHAINS, text_heads="simulator heads, whole chains\n\nAs recon-refit-start (q).",
        timing=list(REFIT_SHAPE_CHAINS)[:2], letters="stu")


# ------------------------------------------------------------------ section recon-exterior
EXTERIOR_2016 = {
    "default": {},
    "tv_exterior": {"preset": "tv_exterior"},
    "tv_exterior, tv_rho_data 1": {"preset": "tv_exterior", "tv_rho_data": 1.0},
    "tv_exterior, tv_lambda 3e-3": {"preset": "tv_exterior", "tv_lambda": 3e-3},
    "default, tv_rho_data 0.1, 30 + 15 iterations, no boundary-field correction": {
        "tv_rho_data": 0.1, "tv_max_iter": 30, "lbv_boundary_depth_mm": 0.0},
}
EXTERIOR_CHAINS = {"default": {}, "tv_exterior": {"preset": "tv_exterior"}}


# ------------------------------------------------------------------ section recon-pass2
#: the second pass of the boundary-field correction (lbv_boundary_pass2_depth_mm, issue 14)
PASS2_ONE = "single_pass (one pass; the default up to 98887c8)"
PASS2_DEFAULT = "default (pass 2, 10 mm, band threshold 0.08 ppm)"
PASS2_2016 = {
    PASS2_ONE: {"preset": "single_pass"},
    "pass 2, 10 mm, band threshold 0.01 ppm": {"lbv_boundary_pass2_depth_mm": 10.0,
                                               "lbv_boundary_pass2_threshold_ppm": 0.01},
    "pass 2, 10 mm, band threshold 0.05 ppm": {"lbv_boundary_pass2_depth_mm": 10.0,
                                               "lbv_boundary_pass2_threshold_ppm": 0.05},
    PASS2_DEFAULT: {},
}
PASS2_CHAINS = dict(PASS2_2016)


def main_exterior(args):
    """Section recon-exterior: free exterior sources (``tv_outside_reg_weight: 0``, preset
    ``tv_exterior``) beside the default."""
    return _chains_section(
        args, "recon-exterior", "--exterior",
        "The preset `tv_exterior`: TV on LBV's output with no penalty on chi outside the mask "
        "(`tv_outside_reg_weight: 0`), so that a field harmonic inside the mask (what LBV's boundary condition "
        "removes from the field of deep sources) is explained by sources outside it; no boundary-field "
        "correction; `tv_rho_data: 0.1` and 30 + 15 iterations.",
        table_2016=EXTERIOR_2016,
        text_2016="2016 challenge, the chain's inversion stage\n\nAs recon-accuracy (m): the given local field "
                  "and mask through `qsmdask.chain.invert_tv`; qsm-ci `score_arrays` vs COSMOS; ROI slope over "
                  "the 11 evaluation labels. Target (issue 15): nrmse <= 58 and slope >= 0.9 at once.",
        chains=EXTERIOR_CHAINS, text_heads="simulator heads, whole chains\n\nAs recon-refit-start (q).",
        timing=list(EXTERIOR_CHAINS), letters="vwx")


def main_pass2(args):
    """Section recon-pass2: the boundary-field correction's second pass (``lbv_boundary_pass2_depth_mm``,
    the default) beside the one-pass chain (preset ``single_pass``)."""
    return _chains_section(
        args, "recon-pass2", "--pass2",
        "The second pass of the boundary-field correction (`lbv_boundary_pass2_depth_mm`, 10 mm in the default "
        "chain since the commit after 98887c8; 0 in the preset `single_pass`): after the one-pass inversion, "
        "the sources of its final estimate down to 10 mm from the edge (deeper than 20 mm: "
        "0.01 ppm from the median; the 10-20 mm band: the threshold named) give LBV's lost boundary field, "
        "which replaces the first correction in the data of a second inversion from scratch.",
        table_2016=PASS2_2016,
        text_2016="2016 challenge, the chain's inversion stage\n\nAs recon-accuracy (m): the given local field "
                  "and mask through `qsmdask.chain.invert_tv`; qsm-ci `score_arrays` vs COSMOS; ROI slope over "
                  "the 11 evaluation labels. Target (issue 15): nrmse <= 58 and slope >= 0.9 at once.",
        chains=PASS2_CHAINS, text_heads="simulator heads, whole chains\n\nAs recon-refit-start (q).",
        timing=[PASS2_ONE, PASS2_DEFAULT], letters=("y", "z", "aa"))


# ------------------------------------------------------------------ section recon-coverage
# AAL labels of the cerebral cortex: 1-90 without the hippocampus, parahippocampal gyrus, amygdala
# (37-42) and the deep nuclei (71-78); the cerebellum (91-116) is left out too
CORTEX_LABELS = tuple(lab for lab in range(1, 91) if not (37 <= lab <= 42 or 71 <= lab <= 78))


def _coverage_head(seed, air_cavities):
    """The first head of ``simulate_cohort(seed=seed)`` in memory (as section single-echo), with or
    without its air cavities: inputs, truth and the masks the coverage section scores."""
    import scipy.ndimage as ndi

    from qsmdask.sim import phantom

    sim = _session(seed, "transceive", air_cavities=air_cavities)
    tb = sim.brain
    bg = np.abs(sim.field_ppm - sim.local_field_ppm - np.median((sim.field_ppm - sim.local_field_ppm)[tb]))
    return {"mag": sim.magnitude, "phase": sim.phase_rad, "te": np.asarray(sim.echo_times_s),
            "vs": sim.voxel_size_mm, "b0": sim.b0_dir, "chi": sim.chi_ppm, "brain": tb,
            "rois": [np.isin(sim.dseg, labs) for labs in phantom.REGION_LABELS.values()],
            "cortex": tb & np.isin(sim.dseg, CORTEX_LABELS),
            # the air zone: top decile of the true background field's deviation in the brain
            "air zone": tb & (bg >= np.percentile(bg[tb], 90)),
            "depth_mm": ndi.distance_transform_edt(tb, sampling=sim.voxel_size_mm), "dseg": sim.dseg}


def _coverage_losses(h, r):
    """Shares (%) of the true brain lost at each step of the chain's masking."""
    import scipy.ndimage as ndi

    from qsmdask import unwrap
    from qsmdask.mask import max_wrapped_gradient

    tb, whole, q, final = h["brain"], r.brain_mask, r.quality_mask, r.mask
    cfg = r.config
    qphase = unwrap.echo_difference_phase(h["phase"], np.asarray(h["te"]), magnitude=h["mag"])[0]
    g_all = max_wrapped_gradient(qphase)
    bad_all = (g_all > cfg.quality_max_gradient_rad) & whole
    bad_in = (max_wrapped_gradient(qphase, whole) > cfg.quality_max_gradient_rad) & whole
    dilated = ndi.binary_dilation(bad_all, mask=g_all > cfg.quality_dilate_min_gradient_rad) \
        if cfg.quality_dilate_min_gradient_rad > 0 else ndi.binary_dilation(bad_all)
    lost_q, lost_e = tb & whole & ~q, tb & q & ~final
    depth = h["depth_mm"]

    def pc(x):
        return 100 * float((x & tb).sum() / tb.sum())

    return {"threshold mask %": pc(whole), "quality mask %": pc(q), "final mask %": pc(final),
            "cortex in final mask %": 100 * float((final & h["cortex"]).sum() / h["cortex"].sum()),
            "lost: over the limit (inside pairs) %": pc(lost_q & bad_in),
            "lost: over the limit via outside pairs %": pc(lost_q & bad_all & ~bad_in),
            "lost: dilation of removed set %": pc(lost_q & ~bad_all & dilated),
            "lost: not largest component %": pc(lost_q & ~dilated),
            "lost: LBV erosion %": pc(lost_e),
            "lost within 4.5 mm of the brain surface %": 100 * float(((lost_q | lost_e) & (depth <= 4.5)).sum()
                                                                     / max((lost_q | lost_e).sum(), 1))}


def _nrmse(a, b, m):
    """Demeaned NRMSE (%) of ``a`` against truth ``b`` in ``m``."""
    e = a[m] - a[m].mean()
    t = b[m] - b[m].mean()
    return 100 * float(np.linalg.norm(e - t) / np.linalg.norm(t))


CORTICAL_GROUPS = ("frontal", "temporal", "occipital", "parietal", "cingulum", "insula")


def _cortical_groups(values, labels, voxel_size_mm, mask, erode_mm, table) -> dict:
    """Means (ppm) of the cortical AAL groups (CORTICAL_GROUPS, L and R) as the pipeline's ROI
    tables make them (``roi_statistics`` of ``labels`` eroded by ``erode_mm`` inside ``mask``)."""
    from qsmdask.roi import roi_statistics

    t = roi_statistics(values, labels.astype(np.int32), table, voxel_size_mm=voxel_size_mm, erode_mm=erode_mm,
                       min_voxels=5, mask=mask)
    t = t[(t.level == "group") & t.hemisphere.isin(["L", "R"]) & t.roi.isin(CORTICAL_GROUPS)]
    return dict(zip(t.roi + "_" + t.hemisphere, t.mean_ppm))


def _cortical_group_errors(est, tru, chi, mask, truth, brain) -> np.ndarray:
    """Errors (ppm) of the groups ``est`` of ``chi`` (each minus chi's mean over the true brain in
    ``mask``) against ``tru`` of ``truth`` (each minus the truth's mean over the true brain)."""
    return np.array([(est[k] - chi[mask & brain].mean()) - (tru[k] - truth[brain].mean()) for k in tru])


def _cortical_group_mae(h, r) -> float:
    """Mean absolute error (ppb) of the cortical AAL group ROIs (CORTICAL_GROUPS, L and R) as the
    pipeline's ROI tables make them in native space (``roi_statistics``, labels eroded by 1 mm, in the
    final mask), each minus the true-brain mean in the final mask, against the truth's over the whole
    true label and true brain."""
    from qsmdask.atlas import load_atlas

    table = load_atlas("aal").table
    tb, m = h["brain"], r.mask
    est = _cortical_groups(r.chi_ppm, h["dseg"], h["vs"], m, 1.0, table)
    tru = _cortical_groups(h["chi"], h["dseg"], h["vs"], tb, 0.0, table)
    return 1e3 * float(np.mean(np.abs(_cortical_group_errors(est, tru, r.chi_ppm, m, h["chi"], tb))))


def _coverage_scores(h, r, ref_mask):
    """Coverage (true brain, cortex, air zone) and accuracy of one reconstruction; ``ref_mask`` is
    the reference chain's final mask on the same head (the voxels every variant is compared on)."""
    import scipy.ndimage as ndi

    m, tb, zone = r.mask, h["brain"], h["air zone"]
    eroded = ndi.binary_erosion(r.quality_mask, structure=ndi.generate_binary_structure(3, 1), border_value=0)
    # the boundary layer that keep_boundary_layer gives back (empty otherwise) and the layer just
    # inside it, in the true brain (outside it the simulator's truth holds extra-cerebral CSF and
    # bone partial volumes, whose field is not in the local field: nothing can estimate them)
    rim = m & ~eroded & tb
    inner_layer = eroded & ~ndi.binary_erosion(eroded, structure=ndi.generate_binary_structure(3, 1)) & tb
    est, tru = [], []
    for sel in h["rois"]:
        s = sel & m
        if s.sum() >= 10:
            est.append(r.chi_ppm[s].mean() - r.chi_ppm[m].mean())
            tru.append(h["chi"][s].mean() - h["chi"][m].mean())
    common = m & ref_mask
    cx = m & h["cortex"]
    # cortical ROI means (AAL cortex labels, >= 20 voxels in the final mask), each minus the mean over
    # the true brain in the final mask, against the truth's over the WHOLE true label and true brain
    # (what a study wants to know, whichever voxels the mask covers): mean absolute error
    roi_err = []
    for lab in CORTEX_LABELS:
        s = m & (h["dseg"] == lab)
        if s.sum() >= 20:
            whole = h["brain"] & (h["dseg"] == lab)
            roi_err.append((r.chi_ppm[s].mean() - r.chi_ppm[m & tb].mean())
                           - (h["chi"][whole].mean() - h["chi"][tb].mean()))
    out = {"final-mask coverage %": 100 * float((m & tb).sum() / tb.sum()),
           "cortex coverage %": 100 * float((m & h["cortex"]).sum() / h["cortex"].sum()),
           "chi corr": _corr(r.chi_ppm, h["chi"], m),
           "chi corr in true brain": _corr(r.chi_ppm, h["chi"], m & tb),
           "chi corr, reference voxels": _corr(r.chi_ppm, h["chi"], common),
           # the cortex's contrast: (cortex mean - true-brain mean in the final mask), estimate minus truth
           "cortex contrast error ppm": float((r.chi_ppm[cx].mean() - r.chi_ppm[m & tb].mean())
                                              - (h["chi"][cx].mean() - h["chi"][m & tb].mean())),
           "ROI slope": float(np.polyfit(tru, est, 1)[0]),
           "cortical ROI MAE ppb": 1e3 * float(np.mean(np.abs(roi_err))),
           "cortical group ROI MAE ppb": _cortical_group_mae(h, r),
           "rim chi corr": _corr(r.chi_ppm, h["chi"], rim) if rim.sum() > 10 else float("nan"),
           "rim nrmse %": _nrmse(r.chi_ppm, h["chi"], rim) if rim.sum() > 10 else float("nan"),
           "layer inside chi corr": _corr(r.chi_ppm, h["chi"], inner_layer),
           "layer inside nrmse %": _nrmse(r.chi_ppm, h["chi"], inner_layer),
           "air-zone coverage %": 100 * float((zone & m).sum() / zone.sum()),
           "air-zone chi corr": _corr(r.chi_ppm, h["chi"], zone & m),
           "air-zone chi corr, reference voxels": _corr(r.chi_ppm, h["chi"], zone & common),
           "air-zone nrmse %": _nrmse(r.chi_ppm, h["chi"], zone & m),
           "air-zone nrmse, reference voxels %": _nrmse(r.chi_ppm, h["chi"], zone & common)}
    return out


COVERAGE_VARIANTS = {
    "dilate all, rim eroded": dict(keep_boundary_layer=False, quality_dilate_min_gradient_rad=0.0),
    "dilate > 0.5 rad, rim eroded": dict(keep_boundary_layer=False, quality_dilate_min_gradient_rad=0.5),
    "dilate all, rim kept": dict(keep_boundary_layer=True, quality_dilate_min_gradient_rad=0.0),
    "dilate > 0.5 rad, rim kept": dict(keep_boundary_layer=True, quality_dilate_min_gradient_rad=0.5),
    "dilate > 0.25 rad, rim kept": dict(keep_boundary_layer=True, quality_dilate_min_gradient_rad=0.25),
    "no dilation, rim kept": dict(keep_boundary_layer=True, quality_dilate_voxels=0),
}
COVERAGE_REFERENCE = "dilate all, rim eroded"  # the chain before issue 15's coverage work


def _resolved(cfg):
    """``cfg`` with ``keep_boundary_layer`` resolved (null: automatic), to tell the default."""
    return cfg.replace(keep_boundary_layer=cfg.boundary_layer_kept)


def main_coverage(args):
    machine = machine_description()
    print(machine, flush=True)
    names = args.variants or list(COVERAGE_VARIANTS)
    loss_rows, var_rows = [], []
    for seed in args.seeds:
        for cav in (True, False):
            h = _coverage_head(seed, cav)
            head = "sinuses, mastoids" if cav else "no air cavities"
            ref = None
            for name in [COVERAGE_REFERENCE] + [n for n in names if n != COVERAGE_REFERENCE]:
                t0 = time.perf_counter()
                cfg = DEFAULT.replace(**COVERAGE_VARIANTS[name])
                is_default = _resolved(cfg) == _resolved(DEFAULT)
                label = name + (" (default)" if is_default else "")
                r = reconstruct(h["mag"], h["phase"], h["te"], h["vs"], b0_dir=h["b0"], b0_tesla=3.0, config=cfg)
                if ref is None:
                    ref = r.mask
                if name in (COVERAGE_REFERENCE, "dilate > 0.5 rad, rim kept") or is_default:
                    loss_rows.append({"seed": seed, "head": head, "chain": label, **_coverage_losses(h, r)})
                    print(loss_rows[-1], flush=True)
                var_rows.append({"seed": seed, "head": head, "chain": label, **_coverage_scores(h, r, ref),
                                 "time s": time.perf_counter() - t0})
                print(var_rows[-1], flush=True)
    cmd = f"python bench/recon.py --coverage --seeds {' '.join(map(str, args.seeds))}"
    if args.variants:
        cmd += " --variants " + " ".join(f"'{v}'" for v in args.variants)
    body = (f"## recon-coverage\n\nMachine: {machine} (shared machine, loaded by other jobs)\n\n"
            f"Command: `{cmd}`\n\n"
            "Simulator heads (the first head of simulate_cohort(seed), 2 mm, TE 4/12/20 ms, SNR 50, "
            "simulated in memory), each with its sinuses and mastoid air cells and without them "
            "(`simulate_session(air_cavities=False)`: the bone, soft tissue or CSF they replaced). Shares of the true "
            "brain (truth mask) covered by each mask, and lost at each step: quality-mask voxels "
            "whose wrapped echo-difference phase differs by more than the limit from a neighbour inside "
            "the threshold mask, or only from one outside it; voxels lost only to the one-voxel dilation "
            "of the removed set, or to the largest-component step; and the quality mask's boundary layer "
            "that LBV erodes (given back by `keep_boundary_layer`). Cortex: true-brain voxels with an AAL "
            "cerebral-cortex label. Last column: share of all lost voxels within 4.5 mm of the true "
            "brain's surface.\n\n" + markdown_table(loss_rows, floatfmt=".3g")
            + "\n\nChain variants (`keep_boundary_layer`, `quality_dilate_min_gradient_rad`, "
            "`quality_dilate_voxels`): coverage and accuracy. chi corr in the variant's final mask and "
            "on the voxels it shares with the reference chain's final mask (dilate all, rim eroded: the "
            "default); cortex contrast error: (mean over the cortex - mean over the "
            "true brain, both in the final mask), estimate minus truth (ppm); cortical ROI MAE: mean absolute "
            "error of the AAL cortex labels' means (minus the true-brain mean, both in the final mask) against "
            "the truth's over the whole label and true brain (ppb); cortical group ROI MAE: the same for the AAL "
            "groups frontal, temporal, occipital, parietal, cingulum, insula (L, R) as the pipeline's native ROI "
            "tables make them (labels eroded by 1 mm inside the final mask); rim: the boundary layer LBV erodes "
            "(in the final mask only with `keep_boundary_layer`), beside the layer just inside it (in "
            "every final mask), both in the true brain; nrmse: demeaned, %. Air zone: true-brain voxels in the top decile of the "
            "true background field's deviation (next to sinuses and mastoids; on heads without cavities "
            "next to the skull base).\n\n"
            + markdown_table(var_rows, floatfmt=".3g"))
    print(body)
    if not args.no_write:
        update_section("recon-coverage", body)
    return 0


def main_coverage_rois(args):
    """Section recon-coverage-rois: cortical group ROIs as the pipeline makes them (the atlas registered
    to the first-echo magnitude with the chain's final mask as the registration mask, affine, seed 1,
    one ITK thread; labels to native; ``roi_statistics`` eroded by 1 mm inside the final mask), the rim
    kept (default) beside the rim eroded, against the simulator's truth over its own native labels."""
    import os

    from qsmdask.atlas import load_atlas, load_template
    from qsmdask.registration import standardise

    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")
    machine = machine_description()
    print(machine, flush=True)
    atlas = load_atlas("aal")
    tpl, tpl_aff = load_template(resolution_mm=2)

    rows = []
    for seed in args.seeds:
        for cav in (True, False):
            sim = _session(seed, "transceive", air_cavities=cav)
            vs, tb = sim.voxel_size_mm, sim.brain
            tru = _cortical_groups(sim.chi_ppm, sim.dseg, vs, tb, 0.0, atlas.table)
            for name in (COVERAGE_REFERENCE, "dilate all, rim kept"):
                cfg = DEFAULT.replace(**COVERAGE_VARIANTS[name])
                r = reconstruct(sim.magnitude, sim.phase_rad, sim.echo_times_s, vs, b0_dir=sim.b0_dir,
                                b0_tesla=3.0, config=cfg)
                sn = standardise(sim.magnitude[..., 0], sim.affine, template=tpl, template_affine=tpl_aff,
                                 method="affine", magnitude_mask=r.mask, seed=1)
                labels = sn.labels_to_native(atlas.labels, atlas.affine, r.chi_ppm.shape, sim.affine)
                est = _cortical_groups(r.chi_ppm, labels, vs, r.mask, 1.0, atlas.table)
                e = _cortical_group_errors(est, tru, r.chi_ppm, r.mask, sim.chi_ppm, tb)
                rows.append({"seed": seed, "head": "sinuses, mastoids" if cav else "no air cavities",
                             "chain": name + (" (default)" if _resolved(cfg) == _resolved(DEFAULT) else ""),
                             "registered cortical group ROI MAE ppb": 1e3 * float(np.abs(e).mean()),
                             "max abs error ppb": 1e3 * float(np.abs(e).max())})
                print(rows[-1], flush=True)
    cmd = f"python bench/recon.py --coverage-rois --seeds {' '.join(map(str, args.seeds))}"
    body = (f"## recon-coverage-rois\n\nMachine: {machine} (shared machine, loaded by other jobs)\n\n"
            f"Command: `{cmd}`\n\nHeads as recon-coverage. The AAL cortical groups (frontal, temporal, occipital, "
            "parietal, cingulum, insula; L, R) as the participant workflow makes its ROI table: the atlas registered "
            "to the first-echo magnitude with the chain's final mask as the registration mask (affine, seed 1), "
            "labels to native, `roi_statistics` with the labels eroded by 1 mm inside the final mask; each ROI "
            "mean minus the mean over the true brain in the final mask, against the truth's over the "
            "simulator's own native label and true brain: mean and largest absolute error over the 12 ROIs.\n\n"
            + markdown_table(rows, floatfmt=".3g"))
    print(body)
    if not args.no_write:
        update_section("recon-coverage-rois", body)
    return 0


# ------------------------------------------------------------------ section recon-tgv
def _tgv(a1, ratio=2.0, mask_data=False, it=30, breg=0):
    return dict(inversion_method="tgv", tgv_alpha1=a1, tgv_alpha0=ratio * a1, tgv_max_iter=it,
                tgv_mask_data=mask_data, tgv_bregman_iterations=breg, tgv_bregman_max_iter=15)


TGV_REFERENCE = {
    "default chain inversion (TV lam 2e-3 + 1 Bregman step, field fitted inside the mask)": dict(),
    "TV lam 1.5e-3, 30 it, field 0 outside the mask": _tv(1.5e-3),
}
TGV_GRID = {
    "TGV alpha1 1e-3, alpha0 2e-3, field 0 outside the mask": _tgv(1e-3, 2.0),
    "TGV alpha1 1e-3, alpha0 4e-3, field 0 outside the mask": _tgv(1e-3, 4.0),
    "TGV alpha1 2e-3, alpha0 8e-3, field 0 outside the mask": _tgv(2e-3, 4.0),
    "TGV alpha1 1e-3, alpha0 4e-3, field fitted inside the mask (chain tgv options)": _tgv(1e-3, 4.0, True),
}
TGV_HEAD_ROWS = ("TGV alpha1 1e-3, alpha0 4e-3, field 0 outside the mask",
                 "TGV alpha1 1e-3, alpha0 4e-3, field fitted inside the mask (chain tgv options)")
TGV_2016 = ("TV lam 1.5e-3, 30 it, field 0 outside the mask",) + tuple(TGV_GRID)
TGV_CHAINS = {"chain with inversion_method tgv (its defaults)": {"inversion_method": "tgv"}}
TGV_HEADS = ("TV lam 1.5e-3, 30 it, field 0 outside the mask",) + TGV_HEAD_ROWS


def bench_tgv_heads(seeds, chain_cfgs):
    """TGV inversions on the default chain's local field and final mask of each head, and whole chains."""
    import tempfile
    from types import SimpleNamespace

    configs = {**TGV_REFERENCE, **TGV_GRID}
    rows = []

    def score(h, name, chi, mask, qmask, dt):
        sc = _head_scores(h, SimpleNamespace(mask=mask, chi_ppm=chi, quality_mask=qmask))
        row = {"seed": seed, "inversion": name, "chi corr": sc["chi corr"], "ROI slope": sc["ROI slope"]}
        row.update(_deep_grey_errors(h, chi, mask))
        row["time s"] = dt
        rows.append(row)
        print(row, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            h = _load_head(seed, tmp)
            for name, cfg in chain_cfgs.items():
                t0 = time.perf_counter()
                r = reconstruct(h["mag"], h["phase"], h["te"], h["vs"], b0_dir=h["b0"], b0_tesla=3.0,
                                config=ChainConfig.from_dict(cfg))
                score(h, name, r.chi_ppm, r.mask, r.quality_mask, time.perf_counter() - t0)
                if cfg == {}:
                    ref = r
            for name in TGV_HEADS:
                t0 = time.perf_counter()
                chi = _invert_cfg(configs[name], ref.local_field_ppm, ref.mask, tuple(h["vs"]), tuple(h["b0"]))
                score(h, name, chi, ref.mask, ref.quality_mask, time.perf_counter() - t0)
    summary = []
    for name in list(chain_cfgs) + list(TGV_HEADS):
        sub = [r for r in rows if r["inversion"] == name]
        out = {"inversion": name, "chi corr mean": float(np.mean([r["chi corr"] for r in sub])),
               "ROI slope mean": float(np.mean([r["ROI slope"] for r in sub]))}
        for reg in DEEP_GREY:
            out[f"{reg} err mean %"] = float(np.mean([r[f"{reg} err %"] for r in sub]))
        summary.append(out)
    return summary, rows


def main_tgv(args):
    machine = machine_description()
    print(machine, flush=True)
    seeds = args.seeds
    parts = [f"## recon-tgv\n\nMachine: {machine} (shared machine, loaded by other jobs: times are "
             f"inflated)\n\nCommand: `python bench/recon.py --tgv --seeds {' '.join(map(str, seeds))}`\n\n"
             "Second-order total generalised variation (`qsmdask.inversion.tgv_admm`, chain: `inversion_method: "
             "tgv`): min 1/2 ||W (D chi - f)||^2 + alpha1 ||grad chi - w|| + alpha0 ||E w||, chi 0 outside the "
             "mask and the regulariser on differences inside it, ADMM with the joint (chi, w) update solved "
             "in k-space.\n"]
    if (DATA / "local_field_ppm.nii.gz").exists():
        rows = bench_study_2016(configs={k: v for k, v in {**TGV_REFERENCE, **TGV_GRID}.items() if k in TGV_2016})
        parts.append("### (j) 2016 challenge: alpha grid\n\nThe given local field and mask; qsm-ci `score_arrays` "
                     "vs COSMOS; ROI slope: least squares of (ROI mean - mask mean) of the estimate on COSMOS's over "
                     "the 11 evaluation labels. Target (issue 15): nrmse <= 58 and slope >= 0.9 at once. One child "
                     "process per row (time and peak RSS of the inversion alone).\n\n"
                     + markdown_table(rows, floatfmt=".3g"))
    chains = {"default chain (LBV + TV + Bregman + boundary correction)": {}, **TGV_CHAINS}
    summary, rows = bench_tgv_heads(seeds, chains)
    parts.append("### (k) simulator heads\n\nSimulator heads (simulate_cohort, 2 mm, TE 4/12/20 ms, SNR 50). "
                 "Whole chains (first rows), then inversions on the default chain's local field and final mask "
                 "(as recon-debias (i)). Chi corr in the final mask; ROI slope over the simulator's tissue "
                 "regions; ROI error: (ROI mean - final-mask mean) relative to the same for the true chi, AAL "
                 "labels.\n\n" + markdown_table(summary, floatfmt=".3g")
                 + "\n\nPer head:\n\n" + markdown_table(rows, floatfmt=".3g"))
    trows = []
    for name, cfg in {"default: LBV + TV-Bregman (15+15 it)": {}, **TGV_CHAINS}.items():
        (dt, stages), _, rss = run_isolated(_time_chain, ChainConfig.from_dict(cfg).to_dict(), (256, 256, 80))
        trows.append({"chain": name, "shape": "256x256x80", "total wall s": float(dt),
                      "total CPU s": float(stages["cpu_s"]), "inversion s": stages["time_inversion_s"],
                      "peak RSS MiB (incl. simulation)": rss})
        print(trows[-1], flush=True)
    parts.append("### (l) whole chain timing, single echo, 1 FFT thread\n\nAs recon (c): adult-size geometric "
                 "phantom at 256x256x80 (0.94x0.94x2 mm). Target: regularised chain <= 30 s and <= 2 GB.\n\n"
                 + markdown_table(trows, floatfmt=".3g"))
    if args.reading:
        parts.append("### Reading\n\n" + Path(args.reading).read_text().strip() + "\n")
    body = "\n".join(parts)
    print(body)
    if not args.no_write:
        update_section("recon-tgv", body)
    return 0


# ------------------------------------------------------------------ section single-echo
def _session(seed, offset_model, air_cavities=True):
    """The first subject of ``simulate_cohort(seed=seed, n_sessions=1)`` (2 mm, TE 4/12/20 ms), simulated
    in memory with the given receiver phase offset model: both models draw the same random
    numbers, so head, pose and noise are the same and only the offset differs."""
    from qsmdask.sim import phantom
    from qsmdask.sim.cohort import _DEFAULT_FOV, _subject_values, plan_cohort

    cfg = {"voxel_size_mm": [2.0, 2.0, 2.0], "fov_mm": list(_DEFAULT_FOV), "echo_times_s": [0.004, 0.012, 0.020],
           "b0_tesla": 3.0, "t1w": False, "t1w_voxel_size_mm": None, "max_rotation_deg": 12.0,
           "max_translation_mm": 10.0, "shape_variation": 0.04, "shim_order": 2, "write_fields": True}
    plan = plan_cohort(n_subjects=1, seed=seed, n_sessions=1, snr=50.0, config=cfg)
    values, shape = _subject_values(plan, 0)
    rng = np.random.default_rng([seed, 4, 0, 0])  # as simulate_session_files draws it
    pose = phantom.random_pose(rng, max_rotation_deg=12.0, max_translation_mm=10.0, shape=shape)
    return phantom.simulate_session(values=values, pose=pose, rng=rng, voxel_size_mm=(2.0, 2.0, 2.0),
                                    fov_mm=cfg["fov_mm"], echo_times_s=cfg["echo_times_s"], b0_tesla=3.0,
                                    snr=50.0 * float(plan.participants.iloc[0]["site_snr_factor"]),
                                    shim_order=2, t1w=False, phase_offset=offset_model,
                                    air_cavities=air_cavities)


def _offset_laplacian(sim):
    """Median Laplacian (rad/m^2) of the true phase offset inside the brain (2 voxels eroded)."""
    import scipy.ndimage as ndi

    off = sim.phase_offset_rad.astype(np.float64)
    lap = np.zeros_like(off)
    for a, v in enumerate(sim.voxel_size_mm):
        lap += (np.roll(off, 1, a) + np.roll(off, -1, a) - 2 * off) / (v * 1e-3) ** 2
    inner = ndi.binary_erosion(sim.brain, iterations=2)
    return float(np.median(lap[inner])), float(np.ptp(off[sim.brain]))


SINGLE_ECHO_SETS = {"3 echoes (4/12/20 ms)": ([0, 1, 2], True), "2 echoes (4/12 ms)": ([0, 1], True),
                    "1 echo (20 ms)": ([2], True), "1 echo (12 ms)": ([1], True),
                    "1 echo (20 ms), no offset fit": ([2], False)}


def bench_single_echo(seeds):
    from qsmdask.sim import phantom

    rows = []
    for seed in seeds:
        for model in ("transceive", "plane_waves"):
            sim = _session(seed, model)
            lap_true, range_true = _offset_laplacian(sim)
            rois = [np.isin(sim.dseg, labs) for labs in phantom.REGION_LABELS.values()]
            h = {"chi": sim.chi_ppm, "brain": sim.brain, "rois": rois}
            tes = np.asarray(sim.echo_times_s)
            for name, (idx, fit) in SINGLE_ECHO_SETS.items():
                t0 = time.perf_counter()
                r = reconstruct(sim.magnitude[..., idx], sim.phase_rad[..., idx], tes[idx], sim.voxel_size_mm,
                                b0_dir=sim.b0_dir, b0_tesla=3.0,
                                config=DEFAULT.replace(single_echo_offset_fit=fit))
                sc = _head_scores(h, r)
                rows.append({"seed": seed, "offset model": model,
                             "offset range in brain rad": range_true,
                             "offset Laplacian rad/m^2 (true)": lap_true, "echoes": name,
                             "chi corr": sc["chi corr"], "chi corr in true brain": sc["chi corr in true brain"],
                             "ROI slope": sc["ROI slope"],
                             "fitted Laplacian rad/m^2": r.qc["single_echo_offset_laplacian_rad_per_m2"],
                             "time s": time.perf_counter() - t0})
                print(rows[-1], flush=True)
    return rows


def main_single_echo(args):
    machine = machine_description()
    print(machine, flush=True)
    rows = bench_single_echo(args.seeds)
    body = (f"## single-echo\n\nMachine: {machine} (shared machine, loaded by other jobs: times are "
            f"inflated)\n\nCommand: `python bench/recon.py --single-echo --seeds "
            f"{' '.join(map(str, args.seeds))}`\n\nSimulator heads (the first subject of "
            "`simulate_cohort(seed, n_sessions=1)`, 2 mm, SNR 50, TE 4/12/20 ms), default chain on "
            "subsets of the echoes. Offset model `transceive`: constant + linear ramps + the RF "
            "transceive phase of the head's conductivity (the simulator's default since this "
            "section); `plane_waves`: the earlier model (same random draws, so same head, pose and "
            "noise). Chi corr in the final mask (with LBV's rim kept, the default since session 7, it holds "
            "voxels outside the true brain whose bone and air values dominate it) and in the final mask "
            "inside the true brain; ROI slope: ROI mean - mask mean of the estimate on "
            "the truth's over the 5 deep-grey regions. Fitted Laplacian: the single-echo offset "
            "fit's estimate, in phase units (true: median over the brain, 2 voxels eroded).\n\n"
            + markdown_table(rows, floatfmt=".3g"))
    print(body)
    if not args.no_write:
        update_section("single-echo", body)
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small smoke run (implies --no-write)")
    ap.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    ap.add_argument("--skip-2016", action="store_true")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--skip-heads", action="store_true")
    ap.add_argument("--robustness", action="store_true", help="run only section recon-robustness")
    ap.add_argument("--single-echo", action="store_true", help="run only section single-echo")
    ap.add_argument("--debias", action="store_true", help="run only section recon-debias")
    ap.add_argument("--coverage", action="store_true", help="run only section recon-coverage")
    ap.add_argument("--coverage-rois", action="store_true",
                    help="run only section recon-coverage-rois (registered cortical ROIs, rim kept vs eroded)")
    ap.add_argument("--refit-mask", action="store_true", help="run only section recon-refit-mask")
    ap.add_argument("--tgv", action="store_true", help="run only section recon-tgv")
    ap.add_argument("--accuracy", action="store_true", help="run only section recon-accuracy")
    ap.add_argument("--refit-start", action="store_true",
                    help="run only section recon-refit-start (the refits with the boundary-field correction from the start)")
    ap.add_argument("--refit-shape", action="store_true",
                    help="run only section recon-refit-shape (the refit without its global amplitude step)")
    ap.add_argument("--exterior", action="store_true", help="run only section recon-exterior")
    ap.add_argument("--pass2", action="store_true", help="run only section recon-pass2")
    ap.add_argument("--reading", metavar="FILE", help="--tgv: text of the section's reading (kept with the tables)")
    ap.add_argument("--pairs", action="store_true",
                    help="run only (e), quality_pairs all vs inside with air-zone scores; prints, writes nothing")
    ap.add_argument("--f-rows", metavar="SUBSTR",
                    help="run only the (f) rows whose name contains SUBSTR; prints, writes nothing")
    ap.add_argument("--seeds", type=int, nargs="+", default=[5, 7])
    ap.add_argument("--variants", nargs="+", choices=list(COVERAGE_VARIANTS), default=None,
                    help="--coverage: only these chain variants (the reference chain always runs)")
    args = ap.parse_args(argv)
    if args.pairs:
        return bench_pairs(args.seeds)
    if args.f_rows:
        print(markdown_table(bench_study_2016(args.f_rows), floatfmt=".3g"))
        return 0
    if args.robustness:
        return main_robustness(args)
    if args.single_echo:
        return main_single_echo(args)
    if args.debias:
        return main_debias(args)
    if args.coverage_rois:
        return main_coverage_rois(args)
    if args.coverage:
        return main_coverage(args)
    if args.refit_mask:
        return main_refit_mask(args)
    if args.tgv:
        return main_tgv(args)
    if args.accuracy:
        return main_accuracy(args)
    if args.refit_start:
        return main_refit_start(args)
    if args.refit_shape:
        return main_refit_shape(args)
    if args.exterior:
        return main_exterior(args)
    if args.pass2:
        return main_pass2(args)
    machine = machine_description()
    print(machine, flush=True)
    parts = [f"Machine: {machine}\n\nCommand: `python bench/recon.py{' --quick' if args.quick else ''}`\n"]
    if not args.skip_2016 and (DATA / "local_field_ppm.nii.gz").exists() and not args.quick:
        rows = bench_2016(args.quick)
        parts.append("### (a) 2016 challenge in-vivo local field, scored with qsm_ci score_arrays\n\n"
                     "Published on these files (QSM-CI board, vs COSMOS): MEDI tuned 60.0, TKD tuned 62.7, "
                     "TV ADMM tuned 71.4. Times: one child process each, this machine, under the load above.\n\n"
                     + markdown_table(rows, floatfmt=".3g"))
    rows = bench_phantoms(args.quick)
    parts.append("### (b) simulated phantoms, whole chain from wrapped 4-echo phase (TE 4-16 ms, 3 T)\n\n"
                 "All chains: threshold mask, phase-quality mask, temporal unwrapping; rows differ in the "
                 "background removal and inversion. 'small' phantoms have a 40 mm brain (deep structures a "
                 "few mm from its edge); 'adult' ones an adult-size brain (140x168x116 mm) with deep "
                 "structures at adult positions (qsmdask.sim.geometric). NRMSE: demeaned, in the final mask "
                 "vs the true chi. ROI error: (ROI mean - tissue mean) / true ROI chi - 1 for putamen L/R, "
                 "pallidum L/R and a red-nucleus-like sphere (target: within 15 %). Dice: brain mask vs "
                 "truth.\n\n"
                 + markdown_table(rows, floatfmt=".3g"))
    if not args.skip_timing:
        rows = bench_timing(args.quick)
        parts.append("### (c) whole chain timing, single echo, 1 FFT thread (fft_workers=1)\n\n"
                     "Adult-size brain (qsmdask.sim.geometric, 136x168x116 mm) in the study's 240x240x160 mm "
                     "field of view. TV is solved on the mask's bounding box plus padding. "
                     "Targets: TKD path <= 10 s, regularised <= 30 s, peak memory <= 2 GB. The machine "
                     "is shared (see load average): CPU s (process time of the single-threaded child) "
                     "is the better estimate of the time on an idle core; stage times are wall.\n\n"
                     + markdown_table(rows, floatfmt=".3g"))
    if not args.skip_heads:
        rows, summary = bench_heads(args.quick)
        parts.append("### (d) simulator heads (simulate_cohort, 2 mm, TE 4/12/20 ms, SNR 50, seeds "
                     + ", ".join(map(str, HEAD_SEEDS[:1] if args.quick else HEAD_SEEDS)) + "), whole chain\n\n"
                     "Correlations in the chain's final mask. ROI error: (ROI mean - final-mask mean) relative to the "
                     "same for the true chi, in %, AAL labels of desc-truth_dseg (target: within 15 %). The SD over "
                     "subjects is what limits group comparisons (a constant bias scales the group difference "
                     "but cancels in it).\n\n"
                     + markdown_table(summary, floatfmt=".3g") + "\n\nPer subject:\n\n"
                     + markdown_table(rows, floatfmt=".3g"))
    body = "## recon\n\n" + "\n".join(parts)
    print(body)
    if not (args.quick or args.no_write):
        update_section("recon", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: voxel-wise permutation inference (qsmdask.perm, both schemes) vs nilearn permuted_ols.

Study-like data: 41 subjects, two groups + age, sex, medication, 3 mm FWHM
smoothed maps on the MNI152 2 mm grey-matter template (> 0.4, ~151k voxels).
Each inference mode is timed for qsmdask's Huh-Jhun and Freedman-Lane schemes and
for nilearn side by side in one run (wall and CPU time per permutation; nilearn's
per-permutation time is (T(n) - T(0)) / n so its set-up is not counted), and
20,000 max-T permutations are timed for each scheme. Writes section
"permutation" of docs/benchmarks.md.

Run: python bench/permutation.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._report import machine_description, markdown_table, peak_rss_mb, update_section  # noqa: E402
from qsmdask.perm import permutation_test, two_group_design  # noqa: E402


def make_data(seed=0, n=41, fwhm_mm=3.0, voxel_mm=2.0):
    from nilearn import datasets
    gm_img = datasets.load_mni152_gm_template(resolution=2)
    mask = gm_img.get_fdata() > 0.4
    rng = np.random.default_rng(seed)
    sigma = fwhm_mm / np.sqrt(8 * np.log(2)) / voxel_mm
    y = np.empty((n, int(mask.sum())), dtype=np.float32)
    for i in range(n):
        y[i] = ndimage.gaussian_filter(rng.standard_normal(mask.shape).astype(np.float32), sigma)[mask]
    group = np.r_[np.zeros(20), np.ones(n - 20)]
    age = rng.normal(60, 8, n)
    sex = rng.integers(0, 2, n)
    med = rng.integers(0, 2, n)
    y += (0.01 * (age - 60)).astype(np.float32)[:, None]
    return y, mask, gm_img.affine, group, age, sex, med


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer permutations (smoke run)")
    ap.add_argument("--repeats", type=int, default=2,
                    help="interleaved repeats of each ours/nilearn set (the table gives the median "
                         "and the range of the ratio)")
    ap.add_argument("--no-tfce", action="store_true", help="skip the TFCE row (nilearn's TFCE is slow)")
    ap.add_argument("--no-write", action="store_true", help="print only, do not update docs/benchmarks.md")
    ap.add_argument("--max-t-only", action="store_true",
                    help="only the 20,000 max-T permutations of each scheme (wall and CPU time; prints, "
                         "writes nothing): the wall-time target needs an otherwise idle machine")
    args = ap.parse_args(argv)
    machine = machine_description()
    y, mask, affine, group, age, sex, med = make_data()
    design = two_group_design(group, covariates={"age": age, "sex": sex, "medication": med})
    n_vox = y.shape[1]
    schemes = ("huh_jhun", "freedman_lane")
    big = 2000 if args.quick else 20000
    n_maxt, n_cl, n_tf = (500, 40, 6) if args.quick else (4000, 200, 20)
    nl_maxt, nl_cl, nl_tf = (10, 2, 1) if args.quick else (40, 5, 2)

    # 1) 20,000 max-T permutations per scheme (default threads = the cores), peak memory of qsmdask alone
    permutation_test(y, design, mask=mask, n_perm=256, seed=0)          # warm-up (imports, allocator)
    big_runs = {}
    for scheme in schemes:
        load0 = os.getloadavg()[0]
        res, w, c = timed(lambda: permutation_test(y, design, mask=mask, n_perm=big, seed=1, scheme=scheme))
        big_runs[scheme] = (w, c, load0, float(np.quantile(res.null["max_t"], 0.95)))
        print(f"{big} max-T permutations, {scheme}: {w:.1f} s wall, {c:.1f} s CPU, load {load0:.1f}", flush=True)
    rss_ours = peak_rss_mb()
    if args.max_t_only:
        print(f"machine: {machine}; load average at end {os.getloadavg()[0]:.1f}; peak RSS {rss_ours:.0f} MiB")
        return

    from nibabel import Nifti1Image
    from nilearn.maskers import NiftiMasker
    from nilearn.mass_univariate import permuted_ols
    masker = NiftiMasker(Nifti1Image(mask.astype(np.uint8), affine, dtype=np.uint8)).fit()
    conf = np.column_stack([age, sex, med])

    def nilearn_run(n_perm, **kw):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return permuted_ols(group[:, None], y, conf, n_perm=n_perm, two_sided_test=True, random_state=0,
                                n_jobs=1, output_type="dict", **kw)

    rows = []

    def compare(name, ours_fn, n_ours, nl_kw, n_nl, target):
        """Interleaved repeats: ours (each scheme), nilearn(0), nilearn(n), ...; per-permutation
        times and ratios to nilearn of the same repeat."""
        rec = {s: [] for s in schemes}
        loads = []
        for _ in range(args.repeats):
            loads.append(os.getloadavg()[0])
            ours = {}
            for scheme in schemes:
                _, w_o, c_o = timed(lambda: ours_fn(scheme))
                ours[scheme] = (w_o / n_ours, c_o / n_ours)
            _, w0, c0 = timed(lambda: nilearn_run(0, **nl_kw))
            _, w1, c1 = timed(lambda: nilearn_run(n_nl, **nl_kw))
            nl_w, nl_c = (w1 - w0) / n_nl, (c1 - c0) / n_nl
            for scheme in schemes:
                rec[scheme].append((*ours[scheme], nl_w, nl_c))
        for scheme in schemes:
            r = np.array(rec[scheme])
            sw, sc = r[:, 2] / r[:, 0], r[:, 3] / r[:, 1]
            rows.append({"inference": name, "scheme": scheme, "qsmdask ms/perm": 1e3 * np.median(r[:, 0]),
                         "nilearn ms/perm": 1e3 * np.median(r[:, 2]),
                         "speed-up (wall)": float(np.median(sw)),
                         "speed-up (wall) range": f"{sw.min():.3g}-{sw.max():.3g}",
                         "speed-up (CPU)": float(np.median(sc)),
                         "speed-up (CPU) range": f"{sc.min():.3g}-{sc.max():.3g}",
                         "target": target, "perms (ours/nilearn)": f"{n_ours}/{n_nl}",
                         "load": f"{min(loads):.1f}-{max(loads):.1f}"})
            print(rows[-1], flush=True)

    compare("voxel max-T",
            lambda sch: permutation_test(y, design, mask=mask, n_perm=n_maxt, seed=2, scheme=sch), n_maxt,
            {}, nl_maxt, ">= 100x")
    compare("cluster extent+mass, p=0.005, >=10 vox",
            lambda sch: permutation_test(y, design, mask=mask, n_perm=n_cl, seed=3, inference=("voxel", "cluster"),
                                         cluster_p=0.005, min_cluster_voxels=10, scheme=sch),
            n_cl, {"masker": masker, "threshold": 0.005}, nl_cl, ">= 50x")
    if not args.no_tfce:
        compare("TFCE (E=0.5, H=2, 100 steps)",
                lambda sch: permutation_test(y, design, mask=mask, n_perm=n_tf, seed=4,
                                             inference=("voxel", "tfce"), tfce_dh="auto", scheme=sch),
                n_tf, {"masker": masker, "tfce": True}, nl_tf, ">= 50x")
    load_end = os.getloadavg()[0]

    flags = " ".join(f for f, on in (("--quick", args.quick), (f"--repeats {args.repeats}", args.repeats != 2),
                                      ("--no-tfce", args.no_tfce)) if on)
    big_lines = [
        f"- {big} max-T permutations (incl. uncorrected permutation p per voxel), scheme `{scheme}`: "
        f"**{w:.1f} s wall**, {c:.1f} s CPU (load average {load0:.1f} when it started; target <= 10 s wall); "
        f"max-T null 95th percentile {q95:.2f}."
        for scheme, (w, c, load0, q95) in big_runs.items()]
    body = [
        "Voxel-wise permutation inference, `qsmdask.perm.permutation_test` (schemes `huh_jhun`, the "
        "default, and `freedman_lane`) vs `nilearn.mass_univariate.permuted_ols` (nilearn 0.14, n_jobs=1, "
        "Freedman-Lane with the nuisance refit), measured side by side in one run: each row set is "
        f"{args.repeats} interleaved repeats (ours with each scheme, then nilearn), the table gives the median "
        "per-permutation times and the median and range of the ratios to nilearn of the same repeat.",
        "",
        f"- Machine: {machine}; load average at end {load_end:.1f}. The machine is shared with other "
        "engineers (2 cores): compare the ratios, measured back to back, and the CPU "
        "times, not absolute wall times.",
        f"- Command: `python bench/permutation.py{' ' + flags if flags else ''}`",
        f"- Data: 41 subjects, two groups + age, sex, medication (5 regressors, dof 36), 3 mm FWHM smoothed maps, "
        f"MNI152 2 mm grey-matter template > 0.4: {n_vox} voxels; two-sided. Freedman-Lane (ours and "
        "nilearn) refits the permuted data on the nuisance regressors: 4 rows of length 37 per "
        "permutation and voxel here; Huh-Jhun permutes the data projected on the 37-dimensional complement "
        "of the nuisance space: 1 row of length 37 (`qsmdask/perm/permute.py`). nilearn per-permutation "
        "time = (T(n) - T(0)) / n. qsmdask uses its default threads (one per core, single-threaded BLAS "
        "inside); nilearn n_jobs=1 (its BLAS may use both cores).",
        "",
        markdown_table(rows, ["inference", "scheme", "qsmdask ms/perm", "nilearn ms/perm", "speed-up (wall)",
                              "speed-up (wall) range", "speed-up (CPU)", "speed-up (CPU) range", "target",
                              "perms (ours/nilearn)", "load"]),
        *big_lines,
        f"- Peak RSS of the process after the {big}-permutation runs (data + qsmdask, before nilearn ran): "
        f"{rss_ours:.0f} MiB (target <= 1024 MiB).",
    ]
    text = "\n".join(body)
    print(text)
    if not args.no_write:
        update_section("permutation", text)


if __name__ == "__main__":
    main()

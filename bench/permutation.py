"""Benchmark: voxel-wise permutation inference (qsmdask.perm) vs nilearn permuted_ols.

Study-like data: 41 subjects, two groups + age, sex, medication, 3 mm FWHM
smoothed maps on the MNI152 2 mm grey-matter template (> 0.4, ~151k voxels).
Each inference mode is timed for qsmdask and nilearn side by side in one run
(wall and CPU time per permutation; nilearn's per-permutation time is
(T(n) - T(0)) / n so its set-up is not counted). Writes section
"permutation" of docs/benchmarks.md.

Run: python bench/permutation.py [--quick]
"""

from __future__ import annotations

import argparse
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
    ap.add_argument("--no-write", action="store_true", help="print only, do not update docs/benchmarks.md")
    args = ap.parse_args(argv)
    machine = machine_description()
    y, mask, affine, group, age, sex, med = make_data()
    design = two_group_design(group, covariates={"age": age, "sex": sex, "medication": med})
    n_vox = y.shape[1]
    big = 2000 if args.quick else 20000
    n_cl, n_tf = (40, 6) if args.quick else (200, 20)
    nl_maxt, nl_cl, nl_tf = (20, 2, 1) if args.quick else (50, 5, 2)

    # 1) 20,000 max-T permutations, and peak memory of qsmdask alone (before nilearn runs)
    res, w_big, c_big = timed(lambda: permutation_test(y, design, mask=mask, n_perm=big, seed=1,
                                                       batch_size=32))
    rss_ours = peak_rss_mb()

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
        _, w_o, c_o = timed(ours_fn)
        _, w0, c0 = timed(lambda: nilearn_run(0, **nl_kw))
        _, w1, c1 = timed(lambda: nilearn_run(n_nl, **nl_kw))
        nl_w, nl_c = (w1 - w0) / n_nl, (c1 - c0) / n_nl
        rows.append({"inference": name, "qsmdask ms/perm": 1e3 * w_o / n_ours,
                     "nilearn ms/perm": 1e3 * nl_w, "speed-up (wall)": nl_w / (w_o / n_ours),
                     "speed-up (CPU)": nl_c / (c_o / n_ours), "target": target,
                     "perms (ours/nilearn)": f"{n_ours}/{n_nl}"})
        print(rows[-1], flush=True)

    compare("voxel max-T", lambda: permutation_test(y, design, mask=mask, n_perm=1000, seed=2), 1000,
            {}, nl_maxt, ">= 4x")
    compare("cluster extent+mass, p=0.005, >=10 vox",
            lambda: permutation_test(y, design, mask=mask, n_perm=n_cl, seed=3, inference=("voxel", "cluster"),
                                     cluster_p=0.005, min_cluster_voxels=10),
            n_cl, {"masker": masker, "threshold": 0.005}, nl_cl, ">= 10x")
    compare("TFCE (E=0.5, H=2, 100 steps)",
            lambda: permutation_test(y, design, mask=mask, n_perm=n_tf, seed=4, inference=("voxel", "tfce"),
                                     tfce_dh="auto"),
            n_tf, {"masker": masker, "tfce": True}, nl_tf, ">= 10x")
    load_end = __import__("os").getloadavg()[0]

    body = [
        "Voxel-wise permutation inference, `qsmdask.perm.permutation_test` vs "
        "`nilearn.mass_univariate.permuted_ols` (nilearn 0.14, n_jobs=1), measured side by side in one run.",
        "",
        f"- Machine: {machine}; load average at end {load_end:.1f} (machine shared with other engineers: "
        "compare the ratios, measured back to back, not absolute times).",
        f"- Command: `python bench/permutation.py{' --quick' if args.quick else ''}`",
        f"- Data: 41 subjects, two groups + age, sex, medication (5 regressors, dof 36), 3 mm FWHM smoothed maps, "
        f"MNI152 2 mm grey-matter template > 0.4: {n_vox} voxels; two-sided; Freedman-Lane (ours); "
        "nilearn per-permutation time = (T(n) - T(0)) / n.",
        "",
        markdown_table(rows, ["inference", "qsmdask ms/perm", "nilearn ms/perm", "speed-up (wall)",
                              "speed-up (CPU)", "target", "perms (ours/nilearn)"]),
        f"- {big} max-T permutations (incl. uncorrected permutation p per voxel): {w_big:.1f} s wall, "
        f"{c_big:.1f} s CPU (target < 60 s); max-T null 95th percentile {np.quantile(res.null['max_t'], 0.95):.2f}.",
        f"- Peak RSS of the process after the {big}-permutation run (data + qsmdask, before nilearn ran): "
        f"{rss_ours:.0f} MiB (target <= 1024 MiB).",
    ]
    text = "\n".join(body)
    print(text)
    if not args.no_write:
        update_section("permutation", text)


if __name__ == "__main__":
    main()

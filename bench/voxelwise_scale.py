"""Out-of-core voxel-wise inference at cohort scale (issue 18, section 2).

    python bench/voxelwise_scale.py [--subjects 1000] [--n-perm 1000] [--roi-subjects 35000]

1. builds a cohort stack (``qsmdask.perm.stack``) of SUBJECTS simulated template-space maps at
   2 mm in the MNI152 grey-matter mask (nilearn GM template > 0.4, ~151k voxels) with a
   2-worker Dask cluster: stacking throughput, then a rerun with nothing changed (plan only);
2. for 1 and 2 workers: the GLM with parametric t/z/p maps (``n_perm=0``) and N_PERM max-T
   permutations (``permutation_test_stack``): wall time, peak RSS per worker process;
3. group ROI statistics (``run_group_analysis``, default design) on a simulated ROI table of
   ROI_SUBJECTS subjects: seconds and peak RSS of this process.
Writes the "voxelwise_scale" section of docs/benchmarks.md.

The simulated maps are cheap on purpose, so that the stacking time measures the stack: each
subject's map is a mix of two smooth random fields (3 mm FWHM) drawn from a fixed pool of 16
(built once per worker process), with per-subject weights, plus white noise and a planted
patient effect (generation is part of the stacking time; reading and resampling a real
.nii.gz map costs more, see the text of the section).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one thread per Dask worker, as `qsmdask run`

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._report import machine_description, markdown_table, peak_rss_mb, update_section  # noqa: E402

def gm_mask():
    from nilearn import datasets
    img = datasets.load_mni152_gm_template(resolution=2)
    return img.get_fdata() > 0.4, img.affine


POOL_SIZE = 16
_POOL = {}


def build_field_pool(path, mask, seed: int = 12345):
    """Write ``POOL_SIZE`` smooth unit-variance random fields (3 mm FWHM at 2 mm) inside ``mask``
    and the patient-effect vector to ``path`` (.npz); the workers load it once (no nilearn, no
    filtering in the timed stacking)."""
    from scipy import ndimage
    rng = np.random.default_rng(seed)
    sigma = 3.0 / np.sqrt(8 * np.log(2)) / 2.0
    fields = np.empty((POOL_SIZE, int(mask.sum())), np.float32)
    for k in range(POOL_SIZE):
        f = ndimage.gaussian_filter(rng.standard_normal(mask.shape).astype(np.float32), sigma)[mask]
        fields[k] = f / f.std()
    effect = np.zeros(mask.shape, np.float32)
    effect[40:50, 50:60, 40:50] = 0.3
    np.savez(path, mask=mask, fields=fields, effect=effect[mask])


def _field_pool(path):
    if path not in _POOL:
        with np.load(path) as z:
            _POOL[path] = (z["mask"], z["fields"], z["effect"])
    return _POOL[path]


def simulated_map(source):
    """Loader of the benchmark stack: (map, None) of source (seed, pool path) (patients: odd
    seeds): w1 * field[a] + w2 * field[b] + 0.5 * white noise (+ 0.3 in a 10^3-voxel box)."""
    seed, path = source
    mask, fields, effect = _field_pool(path)
    rng = np.random.default_rng(int(seed))
    a, b = rng.choice(POOL_SIZE, 2, replace=False)
    w1, w2 = rng.normal(1.0, 0.3, 2).astype(np.float32)
    vec = rng.standard_normal(fields.shape[1], dtype=np.float32)
    vec *= np.float32(0.5)
    vec += w1 * fields[a]
    vec += w2 * fields[b]
    if int(seed) % 2:
        vec += effect
    m = np.zeros(mask.shape, np.float32)
    m[mask] = vec
    return m, None


class WorkerRSS(threading.Thread):
    """Peak RSS of the Dask worker processes (sampled every 0.2 s)."""

    def __init__(self, pids):
        super().__init__(daemon=True)
        import psutil
        self.procs = [psutil.Process(p) for p in pids]
        self.peak = 0
        self.halt = False

    def run(self):
        while not self.halt:
            for p in self.procs:
                try:
                    self.peak = max(self.peak, p.memory_info().rss)
                except Exception:  # noqa: BLE001 - worker gone
                    pass
            time.sleep(0.2)

    def stop(self):
        self.halt = True
        self.join(timeout=5)
        return self.peak / 2**20


def _warm_up():
    import qsmdask.perm.distributed  # noqa: F401
    import qsmdask.perm.stack  # noqa: F401
    import zarr  # noqa: F401


def with_cluster(n_workers, fn):
    from distributed import Client, LocalCluster
    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None,
                      memory_limit="4GiB") as lc, Client(lc) as client:
        pids = list(client.run(os.getpid).values())
        client.run(_warm_up)  # imports outside the timed part
        sampler = WorkerRSS(pids)
        sampler.start()
        t0 = time.perf_counter()
        out = fn(client)
        wall = time.perf_counter() - t0
        return out, wall, sampler.stop()


def roi_bench(n_subjects, tests=None):
    from qsmdask.stats import run_group_analysis
    from qsmdask.stats.design import GroupDesign
    from qsmdask.stats.simulate import simulate_roi_cohort
    import resource
    rois = {"caudate": 0.06, "putamen": 0.05, "globus_pallidus": 0.15, "thalamus": 0.01,
            "hippocampus": 0.0, "amygdala": 0.0, "substantia_nigra": 0.12, "red_nucleus": 0.1}
    t0 = time.perf_counter()
    roi, participants, sessions = simulate_roi_cohort(n_patients=n_subjects // 2,
                                                       n_controls=n_subjects - n_subjects // 2,
                                                       rois=rois, n_sites=3, group_effect_ppm=0.005,
                                                       seed=0)
    t_sim = time.perf_counter() - t0
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    design = GroupDesign(tests=tuple(tests)) if tests else GroupDesign()
    tables = run_group_analysis(roi, participants, sessions, design=design)
    t_run = time.perf_counter() - t0
    ran = sorted(k for k in tables if k != "skipped")
    return {"rows": len(roi), "simulate_s": t_sim, "analysis_s": t_run, "tests": ", ".join(ran),
            "peak_rss_mib": peak_rss_mb(), "rss_before_mib": rss0}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", type=int, default=1000)
    ap.add_argument("--n-perm", type=int, default=1000)
    ap.add_argument("--voxel-block", type=int, default=8192)
    ap.add_argument("--subject-block", type=int, default=128)
    ap.add_argument("--roi-subjects", type=int, default=35000)
    ap.add_argument("--roi-tests", default="", help="comma-separated GroupDesign tests (default: all)")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--scheme", default="huh_jhun", choices=("huh_jhun", "freedman_lane"))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    machine = machine_description()
    from qsmdask.perm import two_group_design
    from qsmdask.perm.distributed import permutation_test_stack
    from qsmdask.perm.stack import create_cohort_stack, update_cohort_stack

    work = Path(args.workdir or tempfile.mkdtemp(prefix="qsmdask-bench-vw-"))
    store = str(work / "stack.zarr")
    shutil.rmtree(store, ignore_errors=True)
    mask, affine = gm_mask()
    n, n_vox = args.subjects, int(mask.sum())
    create_cohort_stack(store, mask, affine=affine, subject_block=args.subject_block,
                        voxel_block=args.voxel_block)
    pool = str(work / "field_pool.npz")
    build_field_pool(pool, mask)
    entries = {f"sub-{i:06d}": (f"seed{i}", (i, pool)) for i in range(n)}
    rows = []
    res, wall, rss = with_cluster(2, lambda c: update_cohort_stack(store, entries, simulated_map, client=c))
    assert res["rows"] == n and not res["failed"], res
    size_gb = sum(f.stat().st_size for f in Path(store).rglob("*") if f.is_file()) / 1e9
    rows.append({"step": "stack (2 workers)", "workers": 2, "wall s": wall, "per subject ms": 1e3 * wall / n,
                 "peak RSS per worker MiB": rss, "load": os.getloadavg()[0]})
    print(rows[-1], f"{size_gb:.2f} GB", flush=True)
    t0 = time.perf_counter()
    again = update_cohort_stack(store, entries, simulated_map)
    rows.append({"step": "stack rerun, nothing changed", "workers": 0, "wall s": time.perf_counter() - t0,
                 "per subject ms": 1e3 * (time.perf_counter() - t0) / n, "peak RSS per worker MiB": float("nan"),
                 "load": os.getloadavg()[0]})
    assert again["rows"] == 0
    rng = np.random.default_rng(1)
    keys = sorted(entries)
    group = np.array([i % 2 for i in range(n)], float)
    design = two_group_design(group, covariates={"age": rng.normal(60, 8, n), "sex": rng.integers(0, 2, n)})
    results = {}
    for k in [int(w) for w in args.workers.split(",")]:
        for label, n_perm in (("GLM t/z/p maps", 0), (f"{args.n_perm} max-T permutations", args.n_perm)):
            load0 = os.getloadavg()[0]
            r, wall, rss = with_cluster(k, lambda c: permutation_test_stack(
                store, design, keys=keys, client=c, n_perm=n_perm, seed=3, scheme=args.scheme))
            results[(label, k)] = r
            rows.append({"step": label, "workers": k, "wall s": wall,
                         "per subject ms": float("nan"), "peak RSS per worker MiB": rss,
                         "load": f"{load0:.1f}-{os.getloadavg()[0]:.1f}"})
            print(rows[-1], flush=True)
    perm_label = f"{args.n_perm} max-T permutations"
    ws = sorted({int(w) for w in args.workers.split(",")})
    if len(ws) == 2:
        a, b = results[(perm_label, ws[0])], results[(perm_label, ws[1])]
        assert np.array_equal(a.null["max_t"], b.null["max_t"])
    scaling = {}
    if len(ws) == 2:
        walls = {(r["step"], r["workers"]): r["wall s"] for r in rows}
        scaling = {lab: walls[(lab, ws[0])] / walls[(lab, ws[1])] / (ws[1] / ws[0])
                   for lab in ("GLM t/z/p maps", perm_label)}
    roi_load = os.getloadavg()[0]
    roi = roi_bench(args.roi_subjects, [t for t in args.roi_tests.split(",") if t]) if args.roi_subjects else None
    shutil.rmtree(work, ignore_errors=True)
    cmd = "python bench/voxelwise_scale.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = [
        "## Voxel-wise inference out of core (`bench/voxelwise_scale.py`, issue 18)", "",
        f"Machine: {machine}. Shared with other agents' jobs (2 cores for 8 agents): wall times are upper bounds.",
        f"Command: `{cmd.strip()}`.", "",
        f"{n} simulated subjects, 2 mm MNI152 grey-matter mask (GM template > 0.4): {n_vox} voxels. "
        f"Stack: {n} x {n_vox} float32 + bool, chunks {args.subject_block} subjects x {args.voxel_block} voxels, "
        f"{size_gb:.2f} GB on disk (zarr default zstd). Design: group + age + sex; permutation scheme "
        f"`{args.scheme}`; Dask LocalCluster, one thread per worker; peak RSS sampled every 0.2 s over the "
        "worker processes; load = 1-minute load average (start-end of the step; 2 cores).", "",
        markdown_table(rows, ["step", "workers", "wall s", "per subject ms", "peak RSS per worker MiB", "load"]),
    ]
    if scaling:
        text.append("Scaling efficiency 1 -> 2 workers: " + ", ".join(f"{k} {v:.2f}" for k, v in scaling.items())
                    + ". The 1- and 2-worker null distributions are identical (asserted).")
    if roi:
        text += ["", f"Group ROI statistics, {args.roi_subjects} simulated subjects (8 ROIs x L/R, 3 sites; "
                 f"{roi['rows']} ROI rows): `run_group_analysis` ran {roi['tests']} in "
                 f"{roi['analysis_s']:.1f} s (load {roi_load:.1f} at start); peak RSS of the process {roi['peak_rss_mib']:.0f} MiB "
                 f"({roi['rss_before_mib']:.0f} MiB before the analysis, table simulated in {roi['simulate_s']:.1f} s)."]
    body = "\n".join(text)
    print(body)
    if not args.no_write:
        update_section("voxelwise_scale", body)


if __name__ == "__main__":
    main()

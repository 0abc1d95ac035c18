"""Cohort orchestration benchmark (issue 7): throughput, overhead, scaling, resume.

    python bench/cohort.py [--subjects 100] [--voxel-mm 4] [--direct 3]

1. simulates SUBJECTS x 2 sessions (reduced resolution);
2. times the library directly (process_subject_session, serial) on a few subject-sessions;
3. runs the participant flow (Prefect on a LocalCluster) with 1 worker and with 2 workers on
   fresh output folders: wall time, subjects/minute, orchestration overhead per subject
   (flow wall time x workers / n - library time per subject), scaling efficiency, peak RSS
   per worker process;
4. reruns the 2-worker folder (must do no reconstruction work), adds 5 subjects and reruns
   (must process exactly those 5);
and writes the "cohort" section of docs/benchmarks.md.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import machine_description, markdown_table, update_section  # noqa: E402


class RSSSampler(threading.Thread):
    """Peak resident memory of each child process (the Dask workers) of this process."""

    def __init__(self, interval_s=0.5):
        super().__init__(daemon=True)
        import psutil
        self.proc, self.interval, self.peak, self._halt = psutil.Process(), interval_s, {}, False

    def run(self):
        import psutil
        while not self._halt:
            for c in self.proc.children(recursive=True):
                try:
                    if "prefect" in " ".join(c.cmdline()):
                        continue  # the Prefect server is not a worker
                    self.peak[c.pid] = max(self.peak.get(c.pid, 0), c.memory_info().rss)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            time.sleep(self.interval)

    def stop(self):
        self._halt = True
        self.join(timeout=5)
        return max(self.peak.values(), default=0) / 2**20


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", type=int, default=100, help="subjects (x 2 sessions)")
    ap.add_argument("--voxel-mm", type=float, default=4.0)
    ap.add_argument("--direct", type=int, default=3, help="subject-sessions timed by direct library calls")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    args = ap.parse_args(argv)

    machine = machine_description()
    # the thread settings of `qsmdask run` (qsmdask.cli): one thread per task, for the direct
    # library calls and the Dask workers alike, so both sides do the same work per subject
    for var in ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    from qsmdask.orchestration.server import ensure_prefect_api
    work = Path(args.workdir or tempfile.mkdtemp(prefix="qsmdask-bench-cohort-"))
    api = ensure_prefect_api(home=work / "prefect")
    os.environ["QSMDASK_CLUSTER"] = "local"

    from qsmdask.config import PipelineConfig
    from qsmdask.io.bids import find_subject_sessions
    from qsmdask.sim import simulate_cohort
    from qsmdask.workflows.participant import process_subject_session

    bids = work / "bids"
    vs = (args.voxel_mm,) * 3
    t0 = time.perf_counter()
    if not (bids / "dataset_description.json").exists():
        simulate_cohort(bids, n_subjects=args.subjects, seed=11, n_sessions=2, voxel_size_mm=vs, t1w=False)
    t_sim = time.perf_counter() - t0
    sss = find_subject_sessions(bids)
    n = len(sss)
    print(f"{n} subject-sessions simulated in {t_sim:.0f} s at {args.voxel_mm} mm", flush=True)

    cfg = PipelineConfig()
    # one untimed call first: imports, template and atlas loading happen once per process
    # (a Dask worker pays them once too, for its first subject only)
    process_subject_session(sss[-1], work / "direct", cfg)
    lib = []
    for ss in sss[: args.direct]:
        t = time.perf_counter()
        process_subject_session(ss, work / "direct", cfg)
        lib.append(time.perf_counter() - t)
    lib_s = sum(lib) / len(lib)
    print(f"library, direct: {lib_s:.2f} s per subject-session", flush=True)

    from flows.participant import participant_flow
    from qsmdask.orchestration.cluster import ClusterConfig, make_task_runner

    def run_flow(out, workers):
        flow = participant_flow.with_options(task_runner=make_task_runner(ClusterConfig(n_workers=workers)))
        sampler = RSSSampler()
        sampler.start()
        t = time.perf_counter()
        res = flow(str(bids), str(out))
        wall = time.perf_counter() - t
        return res, wall, sampler.stop()

    rows, walls = [], {}
    for workers in (1, 2):
        out = work / f"out{workers}"
        shutil.rmtree(out, ignore_errors=True)
        res, wall, peak = run_flow(out, workers)
        walls[workers] = wall
        done = len(res["done"])
        rows.append({"run": f"participant flow, {workers} worker(s)", "processed": done,
                     "skipped": len(res["skipped"]), "failed": len(res["failed"]), "wall s": wall, "subjects/min": 60 * done / wall,
                     "overhead s/subject": wall * workers / max(done, 1) - lib_s,
                     "peak RSS per worker MiB": peak})
        print(rows[-1], flush=True)
    eff = walls[1] / (2 * walls[2])

    res, wall, _ = run_flow(work / "out2", 2)
    rows.append({"run": "rerun, nothing changed", "processed": len(res["done"]),
                 "skipped": len(res["skipped"]), "failed": len(res["failed"]), "wall s": wall, "subjects/min": float("nan"),
                 "overhead s/subject": float("nan"), "peak RSS per worker MiB": float("nan")})
    extra = work / "extra"
    simulate_cohort(extra, n_subjects=5, seed=99, n_sessions=1, voxel_size_mm=vs, t1w=False)
    for k, sub in enumerate(sorted(extra.glob("sub-*"))):
        new = f"sub-new{k + 1}"
        shutil.copytree(sub, bids / new)
        for f in sorted((bids / new).rglob("*")):
            if f.is_file() and f.name.startswith(sub.name):
                f.rename(f.with_name(f.name.replace(sub.name, new, 1)))
    with open(bids / "participants.tsv", "a") as fh:
        import pandas as pd
        p = pd.read_csv(extra / "participants.tsv", sep="\t")
        for k, (_, r) in enumerate(p.iterrows()):
            fh.write("\t".join([f"sub-new{k + 1}"] + [str(r[c]) for c in p.columns[1:]]) + "\n")
    res, wall, _ = run_flow(work / "out2", 2)
    rows.append({"run": "5 subjects added", "processed": len(res["done"]),
                 "skipped": len(res["skipped"]), "failed": len(res["failed"]),
                 "wall s": wall, "subjects/min": float("nan"), "overhead s/subject": float("nan"),
                 "peak RSS per worker MiB": float("nan")})
    api.stop()

    cmd = "python bench/cohort.py " + " ".join(argv if argv is not None else sys.argv[1:])
    table = markdown_table(rows)
    body = (f"## Cohort orchestration (`bench/cohort.py`, issue 7)\n\n"
            f"Machine: {machine}.\nCommand: `{cmd.strip()}`.\n\n"
            f"{n} subject-sessions ({args.subjects} subjects x 2 sessions) simulated at {args.voxel_mm} mm "
            f"in {t_sim:.0f} s. Library called directly: {lib_s:.2f} s per subject-session "
            f"(mean of {len(lib)} after one untimed warm-up call, one thread as in `qsmdask run`). Scaling efficiency 1 -> 2 workers: {eff:.2f}.\n\n"
            "Overhead per subject = flow wall time x workers / subject-sessions - the direct library time "
            "(cluster start-up included); a negative value means the orchestration cost is below the "
            "spread of the library time itself (registration time varies by seconds between "
            f"subjects).\n\n{table}")
    print("\n" + table)
    print(f"scaling efficiency {eff:.2f}")
    if not args.no_write:
        update_section("cohort", body)


if __name__ == "__main__":
    main()

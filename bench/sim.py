"""Speed of the cohort simulator: ``python bench/sim.py [--update-docs]``.

Runs, side by side in one process tree:

1. a 12-subject x 2-session cohort at 2 mm, serially and on a 2-process pool;
2. single subject-sessions on a 1 mm and a 1x1x2 mm (256x256x80) grid.

Prints a markdown table; ``--update-docs`` writes it into the ``sim`` section of
``docs/benchmarks.md`` through ``bench/_report.py`` (when the repository checkout has it).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from qsmdask.sim import phantom, simulate_cohort


def _report_module():
    path = Path(__file__).resolve().parent / "_report.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("_qsmdask_bench_report", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _peak_rss_mb(children: bool = False) -> float:
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 1024.0


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _du_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def _warm(_):
    phantom.load_head_model(2)
    return os.getpid()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n-subjects", type=int, default=12)
    ap.add_argument("--update-docs", action="store_true")
    ap.add_argument("--skip-fine", action="store_true", help="skip the 1 mm / 1x1x2 mm runs")
    args = ap.parse_args(argv)
    rep = _report_module()
    machine = rep.machine_description() if rep else f"{os.cpu_count()} cores"
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="qsmdask-sim-bench-"))
    try:
        t, c = time.perf_counter(), time.process_time()
        phantom.load_head_model(2)
        rows.append({"run": "head model build (2 mm, once per process)", "sessions": 0,
                     "wall_s": time.perf_counter() - t, "cpu_s": time.process_time() - c,
                     "cpu_s_per_session": float("nan"), "output_MiB": 0.0})
        n = args.n_subjects
        t, c = time.perf_counter(), time.process_time()
        info = simulate_cohort(tmp / "serial", n_subjects=n, seed=1, n_sessions=2)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        rows.append({"run": f"{n} subj x 2 ses, 2 mm (112x112x80), serial", "sessions": 2 * n,
                     "wall_s": wall, "cpu_s": cpu, "cpu_s_per_session": cpu / (2 * n),
                     "output_MiB": _du_mb(tmp / "serial")})
        c0 = _children_cpu()
        with ProcessPoolExecutor(2) as ex:
            list(ex.map(_warm, range(2)))
            t = time.perf_counter()
            simulate_cohort(tmp / "pool", n_subjects=n, seed=1, n_sessions=2, executor=ex)
            wall_p = time.perf_counter() - t
        cpu_p = _children_cpu() - c0  # includes the two workers' head-model builds
        rows.append({"run": f"{n} subj x 2 ses, 2 mm, 2-process pool", "sessions": 2 * n,
                     "wall_s": wall_p, "cpu_s": cpu_p, "cpu_s_per_session": cpu_p / (2 * n),
                     "output_MiB": _du_mb(tmp / "pool")})
        same = all((tmp / "serial" / p.relative_to(tmp / "pool")).read_bytes() == p.read_bytes()
                   for p in (tmp / "pool").rglob("*.nii.gz"))
        shutil.rmtree(tmp / "pool", ignore_errors=True)
        if not args.skip_fine:
            for label, vs, fov in (("1 mm (224x224x160)", (1.0, 1.0, 1.0), (224.0, 224.0, 160.0)),
                                   ("1x1x2 mm (256x256x80)", (1.0, 1.0, 2.0),
                                    (256.0, 256.0, 160.0))):
                t, c = time.perf_counter(), time.process_time()
                simulate_cohort(tmp / label[:3], n_subjects=1, seed=1, n_sessions=1,
                                voxel_size_mm=vs, fov_mm=fov)
                wall, cpu = time.perf_counter() - t, time.process_time() - c
                rows.append({"run": f"1 session, {label}, incl. 1 mm model build",
                             "sessions": 1, "wall_s": wall, "cpu_s": cpu,
                             "cpu_s_per_session": cpu, "output_MiB": _du_mb(tmp / label[:3])})
        peak = max(_peak_rss_mb(), _peak_rss_mb(children=True))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cols = ["run", "sessions", "wall_s", "cpu_s", "cpu_s_per_session", "output_MiB"]
    if rep:
        table = rep.markdown_table(rows, cols)
    else:
        table = "\n".join(str(r) for r in rows) + "\n"
    body = (f"## Cohort simulator (`qsmdask.sim`)\n\n"
            f"Command: `python bench/sim.py --update-docs`. Machine: {machine}.\n\n"
            f"{table}\n"
            f"Serial vs 2-process pool, measured side by side: speed-up "
            f"{rows[1]['wall_s'] / rows[2]['wall_s']:.2f}x; pool output byte-identical to serial: "
            f"{same}. Wall times depend on the machine's load (2 shared cores; see the load "
            f"average above); CPU seconds are the load-independent cost. Peak RSS (max of parent, children) {peak:.0f} MiB. Per session: 3-echo "
            f"magnitude + phase (int16), T1w, truth chi/mask/dseg/pose/total and local field. "
            f"Participants of the demo cohort: {len(info.participants)}.\n")
    print(body)
    if args.update_docs and rep:
        rep.update_section("sim", body)
    return 0 if np.isfinite(rows[1]["wall_s"]) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

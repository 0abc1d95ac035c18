"""Peak memory of each participant stage: ``python bench/memory.py [--voxel-size 2 3]``.

Simulates one subject-session per voxel size (T1w included), then runs the four stages
(ingest, reconstruct, standardise, write) in a fresh process, sampling the resident set
size every 5 ms. For each stage it prints the peak RSS above the RSS at the stage's start
and the peak of Python-tracked allocations (``tracemalloc``: numpy arrays, not ANTs'
C++ buffers), both per voxel x echo of the GRE grid. These numbers are where
``qsmdask.workflows.participant.estimate_task_memory_bytes`` comes from.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path


def _stages(bids: str, out: str, template_mm: int, queue) -> None:
    import faulthandler
    import psutil

    faulthandler.enable()
    from qsmdask.config import PipelineConfig
    from qsmdask.io.bids import find_subject_sessions
    from qsmdask.workflows import participant as wf
    import qsmdask.chain, qsmdask.registration, qsmdask.atlas, qsmdask.roi, qsmdask.report.qc  # noqa: F401,E401

    proc = psutil.Process()
    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)

    threading.Thread(target=sample, daemon=True).start()
    cfg = PipelineConfig(template_resolution_mm=template_mm)
    ss = find_subject_sessions(bids)[0]
    key = wf.resume_key(ss, cfg)
    tracemalloc.start()
    rows = []
    meta = None

    def run(name, fn):
        nonlocal meta
        time.sleep(0.05)
        start = proc.memory_info().rss
        peak[0] = start
        tracemalloc.reset_peak()
        t0 = time.perf_counter()
        meta = fn()
        seconds = time.perf_counter() - t0
        time.sleep(0.05)
        rows.append((name, peak[0] - start, tracemalloc.get_traced_memory()[1], seconds))

    run("ingest", lambda: wf.ingest(ss, wf.work_paths(ss, out)))
    shape = meta["shape"]
    run("reconstruct", lambda: wf.reconstruct(meta, cfg))
    run("standardise", lambda: wf.standardise_and_measure(meta, cfg))
    run("write", lambda: wf.write_outputs(ss, meta, out, cfg, resume=key))
    stop.set()
    queue.put((shape, rows))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--voxel-size", type=float, nargs="+", default=[2.0, 3.0],
                    help="isotropic GRE voxel sizes in mm, one subject-session each")
    ap.add_argument("--template-mm", type=int, choices=[1, 2], default=2,
                    help="template resolution of the standardise stage")
    args = ap.parse_args(argv)
    from qsmdask.sim import simulate_cohort
    from qsmdask.workflows.participant import estimate_task_memory_bytes

    ctx = mp.get_context("spawn")
    print(f"template {args.template_mm} mm\n")
    print("| voxel mm | shape | stage | peak RSS rise MiB | tracemalloc peak MiB | RSS B/(voxel x echo) "
          "| estimate MiB | s |")
    print("|---|---|---|---|---|---|---|---|")
    for vs in args.voxel_size:
        with tempfile.TemporaryDirectory() as tmp:
            bids, out = Path(tmp) / "bids", Path(tmp) / "out"
            simulate_cohort(bids, n_subjects=1, seed=3, n_sessions=1, voxel_size_mm=(vs, vs, vs))
            q = ctx.Queue()
            p = ctx.Process(target=_stages, args=(str(bids), str(out), args.template_mm, q))
            p.start()
            p.join()
            if p.exitcode != 0:
                raise RuntimeError(f"stage process for {vs} mm exited with {p.exitcode}")
            shape, rows = q.get()
            n = shape[0] * shape[1] * shape[2] * shape[3]
            est = estimate_task_memory_bytes(shape, template_resolution_mm=args.template_mm) / 2**20
            for name, rss, traced, seconds in rows:
                print(f"| {vs:g} | {'x'.join(map(str, shape))} | {name} | {rss / 2**20:.0f} | "
                      f"{traced / 2**20:.0f} | {rss / n:.0f} | {est:.0f} | {seconds:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

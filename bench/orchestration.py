"""Orchestration at cohort scale (issue 18, section 1): the real participant flow, synthetic compute.

    python bench/orchestration.py --counts 1000,5000,10000 [--stage-s 0.2] [--workers 2 --threads 8]

For each count N: a BIDS tree of N subject-sessions (N/2 subjects x 2 sessions; tiny 8^3 NIfTI
files, hard links of one template), a PostgreSQL 15 server (run as an unprivileged user) with
a Prefect server on it, and a Dask LocalCluster (its scheduler runs in the flow process) whose workers run **labelled synthetic
stages**: ``ingest``, ``reconstruct``, ``standardise`` and ``write`` of
``qsmdask.workflows.participant`` are replaced in the worker processes by functions that sleep
a fixed duration (STAGE_S each) and return ``"synthetic": True``; ``write`` writes a real ROI
Parquet table and the real manifest, so resume is the real resume. Everything else is the real
``flows.participant.participant_flow`` (planning, memory check, Prefect tasks, futures,
artifacts, failures table).

Measured: wall time, overhead per subject-session (wall x slots / N - 4 x STAGE_S), peak RSS of
the flow process (and its growth over the run), Prefect API latency while the flow runs (p95
of reading the flow run and of reading its task runs, polled every second from another
thread), PostgreSQL database size, plan time (``plan_participants``) and resume time (rerun,
nothing changed). Writes the "orchestration" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._report import machine_description, markdown_table, update_section  # noqa: E402

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Postgres:
    """A throw-away PostgreSQL 15 cluster run as ``nobody`` (initdb refuses root)."""

    def __init__(self, root: Path, user: str = "nobody"):
        self.root, self.user, self.port = root, user, free_port()
        self.data = root / "pgdata"

    def _run(self, *cmd, check=True):
        pre = ["runuser", "-u", self.user, "--"] if os.geteuid() == 0 else []
        return subprocess.run(pre + [str(c) for c in cmd], check=check, capture_output=True, text=True)

    def start(self, db="prefect"):
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.root, self.user)
        self._run(PG_BIN / "initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self._run(PG_BIN / "pg_ctl", "-D", self.data, "-l", self.root / "pg.log", "-w", "start", "-o",
                  f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=200")
        self._run(PG_BIN / "createdb", "-h", "127.0.0.1", "-p", self.port, "-U", "postgres", db)
        self.db = db
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{db}"

    def size_mb(self) -> float:
        out = self._run("psql", "-h", "127.0.0.1", "-p", self.port, "-U", "postgres", "-At", "-c",
                        f"select pg_database_size('{self.db}')")
        return int(out.stdout.strip()) / 2**20

    def counts(self) -> dict:
        out = self._run("psql", "-h", "127.0.0.1", "-p", self.port, "-U", "postgres", "-d", self.db, "-At", "-c",
                        "select (select count(*) from task_run), (select count(*) from log), "
                        "(select count(*) from artifact)", check=False)
        try:
            t, lg, a = out.stdout.strip().split("|")
            return {"task_runs": int(t), "logs": int(lg), "artifacts": int(a)}
        except ValueError:
            return {}

    def pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self):
        self._run(PG_BIN / "pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop", check=False)


def make_bids(root: Path, n_sessions: int):
    """n_sessions subject-sessions (2 sessions per subject), hard links of one tiny template."""
    import nibabel as nib
    import numpy as np
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "orchestration bench",
                                                               "BIDSVersion": "1.9.0"}))
    tpl = root / ".template"
    tpl.mkdir(exist_ok=True)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    rng = np.random.default_rng(0)
    nib.save(nib.Nifti1Image(rng.random((8, 8, 8)).astype(np.float32), aff), tpl / "mag.nii.gz")
    nib.save(nib.Nifti1Image((rng.random((8, 8, 8)) * 6 - 3).astype(np.float32), aff), tpl / "phase.nii.gz")
    (tpl / "side.json").write_text(json.dumps({"EchoTime": 0.01, "MagneticFieldStrength": 3.0}))
    old = time.time_ns() - 3600 * 10**9  # an existing dataset (just-written files are not cached)
    for f in tpl.iterdir():
        os.utime(f, ns=(old, old))
    n_sub = (n_sessions + 1) // 2
    lines = ["participant_id\tgroup\tage\tsex"]
    made = 0
    for i in range(n_sub):
        sub = f"sub-{i:05d}"
        lines.append(f"{sub}\t{'patient' if i % 2 else 'control'}\t{40 + i % 30}\t{'MF'[i % 2]}")
        for ses in ("1", "2"):
            if made == n_sessions:
                break
            d = root / sub / f"ses-{ses}" / "anat"
            d.mkdir(parents=True, exist_ok=True)
            stem = f"{sub}_ses-{ses}_echo-1_part-"
            for part, src in (("mag", "mag.nii.gz"), ("phase", "phase.nii.gz")):
                os.link(tpl / src, d / f"{stem}{part}_MEGRE.nii.gz")
                os.link(tpl / "side.json", d / f"{stem}{part}_MEGRE.json")
            made += 1
    (root / "participants.tsv").write_text("\n".join(lines) + "\n")


# ---- the labelled synthetic stages (installed in every Dask worker) --------------------------

def _synthetic_stages(stage_s: float):
    """Replace the four compute stages in this process by fixed-duration synthetic ones."""
    import pandas as pd
    from qsmdask.io.derivatives import DerivativesWriter
    from qsmdask.workflows import participant as wf

    def ingest(ss, paths):
        time.sleep(stage_s)
        return {"key": ss.key, "synthetic": True, "shape": [8, 8, 8, 1]}

    def reconstruct(meta, config):
        time.sleep(stage_s)
        return {**meta, "stage": "reconstruct"}

    def standardise_and_measure(meta, config):
        time.sleep(stage_s)
        return {**meta, "stage": "standardise"}

    def write_outputs(ss, meta, output_dir, config, *, resume=None, keep_work=False, tables_url=None,
                      run_token=None):
        time.sleep(stage_s)
        writer = DerivativesWriter(output_dir, tables_url=tables_url)
        roi = pd.DataFrame({"participant_id": [ss.participant_id], "session_id": [ss.session_id],
                            "measure": ["chi"], "atlas": ["synthetic"], "roi": ["putamen"], "hemisphere": ["L"],
                            "level": ["group"], "label": [-1], "name": ["putamen"], "n_voxels": [1],
                            "mean_ppm": [0.05], "median_ppm": [0.05], "std_ppm": [0.0], "iqr_ppm": [0.0]})
        files = [writer.save_roi_table(ss.subject, ss.session, roi)]
        manifest = writer.write_manifest(ss.subject, ss.session, files, config=config.to_dict(),
                                         status={"status": "done", "resume_key": resume or "", "synthetic": True,
                                                 "run_token": run_token})
        return {"participant_id": ss.participant_id, "session_id": ss.session_id,
                "manifest": str(manifest), "n_files": 1, "qc": {}, "synthetic": True}

    wf.ingest, wf.reconstruct = ingest, reconstruct
    wf.standardise_and_measure, wf.write_outputs = standardise_and_measure, write_outputs


class RSS(threading.Thread):
    def __init__(self, interval_s=0.5):
        super().__init__(daemon=True)
        import psutil
        self.proc, self.interval, self.samples, self.halt = psutil.Process(), interval_s, [], False

    def run(self):
        t0 = time.perf_counter()
        while not self.halt:
            self.samples.append((time.perf_counter() - t0, self.proc.memory_info().rss / 2**20))
            time.sleep(self.interval)

    def stop(self):
        self.halt = True
        self.join(timeout=5)
        return self.samples


class APIPoller(threading.Thread):
    """Latency of reading the running flow run and its task runs (every ``interval_s``)."""

    def __init__(self, api_url, interval_s=1.0):
        super().__init__(daemon=True)
        self.url, self.interval, self.flow_s, self.tasks_s, self.halt, self.errors = api_url, interval_s, [], [], False, 0

    def run(self):
        import httpx
        with httpx.Client(base_url=self.url, timeout=30) as c:
            fid = None
            while not self.halt:
                try:
                    if fid is None:
                        r = c.post("/flow_runs/filter", json={"flow_runs": {"state": {"type": {"any_": ["RUNNING"]}}},
                                                              "limit": 1})
                        runs = r.json()
                        fid = runs[0]["id"] if runs else None
                    if fid is not None:
                        t = time.perf_counter()
                        c.get(f"/flow_runs/{fid}").raise_for_status()
                        self.flow_s.append(time.perf_counter() - t)
                        t = time.perf_counter()
                        c.post("/task_runs/filter", json={"flow_runs": {"id": {"any_": [fid]}},
                                                          "sort": "EXPECTED_START_TIME_DESC", "limit": 200}
                               ).raise_for_status()
                        self.tasks_s.append(time.perf_counter() - t)
                except Exception:  # noqa: BLE001 - counted, the poller keeps going
                    self.errors += 1
                time.sleep(self.interval)

    def stop(self):
        self.halt = True
        self.join(timeout=60)


def _kind(p) -> str:
    """Which part of the run a process is: flow, dask worker, prefect server, postgres."""
    import psutil
    try:
        cmd = " ".join(p.cmdline())
    except psutil.Error:
        return "other"
    if p.pid == os.getpid():
        return "flow"
    if "postgres" in cmd or "postgres" in p.name() or p.name() == "postmaster":
        return "postgres"
    if "prefect" in cmd and "server" in cmd:
        return "prefect server"
    if "dask_scheduler" in cmd:
        return "dask scheduler"
    if "multiprocessing" in cmd or "spawn_main" in cmd or "dask_worker" in cmd:
        return "dask workers"
    return "other"


def tree_cpu_s(extra_roots=()) -> dict:
    """CPU seconds (user + system) of this process and of each live descendant, by pid, and
    of the ``extra_roots`` pids and theirs (PostgreSQL: pg_ctl daemonises it)."""
    import psutil
    me = psutil.Process()
    procs = [me] + me.children(recursive=True)
    for pid in extra_roots:
        try:
            root = psutil.Process(pid)
            procs += [root] + root.children(recursive=True)
        except psutil.Error:
            pass
    out = {}
    for p in procs:
        try:
            t = p.cpu_times()
            out[p.pid] = (t.user + t.system, _kind(p))
        except psutil.Error:
            pass
    return out


def cpu_used(before: dict, after: dict, kind: str | None = None) -> float:
    return sum(after[k][0] - before.get(k, (0.0, ""))[0] for k in after if kind is None or after[k][1] == kind)


class Snapshots(threading.Thread):
    """Every ``interval_s``: elapsed, completed task runs, flow RSS, DB size, API p95 so far, load
    (printed as one line each, so a run stopped before its end still shows its trajectory)."""

    def __init__(self, pg, rss, poller, interval_s=60.0):
        super().__init__(daemon=True)
        self.pg, self.rss, self.poller, self.interval, self.halt = pg, rss, poller, interval_s, threading.Event()

    def run(self):
        t0 = time.perf_counter()
        while not self.halt.wait(self.interval):
            try:
                out = self.pg._run("psql", "-h", "127.0.0.1", "-p", self.pg.port, "-U", "postgres", "-d",
                                   self.pg.db, "-At", "-c", "select count(*) from task_run where state_type = "
                                   "'COMPLETED'", check=False)
                snap = {"snapshot s": round(time.perf_counter() - t0), "completed": out.stdout.strip(),
                        "flow RSS MiB": round(self.rss.samples[-1][1]) if self.rss.samples else None,
                        "DB MiB": round(self.pg.size_mb(), 1),
                        "API p95 task runs s": round(p95(self.poller.tasks_s[-60:]), 3),
                        "load": os.getloadavg()[0]}
                print(snap, file=sys.stderr, flush=True)
            except Exception as e:  # noqa: BLE001 - a snapshot never stops the run
                print({"snapshot error": str(e)}, file=sys.stderr, flush=True)

    def stop(self):
        self.halt.set()


def p95(xs):
    import numpy as np
    return float(np.percentile(xs, 95)) if xs else float("nan")


def run_count(n: int, args, work: Path, pg=None, per_task="auto") -> dict:
    from distributed import Client, LocalCluster
    bids, out = work / "bids", work / "out"
    t0 = time.perf_counter()
    make_bids(bids, n)
    t_bids = time.perf_counter() - t0
    from flows.participant import participant_flow
    from qsmdask.config import PipelineConfig
    from qsmdask.workflows.cohort import plan_participants
    t0 = time.perf_counter()
    plan = plan_participants(bids, out, PipelineConfig())
    t_plan = time.perf_counter() - t0
    assert len(plan.todo) == n, (len(plan.todo), len(plan.invalid), plan.invalid[:2])
    from qsmdask.orchestration.batching import subject_sessions_per_task
    size = subject_sessions_per_task(n, per_task, threads=args.workers * args.threads)
    row = {"subject-sessions": n, "per task": f"{size} ({per_task})", "bids s": t_bids, "plan s": t_plan,
           "load start": os.getloadavg()[0]}
    mem = int(args.worker_memory_gb * 2**30)
    with LocalCluster(n_workers=args.workers, threads_per_worker=args.threads, processes=True,
                      dashboard_address="127.0.0.1:0", memory_limit=mem, resources={"MEMORY": mem}) as lc, \
            Client(lc) as client:
        client.run(_synthetic_stages, args.stage_s)
        os.environ["QSMDASK_CLUSTER"] = "address"
        os.environ["QSMDASK_DASK_ADDRESS"] = lc.scheduler_address
        from qsmdask.orchestration.cluster import ClusterConfig, make_task_runner
        flow = participant_flow.with_options(task_runner=make_task_runner(ClusterConfig.from_env()))
        rss, poller = RSS(), APIPoller(os.environ["PREFECT_API_URL"])
        rss.start(), poller.start()
        import psutil
        roots = [pg.pid()] if pg is not None and pg.pid() else []
        snaps = Snapshots(pg, rss, poller) if pg is not None else None
        if snaps:
            snaps.start()
        cpu0, flow_cpu0 = tree_cpu_s(roots), sum(psutil.Process().cpu_times()[:2])
        t0 = time.perf_counter()
        try:
            res = flow(str(bids), str(out), subject_sessions_per_task=per_task)
            row["error"] = ""
        except Exception as e:  # noqa: BLE001 - what breaks is a result of this benchmark
            res = {"done": [], "failed": [], "skipped": []}
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        wall = time.perf_counter() - t0
        cpu1 = tree_cpu_s(roots)
        if snaps:
            snaps.stop()
        cpu = cpu_used(cpu0, cpu1)
        for kind in ("dask scheduler", "dask workers", "prefect server", "postgres"):
            row[f"CPU s/ss {kind}"] = cpu_used(cpu0, cpu1, kind) / n
        flow_cpu = sum(psutil.Process().cpu_times()[:2]) - flow_cpu0
        poller.stop()
        samples = rss.stop()
        slots = args.workers * args.threads
        row.update({"done": len(res["done"]), "failed": len(res["failed"]), "wall s": wall,
                    "wall s/ss": wall / n,
                    "overhead s/ss": wall * slots / n - 4 * args.stage_s,
                    "CPU s/ss": cpu / n, "flow CPU s/ss": flow_cpu / n,
                    "flow RSS peak MiB": max(s[1] for s in samples),
                    "flow RSS at 25% MiB": samples[len(samples) // 4][1],
                    "API p95 flow run s": p95(poller.flow_s), "API p95 task runs s": p95(poller.tasks_s),
                    "API polls": len(poller.flow_s), "API errors": poller.errors})
        t0 = time.perf_counter()
        try:
            if row["error"]:
                raise RuntimeError("first run failed: no resume")
            res2 = flow(str(bids), str(out), subject_sessions_per_task=per_task)
            row["resume skipped"] = len(res2["skipped"])
            if len(res2["skipped"]) != n:
                row["error"] += f" | resume skipped {len(res2['skipped'])} of {n}"
        except Exception as e:  # noqa: BLE001
            row["error"] += f" | resume: {type(e).__name__}: {str(e)[:200]}"
        row["resume s"] = time.perf_counter() - t0
    row["load end"] = os.getloadavg()[0]
    return row


def checksum_bench(n: int, mb: float, work: Path) -> dict:
    """Planning with real-size inputs: first plan (every input read) vs a replan (cache).

    ``n`` subject-sessions whose two MEGRE files are ``mb`` MB each (hard links of one file,
    so the bytes come from the page cache: this times SHA-256, not the disk).
    """
    import numpy as np
    from qsmdask.config import PipelineConfig
    from qsmdask.workflows.cohort import plan_participants
    bids, out = work / "bids_ck", work / "out_ck"
    make_bids(bids, n)
    tpl = bids / ".template"
    side = int(round((mb * 2**20 / 4) ** (1 / 3)))
    import nibabel as nib
    rng = np.random.default_rng(1)
    for name in ("mag.nii.gz", "phase.nii.gz"):  # uncompressible payload: the size on disk is mb
        img = nib.Nifti1Image(rng.random((side, side, side)).astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
        data = img.to_bytes()
        with open(tpl / name, "r+b") as fh:  # same inode: every hard link sees it
            fh.truncate(0)
            fh.write(__import__("gzip").compress(data, compresslevel=1))
        old = time.time_ns() - 3600 * 10**9
        os.utime(tpl / name, ns=(old, old))
    size = sum((tpl / f).stat().st_size for f in ("mag.nii.gz", "phase.nii.gz"))
    cfg = PipelineConfig()
    t0 = time.perf_counter()
    cold = plan_participants(bids, out, cfg)
    t_cold = time.perf_counter() - t0
    # what a finished run leaves: each subject-session's ROI table, then its manifest
    import pandas as pd
    from qsmdask.io.derivatives import DerivativesWriter
    w = DerivativesWriter(out)
    for ss, key in cold.todo:
        roi = pd.DataFrame({"participant_id": [ss.participant_id], "roi": ["putamen"], "mean_ppm": [0.05]})
        files = [w.save_roi_table(ss.subject, ss.session, roi)]
        w.write_manifest(ss.subject, ss.session, files, config=cfg.to_dict(),
                         status={"status": "done", "resume_key": key})
    t0 = time.perf_counter()
    warm = plan_participants(bids, out, cfg)
    t_warm = time.perf_counter() - t0
    assert len(warm.skipped) == n and not warm.todo, (len(warm.skipped), len(warm.todo))  # all up to date
    return {"subject-sessions": n, "input MB per ss": size / 2**20, "plan, inputs read s": t_cold,
            "read ss": cold.checksums_read, "resume plan (all up to date) s": t_warm,
            "cached ss": warm.checksums_cached, "GB not re-read": n * size / 1e9}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", default="1000")
    ap.add_argument("--per-task", default="auto",
                    help="subject-sessions per Prefect task run, comma-separated settings run one after the "
                         "other for each count (e.g. 1,auto: the per-subject-session before/after side by side)")
    ap.add_argument("--stage-s", type=float, default=0.2, help="duration of each synthetic stage (s)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=8, help="threads per worker (synthetic stages sleep)")
    ap.add_argument("--worker-memory-gb", type=float, default=4.0)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--checksum", default=None, metavar="N,MB[;N,MB]",
                    help="also time planning of N subject-sessions with MB-sized inputs: first plan vs the plan "
                         "of a resume (several: separated by ';')")
    ap.add_argument("--row-json", type=Path, default=None, help=argparse.SUPPRESS)  # one run, its row as JSON
    args = ap.parse_args(argv)
    machine = machine_description()
    base = Path(args.workdir or tempfile.mkdtemp(prefix="qsmdask-bench-orch-"))
    base.mkdir(parents=True, exist_ok=True)
    base.chmod(0o755)  # the PostgreSQL user must reach its data folder below
    rows = []
    runs = [(int(c), pt) for c in args.counts.split(",") if c for pt in args.per_task.split(",") if pt]
    if len(runs) > 1:  # one process per run: Prefect reads its API URL once per process
        for n, per_task in runs:
            out_json = base / f"row-{n}-{per_task}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--counts", str(n), "--per-task", per_task,
                   "--stage-s", str(args.stage_s), "--workers", str(args.workers), "--threads", str(args.threads),
                   "--worker-memory-gb", str(args.worker_memory_gb), "--workdir", str(base), "--no-write",
                   "--row-json", str(out_json)]
            subprocess.run(cmd, check=False)
            row = json.loads(out_json.read_text()) if out_json.exists() else {
                "subject-sessions": n, "per task": per_task, "error": "the run's process ended without a row"}
            rows.append(row)
            if row.get("error"):
                break
        runs = []
    for n, per_task in runs:
        work = base / f"n{n}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        work.chmod(0o755)
        pg = Postgres(work / "pg")
        db_url = pg.start()
        api = None
        env_keep = {k: os.environ.get(k) for k in ("PREFECT_API_URL", "PREFECT_API_DATABASE_CONNECTION_URL")}
        os.environ.pop("PREFECT_API_URL", None)
        os.environ["PREFECT_API_DATABASE_CONNECTION_URL"] = db_url
        os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
        from qsmdask.orchestration.server import ensure_prefect_api
        try:
            api = ensure_prefect_api(port=free_port(), home=work / "prefect", timeout_s=900)
            row = run_count(n, args, work, pg, per_task=per_task)
            row["DB MiB"] = pg.size_mb()
            row.update(pg.counts())
        finally:
            if api is not None:
                api.stop()
            pg.stop()
            for k, v in env_keep.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        print(row, flush=True)
        rows.append(row)
        if args.row_json:
            args.row_json.write_text(json.dumps(row, default=float))
        shutil.rmtree(work, ignore_errors=True)
        if row.get("error"):
            break
    ck_rows = []
    for spec in filter(None, (args.checksum or "").split(";")):
        n_ck, mb = spec.split(",")
        work = base / "checksum"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        ck_rows.append(checksum_bench(int(n_ck), float(mb), work))
        print(ck_rows[-1], flush=True)
        shutil.rmtree(work, ignore_errors=True)
    if args.row_json:
        return
    cmd = "python bench/orchestration.py " + " ".join(argv if argv is not None else sys.argv[1:])
    cols = ["subject-sessions", "per task", "done", "failed", "wall s", "wall s/ss", "overhead s/ss", "CPU s/ss",
            "flow CPU s/ss", "CPU s/ss dask scheduler", "CPU s/ss dask workers", "CPU s/ss prefect server", "CPU s/ss postgres", "plan s", "resume s", "flow RSS at 25% MiB", "flow RSS peak MiB",
            "API p95 flow run s", "API p95 task runs s", "DB MiB", "task_runs", "logs", "load start", "load end",
            "error"]
    parts = [
        "## Orchestration at cohort scale (`bench/orchestration.py`, issue 18)", "",
        f"Machine: {machine}. Shared with other agents' jobs (2 cores for 6 agents): times are upper bounds.",
        f"Command: `{cmd.strip()}`.", "",
        f"**Synthetic compute**: the four stages run as labelled synthetic functions of {args.stage_s} s each "
        f"({4 * args.stage_s:.2f} s per subject-session, a sleep; `write` writes the real ROI table and manifest), "
        f"on {args.workers} Dask workers x {args.threads} threads; everything else is the real participant flow "
        "(`per task`: subject-sessions per Prefect task run, the setting in brackets) on a Prefect server backed by PostgreSQL 15. "
        "Overhead per subject-session = wall x slots / N - the synthetic time; CPU s/ss = CPU seconds of every "
        "process of the run (flow process with the Dask scheduler, workers, Prefect server, PostgreSQL) per "
        "subject-session, all of it orchestration since the synthetic stages sleep.", ""]
    if rows:
        parts.append(markdown_table(rows, cols))
    if ck_rows:
        parts += ["", "Planning with real-size inputs (`--checksum N,MB`: two MEGRE files of that size per "
                  "subject-session, hard links of one file, so this times SHA-256 from the page cache, not a disk):", "",
                  markdown_table(ck_rows, list(ck_rows[0]))]
    body = "\n".join(parts)
    print(body)
    if not args.no_write:
        update_section("orchestration", body)


if __name__ == "__main__":
    main()

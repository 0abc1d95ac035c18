"""qsmdask command line (BIDS-App conventions).

    qsmdask run BIDS_DIR OUTPUT_DIR participant|group [options]
    qsmdask simulate OUT_DIR --subjects N --seed S [--sessions 2] [--sites K]
    qsmdask demo [OUT_DIR]

Exit codes: 0 success; 1 error (bad input, bad configuration, crash); 2 usage error;
3 the run finished but one or more subject-sessions failed (see the failure table).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from . import __version__

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_SUBJECTS_FAILED = 0, 1, 2, 3


def _existing_dir(s: str) -> Path:
    p = Path(s)
    if not p.is_dir():
        raise argparse.ArgumentTypeError(f"folder not found: {s}")
    return p


def _label(s: str) -> str:
    from .io.bids import validate_label
    try:
        return validate_label(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _tables_url(s: str) -> str:
    """A local path or an fsspec URL whose filesystem is installed (not memory://: per process)."""
    if "://" not in s:
        return s
    protocol = s.split("://", 1)[0]
    if protocol == "memory":
        raise argparse.ArgumentTypeError("memory:// lives inside one process, but the tables are written by "
                                         "Dask worker processes; use a path, file:// or an object store")
    import fsspec
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as e:
        raise argparse.ArgumentTypeError(f"{protocol}:// needs an extra package ({e})") from None
    except ValueError:
        raise argparse.ArgumentTypeError(f"unknown storage protocol {protocol!r} in {s!r}") from None
    return s


def _bytes(s: str) -> str:
    from dask.utils import parse_bytes
    try:
        ok = parse_bytes(s) > 0
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"not a memory size: {s!r} (e.g. 8GiB, 4GB, 2000000000)")
    return s


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qsmdask", description="Quantitative susceptibility mapping "
                                "for research cohorts: BIDS in, brain-iron results out.")
    p.add_argument("--version", action="version", version=f"qsmdask {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="run the participant or group level on a BIDS dataset",
                       description="BIDS-App: reconstruct QSM per subject-session (participant) or "
                       "compute cohort statistics from the ROI tables (group).")
    r.add_argument("bids_dir", type=_existing_dir, help="BIDS dataset with *_MEGRE.nii[.gz] and sidecars")
    r.add_argument("output_dir", type=Path, help="derivatives folder (created if missing)")
    r.add_argument("analysis_level", choices=["participant", "group"], help="which level to run")
    r.add_argument("--participant-label", nargs="+", type=_label, metavar="LABEL",
                   help="only these participants (with or without 'sub-')")
    r.add_argument("--config", type=Path, help="pipeline configuration (JSON or YAML), see docs/configuration.md")
    r.add_argument("--design", type=Path, help="group design file (JSON or YAML) for the group level")
    _cluster_args(r)
    r.add_argument("--force", action="store_true", help="recompute subject-sessions that are up to date")
    r.add_argument("--n-perm", type=int, default=1000,
                   help="permutations of the voxel-wise group analysis (study: 20000; 0 skips it)")

    v = sub.add_parser("serve", help="run the cohort flow on a BIDS folder on a cron schedule (blocks)",
                       description="Registers the Prefect deployment 'qsmdask-cohort-nightly' and serves it: "
                       "new or changed subject-sessions are processed, then the group level is refreshed.")
    v.add_argument("bids_dir", type=_existing_dir)
    v.add_argument("output_dir", type=Path)
    v.add_argument("--cron", default="0 2 * * *", help="cron schedule (default: every night at 02:00)")
    v.add_argument("--config", type=Path, help="pipeline configuration (JSON or YAML)")
    v.add_argument("--design", type=Path, help="group design file (JSON or YAML)")
    _cluster_args(v)

    s = sub.add_parser("simulate", help="write a synthetic BIDS cohort with ground truth")
    s.add_argument("out_dir", type=Path)
    s.add_argument("--subjects", type=_positive_int, default=12)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--sessions", type=int, choices=[1, 2], default=2)
    s.add_argument("--sites", type=_positive_int, default=1)
    s.add_argument("--voxel-size", type=float, nargs=3, default=(2.0, 2.0, 2.0), metavar=("X", "Y", "Z"),
                   help="voxel size in mm (default 2 2 2; the study's grid is 1 1 2)")
    s.add_argument("--effect-ppm", type=float, default=None, help="planted patient increase in ppm")

    d = sub.add_parser("demo", help="simulate a small cohort and run both levels on it")
    d.add_argument("out_dir", type=Path, nargs="?", default=Path("qsmdask_demo"))
    d.add_argument("--subjects", type=_positive_int, default=16,
                   help="subjects (half patients); 16 lets a rank test pass Bonferroni over 16 ROIs")
    d.add_argument("--seed", type=int, default=1)
    d.add_argument("--n-perm", type=int, default=500, help="permutations of the voxel-wise analysis")
    d.add_argument("--effect-ppm", type=float, default=0.05,
                   help="planted patient increase in putamen, thalamus and hippocampus (ppm); the "
                        "default chain (LBV + TV-Bregman) recovers about 90 %% of deep-grey contrast on "
                        "simulated heads, the study's V-SHARP + TKD about half")
    _cluster_args(d)
    return p


def _cluster_args(p):
    g = p.add_argument_group("execution")
    g.add_argument("--n-workers", type=_positive_int, default=2, help="local Dask worker processes")
    g.add_argument("--scheduler-address", metavar="tcp://HOST:PORT",
                   help="use an existing Dask scheduler instead of a LocalCluster")
    g.add_argument("--worker-memory", metavar="SIZE", type=_bytes,
                   help="memory of each local Dask worker, e.g. 8GiB (default: total memory / --n-workers); "
                        "subject-sessions run side by side only as far as their estimated memory fits")
    g.add_argument("--work-dir", metavar="URL", help="zarr work area (path or fsspec URL; default OUTPUT_DIR/work)")
    g.add_argument("--tables-url", metavar="URL", type=_tables_url,
                   help="where the Parquet tables (roi/, group/, failures.parquet) are written and read: "
                        "path, file:// or object-store URL such as s3://bucket/prefix (default OUTPUT_DIR)")
    g.add_argument("--prefect-port", type=int, default=None, help="port of the local Prefect server (default 4200)")
    g.add_argument("--keep-server", action="store_true",
                   help="leave the local Prefect server (and its UI) running after the command")


def _setup_logging(debug: bool):
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    # INFO reaches the flow-run logs in the Prefect UI (the Dask dashboard link, counts); the
    # console shows less (below)
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "DEBUG" if debug else "INFO")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_UI_ENABLED", "true")
    if not debug:
        # the CLI prints its own progress and failure table: Prefect's console handler (in this
        # process and, through the environment, in every Dask worker) shows only critical
        # messages, while the API handler still sends every log to the Prefect UI
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
        for name in ("distributed", "distributed.scheduler", "distributed.nanny", "distributed.core"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _start_api(args):
    from .orchestration.server import ensure_prefect_api
    api = ensure_prefect_api(port=args.prefect_port, stop_at_exit=not args.keep_server)
    print(f"Prefect API {api.url} (UI {api.ui_url})" + (" started" if api.started_here else " reused"),
          file=sys.stderr)
    return api


def _cluster_env(args):
    # one thread per task: Dask owns the parallelism, and ANTs is only reproducible single-threaded
    for var in ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    if args.scheduler_address:
        os.environ["QSMDASK_CLUSTER"] = "address"
        os.environ["QSMDASK_DASK_ADDRESS"] = args.scheduler_address
    else:
        os.environ.setdefault("QSMDASK_CLUSTER", "local")
        os.environ["QSMDASK_N_WORKERS"] = str(args.n_workers)
    if args.worker_memory:
        os.environ["QSMDASK_WORKER_MEMORY"] = args.worker_memory


def run_participant(bids_dir, output_dir, *, labels=None, config=None, force=False, work_dir=None,
                    tables_url=None) -> dict:
    from flows.participant import participant_flow
    return participant_flow(str(bids_dir), str(output_dir), participant_labels=labels, config=config,
                            force=force, work_root=work_dir, tables_url=tables_url)


def run_group(bids_dir, output_dir, *, design=None, n_perm: int = 1000, tables_url=None) -> dict:
    from flows.group import group_flow
    vw = {"enabled": n_perm > 0, "n_perm": max(n_perm, 1)}
    return group_flow(str(bids_dir), str(output_dir), design=design, voxelwise=vw, tables_url=tables_url)


def _tables_root(output_dir, tables_url):
    from .io.derivatives import DerivativesWriter
    return DerivativesWriter(output_dir, tables_url=tables_url).tables_root


def _print_failures(failed: list[dict]):
    print(f"\n{len(failed)} subject-session(s) failed:", file=sys.stderr)
    for f in failed:
        ses = f" {f['session_id']}" if f["session_id"] else ""
        print(f"  {f['participant_id']}{ses}  [{f['stage']}]  {f['error_type']}: {f['message']}",
              file=sys.stderr)


def _cmd_run(args) -> int:
    from .config import PipelineConfig, load_config_file

    cfg = PipelineConfig.from_dict(load_config_file(args.config)) if args.config else PipelineConfig()
    cfg.to_dict()  # validates the chain options now, before any work
    design = load_config_file(args.design) if args.design else None
    if design is not None:
        from .stats.design import GroupDesign
        GroupDesign.from_dict(design)
    from .io.lock import OutputLock

    try:
        args.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RuntimeError(f"{args.output_dir}: cannot create the output folder ({e.strerror})") from None
    if not os.access(args.output_dir, os.W_OK):
        raise RuntimeError(f"{args.output_dir}: output folder is not writable")
    with OutputLock(args.output_dir):
        return _run_level(args, cfg, design)


def _run_level(args, cfg, design) -> int:
    _cluster_env(args)
    _start_api(args)
    t0 = time.monotonic()
    if args.analysis_level == "participant":
        res = run_participant(args.bids_dir, args.output_dir, labels=args.participant_label,
                              config=cfg.to_dict(), force=args.force, work_dir=args.work_dir,
                              tables_url=args.tables_url)
        print(f"participant level: {len(res['done'])} done, {len(res['skipped'])} up to date, "
              f"{len(res['failed'])} failed in {time.monotonic() - t0:.0f} s -> {args.output_dir}")
        if res["failed"]:
            _print_failures(res["failed"])
            return EXIT_SUBJECTS_FAILED
        return EXIT_OK
    written = run_group(args.bids_dir, args.output_dir, design=design, n_perm=args.n_perm,
                        tables_url=args.tables_url)
    n_tables = len([k for k in written if k != "report"])
    group_dir = _tables_root(args.output_dir, args.tables_url)
    print(f"group level: {n_tables} table(s) in {str(group_dir).rstrip('/')}/group; "
          f"report {written.get('report')}")
    return EXIT_OK


def _cmd_serve(args) -> int:
    from .config import PipelineConfig, load_config_file

    cfg = PipelineConfig.from_dict(load_config_file(args.config)) if args.config else PipelineConfig()
    design = load_config_file(args.design) if args.design else None
    _cluster_env(args)
    api = _start_api(args)
    from flows.serve import serve
    print(f"serving the cohort flow on {args.bids_dir} with schedule '{args.cron}'; "
          f"runs are listed in the Prefect UI at {api.ui_url}", file=sys.stderr)
    serve(str(args.bids_dir), str(args.output_dir), cron=args.cron, config=cfg.to_dict(), design=design,
          tables_url=args.tables_url)
    return EXIT_OK


def _cmd_simulate(args) -> int:
    from .sim import simulate_cohort
    kw = {}
    if args.effect_ppm is not None:
        kw["effect_ppm"] = args.effect_ppm
    info = simulate_cohort(args.out_dir, n_subjects=args.subjects, seed=args.seed, n_sessions=args.sessions,
                           n_sites=args.sites, voxel_size_mm=tuple(args.voxel_size), **kw)
    print(f"simulated {args.subjects} subject(s) x {args.sessions} session(s) -> {args.out_dir}")
    return EXIT_OK if info is not None else EXIT_ERROR


def _cmd_demo(args) -> int:
    from .sim import simulate_cohort

    out = Path(args.out_dir)
    bids, deriv = out / "bids", out / "derivatives"
    t0 = time.monotonic()
    if not (bids / "dataset_description.json").exists():
        print(f"simulating {args.subjects} subjects x 2 sessions in {bids} ...", file=sys.stderr)
        simulate_cohort(bids, n_subjects=args.subjects, seed=args.seed, n_sessions=2,
                        effect_ppm=args.effect_ppm)
    _cluster_env(args)
    _start_api(args)
    res = run_participant(bids, deriv, work_dir=args.work_dir, tables_url=args.tables_url)
    written = run_group(bids, deriv, n_perm=args.n_perm, tables_url=args.tables_url)
    tables = str(_tables_root(deriv, args.tables_url)).rstrip("/")
    print(f"\nqsmdask demo finished in {time.monotonic() - t0:.0f} s")
    print(f"  BIDS input (with ground truth in derivatives/qsmdask-sim): {bids}")
    print(f"  susceptibility maps, masks, transforms:                    {deriv}/sub-*/")
    print(f"  ROI tables (Parquet, one per subject-session):              {tables}/roi")
    print(f"  group statistics (Parquet):                                 {tables}/group")
    print(f"  cohort report (open in a browser):                          {written.get('report')}")
    if "group_wilcoxon" in written:
        from .io.tables import read_parquet
        t = read_parquet(written["group_wilcoxon"])
        t = t[t["level"] == "group"] if "level" in t.columns else t
        t = t[(t["p_corrected"] < 0.05)]
        cols = [c for c in ("session_id", "roi", "hemisphere", "n", "p", "p_corrected", "effect_size")
                if c in t.columns]
        print("\nPatients vs controls, Wilcoxon rank-sum, Bonferroni p < 0.05:")
        print(t[cols].to_string(index=False) if len(t) else "  (none)")
    if res["failed"]:
        _print_failures(res["failed"])
        return EXIT_SUBJECTS_FAILED
    return EXIT_OK


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.debug)
    try:
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "simulate":
            return _cmd_simulate(args)
        if args.command == "serve":
            return _cmd_serve(args)
        return _cmd_demo(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line; the traceback only with --debug
        if args.debug:
            raise
        print(f"qsmdask: error: {e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""qsmdask command line (BIDS-App conventions).

    qsmdask run BIDS_DIR OUTPUT_DIR participant|group [options]
    qsmdask simulate OUT_DIR --subjects N --seed S [--sessions 2] [--sites K]
    qsmdask demo [OUT_DIR]

Exit codes: 0 success; 1 error (bad input, including BIDS-validator errors of the whole
dataset, bad configuration, an output folder inside the input dataset, crash); 2 usage error;
3 the run finished but one or more subject-sessions failed (see the failure table);
130 interrupted (SIGINT, Ctrl-C); 143 terminated (SIGTERM, as sent by SLURM, Kubernetes, kill).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

from . import __version__

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_SUBJECTS_FAILED, EXIT_ANALYSIS_FAILED = 0, 1, 2, 3, 4
EXIT_INTERRUPTED, EXIT_TERMINATED = 128 + signal.SIGINT, 128 + signal.SIGTERM

EXIT_CODES_HELP = """exit codes:
  0    success
  1    error (bad input, bad configuration, crash): one line, the traceback with --debug
  2    usage error (bad arguments)
  3    finished, but some subject-sessions failed (listed, and in OUTPUT_DIR/failures.parquet)
  4    group level finished, but the voxel-wise analysis failed (ROI statistics and report
       written; the error is in the log and in group/skipped.parquet)
  130  interrupted (SIGINT, Ctrl-C)
  143  terminated (SIGTERM: kill, SLURM, Kubernetes)"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each option's default in its help (unless the help states it), the exit-code list as written."""

    def _get_help_string(self, action):
        h = action.help or ""
        if ("default" not in h and action.default not in (None, False, argparse.SUPPRESS)
                and action.option_strings and action.nargs != 0):
            d = action.default
            d = " ".join(map(str, d)) if isinstance(d, (tuple, list)) else d
            h += f" (default: {d})"
        return h


class Terminated(KeyboardInterrupt):
    """SIGTERM received: handled like Ctrl-C (clean up, one line), exit 143."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _terminated_inside(exc: BaseException) -> bool:
    """Whether ``exc`` is Prefect's SIGTERM in disguise.

    During a flow Prefect's own SIGTERM handler raises ``TerminationSignal``; when the signal
    lands inside serialisation (pydantic) it comes back wrapped in another error, and only its
    name survives in the message. Such an error is a termination, not a failure.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if type(exc).__name__ == "TerminationSignal" or "TerminationSignal" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _existing_dir(s: str) -> Path:
    p = Path(s)
    if not p.is_dir():
        raise argparse.ArgumentTypeError(f"folder not found: {s}")
    return p


def _label(s: str, what: str = "participant label") -> str:
    from .io.bids import validate_label
    try:
        return validate_label(s, what=what)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _int_at_least(minimum: int):
    """An argparse type: an integer >= ``minimum``, else a message naming the value."""
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {s!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {v}")
        return v
    return parse


_positive_int, _non_negative_int = _int_at_least(1), _int_at_least(0)


def _port(s: str) -> int:
    v = _positive_int(s)
    if v > 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {v} (1-65535)")
    return v


def _host_port(s: str) -> str:
    host, sep, port = s.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT such as 127.0.0.1:8787 (port 0: any free), got {s!r}")
    return s


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


def _common_args(p, *, suppress: bool):
    """--debug and -v, accepted before and after the subcommand."""
    kw = {"default": argparse.SUPPRESS} if suppress else {}
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs", **kw)
    p.add_argument("-v", "--verbose", action="count",
                   help="more console output: -v adds INFO messages, -vv DEBUG (the log file always has INFO)",
                   **({"default": argparse.SUPPRESS} if suppress else {"default": 0}))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qsmdask", description="Quantitative susceptibility mapping "
                                "for research cohorts: BIDS in, brain-iron results out.",
                                epilog=EXIT_CODES_HELP, formatter_class=_HelpFormatter)
    p.add_argument("--version", action="version", version=f"qsmdask {__version__}")
    _common_args(p, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _common_args(common, suppress=True)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def parser(name, **kw):
        return sub.add_parser(name, parents=[common], formatter_class=_HelpFormatter, epilog=EXIT_CODES_HELP,
                              **kw)

    r = parser("run", help="run the participant or group level on a BIDS dataset",
               description="BIDS-App: reconstruct QSM per subject-session (participant) or "
               "compute cohort statistics from the ROI tables (group).")
    r.add_argument("bids_dir", type=_existing_dir, help="BIDS dataset with *_MEGRE.nii[.gz] and sidecars")
    r.add_argument("output_dir", type=Path, help="derivatives folder (created if missing)")
    r.add_argument("analysis_level", choices=["participant", "group"], help="which level to run")
    r.add_argument("--participant_label", "--participant-label", dest="participant_label", nargs="+",
                   type=_label, metavar="LABEL",
                   help="only these participants (with or without 'sub-'); default: all")
    r.add_argument("--session_label", "--session-label", dest="session_label", nargs="+",
                   type=lambda x: _label(x, what="session label"), metavar="LABEL",
                   help="only these sessions (with or without 'ses-'); default: all")
    r.add_argument("--config", type=Path, help="pipeline configuration (JSON or YAML), see docs/configuration.md")
    r.add_argument("--design", type=Path, help="group design file (JSON or YAML) for the group level")
    _cluster_args(r)
    r.add_argument("--force", action="store_true", help="recompute subject-sessions that are up to date")
    r.add_argument("--n-perm", type=_non_negative_int, default=1000,
                   help="permutations of the voxel-wise group analysis (study: 20000; 0 skips it)")
    r.add_argument("--skip-bids-validation", action="store_true",
                   help="do not run the official BIDS validator (bids-validator-deno) on BIDS_DIR first; "
                        "qsmdask's own input checks still run")

    v = parser("serve", help="run the cohort flow on a BIDS folder on a cron schedule (blocks)",
               description="Registers the Prefect deployment 'qsmdask-cohort-nightly' and serves it: "
               "new or changed subject-sessions are processed, then the group level is refreshed.")
    v.add_argument("bids_dir", type=_existing_dir, help="BIDS dataset")
    v.add_argument("output_dir", type=Path, help="derivatives folder")
    v.add_argument("--cron", default="0 2 * * *", help="cron schedule (default: every night at 02:00)")
    v.add_argument("--config", type=Path, help="pipeline configuration (JSON or YAML)")
    v.add_argument("--design", type=Path, help="group design file (JSON or YAML)")
    _cluster_args(v)

    s = parser("simulate", help="write a synthetic BIDS cohort with ground truth")
    s.add_argument("out_dir", type=Path, help="folder of the new BIDS dataset")
    s.add_argument("--subjects", type=_positive_int, default=12, help="number of subjects (half patients)")
    s.add_argument("--seed", type=int, default=0, help="random seed")
    s.add_argument("--sessions", type=int, choices=[1, 2], default=2, help="sessions per subject")
    s.add_argument("--sites", type=_positive_int, default=1, help="acquisition sites")
    s.add_argument("--voxel-size", type=float, nargs=3, default=(2.0, 2.0, 2.0), metavar=("X", "Y", "Z"),
                   help="voxel size in mm (the study's grid is 1 1 2)")
    s.add_argument("--effect-ppm", type=float, default=None,
                   help="planted patient increase in ppm (default: the simulator's)")
    s.add_argument("--no-air-cavities", action="store_true",
                   help="heads without sinuses and mastoid air cells (no steep air-tissue fields)")

    d = parser("demo", help="simulate a small cohort and run both levels on it")
    d.add_argument("out_dir", type=Path, nargs="?", default=Path("qsmdask_demo"), help="demo folder")
    d.add_argument("--subjects", type=_positive_int, default=16,
                   help="subjects (half patients); 16 lets a rank test pass Bonferroni over 16 ROIs")
    d.add_argument("--seed", type=int, default=1, help="random seed of the simulated cohort")
    d.add_argument("--n-perm", type=_non_negative_int, default=500,
                   help="permutations of the voxel-wise analysis (0 skips it)")
    d.add_argument("--effect-ppm", type=float, default=0.05,
                   help="planted patient increase in putamen, thalamus and hippocampus (ppm); the "
                        "default chain (LBV + TV-Bregman) recovers about 90 %% of deep-grey contrast on "
                        "simulated heads, the study's V-SHARP + TKD about half")
    _cluster_args(d)
    return p


def _cluster_args(p):
    g = p.add_argument_group("execution")
    g.add_argument("--nprocs", "--nthreads", "--n-workers", dest="n_workers", type=_positive_int, default=2,
                   metavar="N", help="local Dask worker processes (one thread each)")
    mem = g.add_mutually_exclusive_group()
    mem.add_argument("--mem", metavar="SIZE", type=_bytes,
                     help="memory of the whole run, e.g. 16GB or 16000MB, shared evenly by the workers "
                          "(default: the machine's memory)")
    mem.add_argument("--worker-memory", metavar="SIZE", type=_bytes,
                     help="memory of each local Dask worker, e.g. 8GiB (default: total memory / --nprocs); "
                          "subject-sessions run side by side only as far as their estimated memory fits")
    g.add_argument("--scheduler-address", metavar="tcp://HOST:PORT",
                   help="use an existing Dask scheduler instead of a LocalCluster")
    g.add_argument("--dashboard-address", metavar="HOST:PORT", type=_host_port, default="127.0.0.1:0",
                   help="where the local Dask dashboard listens; it shows logs and tracebacks, so it is local "
                        "to this machine (0.0.0.0:PORT exposes it to the network)")
    g.add_argument("--work-dir", metavar="URL", help="zarr work area (path or fsspec URL; default OUTPUT_DIR/work)")
    g.add_argument("--tables-url", metavar="URL", type=_tables_url,
                   help="where the Parquet tables (roi/, group/, failures.parquet) are written and read: "
                        "path, file:// or object-store URL such as s3://bucket/prefix (default OUTPUT_DIR)")
    g.add_argument("--prefect-port", type=_port, default=None,
                   help="preferred port of a new local Prefect server (default 4200, a free port when taken)")
    g.add_argument("--keep-work", action="store_true",
                   help="keep the zarr work stores (default: removed once a subject-session is done or failed)")
    g.add_argument("--keep-server", action="store_true",
                   help="leave the local Prefect server (and its UI) running after the command; later "
                        "commands of this user reuse it")


class _QuietShutdown(logging.Filter):
    """Expected messages of a clean shutdown, demoted to DEBUG.

    When the LocalCluster closes, each nanny waits a few seconds for its worker process
    (Prefect flushes its logs there) and then kills it: "Worker process still alive after
    4.0 seconds, killing" on every run. It says nothing about the results.
    """

    def filter(self, record):
        if record.levelno == logging.WARNING and "still alive after" in record.getMessage():
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


class _NotOnConsole(logging.Filter):
    """Prefect's report of a flow stopped by Ctrl-C/SIGTERM or by an exception: the CLI says it
    in one line (the report and its traceback stay in the log file and the Prefect UI)."""

    def filter(self, record):
        if not record.name.startswith("prefect.flow_runs"):
            return True
        msg = record.getMessage()
        if "Crash detected!" in msg and ("termination signal" in msg or "interrupted by the user" in msg
                                         or "KeyboardInterrupt" in msg):
            return False
        # a flow's exception: the CLI prints it as one line (the traceback is in the log file)
        return not (msg.startswith("Encountered exception during execution")
                    or msg.startswith("Finished in state Failed"))


_CONSOLE_FORMAT = "%(levelname)s %(name)s: %(message)s"
_FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _setup_logging(debug: bool, verbose: int = 0):
    """Console: warnings and errors (-v INFO, -vv or --debug DEBUG); the run log file gets INFO."""
    console_level = logging.DEBUG if debug or verbose >= 2 else logging.INFO if verbose == 1 else logging.WARNING
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if console_level == logging.DEBUG else logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(console_level)
    console.setFormatter(logging.Formatter(_CONSOLE_FORMAT))
    console.addFilter(_QuietShutdown())
    console.addFilter(_NotOnConsole())
    console._qsmdask = True
    for h in [h for h in root.handlers if getattr(h, "_qsmdask", False)]:
        root.removeHandler(h)
    root.addHandler(console)
    # INFO reaches the flow-run logs in the Prefect UI (the Dask dashboard link, counts) and the
    # run log file; the console shows what console_level lets through
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
    for name in ("distributed.nanny", "distributed.deploy.spec"):
        logging.getLogger(name).addFilter(_QuietShutdown())
    for name in ("httpx", "httpcore"):  # one INFO line per Prefect API request otherwise
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.WARNING)


class _Tee:
    """A text stream that writes to the console stream and to the run log file."""

    def __init__(self, stream, log):
        self._stream, self._log = stream, log

    def write(self, text):
        n = self._stream.write(text)
        try:
            self._log.write(text)
            self._log.flush()
        except (OSError, ValueError):  # a full disk or a closed log never stops the run
            pass
        return n

    def flush(self):
        self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


class RunLog:
    """``OUTPUT_DIR/logs/qsmdask_<what>_<UTC time>.log``: the console output and every INFO log.

    The log file honours the umask (like every output); the console streams are restored on close.
    """

    def __init__(self, output_dir: Path, what: str):
        from datetime import datetime, timezone
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        folder = Path(output_dir) / "logs"
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"qsmdask_{what}_{stamp}_{os.getpid()}.log"
        self._file = open(self.path, "a", encoding="utf-8")
        self._handler = logging.FileHandler(self.path, encoding="utf-8", delay=True)
        self._handler.setLevel(logging.INFO)
        self._handler.setFormatter(logging.Formatter(_FILE_FORMAT))
        self._handler.addFilter(_QuietShutdown())
        self._saved = (sys.stdout, sys.stderr)

    def __enter__(self):
        self._file.write(f"# qsmdask {__version__}: {' '.join(sys.argv)}\n")
        self._file.flush()
        sys.stdout, sys.stderr = _Tee(sys.stdout, self._file), _Tee(sys.stderr, self._file)
        logging.getLogger().addHandler(self._handler)
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and issubclass(exc_type, Exception):
            import traceback
            try:  # the console gets one line (main); the log file the whole story
                self._file.write(f"qsmdask: error: {exc}\n" + "".join(traceback.format_exception(exc_type, exc, tb)))
            except (OSError, ValueError):
                pass
        logging.getLogger().removeHandler(self._handler)
        self._handler.close()
        sys.stdout, sys.stderr = self._saved
        self._file.close()
        return False


def _start_api(args):
    from .orchestration.server import ensure_prefect_api
    api = ensure_prefect_api(port=args.prefect_port, stop_at_exit=not args.keep_server)
    if not api.started_here and not api.reused:
        how = "from PREFECT_API_URL"
    elif api.reused:
        how = f"your server kept by an earlier --keep-server run; stop it with: kill {api.pid}"
    elif api.kept:
        how = f"started; it keeps running after this command (--keep-server); stop it with: kill {api.process.pid}"
    else:
        how = "started for this command: it stops when the command ends (add --keep-server to keep it)"
    print(f"Prefect UI {api.ui_url} ({how})", file=sys.stderr)
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
    os.environ["QSMDASK_DASHBOARD_ADDRESS"] = args.dashboard_address
    if args.worker_memory:
        os.environ["QSMDASK_WORKER_MEMORY"] = args.worker_memory
    elif getattr(args, "mem", None):
        from dask.utils import parse_bytes
        os.environ["QSMDASK_WORKER_MEMORY"] = str(parse_bytes(args.mem) // args.n_workers)


def run_participant(bids_dir, output_dir, *, labels=None, config=None, force=False, work_dir=None,
                    tables_url=None, session_labels=None, keep_work=False, validation_errors=None) -> dict:
    from flows.participant import participant_flow
    kw = {"session_labels": session_labels} if session_labels else {}
    return participant_flow(str(bids_dir), str(output_dir), participant_labels=labels, config=config,
                            force=force, work_root=work_dir, tables_url=tables_url, keep_work=keep_work,
                            validation_errors=validation_errors, **kw)


def _check_locations(args):
    """Refuse outputs in the input dataset (other than BIDS_DIR/derivatives/...) before writing."""
    from .io.bids import check_output_location
    check_output_location(args.bids_dir, args.output_dir)
    check_output_location(args.bids_dir, args.work_dir, what="work folder (--work-dir)")
    check_output_location(args.bids_dir, args.tables_url, what="tables location (--tables-url)")


def _validate_input(args) -> list | None:
    """The official BIDS validator on BIDS_DIR (unless --skip-bids-validation or not installed).

    Dataset-level errors stop the run (exit 1); errors confined to files are returned for the
    participant level (an acquisition reading such a file fails alone).
    """
    if getattr(args, "skip_bids_validation", False):
        return None
    from .io.validation import VALIDATOR, BIDSValidationError, dataset_error_message, validate_bids
    res = validate_bids(args.bids_dir)
    if res is None:
        print(f"{VALIDATOR} not installed: using qsmdask's own BIDS checks only", file=sys.stderr)
        return None
    if res.dataset:
        raise BIDSValidationError(dataset_error_message(args.bids_dir, res.dataset))
    if res.files:
        print(f"BIDS validator: {len(res.files)} error(s) in single files (an acquisition reading one "
              "fails alone, the others are ignored)", file=sys.stderr)
    return res.files


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
        ses = "".join(f" {f[k]}" for k in ("session_id", "acquisition") if f.get(k))
        print(f"  {f['participant_id']}{ses}  [{f['stage']}]  {f['error_type']}: {f['message']}",
              file=sys.stderr)


def _load_config(path):
    from .config import PipelineConfig, load_config_file
    if path is None:
        return PipelineConfig()
    try:
        cfg = PipelineConfig.from_dict(load_config_file(path))
        cfg.to_dict()  # validates the chain options now, before any work
    except (TypeError, ValueError) as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None
    return cfg


def _load_design(path):
    if path is None:
        return None
    from .config import load_config_file
    from .stats.design import GroupDesign
    design = load_config_file(path)
    try:
        GroupDesign.from_dict(design)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None
    return design


def _cmd_run(args) -> int:
    cfg = _load_config(args.config)
    design = _load_design(args.design)
    from .io.lock import OutputLock

    _check_locations(args)
    try:
        args.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RuntimeError(f"{args.output_dir}: cannot create the output folder ({e.strerror})") from None
    if not os.access(args.output_dir, os.W_OK):
        raise RuntimeError(f"{args.output_dir}: output folder is not writable")
    with OutputLock(args.output_dir), RunLog(args.output_dir, args.analysis_level) as log:
        print(f"log: {log.path}", file=sys.stderr)
        try:
            validation_errors = _validate_input(args) if args.analysis_level == "participant" else None
            return _run_level(args, cfg, design, validation_errors)
        except KeyboardInterrupt as e:  # handled here so that the log file gets the line too
            return _interrupted(args, e)


def _run_level(args, cfg, design, validation_errors=None) -> int:
    _cluster_env(args)
    _start_api(args)
    t0 = time.monotonic()
    if args.analysis_level == "participant":
        res = run_participant(args.bids_dir, args.output_dir, labels=args.participant_label,
                              config=cfg.to_dict(), force=args.force, work_dir=args.work_dir,
                              tables_url=args.tables_url, session_labels=args.session_label,
                              keep_work=args.keep_work, validation_errors=validation_errors)
        print(f"participant level: {len(res['done'])} done, {len(res['skipped'])} up to date, "
              f"{len(res['failed'])} failed in {time.monotonic() - t0:.0f} s -> {args.output_dir}")
        if res["failed"]:
            _print_failures(res["failed"])
            return EXIT_SUBJECTS_FAILED
        return EXIT_OK
    written = run_group(args.bids_dir, args.output_dir, design=design, n_perm=args.n_perm,
                        tables_url=args.tables_url)
    n_tables = len([k for k in written if k not in ("report", "voxelwise_failed")])
    group_dir = _tables_root(args.output_dir, args.tables_url)
    print(f"group level: {n_tables} table(s) in {str(group_dir).rstrip('/')}/group; "
          f"report {written.get('report')}")
    return _voxelwise_status(written)


def _voxelwise_status(written: dict) -> int:
    """EXIT_ANALYSIS_FAILED (one line on stderr) when the group level's voxel-wise analysis failed."""
    if "voxelwise_failed" not in written:
        return EXIT_OK
    print(f"voxel-wise analysis failed: {written['voxelwise_failed']} (the ROI statistics and the "
          "report were written; see group/skipped.parquet and the log)", file=sys.stderr)
    return EXIT_ANALYSIS_FAILED


def _cmd_serve(args) -> int:
    cfg = _load_config(args.config)
    design = _load_design(args.design)
    _check_locations(args)
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
                           n_sites=args.sites, voxel_size_mm=tuple(args.voxel_size),
                           air_cavities=not args.no_air_cavities, **kw)
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
    with RunLog(deriv, "demo") as log:
        print(f"log: {log.path}", file=sys.stderr)
        try:
            _start_api(args)
            res = run_participant(bids, deriv, work_dir=args.work_dir, tables_url=args.tables_url,
                                  keep_work=args.keep_work)
            written = run_group(bids, deriv, n_perm=args.n_perm, tables_url=args.tables_url)
        except KeyboardInterrupt as e:
            return _interrupted(args, e)
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
    return _voxelwise_status(written)


def _interrupted(args, exc: KeyboardInterrupt) -> int:
    """Ctrl-C or SIGTERM: remove half-written work stores (unless --keep-work), one line, 130/143."""
    from .workflows import active as active_work
    terminated = isinstance(exc, Terminated)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the cleanup below is not interrupted again
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    removed = [] if getattr(args, "keep_work", False) else active_work.remove_active()
    what = "terminated (SIGTERM)" if terminated else "interrupted"
    extra = f"; removed {len(removed)} unfinished work store(s)" if removed else ""
    print(f"qsmdask: {what}{extra}; rerun the same command to resume", file=sys.stderr)
    return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.debug, args.verbose or 0)
    previous = signal.signal(signal.SIGTERM, _on_sigterm), signal.getsignal(signal.SIGINT)
    try:
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "simulate":
            return _cmd_simulate(args)
        if args.command == "serve":
            return _cmd_serve(args)
        return _cmd_demo(args)
    except KeyboardInterrupt as e:
        return _interrupted(args, e)
    except Exception as e:  # one clear line; the traceback only with --debug
        if _terminated_inside(e):
            return _interrupted(args, Terminated())
        if args.debug:
            raise
        print(f"qsmdask: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        root = logging.getLogger()
        for h in [h for h in root.handlers if getattr(h, "_qsmdask", False)]:
            root.removeHandler(h)  # main() may run again in this process (tests, notebooks)
        try:
            signal.signal(signal.SIGTERM, previous[0])
            signal.signal(signal.SIGINT, previous[1])
        except (ValueError, TypeError):  # pragma: no cover - not the main thread / no handler
            pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""CLI: argument validation and one-line errors (no Prefect server needed for these)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qsmdask.cli import EXIT_ERROR, EXIT_USAGE, main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "qsmdask.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def test_help_lists_commands():
    r = run_cli("--help")
    assert r.returncode == 0
    for cmd in ("run", "simulate", "demo"):
        assert cmd in r.stdout
    r = run_cli("run", "--help")
    assert "participant" in r.stdout and "--participant-label" in r.stdout and "--scheduler-address" in r.stdout


def test_missing_bids_dir_is_usage_error(tmp_path):
    r = run_cli("run", tmp_path / "nope", tmp_path / "out", "participant")
    assert r.returncode == EXIT_USAGE
    assert "folder not found" in r.stderr


def test_bad_analysis_level(tmp_path):
    r = run_cli("run", tmp_path, tmp_path / "out", "everything")
    assert r.returncode == EXIT_USAGE and "invalid choice" in r.stderr


def test_participant_label_with_path_separator(tmp_path):
    r = run_cli("run", tmp_path, tmp_path / "out", "participant", "--participant-label", "../etc")
    assert r.returncode == EXIT_USAGE and "invalid participant label" in r.stderr


def test_bad_config_key_is_one_line_error(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"registrashun": "affine"}))
    rc = main(["run", str(tmp_path), str(tmp_path / "out"), "participant", "--config", str(cfg)])
    err = capsys.readouterr().err
    assert rc == EXIT_ERROR
    assert err.startswith("qsmdask: error:") and "registrashun" in err and "Traceback" not in err


def test_bad_chain_option_rejected_before_work(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"chain": {"inversion_method": "magic"}}))
    rc = main(["run", str(tmp_path), str(tmp_path / "out"), "participant", "--config", str(cfg)])
    assert rc == EXIT_ERROR and "magic" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_config_is_not_executed(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("!!python/object/apply:os.system ['touch pwned']\n")
    rc = main(["run", str(tmp_path), str(tmp_path / "out"), "participant", "--config", str(cfg)])
    assert rc == EXIT_ERROR
    assert not (tmp_path / "pwned").exists()


def test_debug_shows_traceback(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text("{not json")
    r = run_cli("--debug", "run", tmp_path, tmp_path / "out", "participant", "--config", cfg)
    assert r.returncode != 0 and "Traceback" in r.stderr


# -- BIDS-App conventions (issue 16) ----------------------------------------------------------
from qsmdask.cli import build_parser  # noqa: E402


def test_bids_app_argument_spellings():
    p = build_parser()
    a = p.parse_args(["run", "/tmp", "/tmp/o", "participant", "--participant_label", "sub-01", "02",
                      "--session_label", "ses-pre", "--nprocs", "3", "--mem", "16GB", "--work-dir", "/w"])
    assert a.participant_label == ["01", "02"] and a.session_label == ["pre"]
    assert a.n_workers == 3 and a.mem == "16GB" and a.work_dir == "/w"
    # the hyphen forms stay as aliases, --nthreads is fMRIPrep's other name
    a = p.parse_args(["run", "/tmp", "/tmp/o", "participant", "--participant-label", "01", "--nthreads", "4"])
    assert a.participant_label == ["01"] and a.n_workers == 4


def test_debug_and_verbose_after_the_subcommand():
    p = build_parser()
    a = p.parse_args(["run", "/tmp", "/tmp/o", "group", "--debug", "-vv"])
    assert a.debug is True and a.verbose == 2
    a = p.parse_args(["--debug", "-v", "run", "/tmp", "/tmp/o", "group"])
    assert a.debug is True and a.verbose == 1
    a = p.parse_args(["run", "/tmp", "/tmp/o", "group"])
    assert a.debug is False and a.verbose == 0


@pytest.mark.parametrize("bad, message", [(["--n-perm", "-5"], "--n-perm: must be >= 0"),
                                          (["--nprocs", "0"], "must be >= 1"),
                                          (["--mem", "lots"], "not a memory size"),
                                          (["--prefect-port", "70000"], "not a TCP port"),
                                          (["--dashboard-address", "localhost"], "HOST:PORT")])
def test_invalid_numbers_rejected_by_argparse(tmp_path, bad, message):
    r = run_cli("run", tmp_path, tmp_path / "out", "group", *bad)
    assert r.returncode == EXIT_USAGE and message in r.stderr
    assert not (tmp_path / "out").exists()


def test_help_shows_defaults_and_exit_codes():
    r = run_cli("run", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())  # independent of the terminal width
    assert "(default: 1000)" in text and "(default: 2)" in text and "(default: 127.0.0.1:0)" in text
    for code in ("130 interrupted", "143 terminated", "3 finished, but some subject-sessions failed"):
        assert code in text
    assert "--participant_label" in text and "--session_label" in text and "(default: None)" not in text


def test_config_typo_names_file_and_likely_key(tmp_path, capsys):
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text("atlass: aal\n")
    rc = main(["run", str(tmp_path), str(tmp_path / "out"), "participant", "--config", str(cfg)])
    err = capsys.readouterr().err
    assert rc == EXIT_ERROR and str(cfg) in err and "'atlass' (did you mean 'atlas'?)" in err
    design = tmp_path / "design.json"
    design.write_text(json.dumps({"covariate": ["age"]}))
    rc = main(["run", str(tmp_path), str(tmp_path / "out"), "group", "--design", str(design)])
    err = capsys.readouterr().err
    assert rc == EXIT_ERROR and str(design) in err and "did you mean 'covariates'?" in err


def test_mem_is_shared_by_the_workers(monkeypatch):
    from qsmdask.cli import _cluster_env
    for k in ("QSMDASK_WORKER_MEMORY", "QSMDASK_N_WORKERS", "QSMDASK_DASHBOARD_ADDRESS", "QSMDASK_CLUSTER"):
        monkeypatch.delenv(k, raising=False)
    a = build_parser().parse_args(["run", "/tmp", "/tmp/o", "participant", "--nprocs", "4", "--mem", "16GB"])
    _cluster_env(a)
    import os
    assert os.environ["QSMDASK_WORKER_MEMORY"] == str(4_000_000_000)
    assert os.environ["QSMDASK_N_WORKERS"] == "4" and os.environ["QSMDASK_DASHBOARD_ADDRESS"] == "127.0.0.1:0"


def test_session_label_selects_sessions(tiny_bids, tmp_path):
    from qsmdask.config import PipelineConfig
    from qsmdask.workflows.cohort import plan_participants
    plan = plan_participants(tiny_bids, tmp_path / "out", PipelineConfig(), session_labels=["ses-pre"])
    assert sorted(ss.key for ss, _ in plan.todo) == ["sub-01_ses-pre", "sub-02_ses-pre"]
    with pytest.raises(ValueError, match=r"ses-post not found; sessions present: ses-pre"):
        plan_participants(tiny_bids, tmp_path / "out", PipelineConfig(), session_labels=["post"])


def test_console_keeps_flow_errors_to_one_line():
    """Prefect's own report of a failed or interrupted flow (with its traceback) stays off the
    console: the CLI prints one line, the log file and the Prefect UI keep the report."""
    import logging

    from qsmdask.cli import _NotOnConsole, _QuietShutdown

    def rec(name, level, msg):
        return logging.LogRecord(name, level, __file__, 1, msg, None, None)

    f = _NotOnConsole()
    assert not f.filter(rec("prefect.flow_runs", logging.ERROR, "Encountered exception during execution: ValueError(...)"))
    assert not f.filter(rec("prefect.flow_runs", logging.ERROR, "Finished in state Failed('Flow run encountered an exception.')"))
    assert not f.filter(rec("prefect.flow_runs", logging.ERROR, "Crash detected! Execution was aborted by a termination signal."))
    assert f.filter(rec("prefect.flow_runs", logging.ERROR, "sub-03 failed at ingest: file truncated"))
    assert f.filter(rec("qsmdask", logging.ERROR, "Finished in state Failed"))
    noise = rec("distributed.nanny", logging.WARNING, "Worker process still alive after 4.0 seconds, killing")
    assert not _QuietShutdown().filter(noise) and noise.levelno == logging.DEBUG
    assert _QuietShutdown().filter(rec("distributed.nanny", logging.WARNING, "Restarting worker"))


def test_prefect_termination_wrapped_in_another_error_is_a_termination():
    """SIGTERM landing inside pydantic serialisation reaches the CLI as
    "Error calling function `_ser_model`: TerminationSignal": exit 143, not 1."""
    from prefect.exceptions import TerminationSignal

    from qsmdask.cli import _terminated_inside
    assert _terminated_inside(RuntimeError("Error calling function `_ser_model`: TerminationSignal: "))
    try:
        try:
            raise TerminationSignal(signal=15)
        except TerminationSignal as inner:
            raise ValueError("serialisation failed") from inner
    except ValueError as outer:
        assert _terminated_inside(outer)
    assert not _terminated_inside(ValueError("sub-01: phase file truncated"))

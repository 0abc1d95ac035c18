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

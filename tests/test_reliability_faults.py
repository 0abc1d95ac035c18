"""Fault injection on the real CLI + Prefect + Dask stack: a Dask worker killed mid-reconstruction,
the whole run SIGKILLed mid-cohort then resumed, bad subjects among good ones, secrets kept out of
logs. Nothing may be lost or duplicated: ROI rows are counted against an uninterrupted run.

The scenario helpers here are also used by ``bench/reliability.py`` (docs/reliability.md).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
SECRET = "secret-value-7f3a9c"  # PREFECT_API_KEY during the runs; must never be written anywhere
N_SUBJECTS = 4
KEY_COLUMNS = ("participant_id", "session_id", "atlas", "roi", "hemisphere", "level", "label", "name",
               "measure")
_COUNTS = re.compile(r"participant level: (\d+) done, (\d+) up to date, (\d+) failed")


# ---------------------------------------------------------------------------------------------- helpers
def make_cohort(root: Path, n_subjects: int = N_SUBJECTS) -> Path:
    """The tiny simulated cohort of the end-to-end tests (4 mm voxels, no T1w)."""
    from qsmdask.sim import simulate_cohort
    simulate_cohort(root, n_subjects=n_subjects, seed=7, n_sessions=1, voxel_size_mm=(4.0, 4.0, 4.0), t1w=False)
    return root


def snapshot_code(dest: Path) -> Path:
    """Copy of the working tree's code (qsmdask/, flows/) that every run of a scenario set uses.

    The checkout is shared and edited while the scenarios run; comparing a faulted run with a
    reference run is only meaningful when both run the same code.
    """
    for pkg in ("qsmdask", "flows"):
        shutil.copytree(REPO / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


CODE = [REPO]  # where the CLI's code comes from (set to a snapshot by the fixtures and the bench)


def cli_env(api_url: str) -> dict:
    env = os.environ.copy()
    env.update({"PREFECT_API_URL": api_url, "PREFECT_API_KEY": SECRET, "PYTHONUNBUFFERED": "1",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                # ANTs registration is reproducible run to run only with one ITK thread
                # (qsmdask.registration docs); without it two uninterrupted runs differ.
                "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1"})
    env["PYTHONPATH"] = str(CODE[0]) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def cli_cmd(bids: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "qsmdask.cli", "run", str(bids), str(out), "participant",
            "--n-workers", "2", *extra]


def start_cli(bids, out, api_url, *extra) -> subprocess.Popen:
    """The CLI as its own process group (so a SIGKILL can take the whole run down)."""
    return subprocess.Popen(cli_cmd(bids, out, *extra), cwd=CODE[0], env=cli_env(api_url), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def finish(p: subprocess.Popen, timeout_s: float = 600) -> tuple[int, str, str]:
    try:
        so, se = p.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_group(p)
        so, se = p.communicate()
    return p.returncode, so, se


def run_cli(bids, out, api_url, *extra, timeout_s: float = 600) -> dict:
    t0 = time.monotonic()
    rc, so, se = finish(start_cli(bids, out, api_url, *extra), timeout_s)
    return {"rc": rc, "stdout": so, "stderr": se, "seconds": time.monotonic() - t0, "counts": counts(so)}


def kill_group(p: subprocess.Popen) -> None:
    """SIGKILL the CLI and every process of its group (Dask nannies and workers)."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def counts(stdout: str) -> tuple[int, int, int] | None:
    """(done, up to date, failed) from the CLI's summary line."""
    m = _COUNTS.search(stdout)
    return tuple(int(x) for x in m.groups()) if m else None


def worker_pids(pid: int) -> list[int]:
    """Dask worker processes (multiprocessing spawn children) below the CLI process."""
    import psutil
    out = []
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return out
    for k in kids:
        try:
            if "spawn_main" in " ".join(k.cmdline()):
                out.append(k.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def wait_for(cond, timeout_s: float, poll_s: float = 0.2, proc: subprocess.Popen | None = None):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        v = cond()
        if v:
            return v
        if proc is not None and proc.poll() is not None:
            return None
        time.sleep(poll_s)
    return None


def manifests(out: Path) -> list[Path]:
    return sorted((out / "logs" / "manifests").glob("*.json")) if (out / "logs" / "manifests").exists() else []


def done_manifests(out: Path) -> list[str]:
    """Subject-sessions whose manifest says done and whose files are intact."""
    from qsmdask.io.derivatives import DerivativesWriter
    w = DerivativesWriter(out)
    keys = []
    for m in manifests(out):
        try:
            man = json.loads(m.read_text())
        except (OSError, ValueError):
            continue
        if man.get("status") == "done" and w.manifest_intact(man):
            keys.append(m.stem)
    return keys


def roi_table(out: Path) -> pd.DataFrame:
    """All ROI rows, QC timing columns dropped, sorted by the row key."""
    from qsmdask.io.tables import read_parquet_folder
    df = read_parquet_folder(out / "roi")
    df = df[[c for c in df.columns if not c.startswith("qc_")]]
    keys = [c for c in KEY_COLUMNS if c in df.columns]
    return df.sort_values(keys, kind="mergesort").reset_index(drop=True)


def row_diff(reference: pd.DataFrame, observed: pd.DataFrame, *, reported: set[str] = frozenset()) -> dict:
    """Rows lost (in the reference, absent from ``observed``, subject not reported as failed)
    and rows duplicated (key seen more than once in ``observed``)."""
    keys = [c for c in KEY_COLUMNS if c in reference.columns]
    ref = reference[~reference["participant_id"].isin(reported)]
    ref_keys = set(map(tuple, ref[keys].astype(str).to_numpy()))
    obs_keys = list(map(tuple, observed[keys].astype(str).to_numpy())) if len(observed) else []
    lost = len(ref_keys - set(obs_keys))
    dup = len(obs_keys) - len(set(obs_keys))
    return {"lost": lost, "duplicated": dup}


def tables_equal(a: pd.DataFrame, b: pd.DataFrame, *, rtol=1e-5, atol=1e-7) -> tuple[bool, str]:
    """Same rows, same columns, numbers equal within ``rtol``/``atol``."""
    if list(a.columns) != list(b.columns):
        return False, f"columns differ: {sorted(set(a.columns) ^ set(b.columns))}"
    if len(a) != len(b):
        return False, f"{len(a)} vs {len(b)} rows"
    worst = 0.0
    for c in a.columns:
        if pd.api.types.is_numeric_dtype(a[c]) and pd.api.types.is_numeric_dtype(b[c]):
            x, y = a[c].to_numpy(float), b[c].to_numpy(float)
            if not np.allclose(x, y, rtol=rtol, atol=atol, equal_nan=True):
                return False, f"column {c} differs (max |d| {np.nanmax(np.abs(x - y)):.3g})"
            d = np.abs(x - y)
            worst = max(worst, float(np.nanmax(d)) if d.size and not np.all(np.isnan(d)) else 0.0)
        elif not (a[c].astype(str).to_numpy() == b[c].astype(str).to_numpy()).all():
            return False, f"column {c} differs"
    return True, f"max |difference| {worst:.3g}"


def _digest(path: Path) -> str:
    import hashlib
    return hashlib.sha256(path.read_bytes()).hexdigest()


def native_chi_digests(out: Path) -> dict[str, str]:
    """SHA-256 of each subject-session's native-space Chimap (a deterministic stage's output)."""
    return {p.name: _digest(p) for p in sorted(out.glob("sub-*/**/anat/*_Chimap.nii.gz"))
            if "_space-" not in p.name}


def roi_file_digests(out: Path) -> dict[str, str]:
    return {p.name: _digest(p) for p in sorted((out / "roi").glob("*.parquet"))} if (out / "roi").exists() else {}


def stray_temp_files(out: Path) -> list[str]:
    """Temporary files of interrupted atomic writes still lying in the output (not work/)."""
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*.tmp")
                  if p.is_file() and "work" not in p.relative_to(out).parts)


def secret_leaks(out: Path, *texts: str) -> list[str]:
    leaks = [f"output text {i}" for i, t in enumerate(texts) if SECRET in t]
    for p in out.rglob("*"):
        if p.is_file() and SECRET.encode() in p.read_bytes():
            leaks.append(p.relative_to(out).as_posix())
    return leaks


def failures(out: Path) -> pd.DataFrame:
    p = out / "failures.parquet"
    return pd.read_parquet(p) if p.exists() else pd.DataFrame(columns=["participant_id"])


# ---------------------------------------------------------------------------------------------- scenarios
def scenario_baseline(bids: Path, out: Path, api_url: str) -> dict:
    r = run_cli(bids, out, api_url)
    r["roi"] = roi_table(out) if r["rc"] == 0 else None
    r["leaks"] = secret_leaks(out, r["stdout"], r["stderr"])
    return r


def scenario_worker_kill(bids: Path, out: Path, api_url: str, reference: pd.DataFrame,
                         reference_out: Path) -> dict:
    """Kill one Dask worker process (SIGKILL) once a subject's volumes are ingested."""
    p = start_cli(bids, out, api_url)
    killed = None
    try:
        ingested = wait_for(lambda: sorted((out / "work").glob("*.zarr/phase_rad")), 300, proc=p)
        pids = wait_for(lambda: worker_pids(p.pid), 60, proc=p) if ingested else None
        if pids:
            time.sleep(0.5)  # into reconstruct
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)
        rc, so, se = finish(p)
    finally:
        if p.poll() is None:
            kill_group(p)
    fails = failures(out)
    reported = set(fails["participant_id"])
    obs = roi_table(out) if (out / "roi").exists() else pd.DataFrame(columns=reference.columns)
    diff = row_diff(reference, obs, reported=reported)
    done = obs[~obs["participant_id"].isin(reported)]
    ref_done = reference[~reference["participant_id"].isin(reported)].reset_index(drop=True)
    same, detail = tables_equal(ref_done, done.reset_index(drop=True))
    ref_chi, chi = native_chi_digests(reference_out), native_chi_digests(out)
    native_equal = bool(chi) and all(chi.get(k) == v for k, v in ref_chi.items()
                                     if k.split("_")[0] not in reported)
    return {"rc": rc, "stdout": so, "stderr": se, "killed_pid": killed, "counts": counts(so),
            "reported": sorted(reported), **diff, "equal": same, "detail": detail,
            "native_equal": native_equal, "leaks": secret_leaks(out, so, se)}


def scenario_sigkill_resume(bids: Path, out: Path, api_url: str, reference: pd.DataFrame,
                            reference_out: Path) -> dict:
    """SIGKILL the whole CLI run after its first manifest, then run again."""
    p = start_cli(bids, out, api_url)
    try:
        first = wait_for(lambda: done_manifests(out), 600, poll_s=0.1, proc=p)
        kill_group(p)
        rc1, so1, se1 = finish(p)
    finally:
        if p.poll() is None:
            kill_group(p)
    time.sleep(1.0)  # let orphaned workers notice and exit
    finished_before = done_manifests(out)
    kept = {k: v for k, v in roi_file_digests(out).items()
            if any(k.startswith(m.replace("_manifest", "") + "_") for m in finished_before)}
    roi_before = roi_table(out) if (out / "roi").exists() and any((out / "roi").glob("*.parquet")) else None
    r = run_cli(bids, out, api_url)
    obs = roi_table(out) if (out / "roi").exists() else pd.DataFrame(columns=reference.columns)
    same, detail = tables_equal(reference, obs)
    after = roi_file_digests(out)
    untouched = bool(kept) and all(after.get(k) == v for k, v in kept.items())
    native_equal = native_chi_digests(out) == native_chi_digests(reference_out)
    return {"untouched": untouched, "native_equal": native_equal, "killed_rc": rc1, "killed_after": first or [], "done_before_resume": finished_before,
            "roi_rows_before_resume": 0 if roi_before is None else len(roi_before),
            "rc": r["rc"], "stdout": r["stdout"], "stderr": r["stderr"], "counts": r["counts"],
            **row_diff(reference, obs), "equal": same, "detail": detail,
            "stray_tmp": stray_temp_files(out), "leaks": secret_leaks(out, so1, se1, r["stdout"], r["stderr"])}


def break_subjects(bids: Path) -> dict[str, str]:
    """Damage two subjects of a cohort in ways found only when their images are read."""
    from qsmdask.io.nifti import load_nifti, save_nifti
    zero = bids / "sub-02/anat/sub-02_echo-1_part-mag_MEGRE.nii.gz"
    data, aff, _ = load_nifti(zero)
    save_nifti(zero, np.zeros_like(data), aff)
    shifted = bids / "sub-03/anat/sub-03_echo-2_part-phase_MEGRE.nii.gz"
    data, aff, _ = load_nifti(shifted)
    aff = aff.copy()
    aff[0, 3] += 8.0
    save_nifti(shifted, data, aff)
    return {"sub-02": zero.name, "sub-03": shifted.name}


def scenario_bad_subjects(bids: Path, out: Path, api_url: str) -> dict:
    broken = break_subjects(bids)
    r = run_cli(bids, out, api_url)
    fails = failures(out)
    obs = roi_table(out) if (out / "roi").exists() else pd.DataFrame(columns=["participant_id"])
    return {**r, "broken": broken, "failures": fails, "roi_subjects": sorted(obs["participant_id"].unique()),
            "duplicated": row_diff(obs, obs)["duplicated"], "leaks": secret_leaks(out, r["stdout"], r["stderr"])}


def remove_echo_time(bids: Path, sub: str = "sub-02") -> Path:
    for side in sorted((bids / sub / "anat").glob("*_MEGRE.json")):
        meta = json.loads(side.read_text())
        meta.pop("EchoTime", None)
        side.write_text(json.dumps(meta))
    return side


# ---------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    CODE[0] = snapshot_code(tmp_path_factory.mktemp("rel_code"))
    yield make_cohort(tmp_path_factory.mktemp("rel") / "bids")
    CODE[0] = REPO


@pytest.fixture(scope="module")
def baseline(cohort, prefect_api, tmp_path_factory):
    out = tmp_path_factory.mktemp("rel_base") / "out"
    r = scenario_baseline(cohort, out, prefect_api.url)
    r["out"] = out
    assert r["rc"] == 0, r["stderr"][-3000:]
    assert r["counts"] == (N_SUBJECTS, 0, 0)
    return r


@pytest.mark.slow
def test_baseline_run_leaks_no_secret(baseline):
    assert baseline["leaks"] == []
    assert set(baseline["roi"]["participant_id"]) == {f"sub-0{i}" for i in range(1, N_SUBJECTS + 1)}
    assert row_diff(baseline["roi"], baseline["roi"])["duplicated"] == 0


@pytest.mark.slow
def test_worker_killed_mid_reconstruction(cohort, baseline, prefect_api, tmp_path):
    r = scenario_worker_kill(cohort, tmp_path / "out", prefect_api.url, baseline["roi"], baseline["out"])
    assert r["killed_pid"] is not None, "no worker was killed"
    assert r["rc"] in (0, 3), r["stderr"][-3000:]
    done, _, failed = r["counts"]
    assert done + failed == N_SUBJECTS and len(r["reported"]) == failed
    assert r["lost"] == 0 and r["duplicated"] == 0
    # chi (deterministic) equals the reference run's; ROI values also pass through ANTs
    # registration, which is not reproducible run to run (see docs/reliability.md)
    assert r["native_equal"]
    assert r["leaks"] == []


@pytest.mark.slow
def test_cli_sigkilled_then_resumed(cohort, baseline, prefect_api, tmp_path):
    r = scenario_sigkill_resume(cohort, tmp_path / "out", prefect_api.url, baseline["roi"], baseline["out"])
    assert r["killed_rc"] == -signal.SIGKILL
    assert r["killed_after"], "the run ended before any manifest was written"
    n_before = len(r["done_before_resume"])
    assert 1 <= n_before
    assert r["rc"] == 0, r["stderr"][-3000:]
    # only the missing work is redone
    assert r["counts"] == (N_SUBJECTS - n_before, n_before, 0)
    assert r["lost"] == 0 and r["duplicated"] == 0
    assert r["untouched"]  # subject-sessions finished before the kill were not rewritten
    assert r["native_equal"]  # recomputed chi equals the uninterrupted run's
    assert r["leaks"] == []


@pytest.mark.slow
def test_bad_subjects_fail_alone(cohort, prefect_api, tmp_path):
    bids = tmp_path / "bids"
    shutil.copytree(cohort, bids)
    r = scenario_bad_subjects(bids, tmp_path / "out", prefect_api.url)
    assert r["rc"] == 3, r["stderr"][-3000:]
    assert r["counts"] == (N_SUBJECTS - 2, 0, 2)
    f = r["failures"].set_index("participant_id")
    assert sorted(f.index) == ["sub-02", "sub-03"]
    for sub, fname in r["broken"].items():
        assert f.loc[sub, "stage"] == "ingest" and f.loc[sub, "file"].endswith(fname)
        assert f.loc[sub, "error_type"] == "InputError"
        assert sub in r["stderr"]
    assert "all zero" in f.loc["sub-02", "message"] and "affine differs" in f.loc["sub-03", "message"]
    assert r["roi_subjects"] == ["sub-01", "sub-04"] and r["duplicated"] == 0
    assert r["leaks"] == []


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["missing EchoTime", "unparseable name"])
def test_discovery_fault_in_one_subject_fails_alone(cohort, prefect_api, tmp_path, fault):
    bids = tmp_path / "bids"
    shutil.copytree(cohort, bids, ignore=shutil.ignore_patterns("sub-03", "sub-04"))
    if fault == "missing EchoTime":
        remove_echo_time(bids, "sub-02")
    else:
        src = bids / "sub-02/anat/sub-02_echo-1_part-mag_MEGRE.nii.gz"
        shutil.copy(src, src.with_name("sub-02_echo-1_part-mag_MEGRE_copy.nii.gz"))
    r = run_cli(bids, tmp_path / "out", prefect_api.url)
    assert r["rc"] == 3 and r["counts"] == (1, 0, 1)
    f = failures(tmp_path / "out")
    assert list(f["participant_id"]) == ["sub-02"] and "sub-02" in f["file"].iloc[0]
    assert f["stage"].iloc[0] == "discover" and f["error_type"].iloc[0] == "InputError"

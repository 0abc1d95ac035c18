"""Signals and local services of the CLI (issue 16): SIGTERM handled like Ctrl-C, a Prefect
server started by a command dies with it (even on SIGKILL), the Dask dashboard is local to
the machine, and only a Prefect server this user kept running is ever reused.

The subprocess tests start real Prefect servers and a real Dask cluster.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from qsmdask.orchestration import server as srv
from qsmdask.orchestration.server import _free_port, api_healthy

REPO = Path(__file__).resolve().parents[1]

HEALTH_SERVER = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"true")
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def _env(**extra):
    env = os.environ.copy()
    env.pop("PREFECT_API_URL", None)
    env.update({"PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", ""), "PYTHONUNBUFFERED": "1",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **extra})
    return env


def _listening(port: int) -> bool:
    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port
               for c in psutil.net_connections(kind="tcp"))


def _wait_gone(port: int, pids: list[int], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive and not _listening(port):
            return True
        time.sleep(0.25)
    return False


@pytest.fixture
def health_server():
    """Something that answers /health like a Prefect server: another user's, as far as we know."""
    port = _free_port()
    p = subprocess.Popen([sys.executable, "-c", HEALTH_SERVER, str(port)])
    deadline = time.monotonic() + 20
    while not api_healthy(f"http://127.0.0.1:{port}/api") and time.monotonic() < deadline:
        time.sleep(0.1)
    yield p, port
    p.kill()
    p.wait()


class _WouldStart(Exception):
    pass


@pytest.fixture
def no_start(monkeypatch):
    """Record the command ensure_prefect_api would start instead of starting it."""
    started = []

    def fake_popen(cmd, **kw):
        started.append(cmd)
        raise _WouldStart()

    monkeypatch.setattr(srv.subprocess, "Popen", fake_popen)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    return started


# -- security: which Prefect server is used --------------------------------------------------------
def test_foreign_server_on_the_port_is_not_reused(health_server, no_start, tmp_path):
    _, port = health_server
    with pytest.raises(_WouldStart):
        srv.ensure_prefect_api(port=port, home=tmp_path)
    cmd = no_start[0]
    new_port = int(cmd[cmd.index("--port") + 1])
    assert new_port != port  # a server of our own, on a free port
    assert "qsmdask.orchestration.watchdog" in cmd  # dies with this process
    assert "PREFECT_API_URL" not in os.environ


def _record(home: Path, proc: subprocess.Popen, port: int, **override):
    rec = {"pid": proc.pid, "create_time": psutil.Process(proc.pid).create_time(), "port": port,
           "url": f"http://127.0.0.1:{port}/api", "uid": os.getuid(), **override}
    path = home / srv.RECORD_NAME
    path.write_text(json.dumps(rec))
    return path


def test_kept_server_of_this_user_is_reused(health_server, no_start, tmp_path, monkeypatch):
    proc, port = health_server
    _record(tmp_path, proc, port)
    api = srv.ensure_prefect_api(home=tmp_path)
    assert api.reused and api.url == f"http://127.0.0.1:{port}/api" and not no_start
    assert os.environ["PREFECT_API_URL"] == api.url
    monkeypatch.delenv("PREFECT_API_URL")


@pytest.mark.parametrize("tamper", ["recycled_pid", "wrong_port", "other_owner"])
def test_record_that_does_not_match_is_not_reused(health_server, no_start, tmp_path, tamper):
    proc, port = health_server
    if tamper == "recycled_pid":
        path = _record(tmp_path, proc, port, create_time=123.0)
    elif tamper == "wrong_port":  # the recorded process is not the one listening on the port
        other = _free_port()
        path = _record(tmp_path, proc, other, url=f"http://127.0.0.1:{port}/api")
    else:
        if os.getuid() != 0:
            pytest.skip("changing a file's owner needs root")
        path = _record(tmp_path, proc, port)
        os.chown(path, 54321, -1)
    with pytest.raises(_WouldStart):
        srv.ensure_prefect_api(home=tmp_path)
    assert path.exists()


def test_dask_dashboard_binds_localhost_by_default(monkeypatch):
    from distributed import LocalCluster

    from qsmdask.orchestration.cluster import ClusterConfig, task_runner_kwargs

    monkeypatch.delenv("QSMDASK_DASHBOARD_ADDRESS", raising=False)
    cfg = ClusterConfig.from_env({"QSMDASK_N_WORKERS": "1"})
    kw = task_runner_kwargs(cfg)["cluster_kwargs"]
    assert kw["dashboard_address"] == "127.0.0.1:0"
    kw.update(processes=False, n_workers=1)  # in-process workers: the sockets are this process's
    for k in ("memory_limit", "env"):  # nanny-only options
        kw.pop(k, None)
    with LocalCluster(**kw) as cluster:
        port = int(cluster.dashboard_link.split(":")[2].split("/")[0])
        addrs = {c.laddr.ip for c in psutil.Process().net_connections(kind="tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
    assert addrs == {"127.0.0.1"}
    # configurable, e.g. for a cluster node whose dashboard is reached through a tunnel
    assert ClusterConfig.from_env({"QSMDASK_DASHBOARD_ADDRESS": "0.0.0.0:8787"}).dashboard_address == "0.0.0.0:8787"
    with pytest.raises(ValueError, match="HOST:PORT"):
        ClusterConfig(dashboard_address="8787")


# -- the server dies with the command ----------------------------------------------------------------
STARTER = """
import sys, time
from pathlib import Path
from qsmdask.orchestration.server import ensure_prefect_api
api = ensure_prefect_api(port=int(sys.argv[1]), home=Path(sys.argv[2]), timeout_s=240)
print(api.url, api.process.pid, flush=True)
time.sleep(600)
"""


def test_server_dies_when_the_command_is_sigkilled(tmp_path):
    port = _free_port()
    p = subprocess.Popen([sys.executable, "-c", STARTER, str(port), str(tmp_path / "home")], env=_env(),
                         stdout=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline().split()
        assert line, "the server did not start"
        url, watchdog = line[0], int(line[1])
        assert api_healthy(url)
        tree = [watchdog] + [c.pid for c in psutil.Process(watchdog).children(recursive=True)]
        assert len(tree) >= 2  # the watchdog and the server
        p.kill()  # SIGKILL: no atexit, no handler runs in the command
        p.wait()
        assert _wait_gone(port, tree, timeout_s=20), "the Prefect server outlived the SIGKILLed command"
    finally:
        p.kill()


# -- SIGTERM mid-run ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sim_cohort(tmp_path_factory):
    from qsmdask.sim import simulate_cohort
    root = tmp_path_factory.mktemp("sigterm") / "bids"
    simulate_cohort(root, n_subjects=2, seed=3, n_sessions=1, voxel_size_mm=(4.0, 4.0, 4.0), t1w=False)
    return root


@pytest.mark.slow  # ~2.5 min on a loaded 2-core machine (a Prefect server and a Dask cluster start)
def test_sigterm_mid_run_cleans_up_and_exits_143(sim_cohort, tmp_path):
    out = tmp_path / "out"
    port = _free_port()
    cmd = [sys.executable, "-m", "qsmdask.cli", "run", str(sim_cohort), str(out), "participant",
           "--nprocs", "1", "--prefect-port", str(port)]
    # PREFECT_LOGGING_LEVEL as a user has it (the CLI's INFO default; conftest sets WARNING)
    p = subprocess.Popen(cmd, env=_env(QSMDASK_PREFECT_HOME=str(tmp_path / "home"), PREFECT_LOGGING_LEVEL="INFO"),
                         text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(p.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240
        while not any("stages:" in x for x in lines) and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert any("stages:" in x for x in lines), "".join(lines)
        tree = [c.pid for c in psutil.Process(p.pid).children(recursive=True)]
        time.sleep(1.0)  # the first stage is running
        n_before = len(lines)
        p.send_signal(signal.SIGTERM)
        rc = p.wait(timeout=120)
        reader.join(timeout=10)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    after = lines[n_before:]
    assert rc == 143, "".join(lines)
    assert len(after) == 1 and after[0].startswith("qsmdask: terminated (SIGTERM)"), "".join(after)
    assert _wait_gone(port, tree, timeout_s=20), "processes of the run are still alive"
    assert not api_healthy(f"http://127.0.0.1:{port}/api")
    assert not list((out / "work").glob("*.zarr")), "unfinished work stores were left behind"
    logs = list((out / "logs").glob("qsmdask_participant_*.log"))
    log_text = logs[0].read_text() if len(logs) == 1 else ""
    assert "terminated (SIGTERM)" in log_text and "stages:" in log_text  # the console's lines
    assert "INFO prefect.flow_runs" in log_text  # and the INFO logs the console does not show

"""One Prefect API for the flow and every Dask worker.

Prefect's ephemeral mode starts a temporary API server in each process that has no
``PREFECT_API_URL``; with Dask worker processes that means one server per worker on one
SQLite file (slow, ``database is locked``). :func:`ensure_prefect_api` therefore uses the API
named by ``PREFECT_API_URL``, or a qsmdask server that *this user* started earlier with
``--keep-server`` (recorded in the user's qsmdask Prefect home), or starts one
(``prefect server start`` on 127.0.0.1) and exports its URL *before* Prefect is imported and
before any Dask worker is spawned, so that all of them talk to the same API.

A server is never reused just because something answers ``/health`` on a port: on a shared
node that could be another user's server, which would then receive this run's flow
parameters and logs. A server started for one command runs under a watchdog
(:mod:`qsmdask.orchestration.watchdog`) and dies with the command, even when the command
is killed with SIGKILL.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PrefectAPI", "ensure_prefect_api", "api_healthy", "default_prefect_home", "RECORD_NAME"]

DEFAULT_PORT = 4200
RECORD_NAME = "qsmdask-server.json"  # the kept server of this user, in the Prefect home


@dataclass
class PrefectAPI:
    url: str
    ui_url: str
    process: subprocess.Popen | None = None  # set when this process started the server
    log_path: Path | None = None
    kept: bool = False  # started here with --keep-server: outlives the command
    reused: bool = False  # a kept server of this user, started by an earlier command
    pid: int | None = None  # the kept server's process (reused)

    @property
    def started_here(self) -> bool:
        return self.process is not None

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop a server started here (its whole process group: watchdog, server, workers)."""
        p = self.process
        if p is None or p.poll() is not None:
            return
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=timeout_s)


def default_prefect_home() -> Path:
    """``QSMDASK_PREFECT_HOME``, else ``~/.qsmdask/prefect`` (per user)."""
    return Path(os.environ.get("QSMDASK_PREFECT_HOME", Path.home() / ".qsmdask" / "prefect"))


def api_healthy(api_url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(api_url.rstrip("/") + "/health", timeout=timeout_s) as r:
            return r.status == 200 and json.loads(r.read().decode() or "true") is not False
    except (OSError, ValueError):
        return False


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the record of a kept server ------------------------------------------------------------
def _record_path(home: Path) -> Path:
    return Path(home) / RECORD_NAME


def _write_record(home: Path, proc: subprocess.Popen, port: int, url: str) -> None:
    import psutil
    rec = {"pid": proc.pid, "create_time": psutil.Process(proc.pid).create_time(), "port": port,
           "url": url, "uid": os.getuid()}
    path = _record_path(home)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # private to this user
    with os.fdopen(fd, "w") as f:
        json.dump(rec, f)
    os.replace(tmp, path)


def _listening_ports(proc) -> set[int]:
    import psutil
    ports = set()
    for p in [proc, *proc.children(recursive=True)]:
        try:
            conns = p.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        ports.update(c.laddr.port for c in conns if c.status == psutil.CONN_LISTEN)
    return ports


def recorded_server(home: Path) -> dict | None:
    """The kept server recorded in ``home`` when it is still this user's and still serving.

    The record must be a file of this user; its process must exist with the recorded start
    time (not a recycled PID), belong to this user and listen on the recorded port.
    """
    import psutil
    path = _record_path(home)
    try:
        st = path.stat()
        rec = json.loads(path.read_text())
        pid, port, url = int(rec["pid"]), int(rec["port"]), str(rec["url"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if st.st_uid != os.getuid():
        return None
    try:
        proc = psutil.Process(pid)
        if proc.uids().real != os.getuid() or abs(proc.create_time() - float(rec["create_time"])) > 1e-3:
            return None
        if port not in _listening_ports(proc):
            return None
    except (psutil.Error, KeyError, ValueError, TypeError):
        return None
    return {"pid": pid, "port": port, "url": url}


# -- the API ---------------------------------------------------------------------------------
def ensure_prefect_api(*, port: int | None = None, home: Path | None = None, timeout_s: float = 300.0,
                       stop_at_exit: bool = True) -> PrefectAPI:
    """Return a healthy Prefect API and export ``PREFECT_API_URL`` for this process and its children.

    Order: ``PREFECT_API_URL`` from the environment; the server this user kept running
    (``stop_at_exit=False``, the CLI's ``--keep-server``) as recorded in ``home`` (and on
    ``port`` when one is given); else a new ``prefect server start`` on 127.0.0.1:``port``
    (default 4200), or on a free port when that one is taken, with ``PREFECT_HOME`` under
    ``home``. With ``stop_at_exit`` the new server runs under a watchdog and stops when this
    process ends, however it ends; otherwise it is recorded in ``home`` for later commands.
    Raises RuntimeError with the server log's tail when the server does not come up.
    """
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env_url = os.environ.get("PREFECT_API_URL")
    if env_url:
        if not api_healthy(env_url, timeout_s=10):
            raise RuntimeError(f"PREFECT_API_URL={env_url} does not answer /health")
        return PrefectAPI(env_url, env_url.rsplit("/api", 1)[0])
    home = Path(home or default_prefect_home())
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    rec = recorded_server(home)
    if rec and (port is None or int(port) == rec["port"]) and api_healthy(rec["url"]):
        os.environ["PREFECT_API_URL"] = rec["url"]
        return PrefectAPI(rec["url"], rec["url"][: -len("/api")], reused=True, pid=rec["pid"])
    port = int(port or os.environ.get("QSMDASK_PREFECT_PORT", DEFAULT_PORT))
    if not _port_free(port):  # someone else's server (or anything else): never talk to it
        port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    log_path = home / f"server-{port}.log"
    env = dict(os.environ)
    env.update({"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_UI_API_URL": url, "PREFECT_LOGGING_LEVEL": "WARNING"})
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    if stop_at_exit:
        cmd = [sys.executable, "-m", "qsmdask.orchestration.watchdog", "--", *cmd]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    api = PrefectAPI(url, url[: -len("/api")], proc, log_path, kept=not stop_at_exit)
    if stop_at_exit:
        atexit.register(api.stop)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if api_healthy(url):
            os.environ["PREFECT_API_URL"] = url
            if not stop_at_exit:
                _write_record(home, proc, port, url)
            return api
        time.sleep(0.5)
    api.stop()
    tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
    raise RuntimeError(f"Prefect server did not start on {url} within {timeout_s:.0f} s; log {log_path}:\n{tail}")

"""One Prefect API for the flow and every Dask worker.

Prefect's ephemeral mode starts a temporary API server in each process that has no
``PREFECT_API_URL``; with Dask worker processes that means one server per worker on one
SQLite file (slow, ``database is locked``). :func:`ensure_prefect_api` therefore reuses the
API named by ``PREFECT_API_URL``, or a qsmdask server already listening on 127.0.0.1, or
starts one (``prefect server start``) and exports its URL *before* Prefect is imported and
before any Dask worker is spawned, so that all of them talk to the same API.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PrefectAPI", "ensure_prefect_api", "api_healthy", "default_prefect_home"]

DEFAULT_PORT = 4200


@dataclass
class PrefectAPI:
    url: str
    ui_url: str
    process: subprocess.Popen | None = None  # set when this process started the server
    log_path: Path | None = None

    @property
    def started_here(self) -> bool:
        return self.process is not None

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=timeout_s)


def default_prefect_home() -> Path:
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


def ensure_prefect_api(*, port: int | None = None, home: Path | None = None, timeout_s: float = 120.0,
                       stop_at_exit: bool = True) -> PrefectAPI:
    """Return a healthy Prefect API and export ``PREFECT_API_URL`` for this process and its children.

    Order: ``PREFECT_API_URL`` from the environment; a server already answering on
    127.0.0.1:``port`` (default 4200); else a new ``prefect server start`` on that port (or a free
    one when it is taken), with ``PREFECT_HOME`` under ``home``. Raises RuntimeError with the
    server log's tail when the server does not come up.
    """
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env_url = os.environ.get("PREFECT_API_URL")
    if env_url:
        if not api_healthy(env_url, timeout_s=10):
            raise RuntimeError(f"PREFECT_API_URL={env_url} does not answer /health")
        return PrefectAPI(env_url, env_url.rsplit("/api", 1)[0])
    port = int(port or os.environ.get("QSMDASK_PREFECT_PORT", DEFAULT_PORT))
    url = f"http://127.0.0.1:{port}/api"
    if api_healthy(url):
        os.environ["PREFECT_API_URL"] = url
        return PrefectAPI(url, url[: -len("/api")])
    if not _port_free(port):
        port = _free_port()
        url = f"http://127.0.0.1:{port}/api"
    home = Path(home or default_prefect_home())
    home.mkdir(parents=True, exist_ok=True)
    log_path = home / f"server-{port}.log"
    env = dict(os.environ)
    env.update({"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_UI_API_URL": url, "PREFECT_LOGGING_LEVEL": "WARNING"})
    env.pop("PREFECT_API_URL", None)
    log = open(log_path, "ab")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    api = PrefectAPI(url, url[: -len("/api")], proc, log_path)
    if stop_at_exit:
        atexit.register(api.stop)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if api_healthy(url):
            os.environ["PREFECT_API_URL"] = url
            return api
        time.sleep(0.5)
    api.stop()
    tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
    raise RuntimeError(f"Prefect server did not start on {url} within {timeout_s:.0f} s; log {log_path}:\n{tail}")

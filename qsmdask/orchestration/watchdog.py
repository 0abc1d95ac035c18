"""Run a command that must not outlive the process that started it.

    python -m qsmdask.orchestration.watchdog -- CMD [ARG ...]

The watchdog is started by the qsmdask CLI in a session of its own; it starts ``CMD`` (the
local Prefect server) in that session and polls its own parent. When the parent is gone,
even after a SIGKILL that left it no chance to clean up, or when the watchdog receives
SIGTERM/SIGINT, it terminates the whole session (SIGTERM, then SIGKILL after a grace
period) and exits. When ``CMD`` exits by itself, the watchdog exits with its status.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

POLL_S = 0.2
GRACE_S = 10.0


def _kill_group(sig: int) -> None:
    try:
        os.killpg(os.getpgid(0), sig)
    except ProcessLookupError:  # pragma: no cover - the group is this process's own
        pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("usage: python -m qsmdask.orchestration.watchdog -- CMD [ARG ...]", file=sys.stderr)
        return 2
    parent = os.getppid()
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: stop.append(signum))
    child = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    while True:
        rc = child.poll()
        if rc is not None:
            return rc
        if stop or os.getppid() != parent:
            break
        time.sleep(POLL_S)
    # the parent is gone or asked us to stop: the child and everything it started go too
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _kill_group(signal.SIGTERM)
    try:
        child.wait(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _kill_group(signal.SIGKILL)  # stragglers (and this process)
    return 0  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

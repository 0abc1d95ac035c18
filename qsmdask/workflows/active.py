"""Work stores of the subject-sessions this process is computing right now.

The participant flow registers a subject-session's zarr work store when it submits the
chain and releases it when the chain has finished (done or failed; the flow's own policy
decides what happens to it then). When the run is interrupted (Ctrl-C, SIGTERM), the CLI
removes what is still registered, after the Dask cluster has shut down, so that half-written
stores do not stay behind and fill the disk.
"""

from __future__ import annotations

import threading

__all__ = ["register", "release", "active", "remove_active"]

_LOCK = threading.Lock()
_ACTIVE: set[str] = set()


def register(url: str) -> None:
    with _LOCK:
        _ACTIVE.add(str(url))


def release(url: str) -> None:
    with _LOCK:
        _ACTIVE.discard(str(url))


def active() -> list[str]:
    with _LOCK:
        return sorted(_ACTIVE)


def remove_active() -> list[str]:
    """Remove every registered work store (missing ones are fine); return the URLs removed."""
    from ..io import zarrstore

    removed = []
    for url in active():
        try:
            zarrstore.remove_group(url)
        except FileNotFoundError:
            pass
        release(url)
        removed.append(url)
    return removed

"""An exclusive lock on an output folder, so two qsmdask runs never write into it at once."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

__all__ = ["OutputLock", "OutputLockedError"]


class OutputLockedError(RuntimeError):
    pass


class OutputLock:
    """``with OutputLock(output_dir):`` holds ``OUTPUT_DIR/logs/qsmdask.lock`` (fcntl, released on exit or crash).

    Once the lock is held no other run writes to the folder, so the temporary files of
    writes killed in an earlier run are swept then (``swept``: the removed paths).
    """

    def __init__(self, output_dir):
        self.path = Path(output_dir) / "logs" / "qsmdask.lock"
        self._fd = None
        self.swept: list[Path] = []

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OutputLockedError(f"{self.path.parent.parent}: another qsmdask run (pid {holder}) is writing "
                                    "to this output folder; wait for it or use another folder") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        from .nifti import sweep_temp_files
        self.swept = sweep_temp_files(self.path.parent.parent)
        return self

    def __exit__(self, *exc):
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        return False

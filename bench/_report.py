"""Shared helpers for benchmark scripts: machine description and section updates.

Each benchmark owns one section of ``docs/benchmarks.md`` delimited by
``<!-- bench:NAME:start -->`` / ``<!-- bench:NAME:end -->`` and rewrites only that
section (under a file lock, so benchmarks run side by side do not clobber each other).
"""

from __future__ import annotations

import fcntl
import os
import platform
import resource
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = float("nan")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=DOC.parent, check=False).stdout.strip()
    except OSError:
        commit = "?"
    return (f"{cpu}, {os.cpu_count()} cores, {mem_gb:.0f} GiB RAM, {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}, load average at start "
            f"{load:.1f}, commit {commit or '?'}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")


def peak_rss_mb() -> float:
    """Peak resident memory of this process (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def markdown_table(rows: list[dict], columns: list[str] | None = None, floatfmt: str = ".3g") -> str:
    if not rows:
        return "(no rows)\n"
    columns = columns or list(rows[0])

    def fmt(v):
        if isinstance(v, float):
            return format(v, floatfmt)
        return str(v)

    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        out.append("| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(out) + "\n"


def update_section(name: str, body: str) -> None:
    """Replace (or append) the section NAME of docs/benchmarks.md with ``body``."""
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    lock = DOC.with_suffix(".lock")
    with open(lock, "w") as lf:
        fcntl.flock(lf, fcntl.LOCK_EX)
        text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
        block = f"{start}\n{body.rstrip()}\n{end}"
        if start in text and end in text:
            pre, rest = text.split(start, 1)
            _, post = rest.split(end, 1)
            text = pre + block + post
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
        tmp = DOC.with_suffix(".md.tmp")
        tmp.write_text(text)
        os.replace(tmp, DOC)
    try:
        lock.unlink()
    except FileNotFoundError:
        pass


if __name__ == "__main__":  # pragma: no cover
    print(machine_description(), file=sys.stderr)

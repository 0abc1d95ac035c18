"""Parquet tables: one deterministic file per subject-session, atomic writes, unified reads.

Every function takes a local path or an fsspec URL (``file://``, ``memory://``, ``s3://``,
...). Local paths and ``file://`` URLs are written through a temporary file in the same
folder and a rename; object stores get the whole object in one PUT, which is atomic there.
``memory://`` lives in one process only (tests, threads-only clusters).
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from urllib.parse import unquote, urlparse

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .nifti import atomic_write_bytes

__all__ = ["write_parquet", "read_parquet", "read_parquet_folder", "join_url", "local_path",
           "table_exists", "file_digest", "list_tables", "remove_table", "canonical_location"]


def local_path(url) -> Path | None:
    """The local path of ``url`` (a plain path or a ``file://`` URL), else None."""
    if isinstance(url, Path):
        return url
    s = str(url)
    if s.startswith("file://"):
        return Path(unquote(urlparse(s).path))
    if "://" in s:
        return None
    return Path(s)


def join_url(base, *parts: str):
    """``base/part/...``: a Path for local bases (``file://`` resolved), a URL string otherwise."""
    local = local_path(base)
    if local is not None:
        return local.joinpath(*parts)
    return "/".join([str(base).rstrip("/"), *parts])


def _fs(url):
    import fsspec
    return fsspec.core.url_to_fs(str(url))


def write_parquet(df: pd.DataFrame, path, *, metadata: dict[str, str] | None = None) -> Path | str:
    """Write ``df`` to ``path`` (local path or fsspec URL) atomically; returns where it went.

    A local destination returns a :class:`~pathlib.Path`, a remote one its URL string.
    """
    table = pa.Table.from_pandas(df, preserve_index=False)
    if metadata:
        meta = dict(table.schema.metadata or {})
        meta.update({k.encode(): str(v).encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(meta)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    local = local_path(path)
    if local is not None:
        return atomic_write_bytes(local, buf.getvalue())
    fs, p = _fs(path)
    parent = p.rsplit("/", 1)[0]
    if parent and parent != p:
        fs.makedirs(parent, exist_ok=True)
    fs.pipe_file(p, buf.getvalue())
    return str(path)


def read_parquet(path) -> pd.DataFrame:
    """Read one Parquet file from a local path or fsspec URL."""
    local = local_path(path)
    if local is not None:
        return pd.read_parquet(local)
    fs, p = _fs(path)
    with fs.open(p, "rb") as f:
        return pq.read_table(f).to_pandas()


def read_parquet_folder(folder, pattern: str = "*.parquet") -> pd.DataFrame:
    """Read every Parquet file of ``folder`` (path or URL) as one table, unifying schemas."""
    local = local_path(folder)
    if local is not None:
        files = sorted(local.glob(pattern))
        tables = [pq.read_table(f) for f in files]
    else:
        fs, p = _fs(folder)
        files = sorted(fs.glob(f"{p.rstrip('/')}/{pattern}"))
        tables = []
        for f in files:
            with fs.open(f, "rb") as fh:
                tables.append(pq.read_table(fh))
    if not tables:
        return pd.DataFrame()
    tables = [t.replace_schema_metadata(None) for t in tables]
    return pa.concat_tables(tables, promote_options="permissive").to_pandas()


def list_tables(folder, pattern: str = "*.parquet") -> list:
    """The files of ``folder`` (path or URL) matching ``pattern``: Paths, or URL strings."""
    local = local_path(folder)
    if local is not None:
        return sorted(local.glob(pattern)) if local.is_dir() else []
    fs, p = _fs(folder)
    return [fs.unstrip_protocol(f) for f in sorted(fs.glob(f"{p.rstrip('/')}/{pattern}"))]


def canonical_location(path) -> str:
    """One spelling per file: the resolved local path, or the URL as its filesystem writes it
    (``memory://x/a`` and ``memory:///x/a`` are the same file)."""
    local = local_path(path)
    if local is not None:
        return str(local.resolve())
    fs, p = _fs(path)
    return fs.unstrip_protocol(p)


def remove_table(path) -> None:
    """Delete one file (path or URL); a missing one is not an error."""
    local = local_path(path)
    if local is not None:
        local.unlink(missing_ok=True)
        return
    fs, p = _fs(path)
    if fs.exists(p):
        fs.rm(p)


def table_exists(path) -> bool:
    local = local_path(path)
    if local is not None:
        return local.is_file()
    fs, p = _fs(path)
    return fs.isfile(p)


def file_digest(path) -> tuple[str, int] | None:
    """``(sha256 hex, size in bytes)`` of a file at a path or URL; None when it is missing."""
    local = local_path(path)
    try:
        if local is not None:
            data = local.read_bytes()
        else:
            fs, p = _fs(path)
            data = fs.cat_file(p)
    except (FileNotFoundError, IsADirectoryError):
        return None
    return hashlib.sha256(data).hexdigest(), len(data)

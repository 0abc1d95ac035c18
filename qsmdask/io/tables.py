"""Parquet tables: one deterministic file per subject-session, atomic writes, unified reads."""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .nifti import atomic_write_bytes

__all__ = ["write_parquet", "read_parquet_folder"]


def write_parquet(df: pd.DataFrame, path, *, metadata: dict[str, str] | None = None) -> Path:
    """Write ``df`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    table = pa.Table.from_pandas(df, preserve_index=False)
    if metadata:
        meta = dict(table.schema.metadata or {})
        meta.update({k.encode(): str(v).encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(meta)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return atomic_write_bytes(path, buf.getvalue())


def read_parquet_folder(folder, pattern: str = "*.parquet") -> pd.DataFrame:
    """Read every Parquet file of ``folder`` as one table, unifying schemas (new columns kept)."""
    files = sorted(Path(folder).glob(pattern))
    if not files:
        return pd.DataFrame()
    tables = [pq.read_table(f).replace_schema_metadata(None) for f in files]
    return pa.concat_tables(tables, promote_options="permissive").to_pandas()

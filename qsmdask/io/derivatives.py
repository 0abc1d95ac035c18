"""The one derivatives writer: BIDS-derivatives names, sidecars with provenance, manifest.

Every file the pipeline writes for a subject-session goes through :class:`DerivativesWriter`,
so names, provenance (method, parameters, qsmdask version) and atomicity are uniform.
"""

from __future__ import annotations

import hashlib
import json
import platform
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from .. import __version__
from .nifti import atomic_write_bytes, atomic_write_json, save_nifti
from .tables import write_parquet

__all__ = ["DerivativesWriter", "bids_stem", "PIPELINE_NAME"]

PIPELINE_NAME = "qsmdask"


def bids_stem(subject: str, session: str = "", **entities) -> str:
    """``sub-<s>[_ses-<t>][_<key>-<value>...]`` in BIDS entity order."""
    order = ["acq", "run", "echo", "part", "space", "res", "desc", "label"]
    parts = [f"sub-{subject}"] + ([f"ses-{session}"] if session else [])
    for k in order:
        v = entities.get(k)
        if v not in (None, ""):
            parts.append(f"{k}-{v}")
    unknown = set(entities) - set(order)
    if unknown:
        raise ValueError(f"unknown BIDS entities {sorted(unknown)}")
    return "_".join(parts)


class DerivativesWriter:
    """Writes BIDS derivatives of qsmdask under ``output_dir``."""

    def __init__(self, output_dir, *, config: dict | None = None):
        self.root = Path(output_dir)
        self.config = config or {}

    # dataset level -------------------------------------------------------------------------
    def write_dataset_description(self, source_dataset=None) -> Path:
        desc = {
            "Name": "qsmdask derivatives: quantitative susceptibility maps and ROI tables",
            "BIDSVersion": "1.9.0",
            "DatasetType": "derivative",
            "GeneratedBy": [{"Name": PIPELINE_NAME, "Version": __version__,
                             "CodeURL": "https://github.com/qsmdask/qsmdask"}],
        }
        if source_dataset:
            desc["SourceDatasets"] = [{"URL": Path(source_dataset).resolve().as_uri()}]
        return atomic_write_json(self.root / "dataset_description.json", desc)

    def write_run_config(self, config: dict, name: str = "qsmdask_config.json") -> Path:
        record = {"qsmdask_version": __version__, "python": platform.python_version(),
                  "written": datetime.now(timezone.utc).isoformat(timespec="seconds"), **config}
        return atomic_write_json(self.root / "logs" / name, record)

    # subject level -------------------------------------------------------------------------
    def anat_dir(self, subject: str, session: str = "") -> Path:
        d = self.root / f"sub-{subject}"
        if session:
            d = d / f"ses-{session}"
        return d / "anat"

    def image_path(self, subject, session, suffix, *, ext=".nii.gz", **entities) -> Path:
        return self.anat_dir(subject, session) / f"{bids_stem(subject, session, **entities)}_{suffix}{ext}"

    def save_image(self, subject: str, session: str, suffix: str, data: np.ndarray, affine, *,
                   sidecar: dict | None = None, sources: list | None = None, **entities) -> Path:
        """Save a derivative image with a JSON sidecar carrying provenance."""
        path = self.image_path(subject, session, suffix, **entities)
        meta = {"GeneratedBy": [{"Name": PIPELINE_NAME, "Version": __version__}]}
        if sources:
            meta["Sources"] = [str(s) for s in sources]
        meta.update(sidecar or {})
        save_nifti(path, data, affine, sidecar=meta)
        return path

    def save_json(self, subject, session, suffix, obj: dict, **entities) -> Path:
        path = self.image_path(subject, session, suffix, ext=".json", **entities)
        return atomic_write_json(path, obj)

    def save_bytes(self, subject, session, suffix, data: bytes, *, ext: str, **entities) -> Path:
        return atomic_write_bytes(self.image_path(subject, session, suffix, ext=ext, **entities), data)

    def roi_path(self, subject: str, session: str = "") -> Path:
        return self.root / "roi" / f"{bids_stem(subject, session)}_roi.parquet"

    def save_roi_table(self, subject: str, session: str, df: pd.DataFrame) -> Path:
        return write_parquet(df, self.roi_path(subject, session),
                             metadata={"qsmdask_version": __version__})

    def write_manifest(self, subject: str, session: str, files: list[Path], *, config: dict,
                       status: dict | None = None) -> Path:
        """Manifest of a subject-session's outputs with SHA-256 checksums and the configuration."""
        entries = []
        for f in sorted(set(Path(p) for p in files)):
            h = hashlib.sha256(f.read_bytes()).hexdigest()
            entries.append({"path": f.relative_to(self.root).as_posix(), "sha256": h,
                            "bytes": f.stat().st_size})
        manifest = {"qsmdask_version": __version__, "files": entries, "config": config,
                    **(status or {})}
        path = self.root / "logs" / "manifests" / f"{bids_stem(subject, session)}_manifest.json"
        return atomic_write_json(path, manifest)

    def read_manifest(self, subject: str, session: str = "") -> dict | None:
        path = self.root / "logs" / "manifests" / f"{bids_stem(subject, session)}_manifest.json"
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return None

    def manifest_intact(self, manifest: dict) -> bool:
        """True when every file in the manifest exists with its recorded checksum."""
        for e in manifest.get("files", []):
            f = self.root / e["path"]
            if not f.exists() or f.stat().st_size != e["bytes"]:
                return False
            if hashlib.sha256(f.read_bytes()).hexdigest() != e["sha256"]:
                return False
        return True

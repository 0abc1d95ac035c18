"""The one derivatives writer: BIDS-derivatives names, sidecars with provenance, manifest.

Every file the pipeline writes for a subject-session goes through :class:`DerivativesWriter`,
so names, provenance (method, parameters, qsmdask version) and atomicity are uniform.
Images, sidecars, figures, transforms and logs live under ``output_dir``; the Parquet tables
(``roi/``, ``group/``, ``failures.parquet``) under ``tables_url``, which defaults to
``output_dir`` and may be any fsspec URL (``file://``, ``memory://``, ``s3://``).
"""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from .. import __version__
from .nifti import atomic_write_bytes, atomic_write_json, save_nifti
from .tables import (canonical_location, file_digest, join_url, list_tables, local_path, read_parquet,
                     remove_table, table_exists, write_parquet)

__all__ = ["DerivativesWriter", "bids_stem", "bids_uri", "dataset_link", "PIPELINE_NAME", "RAW_DATASET",
           "BIDSIGNORE", "ENTITY_ORDER", "configuration_differences"]

PIPELINE_NAME = "qsmdask"

#: ``DatasetLinks`` name of the input dataset (BIDS URIs ``bids:raw:sub-01/anat/...``).
RAW_DATASET = "raw"

#: Outputs outside the BIDS derivatives specification, hidden from the BIDS validator:
#: tables, report, logs, work area, QC figures, transforms and the QSM field maps in ppm
#: (BIDS has no suffix for a total or local field in ppm; ``fieldmap`` means a B0 map of the
#: ``fmap`` datatype in Hz with a magnitude image).
BIDSIGNORE = """\
roi
group
logs
work
failures.parquet
report.html
*_qc.png
xfm
*_totalfield.nii.gz
*_totalfield.json
*_localfield.nii.gz
*_localfield.json
"""


def dataset_link(source_dataset, output_dir) -> str:
    """``DatasetLinks`` value for the source dataset: its path relative to ``output_dir``
    (``../..`` for ``BIDS/derivatives/qsmdask``), or an absolute ``file:`` URI when none exists."""
    src, out = Path(source_dataset).resolve(), Path(output_dir).resolve()
    try:
        return Path(os.path.relpath(src, out)).as_posix()
    except ValueError:  # another drive (Windows)
        return src.as_uri()


def bids_uri(path, dataset: str = RAW_DATASET) -> str:
    """``bids:<dataset>:<path inside the dataset>`` of a file below a ``sub-<label>`` folder.

    >>> bids_uri("/data/bids/sub-01/anat/sub-01_echo-1_part-phase_MEGRE.nii.gz")
    'bids:raw:sub-01/anat/sub-01_echo-1_part-phase_MEGRE.nii.gz'
    """
    p = Path(path)
    for i, parent in enumerate(p.parents):
        if parent.name.startswith("sub-") and "_" not in parent.name:
            rel = p.relative_to(parent.parent)
            return f"bids:{dataset}:{rel.as_posix()}"
    raise ValueError(f"{path}: not inside a sub-<label> folder, no BIDS URI")


#: Entities of output names, in BIDS order (the acquisition entities of the input first).
ENTITY_ORDER = ("acq", "ce", "rec", "dir", "run", "echo", "part", "space", "res", "label", "desc")


def bids_stem(subject: str, session: str = "", **entities) -> str:
    """``sub-<s>[_ses-<t>][_<key>-<value>...]`` in BIDS entity order."""
    unknown = set(entities) - set(ENTITY_ORDER)
    if unknown:
        raise ValueError(f"unknown BIDS entities {sorted(unknown)}")
    parts = [f"sub-{subject}"] + ([f"ses-{session}"] if session else [])
    for k in ENTITY_ORDER:
        v = entities.get(k)
        if v not in (None, ""):
            parts.append(f"{k}-{v}")
    return "_".join(parts)


class DerivativesWriter:
    """Writes BIDS derivatives of qsmdask under ``output_dir``."""

    def __init__(self, output_dir, *, config: dict | None = None, tables_url=None):
        self.root = Path(output_dir)
        self.config = config or {}
        self.tables_root = join_url(tables_url) if tables_url else self.root

    def table_location(self, *parts: str) -> Path | str:
        """Where a table lives: a Path for local tables, a URL string for remote ones."""
        return join_url(self.tables_root, *parts)

    # dataset level -------------------------------------------------------------------------
    def write_dataset_description(self, source_dataset=None) -> Path:
        """``dataset_description.json`` and ``.bidsignore`` of the derivatives dataset.

        The source dataset is linked as ``raw`` (``DatasetLinks``: its path relative to
        ``output_dir``, so moving both together keeps the link) and named in
        ``SourceDatasets`` as the BIDS URI ``bids:raw:``; sidecars' ``Sources`` use
        ``bids:raw:<path in the raw dataset>``.
        """
        desc = {
            "Name": "qsmdask derivatives: quantitative susceptibility maps and ROI tables",
            "BIDSVersion": "1.9.0",
            "DatasetType": "derivative",
            "GeneratedBy": [{"Name": PIPELINE_NAME, "Version": __version__,
                             "CodeURL": "https://github.com/qsmdask/qsmdask"}],
        }
        if source_dataset:
            desc["DatasetLinks"] = {RAW_DATASET: dataset_link(source_dataset, self.root)}
            desc["SourceDatasets"] = [{"URL": f"bids:{RAW_DATASET}:"}]
        atomic_write_bytes(self.root / ".bidsignore", BIDSIGNORE.encode())
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
            meta["Sources"] = [str(s) for s in sources]  # BIDS URIs (see bids_uri)
        meta.update(sidecar or {})
        save_nifti(path, data, affine, sidecar=meta)
        return path

    def uri(self, path) -> str:
        """``bids::<path>`` of a file of this derivatives dataset (for ``Sources``)."""
        return "bids::" + Path(path).resolve().relative_to(self.root.resolve()).as_posix()

    def save_json(self, subject, session, suffix, obj: dict, **entities) -> Path:
        path = self.image_path(subject, session, suffix, ext=".json", **entities)
        return atomic_write_json(path, obj)

    def save_bytes(self, subject, session, suffix, data: bytes, *, ext: str, **entities) -> Path:
        return atomic_write_bytes(self.image_path(subject, session, suffix, ext=ext, **entities), data)

    # tables -------------------------------------------------------------------------------
    def roi_path(self, subject: str, session: str = "", **entities) -> Path | str:
        """The ROI table of a subject-session (``<tables>/roi/sub-<l>[_ses-<s>][_acq-..][_run-..]_roi.parquet``)."""
        return self.table_location("roi", f"{bids_stem(subject, session, **entities)}_roi.parquet")

    def roi_folder(self) -> Path | str:
        return self.table_location("roi")

    def group_folder(self) -> Path | str:
        return self.table_location("group")

    def failures_path(self) -> Path | str:
        return self.table_location("failures.parquet")

    def save_roi_table(self, subject: str, session: str, df: pd.DataFrame, **entities) -> Path | str:
        return write_parquet(df, self.roi_path(subject, session, **entities),
                             metadata={"qsmdask_version": __version__})

    def save_group_table(self, name: str, df: pd.DataFrame) -> Path | str:
        """A group-level table, ``<tables>/group/<name>.parquet``."""
        return write_parquet(df, self.table_location("group", f"{name}.parquet"),
                             metadata={"qsmdask_version": __version__})

    def prune_group_outputs(self, written) -> list[str]:
        """Remove the group outputs of earlier runs that this group run did not write.

        The group level owns ``<tables>/group/*.parquet``, ``OUTPUT_DIR/group/perm_*`` and
        ``logs/qsmdask_voxelwise_config.json``; after a run they must describe that run only. A
        table or map left from an earlier run (a voxel-wise analysis that failed or was not
        run this time, a TFCE map when this run used cluster inference, a test the design no
        longer asks for) would otherwise be read by the report as a current result.
        ``written``: the locations this run wrote (paths or URLs). Returns what was removed.
        """
        keep = {canonical_location(w) for w in written}
        local_group = self.root / "group"
        stale = list_tables(self.group_folder()) + list_tables(local_group, "perm_*.nii*")
        vcfg = self.root / "logs" / "qsmdask_voxelwise_config.json"
        if vcfg.exists() and not any(Path(str(w)).name.startswith("perm_") for w in written):
            stale.append(vcfg)  # describes voxel-wise results this run did not produce
        removed = []
        for f in stale:
            if canonical_location(f) not in keep and str(f) not in removed:
                remove_table(f)
                removed.append(str(f))
        return removed

    def read_failures(self) -> pd.DataFrame | None:
        path = self.failures_path()
        return read_parquet(path) if table_exists(path) else None

    def save_failures(self, df: pd.DataFrame) -> Path | str:
        return write_parquet(df, self.failures_path())

    # manifest -----------------------------------------------------------------------------
    def _entry_ref(self, f) -> dict:
        """``{"path": relative}`` for files under ``output_dir``, else ``{"url": absolute URL}``."""
        local = local_path(f)
        if local is not None:
            try:
                return {"path": local.resolve().relative_to(self._resolved_root()).as_posix()}
            except ValueError:
                return {"url": local.resolve().as_uri()}
        return {"url": str(f)}

    def _resolved_root(self) -> Path:
        """``output_dir`` resolved once per writer (planning checks thousands of manifests)."""
        if getattr(self, "_root_resolved", None) is None:
            self._root_resolved = self.root.resolve()
        return self._root_resolved

    def _entry_location(self, entry: dict) -> Path | str:
        return self.root / entry["path"] if "path" in entry else entry["url"]

    @property
    def manifest_dir(self) -> Path:
        """Folder of the subject-sessions' manifests."""
        return self.root / "logs" / "manifests"

    def manifest_path(self, subject: str, session: str = "", **entities) -> Path:
        return self.manifest_dir / f"{bids_stem(subject, session, **entities)}_manifest.json"

    def write_manifest(self, subject: str, session: str, files: list, *, config: dict,
                       status: dict | None = None, **entities) -> Path:
        """Manifest of a subject-session's outputs with SHA-256 checksums and the configuration.

        ``files`` are paths (recorded relative to ``output_dir`` when under it) or fsspec
        URLs (tables elsewhere, recorded as ``{"url": ...}``).
        """
        entries = {}
        for f in files:
            ref = self._entry_ref(f)
            digest = file_digest(f)
            if digest is None:
                raise FileNotFoundError(f"{f}: output missing when writing the manifest")
            entry = {**ref, "sha256": digest[0], "bytes": digest[1]}
            local = local_path(f)
            if local is not None:  # lets a resume check it without reading it (manifest_intact)
                entry["mtime_ns"] = local.stat().st_mtime_ns
            entries[json.dumps(ref, sort_keys=True)] = entry
        manifest = {"qsmdask_version": __version__, "files": [entries[k] for k in sorted(entries)],
                    "config": config, **(status or {})}
        return atomic_write_json(self.manifest_path(subject, session, **entities), manifest)

    def read_manifest(self, subject: str, session: str = "", **entities) -> dict | None:
        path = self.manifest_path(subject, session, **entities)
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return None

    def manifest_intact(self, manifest: dict, *, verify: bool = False) -> bool:
        """True when every file in the manifest exists with its recorded checksum.

        A local file whose size and modification time (ns) are still those recorded when
        the manifest was written is not read again (a resume of 10,000 subject-sessions
        would otherwise read every derivative); ``verify=True`` reads every file, as do
        entries without a recorded mtime (older manifests) and files at URLs.
        """
        for e in manifest.get("files", []):
            loc = self._entry_location(e)
            local = local_path(loc)
            if local is not None:
                try:
                    st = local.stat()
                except OSError:
                    return False
                if st.st_size != e["bytes"]:
                    return False
                if not verify and e.get("mtime_ns") == st.st_mtime_ns:
                    continue
            try:
                digest = file_digest(loc)
            except OSError:  # an unreachable object store: not intact, recompute
                return False
            if digest is None or digest != (e["sha256"], e["bytes"]):
                return False
        return True

    def manifest_lists(self, manifest: dict, location) -> bool:
        """True when the manifest records the file at ``location`` (path or URL)."""
        ref = self._entry_ref(location)
        return any({k: e[k] for k in ("path", "url") if k in e} == ref for e in manifest.get("files", []))


#: configuration keys that do not change what a subject-session's outputs hold
_RESULT_NEUTRAL_KEYS = {"chain.fft_workers"}


def configuration_differences(output_dir, *, max_names: int = 5) -> list[str]:
    """Lines naming the configuration keys on which the finished subject-sessions of
    ``output_dir`` were reconstructed differently (from their manifests; presets resolved), e.g.
    after a participant run of some subjects with a changed option. [] when they agree.

    Each line: ``chain.keep_boundary_layer: True (sub-01), False (sub-02, sub-03)``.
    """
    folder = DerivativesWriter(output_dir).manifest_dir
    if not folder.is_dir():
        return []
    from qsmdask.chain import ChainConfig

    values: dict[str, dict[str, list[str]]] = {}
    n = 0
    for path in sorted(folder.glob("*_manifest.json")):
        try:
            m = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(m, dict) or m.get("status") != "done" or not isinstance(m.get("config"), dict):
            continue
        cfg = dict(m["config"])
        chain = cfg.pop("chain", {}) or {}
        try:
            chain = ChainConfig.from_dict(chain).to_dict()
        except (TypeError, ValueError):
            pass
        flat = {**cfg, **{f"chain.{k}": v for k, v in chain.items()}}
        who = str(m.get("key") or path.name[:-len("_manifest.json")])
        n += 1
        for k, v in flat.items():
            if k not in _RESULT_NEUTRAL_KEYS:
                values.setdefault(k, {}).setdefault(json.dumps(v, sort_keys=True, default=str), []).append(who)
    lines = []
    for k in sorted(values):
        groups = values[k]
        if len(groups) < 2 and sum(map(len, groups.values())) == n:
            continue  # one value, present in every manifest
        parts = []
        for v, names in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            shown = ", ".join(names[:max_names]) + (f" and {len(names) - max_names} more" if len(names) > max_names else "")
            parts.append(f"{v} ({shown})")
        missing = n - sum(map(len, groups.values()))
        if missing:
            parts.append(f"not recorded ({missing})")
        lines.append(f"{k}: " + ", ".join(parts))
    return lines

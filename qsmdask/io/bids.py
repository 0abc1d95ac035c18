"""BIDS input: discover multi-echo GRE subject-sessions, read and validate them.

Layout understood (BIDS 1.9 ``MEGRE``, and single-echo GRE as ``T2starw`` with ``part-``)::

    sub-<label>[/ses-<label>]/anat/sub-<label>[_ses-<label>][_acq-<l>][_run-<n>]_echo-<n>_part-<mag|phase>_MEGRE.nii[.gz]
    sub-<label>[/ses-<label>]/anat/sub-<label>[_ses-<label>][_acq-<l>][_run-<n>]_part-<mag|phase>_T2starw.nii[.gz]
    sub-<label>[/ses-<label>]/anat/sub-<label>[_ses-<label>]..._T1w.nii[.gz]   (optional)

Every fault raises :class:`qsmdask.io.nifti.InputError` naming the file and the problem.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .nifti import InputError, checked_geometry, load_nifti, read_json

log = logging.getLogger(__name__)

__all__ = [
    "Echo", "SubjectSession", "parse_bids_name", "validate_label", "find_subject_sessions",
    "load_megre", "MEGREData", "read_participants", "read_sessions", "PARTICIPANT_COLUMNS",
    "CLINICAL_COLUMNS", "phase_to_radians", "ACQUISITION_ENTITIES", "check_output_location", "InputChecksums",
]

_LABEL = re.compile(r"^[A-Za-z0-9]+$")
_ENTITY = re.compile(r"^(?P<key>[a-z]+)-(?P<value>[A-Za-z0-9]+)$")
_NIFTI_EXT = (".nii.gz", ".nii")

#: BIDS entities that tell acquisitions of one subject-session apart, in BIDS entity order.
#: Each is part of :attr:`SubjectSession.key`, of every output name and of the ROI table.
ACQUISITION_ENTITIES = ("acq", "ce", "rec", "dir", "run")

PARTICIPANT_COLUMNS = ("participant_id", "group")
CLINICAL_COLUMNS = ("age", "hdrs", "relapse_count", "episode_weeks", "disease_weeks", "crp", "il6",
                    "tnfa", "il1b", "medication")


def validate_label(label: str, *, what: str = "participant label") -> str:
    """Return a BIDS label without its prefix; reject path separators, '..' and non-alphanumerics."""
    if not isinstance(label, str):
        raise ValueError(f"{what} must be a string, got {type(label).__name__}")
    raw = label
    for prefix in ("sub-", "ses-"):
        if label.startswith(prefix):
            label = label[len(prefix):]
    if not _LABEL.match(label):
        raise ValueError(f"invalid {what} {raw!r}: BIDS labels are letters and digits only "
                         "(no path separators, '..', '_' or '-')")
    return label


def check_output_location(bids_dir, path, *, what: str = "output folder") -> None:
    """Refuse a local ``path`` that is the BIDS input folder or inside it.

    The one place inside the input dataset that may hold outputs is its ``derivatives/``
    folder (``BIDS_DIR/derivatives/<pipeline>``). URLs (``s3://...``) are not checked.
    Raises ValueError naming both folders; call it before anything is written.
    """
    if path is None or "://" in str(path) and not str(path).startswith("file://"):
        return
    p = str(path)
    if p.startswith("file://"):
        from urllib.parse import unquote, urlparse
        p = unquote(urlparse(p).path)
    src, out = Path(bids_dir).resolve(), Path(p).resolve()
    if out != src and src not in out.parents:
        return
    rel = out.relative_to(src).parts
    if len(rel) >= 2 and rel[0] == "derivatives":
        return
    where = "is the BIDS input folder itself" if out == src else f"is inside the BIDS input folder {bids_dir}"
    raise ValueError(f"{path}: the {what} {where}; qsmdask never writes into its input dataset. "
                     f"Use a folder outside it, or {Path(bids_dir) / 'derivatives' / 'qsmdask'}")


def parse_bids_name(path) -> tuple[dict[str, str], str, str]:
    """Split a BIDS file name into (entities, suffix, extension).

    >>> parse_bids_name("sub-01_ses-pre_echo-2_part-phase_MEGRE.nii.gz")[0]["echo"]
    '2'
    """
    name = Path(path).name
    ext = next((e for e in _NIFTI_EXT + (".json", ".tsv") if name.endswith(e)), None)
    if ext is None:
        raise InputError(path, "not a BIDS file name: unknown extension")
    stem = name[: -len(ext)]
    parts = stem.split("_")
    if len(parts) < 2:
        raise InputError(path, "not a BIDS file name: expected entities and a suffix")
    suffix = parts[-1]
    if not re.match(r"^[A-Za-z0-9]+$", suffix):
        raise InputError(path, f"not a BIDS file name: bad suffix {suffix!r}")
    entities: dict[str, str] = {}
    for p in parts[:-1]:
        m = _ENTITY.match(p)
        if not m:
            raise InputError(path, f"not a BIDS file name: cannot parse entity {p!r}")
        if m["key"] in entities:
            raise InputError(path, f"not a BIDS file name: entity {m['key']!r} repeated")
        entities[m["key"]] = m["value"]
    if "sub" not in entities or parts[0].split("-")[0] != "sub":
        raise InputError(path, "not a BIDS file name: must start with sub-<label>")
    return entities, suffix, ext


@dataclass(frozen=True)
class Echo:
    number: int
    magnitude: Path
    phase: Path
    echo_time_s: float
    b0_tesla: float


@dataclass(frozen=True)
class SubjectSession:
    """One acquisition of a subject-session with its multi-echo GRE files (sorted by echo number).

    ``extra_entities`` holds the distinguishing entities (:data:`ACQUISITION_ENTITIES`:
    ``acq``, ``ce``, ``rec``, ``dir``, ``run``) present in the file names, in BIDS order, so
    ``sub-01_run-1`` and ``sub-01_run-2`` are two subject-sessions with two keys.
    """

    subject: str
    session: str  # "" when the dataset has no session level
    echoes: tuple[Echo, ...]
    t1w: Path | None = None
    extra_entities: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    @property
    def participant_id(self) -> str:
        return f"sub-{self.subject}"

    @property
    def session_id(self) -> str:
        return f"ses-{self.session}" if self.session else ""

    @property
    def entities(self) -> dict[str, str]:
        """The distinguishing entities (``{"acq": "fast", "run": "1"}``; empty when none)."""
        return dict(self.extra_entities)

    @property
    def acquisition(self) -> str:
        """The distinguishing entities as a name part (``"acq-fast_run-2"``; ``""`` when none)."""
        return "_".join(f"{k}-{v}" for k, v in self.extra_entities)

    @property
    def key(self) -> str:
        """``sub-<l>[_ses-<s>][_acq-<a>][_ce-..][_rec-..][_dir-..][_run-<n>]``: unique per acquisition."""
        return "_".join([f"sub-{self.subject}"] + ([f"ses-{self.session}"] if self.session else [])
                        + [f"{k}-{v}" for k, v in self.extra_entities])

    def input_files(self) -> list[Path]:
        files = []
        for e in self.echoes:
            files += [e.magnitude, e.phase, _sidecar(e.magnitude), _sidecar(e.phase)]
        if self.t1w is not None:
            files.append(self.t1w)
        return [f for f in files if f.exists()]

    def checksum(self, cache: "InputChecksums | None" = None) -> str:
        """SHA-256 over the input files' names and bytes (the resume key's input part).

        With ``cache``, the files are read only when one of them changed since the cached
        checksum was computed (size, mtime, ctime or inode differ; see :class:`InputChecksums`).
        """
        files = self.input_files()
        if cache is not None:
            return cache.checksum(files, lambda: _checksum_files(files))
        return _checksum_files(files)


def _checksum_files(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


class InputChecksums:
    """Input checksums of subject-sessions remembered across runs, by file signature.

    A subject-session's checksum reads every input byte (~50-100 MB of MEGRE per
    subject-session): planning or resuming 10,000 of them would read ~1 TB. This cache keeps,
    per set of input files, the checksum and each file's signature ``(size, mtime_ns,
    ctime_ns, inode)``; the checksum is reused only while every signature is unchanged. A
    content change changes mtime (or, when a tool restores the mtime, ctime, which no user
    can set), and a file replaced by another gets a new inode, so a changed input is always
    re-read. A file modified less than :attr:`RACY_S` seconds before it was read is not
    cached (a write within the timestamp granularity could leave its mtime unchanged).

    Stored as one JSON file (``path``; None: this process only), written by :meth:`save`.
    """

    RACY_S = 2.0

    def __init__(self, path: Path | str | None = None):
        import json

        self.path = Path(path) if path is not None else None
        self.entries: dict[str, list] = {}
        self.hits = self.misses = 0
        self._dirty = False
        if self.path is not None and self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                if isinstance(data, dict) and data.get("version") == 1:
                    self.entries = dict(data.get("entries", {}))
            except (OSError, ValueError):
                self.entries = {}  # unreadable cache: every checksum is recomputed

    @staticmethod
    def _signature(st) -> list[int]:
        return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]

    def checksum(self, files: list[Path], compute) -> str:
        """The cached checksum of ``files`` when none changed, else ``compute()`` (and cache it)."""
        import os
        import time

        key = "\n".join(os.path.abspath(f) for f in files)
        try:
            sigs = [self._signature(os.stat(f)) for f in files]
        except OSError:
            return compute()  # a file vanished: let the reader name it
        hit = self.entries.get(key)
        if hit is not None and hit[0] == sigs:
            self.hits += 1
            return hit[1]
        self.misses += 1
        value = compute()
        now_ns = time.time_ns()
        try:
            after = [self._signature(os.stat(f)) for f in files]
        except OSError:
            return value
        racy = any(now_ns - s[1] < self.RACY_S * 1e9 for s in after)
        if after == sigs and not racy:  # unchanged while it was read, and not modified just now
            self.entries[key] = [sigs, value]
            self._dirty = True
        else:
            self.entries.pop(key, None)
        return value

    def save(self) -> None:
        """Write the cache (atomically) when a checksum was added since it was loaded."""
        if self.path is None or not self._dirty:
            return
        from .nifti import atomic_write_bytes
        import json

        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path, json.dumps({"version": 1, "entries": self.entries}).encode())
        self._dirty = False


def _sidecar(path: Path) -> Path:
    name = path.name
    for e in _NIFTI_EXT:
        if name.endswith(e):
            return path.with_name(name[: -len(e)] + ".json")
    return path.with_suffix(".json")


class _TopLevelSidecars:
    """The dataset's top-level ``*<suffix>.json`` values, read once per discovery and suffix.

    Listing the dataset folder for every echo made discovery quadratic in the cohort (the
    root holds one entry per subject: 10,000 subject-sessions listed 5,000 entries 40,000
    times). A read error is kept and raised for every subject-session, as before.
    """

    def __init__(self, bids_dir: Path):
        self.bids_dir, self._meta, self._error = bids_dir, {}, {}

    def get(self, suffix: str = "MEGRE") -> dict:
        if suffix not in self._meta and suffix not in self._error:
            try:
                meta: dict = {}
                for t in sorted(self.bids_dir.glob(f"*{suffix}.json")):
                    meta.update(read_json(t))
                self._meta[suffix] = meta
            except InputError as e:
                self._error[suffix] = e
        if suffix in self._error:
            raise self._error[suffix]
        return dict(self._meta[suffix])


def _sidecar_metadata(nifti: Path, bids_dir: Path, suffix: str = "MEGRE",
                      top: _TopLevelSidecars | None = None) -> dict:
    """Sidecar JSON with BIDS inheritance: top-level ``*_<suffix>.json`` values, then the file's own."""
    meta = (top or _TopLevelSidecars(bids_dir)).get(suffix)
    own = _sidecar(nifti)
    if own.exists():
        meta.update(read_json(own))
    return meta


def _float_field(meta: dict, key: str, path: Path, *, lo: float, hi: float, unit: str) -> float:
    if key not in meta:
        raise InputError(path, f"sidecar lacks {key} (in {unit})")
    try:
        v = float(meta[key])
    except (TypeError, ValueError):
        raise InputError(path, f"sidecar {key} is not a number: {meta[key]!r}") from None
    if not math.isfinite(v) or not (lo <= v <= hi):
        raise InputError(path, f"sidecar {key}={v} outside the plausible range [{lo}, {hi}] {unit}")
    return v


def _nifti_files_under(root: Path) -> list[Path]:
    """The NIfTI names below ``root`` (symlinked folders not followed, as ``Path.rglob``), sorted
    as ``sorted(root.rglob("*"))`` would; one ``os.scandir`` per folder, no ``stat`` per name
    (discovery of 10,000 subject-sessions spent most of its time in ``rglob``)."""
    import os
    out = [Path(d, name) for d, _dirs, names in os.walk(root) for name in names if name.endswith(_NIFTI_EXT)]
    return sorted(out)


def find_subject_sessions(bids_dir, participant_labels=None, *,
                          errors: list | None = None) -> list[SubjectSession]:
    """Discover every subject-session with multi-echo GRE data.

    Single-echo GRE is read from ``MEGRE`` files with one echo or from ``T2starw`` files with
    ``part-mag``/``part-phase`` (the BIDS name of a single-echo T2*-weighted acquisition, as
    qsm-forward and dcm2niix-based converters write it; the ``echo`` entity is optional there).
    ``T2starw`` files without a ``part`` entity or without a phase partner are not GRE phase
    data and are ignored; an acquisition present both as ``MEGRE`` and ``T2starw`` is read
    from ``MEGRE`` (warning).

    Raises InputError for a folder that is not a BIDS dataset, for files whose names do not
    parse, for echoes missing a magnitude or phase partner or a sidecar field.

    errors : list, optional
        When given, a fault confined to one subject (a file name that does not parse, a missing
        partner, a bad sidecar field) does not stop discovery: the :class:`InputError` is
        appended here with ``participant_id`` and ``session_id`` attributes ("" when unknown)
        and that subject (or subject-session) is left out of the result. Dataset-level faults
        (no dataset_description.json, unknown participant labels) still raise.
    """
    bids_dir = Path(bids_dir)
    if not bids_dir.is_dir():
        raise InputError(bids_dir, "BIDS folder not found")
    if not (bids_dir / "dataset_description.json").exists():
        raise InputError(bids_dir / "dataset_description.json",
                         "missing: not a BIDS dataset (dataset_description.json is required)")
    wanted = None
    if participant_labels:
        wanted = {validate_label(p) for p in participant_labels}
    found: dict[tuple, dict] = {}
    t2starw: dict[tuple, dict] = {}
    t1ws: dict[tuple, Path] = {}
    for sub_dir in sorted(bids_dir.glob("sub-*")):
        if not sub_dir.is_dir():
            log.warning("%s: not a subject folder (a file); ignored", sub_dir)
            continue
        try:
            sub = validate_label(sub_dir.name, what=f"subject folder {sub_dir}")
        except ValueError:
            _stray_subject_folder(sub_dir, wanted, errors)
            continue
        if wanted is not None and sub not in wanted:
            continue
        sub_found: dict[tuple, dict] = {}
        sub_t2s: dict[tuple, dict] = {}
        try:
            for f in _nifti_files_under(sub_dir):
                if "/anat/" not in f.as_posix() or not f.is_file():
                    continue
                ents, suffix, _ = parse_bids_name(f)
                if ents["sub"] != sub:
                    raise InputError(f, f"subject entity sub-{ents['sub']} does not match its folder "
                                        f"{sub_dir.name}")
                ses = ents.get("ses", "")
                extra = tuple((k, ents[k]) for k in ACQUISITION_ENTITIES if k in ents)
                if suffix == "T1w":
                    t1ws.setdefault((sub, ses), f)
                    continue
                if suffix == "T2starw" and "part" in ents:  # single-echo GRE with phase
                    if ents["part"] not in ("mag", "phase"):
                        raise InputError(f, f"part-{ents['part']} not understood (expected mag or phase)")
                    echo = ents.get("echo", "1")
                    if not echo.isdigit():
                        raise InputError(f, f"echo-{echo} is not an echo number")
                    sub_t2s.setdefault((sub, ses, extra), {}).setdefault(int(echo), {})[ents["part"]] = f
                    continue
                if suffix != "MEGRE":
                    continue
                if "echo" not in ents or "part" not in ents:
                    raise InputError(f, "MEGRE file needs echo-<n> and part-<mag|phase> entities")
                if ents["part"] not in ("mag", "phase"):
                    raise InputError(f, f"part-{ents['part']} not understood (expected mag or phase)")
                if not ents["echo"].isdigit():
                    raise InputError(f, f"echo-{ents['echo']} is not an echo number")
                key = (sub, ses, extra)
                sub_found.setdefault(key, {}).setdefault(int(ents["echo"]), {})[ents["part"]] = f
        except InputError as e:
            if errors is None:
                raise
            _note_error(errors, e, sub, "")
            found[(sub, None, ())] = {}  # the subject was seen (for the participant-label check)
            continue
        found.update(sub_found)
        for key, echoes in sub_t2s.items():
            if not any("phase" in parts for parts in echoes.values()):
                continue  # a T2*-weighted magnitude image, not GRE phase data
            if key in sub_found:
                log.warning("%s: T2starw files ignored, the same acquisition has MEGRE files",
                            next(iter(next(iter(echoes.values())).values())))
                continue
            found[key] = echoes
            t2starw[key] = echoes
    if wanted is not None:
        missing = wanted - {k[0] for k in found}
        if missing:
            raise InputError(bids_dir, "no MEGRE data for participant label(s) " + ", ".join(sorted(missing)))
    out = []
    top = _TopLevelSidecars(bids_dir)
    for (sub, ses, extra), echoes in sorted(found.items(), key=lambda kv: (kv[0][0], kv[0][1] or "",
                                                                             _entity_sort_key(kv[0][2]))):
        if ses is None:  # a subject whose files did not parse (already in errors)
            continue
        try:
            out.append(_assemble(bids_dir, sub, ses, extra, echoes, t1ws,
                                 suffix="T2starw" if (sub, ses, extra) in t2starw else "MEGRE", top=top))
        except InputError as e:
            if errors is None:
                raise
            _note_error(errors, e, sub, ses, extra)
    return out


def _stray_subject_folder(sub_dir: Path, wanted, errors: list | None) -> None:
    """A ``sub-*`` folder whose name is not a BIDS subject label (``sub-01_old``, ``sub-0 2``).

    Without image files it is a stray entry: ignored with a warning. With NIfTI files it looks
    like a subject whose data cannot be used: one error (a failure row of that folder) when
    ``errors`` collects them and no ``--participant-label`` selection excludes it, else a
    warning. Never a cohort stop.
    """
    has_images = any(f.name.endswith(_NIFTI_EXT) for f in sub_dir.rglob("*") if f.is_file())
    problem = ("folder name is not a BIDS subject label (sub-<letters and digits>); "
               "its files are not processed")
    if not has_images or wanted is not None or errors is None:
        log.warning("%s: %s (ignored)", sub_dir, problem)
        return
    e = InputError(sub_dir, problem)
    e.participant_id, e.session_id, e.acquisition = sub_dir.name, "", ""
    errors.append(e)


def _entity_sort_key(extra: tuple) -> tuple:
    """Sort acquisitions: a missing entity first, then numbers naturally (run-2 before run-10)."""
    ents = dict(extra)

    def order(v):
        if v is None:
            return (0, 0, "")
        return (1, int(v), "") if v.isdigit() else (2, 0, v)
    return tuple(order(ents.get(k)) for k in ACQUISITION_ENTITIES)


def _note_error(errors: list, e: InputError, sub: str, ses: str, extra: tuple = ()) -> None:
    e.participant_id = f"sub-{sub}"
    e.session_id = f"ses-{ses}" if ses else ""
    e.acquisition = "_".join(f"{k}-{v}" for k, v in extra)
    errors.append(e)


def _assemble(bids_dir: Path, sub: str, ses: str, extra: tuple, echoes: dict, t1ws: dict, *,
              suffix: str = "MEGRE", top: _TopLevelSidecars | None = None) -> SubjectSession:
    """Pair a subject-session's echoes with their sidecar fields and check them."""
    ech = []
    for n in sorted(echoes):
        parts = echoes[n]
        for need in ("mag", "phase"):
            if need not in parts:
                other = next(iter(parts.values()))
                raise InputError(other, f"echo {n} has no part-{need} partner")
        meta = _sidecar_metadata(parts["phase"], bids_dir, suffix, top)
        meta_m = _sidecar_metadata(parts["mag"], bids_dir, suffix, top)
        meta = {**meta_m, **meta}
        side = _sidecar(parts["phase"]) if _sidecar(parts["phase"]).exists() else parts["phase"]
        te = _float_field(meta, "EchoTime", side, lo=1e-4, hi=0.2, unit="s")
        b0 = _float_field(meta, "MagneticFieldStrength", side, lo=0.1, hi=20.0, unit="T")
        ech.append(Echo(n, parts["mag"], parts["phase"], te, b0))
    tes = [e.echo_time_s for e in ech]
    if len(set(tes)) != len(tes):
        raise InputError(ech[0].phase.parent, f"echoes of {sub} {ses} share an EchoTime: {tes}")
    if len({e.b0_tesla for e in ech}) != 1:
        raise InputError(ech[0].phase.parent, "echoes disagree on MagneticFieldStrength")
    return SubjectSession(sub, ses, tuple(ech), t1ws.get((sub, ses)), extra)


@dataclass
class MEGREData:
    magnitude: np.ndarray  # (x, y, z, echo) float32
    phase_rad: np.ndarray  # (x, y, z, echo) float32
    echo_times_s: np.ndarray
    b0_tesla: float
    affine: np.ndarray
    notes: list[str]


def phase_to_radians(phase: np.ndarray, path) -> tuple[np.ndarray, str | None]:
    """Return phase in radians (and a note when it was rescaled); reject unknown ranges.

    The detection is :func:`qsmdask.unwrap.rescale_phase` (strict): radians, GE
    milliradians and power-of-two vendor integer ranges are accepted; degrees and
    anything else raise :class:`InputError` naming ``path``.
    """
    from ..unwrap.rescale import RADIANS_NOTE, rescale_phase

    try:
        rad, note = rescale_phase(phase, strict=True)
    except ValueError as e:
        raise InputError(path, str(e)) from None
    return rad, (None if note == RADIANS_NOTE else note)


def load_megre(ss: SubjectSession) -> MEGREData:
    """Read and validate all echoes of a subject-session.

    The phase encoding (radians or a vendor integer range) is detected once over all
    echoes together, so every echo gets the same scale and offset even when single
    echoes do not span their range.
    """
    mags, phases, notes = [], [], []
    affine = shape = None
    ref = None
    for e in ss.echoes:
        m, a_m, _ = load_nifti(e.magnitude, ndim=3)
        p, a_p, _ = load_nifti(e.phase, ndim=3)
        for path, arr, aff in ((e.magnitude, m, a_m), (e.phase, p, a_p)):
            if shape is None:
                shape, affine, ref = arr.shape, aff, path
            elif arr.shape != shape:
                raise InputError(path, f"shape {arr.shape} differs from {ref.name} {shape}")
            elif not np.allclose(aff, affine, atol=1e-3):
                raise InputError(path, f"affine differs from {ref.name}")
        if np.any(m < 0):
            m = np.abs(m)
            notes.append(f"{e.magnitude.name}: negative magnitude values replaced by absolute values")
        if not np.any(m):
            raise InputError(e.magnitude, "magnitude image is all zero")
        mags.append(m)
        phases.append(p)
    if min(shape) < 8:
        raise InputError(ref, f"image shape {shape} too small for QSM (need >= 8 voxels per axis)")
    affine, geometry_note = checked_geometry(affine, ref)  # shear: fixed once here or refused
    if geometry_note:
        notes.append(geometry_note)
    paths = [e.phase for e in ss.echoes]
    try:
        phase_rad, note = phase_to_radians(np.stack(phases, -1), paths[0])
    except InputError as joint:
        for p, path in zip(phases, paths):  # name the echo that is wrong on its own
            phase_to_radians(p, path)
        raise InputError(paths[0], f"{joint.problem} "
                                   f"(the {len(paths)} phase echoes together)") from None
    if note:
        notes.append(f"{', '.join(p.name for p in paths)}: {note}")
    return MEGREData(np.stack(mags, -1).astype(np.float32), phase_rad.astype(np.float32),
                     np.array([e.echo_time_s for e in ss.echoes]), ss.echoes[0].b0_tesla, affine, notes)


def _read_tsv(path: Path) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_values=["n/a", ""])
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
        raise InputError(path, f"cannot parse TSV ({e})") from None
    return df


def read_participants(bids_dir, *, required=PARTICIPANT_COLUMNS) -> pd.DataFrame:
    """Read and validate ``participants.tsv``; numeric clinical columns become floats."""
    path = Path(bids_dir) / "participants.tsv"
    df = _read_tsv(path)
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputError(path, f"missing column(s) {', '.join(missing)}")
    ids = df["participant_id"]
    if ids.isna().any():
        raise InputError(path, "empty participant_id")
    bad = [i for i in ids if not re.match(r"^sub-[A-Za-z0-9]+$", str(i))]
    if bad:
        raise InputError(path, f"participant_id must look like sub-<label>: {bad[:3]}")
    dup = ids[ids.duplicated()].tolist()
    if dup:
        raise InputError(path, f"duplicate participant_id {sorted(set(dup))}")
    for c in CLINICAL_COLUMNS:
        if c in df.columns:
            num = pd.to_numeric(df[c], errors="coerce")
            bad_rows = df[c].notna() & num.isna()
            if bad_rows.any():
                first = df.loc[bad_rows, c].iloc[0]
                raise InputError(path, f"column {c!r} has non-numeric value {first!r} "
                                       f"(row of {df.loc[bad_rows, 'participant_id'].iloc[0]})")
            df[c] = num.astype(float)
    return df


def read_sessions(bids_dir) -> pd.DataFrame:
    """Concatenate every ``sub-*/sub-*_sessions.tsv`` with a participant_id column."""
    rows = []
    for f in sorted(Path(bids_dir).glob("sub-*/sub-*_sessions.tsv")):
        df = _read_tsv(f)
        if "session_id" not in df.columns:
            raise InputError(f, "missing column session_id")
        df.insert(0, "participant_id", f.name.split("_")[0])
        for c in df.columns:
            if c in CLINICAL_COLUMNS:
                num = pd.to_numeric(df[c], errors="coerce")
                if (df[c].notna() & num.isna()).any():
                    raise InputError(f, f"column {c!r} has non-numeric values")
                df[c] = num.astype(float)
        rows.append(df)
    if not rows:
        return pd.DataFrame(columns=["participant_id", "session_id"])
    return pd.concat(rows, ignore_index=True)

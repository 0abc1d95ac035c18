"""NIfTI and JSON sidecar IO with atomic writes and clear errors."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["InputError", "checked_geometry", "atomic_write_bytes", "atomic_write_json", "save_nifti",
           "load_nifti", "read_json", "sweep_temp_files", "process_umask"]


class InputError(ValueError):
    """A problem with an input file; the message names the file and the fault."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def checked_geometry(affine, path) -> tuple[np.ndarray, str | None]:
    """The affine of ``path`` with a small shear removed, and a note saying so.

    :func:`qsmdask.geometry.orthogonalise_affine`: a shear up to
    ``qsmdask.geometry.SHEAR_TOLERANCE_DEG`` is replaced by orthogonal axes (the note,
    also logged as a warning, goes into the outputs' sidecars); a larger one raises
    :class:`InputError` naming ``path``.
    """
    import logging

    from ..geometry import SHEAR_TOLERANCE_DEG, orthogonalise_affine

    try:
        out, shear = orthogonalise_affine(affine)
    except ValueError as e:
        raise InputError(path, str(e)) from None
    if shear <= 1e-4:
        return out, None
    note = (f"{Path(path).name}: affine axes were {shear:.3g} degrees from orthogonal; "
            f"orthogonalised (nearest orthogonal axes, voxel sizes and origin kept; "
            f"tolerance {SHEAR_TOLERANCE_DEG:g} degrees)")
    logging.getLogger("qsmdask.io").warning("%s", note)
    return out, note


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _named_os_error(e, path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            # mkstemp creates 0600; give the file the mode a plain open() would (0666 & ~umask)
            os.fchmod(fd, 0o666 & ~process_umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):  # e.g. ENOSPC: say which file could not be written
            raise _named_os_error(e, path) from None
        raise
    return path


def process_umask() -> int:
    """The process umask, read without changing it (``/proc/self/status`` on Linux).

    ``os.umask`` can only be read by setting it, which would briefly give files created by
    other threads the wrong mode; it is the fallback where ``/proc`` has no ``Umask:`` line.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def sweep_temp_files(root) -> list[Path]:
    """Delete the temporary files of :func:`atomic_write_bytes` left under ``root``.

    A write killed between creating its temporary file and the rename (SIGKILL, power
    loss) leaves ``.<name>.<random>.tmp`` next to the target.  Call this only while no
    writer is active in ``root`` (:class:`qsmdask.io.lock.OutputLock` does, right after
    taking the lock).  Returns the removed paths.
    """
    removed = []
    root = Path(root)
    if not root.is_dir():
        return removed
    for p in root.rglob(".*.tmp"):
        try:
            if p.is_file() and not p.is_symlink():
                p.unlink()
                removed.append(p)
        except OSError:
            pass  # unreadable or vanished: leave it
    return removed


def _named_os_error(e: OSError, path: Path) -> OSError:
    """The same OSError subclass and errno, naming ``path`` when ``e`` names no file."""
    if e.filename:  # already names the file or folder at fault
        return e
    try:
        return type(e)(e.errno, e.strerror or str(e), str(path))
    except TypeError:  # an OSError subclass with another signature
        return OSError(e.errno, e.strerror or str(e), str(path))


def atomic_write_json(path, obj) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=_json_default)
                                     + "\n").encode())


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def save_nifti(path, data: np.ndarray, affine, *, sidecar: dict | None = None,
               header: nib.Nifti1Header | None = None) -> Path:
    """Save ``data`` as NIfTI-1 atomically; write ``sidecar`` as JSON beside it if given."""
    path = Path(path)
    data = np.asarray(data)
    if data.dtype == bool:
        data = data.astype(np.uint8)
    img = nib.Nifti1Image(data, np.asarray(affine, dtype=float), header=header)
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    img.header.set_xyzt_units("mm", "sec")  # affines are in mm (BIDS validator: NIFTI_UNIT)
    if path.name.endswith(".nii.gz"):
        payload = nib.Nifti1Image.to_bytes(img)
        import gzip
        payload = gzip.compress(payload, compresslevel=4, mtime=0)
    else:
        payload = img.to_bytes()
    atomic_write_bytes(path, payload)
    if sidecar is not None:
        atomic_write_json(_sidecar_path(path), sidecar)
    return path


def _sidecar_path(path: Path) -> Path:
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return path.with_name(name[: -len(ext)] + ".json")
    return path.with_suffix(".json")


def read_json(path) -> dict:
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(path, f"not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise InputError(path, "JSON sidecar must be an object")
    return obj


def load_nifti(path, *, ndim: int | tuple[int, ...] = 3, dtype=np.float32):
    """Load a NIfTI image fully; returns ``(data, affine, header)``.

    Raises :class:`InputError` naming the file for a missing, truncated or corrupt
    file, a wrong number of dimensions, or non-finite values.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    try:
        img = _read_image(path)
        data = np.asarray(img.dataobj, dtype=dtype)
    except Exception as e:  # nibabel raises many types for corrupt files
        raise InputError(path, f"cannot read NIfTI ({type(e).__name__}: {e})") from None
    allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if data.ndim == 4 and data.shape[3] == 1 and 3 in allowed and 4 not in allowed:
        data = data[..., 0]
    if data.ndim not in allowed:
        raise InputError(path, f"expected a {'/'.join(map(str, allowed))}-D image, got {data.ndim}-D "
                               f"shape {data.shape}")
    if not np.all(np.isfinite(data)):
        n = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
        raise InputError(path, f"contains {n} NaN/inf voxels")
    affine = img.affine
    if affine is None or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(path, "has no valid affine (qform/sform)")
    return data, np.asarray(affine, dtype=float), img.header


def _read_image(path: Path):
    """nibabel image of ``path``; a ``.gz`` is decompressed whole first so its CRC is checked.

    nibabel alone stops reading a gzip stream once it has the voxels it needs, so a damaged
    compressed block can decode to wrong voxels without any error.
    """
    if not path.name.endswith(".gz"):
        return nib.load(str(path))
    import gzip
    raw = gzip.decompress(path.read_bytes())  # BadGzipFile / EOFError / zlib.error on damage
    errors = []
    for cls in (nib.Nifti1Image, nib.Nifti2Image):
        try:
            return cls.from_bytes(raw)
        except Exception as e:  # not this NIfTI version
            errors.append(f"{cls.__name__}: {e}")
    raise ValueError("; ".join(errors))

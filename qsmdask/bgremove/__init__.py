"""Background field removal: (field, mask, voxel size) -> (local field, eroded mask)."""

from qsmdask.bgremove.sharp import sharp
from qsmdask.bgremove.vsharp import default_radii_mm, vsharp

__all__ = ["sharp", "vsharp", "default_radii_mm"]

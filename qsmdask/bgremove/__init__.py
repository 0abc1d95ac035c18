"""Background field removal: (field, mask, voxel size) -> (local field, eroded mask)."""

from qsmdask.bgremove.sharp import sharp

__all__ = ["sharp"]

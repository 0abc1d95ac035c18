"""Background field removal: (field, mask, voxel size) -> (local field, eroded mask)."""

from qsmdask.bgremove.boundary import dipole_field, lbv_boundary_field
from qsmdask.bgremove.lbv import lbv
from qsmdask.bgremove.offset import remove_constant_laplacian
from qsmdask.bgremove.pdf import pdf
from qsmdask.bgremove.sharp import sharp
from qsmdask.bgremove.vsharp import default_radii_mm, vsharp

__all__ = ["lbv", "lbv_boundary_field", "dipole_field", "pdf", "sharp", "vsharp", "default_radii_mm", "remove_constant_laplacian"]

"""qsmdask: quantitative susceptibility mapping for research cohorts.

Layers
------
- algorithm modules (``qsmdask.kernels``, ``qsmdask.mask``, ``qsmdask.unwrap``,
  ``qsmdask.bgremove``, ``qsmdask.inversion``, ``qsmdask.roi``, ``qsmdask.stats``,
  ``qsmdask.perm``): pure numpy/scipy, arrays and voxel sizes in, arrays out;
- ``qsmdask.io``: NIfTI, BIDS, zarr, Parquet and the one derivatives writer;
- ``qsmdask.workflows``: per-subject pipelines built from the library (no Prefect);
- ``flows/``: thin Prefect flows that fan the workflows out on Dask;
- ``qsmdask.cli``: the BIDS-App command line.
"""

__version__ = "0.1.0"

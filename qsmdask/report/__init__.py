"""Reports: per-subject QC figures and the self-contained cohort HTML report.

Matplotlib only, Agg canvas (no display, no pyplot global state), so figures can be made
inside Dask workers.

- :func:`qsmdask.report.qc.qc_figure`: orthogonal slices of one subject-session (PNG bytes).
- :func:`qsmdask.report.qc.qc_numbers`: QC numbers the chain's ``ReconResult.qc`` lacks.
- :func:`qsmdask.report.html.build_cohort_report`: ``OUTPUT_DIR/report.html``.
"""

from .html import build_cohort_report
from .qc import CHI_WINDOW_PPM, qc_figure, qc_numbers

__all__ = ["qc_figure", "qc_numbers", "build_cohort_report", "CHI_WINDOW_PPM"]

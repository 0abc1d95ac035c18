"""Cohort statistics on the ROI table (pure numpy/scipy/pandas/statsmodels).

Every function takes DataFrames (the ROI table, participants.tsv, sessions.tsv) and returns
a tidy DataFrame whose leading columns are :data:`TIDY_COLUMNS`.
"""

from ._common import CORRECTIONS, TIDY_COLUMNS, adjust_pvalues
from .analysis import run_group_analysis
from .design import ALL_TESTS, GroupDesign
from .group import group_wilcoxon, rank_biserial, rank_biserial_ci

__all__ = ["TIDY_COLUMNS", "CORRECTIONS", "ALL_TESTS", "adjust_pvalues", "GroupDesign",
           "run_group_analysis", "group_wilcoxon", "rank_biserial", "rank_biserial_ci"]

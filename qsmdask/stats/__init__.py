"""Cohort statistics on the ROI table (pure numpy/scipy/pandas/statsmodels).

Every function takes DataFrames (the ROI table, participants.tsv, sessions.tsv) and returns
a tidy DataFrame whose leading columns are :data:`TIDY_COLUMNS` (see
:mod:`qsmdask.stats._common` for their meaning). :func:`run_group_analysis` runs every
analysis of a :class:`GroupDesign` that the data allow.
"""

from ._common import CORRECTIONS, TIDY_COLUMNS, adjust_pvalues
from .analysis import run_group_analysis
from .combat import combat, combat_roi_table
from .correlation import (clinical_correlation, correlation_plot_data, partial_correlation,
                          regression_band, sex_stratified_correlation)
from .design import ALL_TESTS, GroupDesign
from .group import group_wilcoxon, rank_biserial, rank_biserial_ci
from .hemisphere import hemisphere_wilcoxon, matched_rank_biserial
from .longitudinal import mixed_model, paired_ttest
from .mediation import mediation, mediation_effects
from .power import observed_effects, power_table, power_wilcoxon, sample_size_for_power
from .regression import group_ols, sex_interaction
from .simulate import simulate_roi_cohort

__all__ = ["TIDY_COLUMNS", "CORRECTIONS", "ALL_TESTS", "adjust_pvalues", "GroupDesign",
           "run_group_analysis", "group_wilcoxon", "rank_biserial", "rank_biserial_ci",
           "hemisphere_wilcoxon", "matched_rank_biserial", "paired_ttest", "mixed_model",
           "clinical_correlation", "partial_correlation", "sex_stratified_correlation",
           "regression_band", "correlation_plot_data", "group_ols", "sex_interaction",
           "mediation", "mediation_effects", "combat", "combat_roi_table", "power_wilcoxon",
           "sample_size_for_power", "observed_effects", "power_table", "simulate_roi_cohort"]

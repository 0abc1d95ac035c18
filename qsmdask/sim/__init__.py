"""Synthetic QSM cohorts: head phantom and GRE forward model (``phantom``), BIDS writer (``cohort``).

Main entry point: :func:`simulate_cohort`.
"""

from qsmdask.sim.cohort import (CohortInfo, CohortPlan, plan_cohort, session_names,
                                simulate_cohort, simulate_session_files,
                                simulate_subject_files)

__all__ = ["CohortInfo", "CohortPlan", "plan_cohort", "session_names", "simulate_cohort",
           "simulate_session_files", "simulate_subject_files"]

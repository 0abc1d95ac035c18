"""The group-analysis design: which analyses to run and with which options.

A :class:`GroupDesign` is a frozen dataclass that is read from a JSON or YAML design file
with :meth:`GroupDesign.from_file` (safe parsing only: ``json.loads`` or
``yaml.safe_load``; nothing is evaluated). Example (YAML)::

    tests: [group_wilcoxon, hemisphere_wilcoxon, mixed_model]
    covariates: [age, sex, medication]
    correction: fdr_bh
    alpha: 0.05
    markers: [crp, il6]
    mediation_paths: [[crp, hdrs]]
    combat: true
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from ._common import CORRECTIONS, validate_alpha, validate_choice

__all__ = ["GroupDesign", "ALL_TESTS"]

#: Every analysis :func:`qsmdask.stats.run_group_analysis` knows, in run order.
STUDY_ROIS = ("frontal", "temporal", "occipital", "hippocampus", "putamen", "thalamus", "cingulum",
              "cerebellum")

ALL_TESTS = (
    "group_wilcoxon",          # patients vs controls, Mann-Whitney U per ROI
    "group_ols",               # covariate-adjusted group comparison (OLS)
    "hemisphere_wilcoxon",     # L vs R signed-rank per ROI
    "paired_ttest",            # pre vs post paired t per ROI
    "clinical_correlation",    # Pearson + Spearman with clinical variables (patients)
    "partial_correlation",     # inflammation markers, covariate-adjusted
    "sex_interaction",         # value ~ marker * sex + covariates
    "sex_stratified_correlation",
    "mediation",               # marker -> ROI -> symptom
    "mixed_model",             # longitudinal LMM, subject random intercept
)


def _value_text(v) -> str:
    """A group value as text: 1, 1.0 and "1" are one value; strings are stripped."""
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    try:
        import numpy as np
        if isinstance(v, np.integer):
            return str(int(v))
        if isinstance(v, np.floating) and float(v).is_integer():
            return str(int(v))
    except ImportError:  # pragma: no cover
        pass
    return str(v).strip()


def _tuple(v):
    if v is None:
        return None
    if isinstance(v, str):
        return (v,)
    return tuple(v)


@dataclass(frozen=True)
class GroupDesign:
    """Options of the cohort group analysis.

    Attributes
    ----------
    tests : tuple of str
        Analyses to run (subset of :data:`ALL_TESTS`); each runs only when the data allow
        (e.g. longitudinal analyses need two sessions).
    value : str
        ROI value column (``"mean_ppm"``).
    level : {"group", "label"}
        ROI level.
    measures : tuple of str or None
        Measures (modalities) to analyse; None: all present.
    atlas : str or None
        Atlas to analyse; None: all (names qualified when several).
    groups : (str, str) or {name: value, name: value}
        The two groups compared, group 1 first (effects are group 1 minus group 2; the
        clinical analyses run in ``clinical_group``). A list names them as they are written
        in ``participants.tsv``'s ``group`` column; a mapping gives each a name and its value
        in that column, so that any two values work: ``{patient: MDD, control: HC}`` or
        ``{patient: 1, control: 0}``. Every value present in the column must be one of them
        (an error names the column and the values found); empty cells are left out.
    group_values : (str, str) or None
        The ``participants.group`` values of the two groups, in the order of ``groups``
        (set from the mapping form of ``groups``; None: the values are the names).
    covariates : tuple of str
        Participant columns adjusted for in the regression analyses (``sex`` is coded
        M=0, F=1; other non-numeric columns are treated as categorical).
    correction : {"bonferroni", "holm", "fdr_bh", "none"}
        Multiple-comparison correction; family = all ROI x hemisphere rows of one test,
        measure, session (and clinical variable / marker / term where applicable).
    alpha : float
        Significance level (used by summaries and power).
    clinical_variables : tuple of str
        Symptom/course variables correlated with ROI values.
    clinical_group : str or None
        Group in which clinical correlations and inflammation analyses run (None: all).
    markers : tuple of str
        Inflammation markers.
    mediation_paths : tuple of (x, y)
        Mediation paths ``x -> ROI value -> y`` (every ROI is tried as mediator).
    combat : bool
        Harmonise sites with ComBat before the analyses (needs >= 2 sites).
    site_covariate : bool
        Add ``site`` to the regression covariates instead (exclusive with ``combat``).
    session_order : (str, str) or None
        Baseline and follow-up session ids for paired tests (None: the two sessions ordered
        by ``acq_time`` in sessions.tsv, else by name).
    rois : tuple of str or None
        ROI groups analysed (the correction family); default the reference study's eight:
        frontal, temporal, occipital, hippocampus, putamen, thalamus, cingulum, cerebellum.
        None: every ROI in the table.
    hemispheres : tuple of str or None
        Hemisphere rows analysed (default left and right, as in the study; add "B" for the
        bilateral rows). None: all.
    ci_method : {"bootstrap", "analytic"}
        CI of the rank-biserial effect size.
    n_boot : int
        Bootstrap resamples (effect-size and mediation CIs).
    seed : int
        Random seed for bootstraps.
    acq : str or None
        When a subject-session has several acquisitions (``acq``/``run``/... entities), the
        ``acq`` label the group level uses; None: the default acquisition (the one without an
        ``acq`` entity, else the first label in sort order). See
        :func:`qsmdask.workflows.cohort.select_acquisitions`.
    run : str
        Which run of that acquisition: ``"lowest"`` (default), ``"highest"`` or a run number.
    keep_covariates : tuple of str
        Covariates kept even when nearly nested in the tested effect (VIF > 5 or constant in
        one group; :func:`qsmdask.stats.diagnostics.screen_covariates`). By default such a
        covariate is left out of that model, with the reason in ``skipped.parquet``.
    min_residual_dof : int
        Mediation and interaction models with fewer residual degrees of freedom, and
        sex-stratified correlations with fewer residual degrees of freedom per stratum, are
        not run (listed in ``skipped.parquet``).
    min_stratum_n : int
        Sex-stratified correlations need at least this many subjects per stratum.
    """

    tests: tuple = ALL_TESTS
    value: str = "mean_ppm"
    level: str = "group"
    measures: tuple | None = None
    atlas: str | None = None
    groups: tuple = ("patient", "control")
    group_values: tuple | None = None
    covariates: tuple = ("age", "sex", "medication")
    correction: str = "bonferroni"
    alpha: float = 0.05
    clinical_variables: tuple = ("hdrs", "relapse_count", "episode_weeks", "disease_weeks")
    clinical_group: str | None = "patient"
    markers: tuple = ("crp", "il6", "tnfa", "il1b")
    mediation_paths: tuple = (("crp", "hdrs"), ("il6", "hdrs"), ("tnfa", "hdrs"),
                              ("il1b", "hdrs"))
    combat: bool = False
    site_covariate: bool = False
    session_order: tuple | None = None
    rois: tuple | None = STUDY_ROIS
    hemispheres: tuple | None = ("L", "R")
    ci_method: str = "bootstrap"
    n_boot: int = 2000
    seed: int = 0
    acq: str | None = None
    run: str = "lowest"
    keep_covariates: tuple = ()
    min_residual_dof: int = 10
    min_stratum_n: int = 10

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen)
        if isinstance(self.groups, dict):
            if len(self.groups) != 2:
                raise ValueError(f"groups must map two group names to their participants.tsv values, "
                                 f"got {self.groups!r}")
            set_("group_values", tuple(_value_text(v) for v in self.groups.values()))
            set_("groups", tuple(str(k) for k in self.groups))
        if self.group_values is not None:
            set_("group_values", tuple(_value_text(v) for v in _tuple(self.group_values)))
            if len(self.group_values) != 2 or self.group_values[0] == self.group_values[1]:
                raise ValueError(f"group_values must be two distinct values, got {self.group_values!r}")
        for k in ("tests", "groups", "covariates", "clinical_variables", "markers",
                  "keep_covariates"):
            set_(k, _tuple(getattr(self, k)))
        if self.tests == ("all",):
            set_("tests", ALL_TESTS)
        set_("measures", _tuple(self.measures))
        set_("rois", _tuple(self.rois))
        set_("hemispheres", _tuple(self.hemispheres))
        set_("session_order", _tuple(self.session_order))
        paths = []
        for p in self.mediation_paths or ():
            p = _tuple(p)
            if len(p) != 2 or not all(isinstance(s, str) for s in p):
                raise ValueError(f"mediation_paths entries must be [x, y] name pairs, got {p!r}")
            paths.append(p)
        set_("mediation_paths", tuple(paths))
        for t in self.tests:
            validate_choice("tests", t, ALL_TESTS)
        validate_choice("level", self.level, ("group", "label"))
        validate_choice("correction", self.correction, CORRECTIONS)
        validate_choice("ci_method", self.ci_method, ("bootstrap", "analytic"))
        set_("alpha", validate_alpha(self.alpha))
        if len(self.groups) != 2 or self.groups[0] == self.groups[1]:
            raise ValueError(f"groups must be two distinct labels, got {self.groups!r}")
        if self.clinical_group is not None and self.clinical_group not in self.groups:
            if self.clinical_group != "patient":  # the default follows group 1
                raise ValueError(f"clinical_group must be one of groups {list(self.groups)} or null, "
                                 f"got {self.clinical_group!r}")
            set_("clinical_group", self.groups[0])
        if self.session_order is not None and len(self.session_order) != 2:
            raise ValueError(f"session_order must be two session ids, got {self.session_order!r}")
        if not isinstance(self.combat, bool) or not isinstance(self.site_covariate, bool):
            raise ValueError("combat and site_covariate must be true/false")
        if self.combat and self.site_covariate:
            raise ValueError("combat and site_covariate are exclusive: choose one")
        if int(self.n_boot) < 100:
            raise ValueError(f"n_boot must be >= 100, got {self.n_boot!r}")
        set_("n_boot", int(self.n_boot))
        for k in ("min_residual_dof", "min_stratum_n"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)!r}")
            set_(k, int(getattr(self, k)))
        set_("seed", int(self.seed))
        if self.acq is not None and (not isinstance(self.acq, str) or not self.acq.isalnum()):
            raise ValueError(f"acq must be an acq label (letters and digits) or null, got {self.acq!r}")
        set_("run", str(self.run))
        if self.run not in ("lowest", "highest") and not self.run.isdigit():
            raise ValueError(f"run must be 'lowest', 'highest' or a run number, got {self.run!r}")
        if not isinstance(self.value, str) or not self.value:
            raise ValueError(f"value must be a column name, got {self.value!r}")

    # -- participants ------------------------------------------------------------------
    def label_groups(self, participants, *, source: str = "participants.tsv"):
        """``participants`` with its ``group`` column in the design's group names.

        Values are compared as text (``1`` and ``1.0`` are the same value); empty cells stay
        empty. A value that is neither a mapped value nor a group name raises ValueError
        naming the column, the values found and the groups expected: such a cohort would
        otherwise be compared silently without those participants, or not at all.
        """
        import pandas as pd

        if participants is None or "group" not in participants.columns:
            return participants
        values = self.group_values or self.groups
        mapping = {v: name for v, name in zip(values, self.groups)}
        mapping.update({name: name for name in self.groups})
        col = participants["group"]
        text = col.map(lambda v: None if pd.isna(v) or str(v).strip() == "" else _value_text(v))
        found = sorted(set(text.dropna()))
        unmapped = [v for v in found if v not in mapping]
        if unmapped:
            pairs = ", ".join(f"{g}: {v}" for g, v in zip(self.groups, values))
            raise ValueError(
                f"{source}: column 'group' has value(s) {unmapped} that the design does not map "
                f"(values found: {found}; the design's groups: {{{pairs}}}); map the values in the design "
                f"file, e.g. groups: {{patient: <value>, control: <value>}} with values from {found}")
        out = participants.copy()
        out["group"] = text.map(lambda v: None if v is None or pd.isna(v) else mapping[v])
        return out

    # -- (de)serialisation -------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain dict (lists instead of tuples) suitable for JSON/YAML."""
        def conv(v):
            if isinstance(v, tuple):
                return [conv(x) for x in v]
            return v
        return {f.name: conv(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "GroupDesign":
        """Build from a mapping; unknown keys raise ValueError naming them."""
        if d is None:
            d = {}
        if not isinstance(d, dict):
            raise ValueError(f"design must be a mapping, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            from ..config import unknown_keys_message
            raise ValueError(unknown_keys_message("design", unknown, names))
        return cls(**d)

    @classmethod
    def from_file(cls, path) -> "GroupDesign":
        """Read a design from ``.json`` or ``.yaml``/``.yml`` (safe parsing only)."""
        path = Path(path)
        text = path.read_text()
        suffix = path.suffix.lower()
        if suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError as exc:  # pragma: no cover - PyYAML is normally present
                raise ValueError(f"{path}: YAML design needs PyYAML; use JSON instead") from exc
            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise ValueError(f"{path}: invalid YAML: {exc}") from exc
        elif suffix == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: invalid JSON: {exc}") from exc
        else:
            raise ValueError(f"{path}: design file must end in .json, .yaml or .yml")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from exc

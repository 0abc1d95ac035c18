"""The cohort report: one self-contained HTML file a researcher can read without the code.

:func:`build_cohort_report` reads what the participant and group levels wrote under
``OUTPUT_DIR`` (ROI tables, group tables, failures, permutation maps, the run
configuration) and the BIDS ``participants.tsv`` / ``sessions.tsv``, and writes
``OUTPUT_DIR/report.html``: images are inline base64 PNG, the CSS is inline, there are no
scripts, fonts or external addresses. Every section is built independently: a missing
input (or an error while building one section) makes that section say so, and the rest
of the report is still written.
"""

from __future__ import annotations

import base64
import html
import importlib.metadata
import io
import json
import math
import platform
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .. import __version__
from .references import REFERENCES

__all__ = ["build_cohort_report", "methods_paragraph", "REPORT_NAME", "GROUP_CONFIG_NAME"]

REPORT_NAME = "report.html"
#: Run record of the group level (``{"design": GroupDesign.to_dict(), ...}``), if written.
GROUP_CONFIG_NAME = "qsmdask_group_config.json"
ALPHA = 0.05
CLINICAL_VARIABLES = ("hdrs", "disease_weeks", "relapse_count", "episode_weeks")
MARKERS = ("crp", "il6", "tnfa", "il1b")
_GROUP_COLOURS = {"patient": "#d95f02", "control": "#1b9e77"}
#: Axis labels with units of the clinical variables and inflammatory markers.
VARIABLE_LABELS = {"hdrs": "HDRS-17 score (points)", "disease_weeks": "illness duration (weeks)",
                   "relapse_count": "relapses (count)", "episode_weeks": "current episode (weeks)",
                   "crp": "CRP (mg/L)", "il6": "IL-6 (pg/mL)", "tnfa": "TNF-alpha (pg/mL)",
                   "il1b": "IL-1beta (pg/mL)", "age": "age (years)"}
#: Strata smaller than this are never highlighted as findings.
MIN_STRATUM_N = 10
_OTHER_COLOURS = ["#7570b3", "#e7298a", "#66a61e", "#e6ab02"]
_HEMI_ORDER = {"L": 0, "R": 1, "": 2, "B": 3}
_DEEP_GM_FIRST = ("pallidum", "putamen", "caudate", "thalamus", "accumbens", "hippocampus",
                  "amygdala")


# ------------------------------------------------------------------------------------------
# small helpers
def _esc(x) -> str:
    return html.escape(str(x), quote=True)


def _fig(width_in: float, height_in: float) -> Figure:
    fig = Figure(figsize=(width_in, height_in), dpi=90)
    FigureCanvasAgg(fig)
    return fig


def _grid_layout(fig: Figure, nrow: int, *, top_in: float = 0.55, bottom_in: float = 0.5) -> None:
    """Fixed margins in inches (tight_layout costs a full extra render per figure)."""
    w, h = fig.get_size_inches()
    fig.subplots_adjust(left=0.65 / w, right=1 - 0.15 / w, top=1 - top_in / h,
                        bottom=bottom_in / h, wspace=0.3, hspace=0.75 if nrow > 1 else 0.2)


def _img(fig: Figure, alt: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{data}">'


def _note(text: str) -> str:
    return f'<p class="note">{_esc(text)}</p>'


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return ""
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(v):
            return ""
        if v != 0 and (abs(v) < 10 ** -digits or abs(v) >= 1e5):
            return f"{v:.2e}"
        return f"{v:.{digits}f}"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    return str(v)


def _fmt_p(p) -> str:
    try:
        p = float(p)
    except (TypeError, ValueError):
        return ""
    if not math.isfinite(p):
        return ""
    return f"{p:.2e}" if p < 1e-3 else f"{p:.3f}"


def _table(df: pd.DataFrame, *, highlight=None, max_rows: int = 200, formats=None,
           fold: int = 15) -> str:
    """HTML table of ``df``; rows where ``highlight`` (bool Series) is True are marked.

    Tables longer than ``fold`` rows show the first ``fold`` rows and the whole table (up to
    ``max_rows``) in a collapsed ``<details>`` element.
    """
    if df is None or len(df) == 0:
        return _note("(no rows)")
    formats = {**{c: _fmt_int for c in df.columns if c in _INT_COLUMNS}, **(formats or {})}
    hl = None if highlight is None else highlight.reindex(df.index).fillna(False)

    def render(rows: pd.DataFrame) -> str:
        head = "".join(f"<th>{_esc(c)}</th>" for c in rows.columns)
        body = []
        for idx, row in rows.iterrows():
            cls = ' class="sig"' if hl is not None and bool(hl.loc[idx]) else ""
            cells = []
            for c in rows.columns:
                f = formats.get(c)
                cells.append(f"<td>{_esc(f(row[c]) if f else _fmt(row[c]))}</td>")
            body.append(f"<tr{cls}>{''.join(cells)}</tr>")
        return (f'<div class="tw"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}'
                "</tbody></table></div>")

    shown = df.head(max_rows)
    if len(shown) <= fold:
        out = render(shown)
    else:
        out = (render(shown.head(fold)) + f"<details><summary>show all {len(shown)} rows"
               "</summary>" + render(shown) + "</details>")
    if len(df) > max_rows:
        out += _note(f"{len(df) - max_rows} more row(s) not shown; see the Parquet file.")
    return out


_INT_COLUMNS = ("n", "n1", "n2", "cluster", "sign", "size_voxels", "n_subjects", "n_voxels")


def _fmt_int(v) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return str(int(round(f))) if math.isfinite(f) else ""


def _p_formats(df):
    return {c: _fmt_p for c in df.columns if c in ("p", "p_corrected", "p_fwe_size", "p_fwe_mass")}


def _roi_sort_key(roi: str):
    base = str(roi).split(":")[-1]
    return (_DEEP_GM_FIRST.index(base) if base in _DEEP_GM_FIRST else len(_DEEP_GM_FIRST), str(roi))


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# ------------------------------------------------------------------------------------------
# inputs
class _Inputs:
    """Everything the report reads, each item None (with a reason) when unavailable."""

    def __init__(self, output_dir: Path, bids_dir, perm_results, tables_url=None):
        from ..io.derivatives import DerivativesWriter
        from ..io.tables import read_parquet, read_parquet_folder, table_exists

        self.output_dir = output_dir
        self.problems: dict[str, str] = {}
        self.config = self._json(output_dir / "logs" / "qsmdask_config.json", "config")
        if bids_dir is None and self.config and self.config.get("bids_dir"):
            bids_dir = self.config["bids_dir"]
        if tables_url is None and self.config:
            tables_url = self.config.get("tables_url")
        self.bids_dir = Path(bids_dir) if bids_dir else None
        writer = DerivativesWriter(output_dir, tables_url=tables_url)
        self.roi = None
        roi_dir = writer.roi_folder()
        try:
            roi = read_parquet_folder(roi_dir)
            if len(roi):
                roi["session_id"] = roi.get("session_id", "").fillna("").astype(str) \
                    if "session_id" in roi.columns else ""
                self.roi = roi
                from ..workflows.cohort import select_acquisitions  # the group level's rule
                d = self._design()
                self.roi = select_acquisitions(roi, acq=d.acq, run=d.run)[0]
            else:
                self.problems["roi"] = f"no ROI tables in {roi_dir} (run the participant level)"
        except Exception as e:  # noqa: BLE001 - reported in the section
            self.problems["roi"] = f"ROI tables in {roi_dir} could not be read ({type(e).__name__}: {e})"
        self.participants = self.sessions = None
        if self.bids_dir is None:
            self.problems["participants"] = "no BIDS folder given (bids_dir) or recorded in the configuration"
        else:
            from ..io.bids import read_participants, read_sessions
            try:
                self.participants = read_participants(self.bids_dir, required=["participant_id"])
            except Exception as e:  # noqa: BLE001
                self.problems["participants"] = f"participants.tsv unreadable ({e})"
            try:
                s = read_sessions(self.bids_dir)
                self.sessions = s if len(s) else None
            except Exception as e:  # noqa: BLE001
                self.problems["sessions"] = f"sessions.tsv unreadable ({e})"
        self.group_tables: dict[str, pd.DataFrame] = {}
        try:
            for name, df in _read_group_tables(writer.group_folder(), self.problems).items():
                self.group_tables[name] = df
        except Exception as e:  # noqa: BLE001 - an unreachable table store
            self.problems["group"] = f"group tables in {writer.group_folder()} not listed ({e})"
        self.failures = None
        fpath = writer.failures_path()
        try:
            if table_exists(fpath):
                self.failures = read_parquet(fpath)
        except Exception as e:  # noqa: BLE001
            self.problems["failures"] = f"{fpath} unreadable ({e})"
        self.perm = _load_perm(output_dir / "group", perm_results, self.problems,
                               clusters=writer.table_location("group", "perm_clusters.parquet"))
        self.design = self._design()
        if self.participants is not None:
            try:
                self.participants = self.design.label_groups(self.participants)
            except ValueError as e:
                self.problems["participants"] = str(e)

    def _json(self, path: Path, key: str):
        if not path.exists():
            self.problems[key] = f"{path} not found"
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            self.problems[key] = f"{path} unreadable ({e})"
            return None

    def _design(self):
        from ..stats.design import GroupDesign
        d = (self.config or {}).get("design")
        gpath = self.output_dir / "logs" / GROUP_CONFIG_NAME
        if gpath.exists():
            try:
                d = json.loads(gpath.read_text()).get("design", d)
            except (OSError, json.JSONDecodeError, AttributeError) as e:
                self.problems["group_config"] = f"{gpath} unreadable ({e})"
        try:
            return GroupDesign.from_dict(d) if isinstance(d, dict) else GroupDesign()
        except ValueError:
            return GroupDesign()

    @property
    def pipeline(self) -> dict:
        return (self.config or {}).get("config") or {}

    def roi_chi(self) -> pd.DataFrame | None:
        """Group-level chi rows in long form (participant_id, session_id, roi, hemisphere, value)."""
        from ..stats._common import long_table
        if self.roi is None:
            return None
        measures = ["chi"] if "measure" in self.roi.columns and (self.roi["measure"] == "chi").any() else None
        return long_table(self.roi, value="mean_ppm", level="group", measures=measures)

    def with_participants(self, long: pd.DataFrame, columns) -> pd.DataFrame:
        if self.participants is None:
            return long.assign(**{c: np.nan for c in columns})
        cols = ["participant_id"] + [c for c in columns if c in self.participants.columns]
        out = long.merge(self.participants[cols], on="participant_id", how="left")
        for c in columns:
            if c not in out.columns:
                out[c] = np.nan
        return out


def _read_group_tables(gdir, problems) -> dict:
    """Every ``<name>.parquet`` of the group folder (path or URL) but the ``perm_*`` ones."""
    from ..io.tables import local_path, read_parquet

    local = local_path(gdir)
    if local is not None:
        files = [str(f) for f in sorted(local.glob("*.parquet"))] if local.is_dir() else []
    else:
        import fsspec
        fs, p = fsspec.core.url_to_fs(str(gdir))
        files = [fs.unstrip_protocol(f) for f in sorted(fs.glob(f"{p.rstrip('/')}/*.parquet"))]
    out = {}
    for f in files:
        stem = f.rsplit("/", 1)[-1][:-len(".parquet")]
        if stem.startswith("perm_"):
            continue
        try:
            out[stem] = read_parquet(f)
        except Exception as e:  # noqa: BLE001
            problems[f"group:{stem}"] = f"{stem}.parquet unreadable ({e})"
    return out


def _load_perm(gdir: Path, perm_results, problems, clusters=None) -> dict | None:
    """Permutation outputs as {"t", "logp_fwe", "cluster_labels", "affine", "clusters", "source"}."""
    out: dict = {}
    if perm_results is not None:
        pr = perm_results
        if hasattr(pr, "to_volume"):  # a qsmdask.perm.PermutationResult
            out["t"] = pr.to_volume("t")
            for name in ("logp_fwe_tfce", "logp_fwe_size", "logp_fwe_t"):
                if getattr(pr, name, None) is not None:
                    out["logp_fwe"], out["logp_name"] = pr.to_volume(name), name
                    break
            if getattr(pr, "cluster_labels", None) is not None:
                out["cluster_labels"] = pr.to_volume("cluster_labels")
            out["clusters"] = getattr(pr, "clusters", None)
            out["affine"] = np.asarray((pr.extras or {}).get("affine", np.eye(4)), float)
        elif isinstance(pr, dict):
            for k, v in pr.items():
                out[k] = v
            if "logp_fwe" not in out:
                for name in ("logp_fwe_tfce", "logp_fwe_size", "logp_fwe_t"):
                    if pr.get(name) is not None:
                        out["logp_fwe"], out["logp_name"] = pr[name], name
                        break
            out["affine"] = np.asarray(pr.get("affine", np.eye(4)), float)
        else:
            problems["perm"] = f"perm_results of type {type(pr).__name__} not understood"
        out["source"] = "perm_results argument"
    elif gdir.is_dir():
        files = sorted(gdir.glob("perm_*.nii*"))
        if files:
            import nibabel as nib
            maps = {}
            for f in files:
                key = f.name.split(".nii")[0][len("perm_"):]
                try:
                    img = nib.load(str(f))
                    maps[key] = (np.asanyarray(img.dataobj), img.affine)
                except Exception as e:  # noqa: BLE001
                    problems[f"perm:{key}"] = f"{f.name} unreadable ({e})"
            for k in ("t", "tstat", "t_map"):
                if k in maps:
                    out["t"], out["affine"] = maps[k][0].astype(np.float32), maps[k][1]
                    break
            for k in ("logp_fwe_tfce", "logp_fwe_size", "logp_fwe_mass", "logp_fwe_t", "logp_fwe"):
                if k in maps:
                    out["logp_fwe"], out["logp_name"] = maps[k][0].astype(np.float32), k
                    out.setdefault("affine", maps[k][1])
                    break
            for k in ("cluster_labels", "clusters"):
                if k in maps:
                    out["cluster_labels"] = maps[k][0].astype(np.int64)
                    out.setdefault("affine", maps[k][1])
            out["source"] = ", ".join(f"group/{f.name}" for f in files)
    if perm_results is None:
        from ..io.tables import read_parquet, table_exists
        ct = gdir / "perm_clusters.parquet" if clusters is None else clusters
        try:
            if table_exists(ct):
                out["clusters"] = read_parquet(ct)
                out.setdefault("source", "")
                out["source"] = (out["source"] + ", " if out["source"] else "") + "group/perm_clusters.parquet"
        except Exception as e:  # noqa: BLE001
            problems["perm_clusters"] = f"perm_clusters.parquet unreadable ({e})"
    return out or None


# ------------------------------------------------------------------------------------------
# sections
def _sig(df: pd.DataFrame, alpha=ALPHA) -> pd.Series:
    if df is None or "p_corrected" not in df.columns:
        return pd.Series(False, index=getattr(df, "index", None))
    return pd.to_numeric(df["p_corrected"], errors="coerce") < alpha


def _finding(df: pd.DataFrame, alpha=ALPHA) -> pd.Series:
    """Rows worth highlighting: corrected p < alpha, but never a model's intercept (it tests
    whether susceptibility is zero, not an effect) and never a row computed on fewer than
    MIN_STRATUM_N participants (a stratum, or a correlation within a small group: too small
    to trust). Two-group comparisons count their groups in ``n1``/``n2`` and are not affected."""
    sig = _sig(df, alpha)
    if df is None or not len(sig):
        return sig
    if "term" in df.columns:
        term = df["term"].astype(str).str.strip().str.lower()
        sig &= ~term.isin(["intercept", "(intercept)", "const", "constant"])
    if "n" in df.columns:
        sig &= ~(pd.to_numeric(df["n"], errors="coerce").fillna(0) < MIN_STRATUM_N)
    return sig


def _section_findings(inp: _Inputs) -> str:
    items = []
    alpha = inp.design.alpha
    n_done = 0 if inp.roi is None else inp.roi[["participant_id", "session_id"]].drop_duplicates().shape[0]
    n_fail = 0 if inp.failures is None else len(inp.failures)
    items.append(f"{n_done} subject-session(s) reconstructed and measured; {n_fail} failed"
                 + (" (see <a href=\"#failures\">Failed subjects</a>)." if n_fail else "."))
    gw = inp.group_tables.get("group_wilcoxon")
    if gw is None:
        items.append("No patients-vs-controls table (group/group_wilcoxon.parquet): run the group level.")
    else:
        s = gw[_finding(gw, alpha)]
        if len(s):
            parts = []
            for roi, g in sorted(s.groupby("roi"), key=lambda kv: kv[1]["p_corrected"].min()):
                where = ", ".join(sorted({f"{h}" + (f" {ses}" if str(ses) else "")
                                          for h, ses in zip(g["hemisphere"], g["session_id"])}))
                es = g["effect_size"].astype(float)
                direction = ("higher" if (es > 0).all() else "lower" if (es < 0).all()
                             else "higher or lower")
                parts.append(f"<b>{_esc(roi)}</b> ({_esc(where)}): {_esc(inp.design.groups[0])} "
                             f"{direction} than {_esc(inp.design.groups[1])}, rank-biserial r "
                             + (f"{es.min():.2f}" if np.isclose(es.min(), es.max())
                                else f"{es.min():.2f} to {es.max():.2f}")
                             + ", smallest corrected p "
                             f"{_fmt_p(g['p_corrected'].min())}")
            items.append("Susceptibility differs between groups (Wilcoxon rank-sum, "
                         f"{_esc(s['correction'].iloc[0])}-corrected p &lt; {alpha}) in: "
                         + "; ".join(parts) + ' (see <a href="#group">ROI comparisons</a>).')
        else:
            items.append(f"No ROI differs between groups at corrected p &lt; {alpha} "
                         f"({_esc(gw['correction'].iloc[0]) if len(gw) else ''} correction).")
    cc = inp.group_tables.get("clinical_correlation")
    if cc is not None and len(cc):
        s = cc[_finding(cc, alpha)]
        if len(s):
            parts = []
            for r in s.sort_values("p_corrected").head(12).itertuples():
                kind = f"{getattr(r, 'correlation', '')} " if hasattr(r, "correlation") else ""
                ses = f", {r.session_id}" if str(r.session_id) else ""
                parts.append(f"<b>{_esc(r.roi)} ({_esc(r.hemisphere)}{_esc(ses)})</b> with "
                             f"{_esc(r.variable)}: {_esc(kind)}r = {float(r.effect_size):.2f}, "
                             f"corrected p = {_fmt_p(r.p_corrected)}")
            more = f" and {len(s) - 12} more" if len(s) > 12 else ""
            items.append("Susceptibility tracks the disease course in: " + "; ".join(parts)
                         + more + ' (see <a href="#course">disease course</a>).')
        else:
            n_small = int((_sig(cc, alpha) & ~_finding(cc, alpha)).sum())
            items.append("No ROI correlates with a clinical variable at corrected p &lt; "
                         f"{alpha} (Pearson or Spearman)"
                         + (f"; {n_small} correlation(s) below that p rest on fewer than {MIN_STRATUM_N} "
                            "participants and are not counted as findings" if n_small else "") + ".")
    elif cc is None:
        items.append("No clinical correlation table (group/clinical_correlation.parquet); the "
                     "disease-course plots show the data without tests.")
    if inp.perm and inp.perm.get("clusters") is not None:
        ct = inp.perm["clusters"]
        pc = [c for c in ("p_fwe_size", "p_fwe_mass") if c in ct.columns]
        n_sig = int((ct[pc].min(axis=1) < alpha).sum()) if pc else len(ct)
        items.append(f"Voxel-wise permutation test: {n_sig} FWE-significant cluster(s) "
                     "(see <a href=\"#voxelwise\">Voxel-wise</a>).")
    return "<ul>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>"


def _section_cohort(inp: _Inputs) -> str:
    parts = []
    if inp.participants is None:
        parts.append(_note(f"participants.tsv not available: {inp.problems.get('participants', '')}"))
    if inp.roi is not None:
        done = inp.roi[["participant_id", "session_id"]].drop_duplicates()
        what = "Processed subject-sessions (with an ROI table)"
    elif inp.participants is not None:
        if inp.sessions is not None:
            done = inp.sessions[["participant_id", "session_id"]].drop_duplicates()
        else:
            done = inp.participants[["participant_id"]].assign(session_id="")
        what = "Subject-sessions in the BIDS dataset (none processed yet)"
    else:
        return "".join(parts) + _note("Neither ROI tables nor participants.tsv are available.")
    df = inp.with_participants(done, ["site", "group", "age", "sex"])
    for c in ("site", "group", "sex"):
        df[c] = df[c].fillna("n/a").astype(str)
    df["age"] = pd.to_numeric(df["age"], errors="coerce")
    rows = []
    for (site, group, ses), g in df.groupby(["site", "group", "session_id"], sort=True):
        age = g["age"].dropna()
        rows.append({"site": site, "group": group, "session": ses or "(none)",
                     "n": len(g),
                     "age mean (SD)": f"{age.mean():.1f} ({age.std(ddof=1):.1f})" if len(age) > 1
                     else (f"{age.mean():.1f}" if len(age) else ""),
                     "age range": f"{age.min():.0f}-{age.max():.0f}" if len(age) else "",
                     "F / M": f"{(g['sex'] == 'F').sum()} / {(g['sex'] == 'M').sum()}"})
    totals = df.drop_duplicates("participant_id")
    parts.append(f"<p>{_esc(what)}: <b>{len(df)}</b> from <b>{totals.shape[0]}</b> participant(s)"
                 + (f"; participants.tsv lists {len(inp.participants)}." if inp.participants is not None
                    else ".") + "</p>")
    parts.append(_table(pd.DataFrame(rows)))
    return "".join(parts)


def _group_panels(long: pd.DataFrame, groups, gw: pd.DataFrame | None, session: str, alpha) -> Figure:
    rois = sorted(long["roi"].unique(), key=_roi_sort_key)
    ncol = min(4, len(rois))
    nrow = int(math.ceil(len(rois) / ncol))
    fig = _fig(3.3 * ncol, 2.9 * nrow)
    rng = np.random.default_rng(0)
    colours = {g: _GROUP_COLOURS.get(g, _OTHER_COLOURS[i % 4]) for i, g in enumerate(groups)}
    for k, roi in enumerate(rois):
        ax = fig.add_subplot(nrow, ncol, k + 1)
        sub = long[long["roi"] == roi]
        hemis = sorted(sub["hemisphere"].unique(), key=lambda h: _HEMI_ORDER.get(h, 9))
        width = 0.8 / len(groups)
        for hi, h in enumerate(hemis):
            for gi, g in enumerate(groups):
                v = sub.loc[(sub["hemisphere"] == h) & (sub["group"] == g), "value"].to_numpy(float)
                if v.size == 0:
                    continue
                pos = hi - 0.4 + width * (gi + 0.5)
                ax.boxplot([v], positions=[pos], widths=width * 0.8, showfliers=False,
                           patch_artist=True,
                           boxprops=dict(facecolor=colours[g], alpha=0.35, edgecolor=colours[g]),
                           medianprops=dict(color=colours[g]), whiskerprops=dict(color=colours[g]),
                           capprops=dict(color=colours[g]))
                ax.scatter(pos + rng.uniform(-width * 0.25, width * 0.25, v.size), v, s=9,
                           color=colours[g], alpha=0.85, linewidths=0, zorder=3)
            if gw is not None and len(gw):
                row = gw[(gw["roi"] == roi) & (gw["hemisphere"] == h)
                         & (gw["session_id"].fillna("").astype(str) == session)]
                if len(row):
                    p = row["p_corrected"].iloc[0]
                    star = " *" if pd.notna(p) and p < alpha else ""
                    short = "<0.001" if pd.notna(p) and p < 1e-3 else _fmt_p(p)
                    ax.annotate(f"p={short}{star}", (hi, 1.0), xycoords=("data", "axes fraction"),
                                ha="center", va="bottom", fontsize=7,
                                fontweight="bold" if star else "normal")
        ax.set_xticks(range(len(hemis)))
        ax.set_xticklabels(hemis)
        ax.set_xlim(-0.6, len(hemis) - 0.4)
        ax.set_title(str(roi), fontsize=9, pad=12)
        ax.tick_params(labelsize=7)
        if k % ncol == 0:
            ax.set_ylabel("chi (ppm)", fontsize=8)
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], marker="s", linestyle="", color=colours[g], label=g) for g in groups]
    fig.legend(handles=handles, loc="upper right", ncol=len(groups), fontsize=8, frameon=False)
    _grid_layout(fig, nrow, top_in=0.75)
    return fig


def _section_group(inp: _Inputs) -> str:
    long = inp.roi_chi()
    if long is None:
        return _note(f"No ROI tables: {inp.problems.get('roi', '')}")
    long = inp.with_participants(long, ["group"])
    if long["group"].isna().all():
        return _note("Group membership unknown (no participants.tsv with a 'group' column); "
                     "ROI values cannot be compared between groups.")
    groups = [g for g in inp.design.groups if g in set(long["group"])]
    groups += sorted(set(long["group"].dropna()) - set(groups))
    gw = inp.group_tables.get("group_wilcoxon")
    alpha = inp.design.alpha
    out = []
    if gw is None:
        out.append(_note("No group table (group/group_wilcoxon.parquet): the plots show the data "
                         "without test results; run the group level."))
    else:
        corr = gw["correction"].iloc[0] if len(gw) else ""
        out.append(f"<p>Mean susceptibility per ROI (atlas groups; hemispheres L, R and B = both "
                   f"pooled) of each subject-session. Boxes: median and quartiles; points: "
                   f"subjects. Above each pair: Wilcoxon rank-sum p, {_esc(corr)}-corrected over all "
                   f"ROI x hemisphere tests; <b>*</b> marks corrected p &lt; {alpha}. "
                   f"Effect size: rank-biserial r (positive: {_esc(inp.design.groups[0])} higher).</p>")
    for ses in sorted(long["session_id"].unique()):
        sub = long[long["session_id"] == ses]
        if ses:
            out.append(f"<h3>Session {_esc(ses)}</h3>")
        out.append(_img(_group_panels(sub, groups, gw, ses, alpha),
                        f"ROI susceptibility by group, session {ses or 'none'}"))
        if gw is not None and len(gw):
            t = gw[gw["session_id"].fillna("").astype(str) == ses].copy()
            med = sub.groupby(["roi", "hemisphere", "group"])["value"].median().unstack("group")
            for g in groups[:2]:
                if g in med.columns:
                    t[f"median {g} (ppm)"] = [med[g].get((r, h), np.nan)
                                             for r, h in zip(t["roi"], t["hemisphere"])]
            t = t.sort_values(["p", "roi"])
            cols = ["roi", "hemisphere", "n1", "n2"] + [c for c in t.columns if c.startswith("median ")] \
                + ["effect_size", "ci_low", "ci_high", "p", "p_corrected"]
            tt = t[[c for c in cols if c in t.columns]].rename(columns={"effect_size": "rank-biserial r"})
            out.append(_table(tt, highlight=_finding(t, alpha), formats=_p_formats(tt)))
    ols = inp.group_tables.get("group_ols")
    if ols is not None and len(ols):
        out.append("<h3>Covariate-adjusted comparison (OLS)</h3>"
                   f"<p>{_esc(ols['method'].dropna().iloc[0] if ols['method'].notna().any() else '')}; "
                   "coefficient = adjusted difference in ppm.</p>")
        cols = ["session_id", "roi", "hemisphere", "n", "effect_size", "ci_low", "ci_high",
                "statistic", "p", "p_corrected"]
        tt = ols.sort_values("p")[[c for c in cols if c in ols.columns]]
        out.append(_table(tt, highlight=_finding(ols.sort_values("p"), alpha), formats=_p_formats(tt)))
    return "".join(out)


def _scatter_figure(inp: _Inputs, variable: str, rois, session, group, stats_table) -> Figure | None:
    """One panel per ROI: susceptibility against ``variable`` with the fit and its 95 % band.

    Each title carries Pearson r of the points shown and the corrected p of the group table
    (``p_corr n/a`` when the table has no such row); both axes carry units.
    """
    from ..stats.correlation import correlation_plot_data
    panels = []
    for roi, hemi in rois:
        try:
            pts, band = correlation_plot_data(inp.roi, inp.participants, inp.sessions, roi=roi,
                                              hemisphere=hemi, variable=variable,
                                              measure=_measure(inp), session=session, group=group)
        except ValueError:
            continue
        panels.append((roi, hemi, pts, band))
    if not panels:
        return None
    ncol = min(4, len(panels))
    nrow = int(math.ceil(len(panels) / ncol))
    fig = _fig(3.4 * ncol, 2.9 * nrow)
    fig.set_layout_engine("constrained")  # no clipped titles or axis labels
    colour = _GROUP_COLOURS.get(group, "#555555")
    xlabel = VARIABLE_LABELS.get(variable, variable)
    for k, (roi, hemi, pts, band) in enumerate(panels):
        ax = fig.add_subplot(nrow, ncol, k + 1)
        ax.fill_between(band["x"], band["lower"], band["upper"], color=colour, alpha=0.2, linewidth=0)
        ax.plot(band["x"], band["fit"], color=colour, linewidth=1.5)
        ax.scatter(pts["x"], pts["y"], s=10, color=colour, alpha=0.85, linewidths=0)
        x, y = pts["x"].to_numpy(float), pts["y"].to_numpy(float)
        ok = np.isfinite(x) & np.isfinite(y)
        r_val = (float(np.corrcoef(x[ok], y[ok])[0, 1]) if ok.sum() >= 3 and np.std(x[ok]) > 0
                 and np.std(y[ok]) > 0 else float("nan"))
        p_text, star = "p_corr n/a", ""
        if stats_table is not None and len(stats_table):
            r = stats_table[(stats_table["roi"] == roi) & (stats_table["hemisphere"] == hemi)
                            & (stats_table["variable"] == variable)
                            & (stats_table["session_id"].fillna("").astype(str) == (session or ""))]
            if "correlation" in r.columns:
                r = r[r["correlation"] == "pearson"]
            if len(r):
                p = r["p_corrected"].iloc[0]
                star = " *" if bool(_finding(r.head(1), inp.design.alpha).iloc[0]) else ""
                p_text = f"p_corr = {_fmt_p(p)}" if pd.notna(p) else "p_corr n/a"
                r_val = float(r["effect_size"].iloc[0])
        r_text = f"r = {r_val:.2f}" if np.isfinite(r_val) else "r n/a"
        ax.set_title(f"{roi} ({hemi}), n = {int(ok.sum())}\n{r_text}, {p_text}{star}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_ylabel("chi (ppm)", fontsize=8)
        ax.set_xlabel(xlabel, fontsize=8)
    return fig


def _measure(inp: _Inputs) -> str:
    if inp.roi is not None and "measure" in inp.roi.columns and (inp.roi["measure"] == "chi").any():
        return "chi"
    return str(inp.roi["measure"].iloc[0]) if inp.roi is not None and "measure" in inp.roi.columns else "chi"


def _section_course(inp: _Inputs) -> str:
    long = inp.roi_chi()
    if long is None:
        return _note(f"No ROI tables: {inp.problems.get('roi', '')}")
    if inp.participants is None:
        return _note("participants.tsv not available, so clinical variables are unknown: "
                     + inp.problems.get("participants", ""))
    from ..stats._common import order_sessions
    sessions = order_sessions(sorted(long["session_id"].unique()), inp.sessions)
    session = sessions[0] if sessions else ""  # "": a dataset without sessions
    group = inp.design.clinical_group
    if group is not None and ("group" not in inp.participants.columns
                              or group not in set(inp.participants["group"])):
        group = None
    pairs = long[["roi", "hemisphere"]].drop_duplicates()
    bil = pairs[pairs["hemisphere"] == "B"]
    if len(bil) == 0:
        bil = pairs.drop_duplicates("roi")
    rois = sorted(zip(bil["roi"], bil["hemisphere"]), key=lambda t: _roi_sort_key(t[0]))
    cc = inp.group_tables.get("clinical_correlation")
    pc = inp.group_tables.get("partial_correlation")
    who = f"{group}s" if group else "all participants"
    out = [f"<p>ROI susceptibility against clinical course and inflammation in {_esc(who)}"
           + (f", session {_esc(session)}" if session else "")
           + " (both hemispheres pooled). Line: least-squares fit; band: its 95 % confidence band. "
           "Panel titles give the number of participants, Pearson r and its corrected p (p_corr) from "
           "the group tables (clinical_correlation; for markers the covariate-adjusted "
           "partial_correlation, whose r is the partial r); without a table row, r of the points shown "
           f"and p_corr n/a. <b>*</b>: corrected p &lt; {inp.design.alpha}.</p>"]
    variables = [v for v in (*CLINICAL_VARIABLES, *MARKERS)]
    shown = 0
    for var in variables:
        in_part = var in inp.participants.columns
        in_ses = inp.sessions is not None and var in inp.sessions.columns
        if not (in_part or in_ses):
            continue
        table = cc if (cc is not None and "variable" in cc.columns and (cc["variable"] == var).any()) else pc
        if table is not None and "variable" not in table.columns:
            table = None
        fig = _scatter_figure(inp, var, rois, session, group, table)
        kind = "inflammatory marker" if var in MARKERS else "clinical variable"
        out.append(f"<h3>{_esc(var)} <span class=\"kind\">({kind})</span></h3>")
        if fig is None:
            out.append(_note(f"Not enough complete data to plot {var}."))
            continue
        out.append(_img(fig, f"ROI susceptibility vs {var}"))
        shown += 1
    if shown == 0:
        out.append(_note("None of the clinical variables or markers "
                         f"({', '.join(variables)}) are in participants.tsv or sessions.tsv."))
    if len(sessions) > 1:
        out.append(_longitudinal(inp, long, sessions, group))
    return "".join(out)


def _longitudinal(inp: _Inputs, long, sessions, group) -> str:
    df = inp.with_participants(long[long["hemisphere"] == "B"] if (long["hemisphere"] == "B").any()
                               else long, ["group"])
    rois = sorted(df["roi"].unique(), key=_roi_sort_key)
    ncol = min(4, len(rois))
    nrow = int(math.ceil(len(rois) / ncol))
    fig = _fig(3.2 * ncol, 2.6 * nrow)
    order = {s: i for i, s in enumerate(sessions)}
    for k, roi in enumerate(rois):
        ax = fig.add_subplot(nrow, ncol, k + 1)
        sub = df[df["roi"] == roi]
        for g, gsub in sub.groupby(sub["group"].fillna("n/a")):
            colour = _GROUP_COLOURS.get(g, "#777777")
            for _, s in gsub.groupby("participant_id"):
                s = s.sort_values("session_id", key=lambda c: c.map(order))
                ax.plot(s["session_id"].map(order), s["value"], color=colour, alpha=0.35, linewidth=0.8)
            m = gsub.groupby("session_id")["value"].mean()
            ax.plot([order[s] for s in m.index], m.to_numpy(), color=colour, linewidth=2.2,
                    marker="o", label=g)
        ax.set_xticks(range(len(sessions)))
        ax.set_xticklabels(sessions, fontsize=7)
        ax.set_title(str(roi), fontsize=9)
        ax.tick_params(labelsize=7)
        if k == 0:
            ax.legend(fontsize=7, frameon=False)
        if k % ncol == 0:
            ax.set_ylabel("chi (ppm)", fontsize=8)
    _grid_layout(fig, nrow)
    out = ["<h3>Change between sessions</h3><p>Thin lines: subjects; thick lines: group means "
           "(both hemispheres pooled).</p>", _img(fig, "ROI susceptibility across sessions")]
    for name in ("paired_ttest", "mixed_model"):
        t = inp.group_tables.get(name)
        if t is not None and len(t):
            out.append(f"<p>{_esc(name)}: {int(_finding(t, inp.design.alpha).sum())} of {len(t)} "
                       "rows significant after correction (see Other analyses).</p>")
    return "".join(out)


def _mip(vol: np.ndarray, axis: int) -> np.ndarray:
    """Signed maximum-intensity projection (the value of largest magnitude) along ``axis``."""
    idx = np.argmax(np.abs(vol), axis=axis)
    return np.take_along_axis(vol, np.expand_dims(idx, axis), axis=axis).squeeze(axis).T


def _template_background(shape, voxel_size_mm):
    """(T1 template, brain mask) from nilearn's package data when they match the map grid."""
    try:
        from ..atlas import load_template, load_template_mask
        for res in (1, 2):
            if np.allclose(voxel_size_mm, res, atol=1e-3):
                t1, _ = load_template(resolution_mm=res)
                mask, _ = load_template_mask(resolution_mm=res)
                if t1.shape == tuple(shape) and mask.shape == tuple(shape):
                    return np.asarray(t1, np.float32), np.asarray(mask, bool)
    except Exception:  # noqa: BLE001 - the background is a nicety
        pass
    return None, None


def _section_voxelwise(inp: _Inputs) -> str:
    perm = inp.perm
    if not perm:
        return _note("No voxel-wise permutation results were found (group/perm_*.nii.gz and "
                     "group/perm_clusters.parquet are absent); run the voxel-wise analysis to "
                     "fill this section.")
    alpha = inp.design.alpha
    out = [f"<p>Source: {_esc(perm.get('source', ''))}.</p>"]
    vpath = Path(inp.output_dir) / "logs" / "qsmdask_voxelwise_config.json"
    try:
        vcfg = json.loads(vpath.read_text()) if vpath.exists() else {}
    except (OSError, json.JSONDecodeError):
        vcfg = {}
    ses = vcfg.get("session_id")
    if ses is None and perm.get("clusters") is not None and "session_id" in perm["clusters"]:
        ses = next(iter(pd.DataFrame(perm["clusters"])["session_id"].astype(str)), None)
    if ses is not None:
        left = "; ".join(d.get("reason", "") for d in vcfg.get("covariates_left_out", []))
        out.append(f"<p>Session analysed: <b>{_esc(ses or 'single session')}</b>"
                   + (f" ({_esc(vcfg['session_choice'])})" if vcfg.get("session_choice") else "")
                   + (f", n = {len(vcfg['subjects'])}" if vcfg.get("subjects") else "")
                   + (f", covariates {_esc(', '.join(vcfg.get('covariates', [])) or 'none')}"
                      if "covariates" in vcfg else "")
                   + (f". Left out: {_esc(left)}" if left else "") + ".</p>")
    t = perm.get("t")
    if t is not None:
        t = np.asarray(t, dtype=np.float32)
        sig = None
        if perm.get("logp_fwe") is not None:
            sig = np.asarray(perm["logp_fwe"]) >= -math.log10(alpha)
            how = f"{perm.get('logp_name', 'logp_fwe')} (-log10 FWE p) &ge; {-math.log10(alpha):.2f}"
        elif perm.get("cluster_labels") is not None and perm.get("clusters") is not None:
            ct = perm["clusters"]
            keep = ct.loc[ct.get("p_fwe_size", pd.Series(1.0, index=ct.index)) < alpha, "cluster"]
            sig = np.isin(np.asarray(perm["cluster_labels"]), keep.to_numpy())
            how = f"clusters with size FWE p &lt; {alpha}"
        if sig is None:
            out.append(_note("No FWE p map was found; the unthresholded t map is shown."))
            shown = t
            how = "unthresholded"
        else:
            shown = np.where(sig, t, 0.0)
        vs = np.linalg.norm(np.asarray(perm.get("affine", np.eye(4)))[:3, :3], axis=0)
        vmax = float(np.nanmax(np.abs(t))) or 1.0
        brain = np.isfinite(t) & (t != 0)
        t1, tmask = _template_background(t.shape, vs)
        if tmask is not None:
            brain = tmask | brain
        fig = _fig(11, 3.8)
        names = (("sagittal (x)", 0), ("coronal (y)", 1), ("axial (z)", 2))
        im = None
        for k, (name, ax_i) in enumerate(names):
            ax = fig.add_subplot(1, 3, k + 1)
            a, b = [i for i in range(3) if i != ax_i]
            ext = (0, t.shape[a] * vs[a], 0, t.shape[b] * vs[b])
            ax.imshow(brain.any(axis=ax_i).T, cmap="Greys", vmin=0, vmax=4, origin="lower", extent=ext)
            proj = _mip(shown, ax_i)
            im = ax.imshow(np.ma.masked_equal(proj, 0), cmap="RdBu_r", vmin=-vmax, vmax=vmax,
                           origin="lower", extent=ext, interpolation="nearest")
            ax.set_title(f"{name} projection", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.colorbar(im, ax=fig.axes, shrink=0.8, label="t")
        n_sig = int(np.count_nonzero(shown)) if sig is not None else 0
        out.append(f"<p>Glass-brain view: maximum-intensity projections of the t statistic in "
                   f"voxels passing {how}; grey: analysed voxels. "
                   + (f"<b>{n_sig}</b> voxel(s) significant." if sig is not None else "") + "</p>")
        out.append(_img(fig, "maximum-intensity projections of significant t"))
        if sig is not None and not n_sig:
            out.append(_not_detected(vcfg, how))
        if sig is not None and n_sig:
            peak = np.unravel_index(np.argmax(np.abs(shown)), shown.shape)
            fig = _fig(11, 3.8)
            for k, (name, ax_i) in enumerate(names):
                ax = fig.add_subplot(1, 3, k + 1)
                a, b = [i for i in range(3) if i != ax_i]
                ext = (0, t.shape[a] * vs[a], 0, t.shape[b] * vs[b])
                if t1 is not None:
                    bg = np.take(t1, peak[ax_i], axis=ax_i).T
                    ax.imshow(bg, cmap="gray", vmin=0, vmax=float(np.percentile(t1, 99.5)) or 1.0,
                              origin="lower", extent=ext)
                else:
                    ax.imshow(np.take(t, peak[ax_i], axis=ax_i).T, cmap="gray", vmin=-vmax,
                              vmax=vmax, origin="lower", extent=ext)
                sl = np.take(shown, peak[ax_i], axis=ax_i).T
                ax.imshow(np.ma.masked_equal(sl, 0), cmap="RdBu_r", vmin=-vmax, vmax=vmax,
                          origin="lower", extent=ext, interpolation="nearest")
                ax.set_title(f"{name.split()[0]} slice {'xyz'[ax_i]}={peak[ax_i]}", fontsize=9)
                ax.set_xticks([])
                ax.set_yticks([])
            bg_name = "the MNI152 template" if t1 is not None else "the t map"
            out.append(f"<p>Slices through the peak voxel: {bg_name} in grey, significant t in "
                       "colour.</p>" + _img(fig, "slices through the peak"))
    ct = perm.get("clusters")
    if ct is not None:
        ct = pd.DataFrame(ct)
        out.append("<h3>Cluster table</h3><p>Peak coordinates in template millimetres; "
                   "p_fwe_*: family-wise error p of cluster size / mass from the permutation "
                   "null distribution of the maximum.</p>")
        pc = [c for c in ("p_fwe_size", "p_fwe_mass") if c in ct.columns]
        hl = (ct[pc].min(axis=1) < alpha) if pc else None
        out.append(_table(ct, highlight=hl, formats=_p_formats(ct)))
    elif t is not None:
        out.append(_note("No cluster table (group/perm_clusters.parquet)."))
    return "".join(out)


def _not_detected(vcfg: dict, how: str) -> str:
    """'Not detected at n = ...' with what the analysis could have detected (its power)."""
    n = len(vcfg.get("subjects", []))
    n1 = vcfg.get("n_patients")
    who = f"n = {n}" + (f" ({n1} patients, {n - n1} controls)" if n and n1 is not None else "")
    text = f"<b>Not detected</b>: no voxel passed {how} at {who}."
    pw = vcfg.get("power") or {}
    t_fwe, d = pw.get("fwe_t_threshold"), pw.get("detectable_d_power80")
    if t_fwe is not None and d is not None:
        text += (f" Power: the voxel-level FWE threshold of this analysis was t &ge; {t_fwe:.2f} "
                 f"({pw.get('n_permutations')} permutations, {pw.get('dof')} degrees of freedom), "
                 f"which a group difference of {d:.2f} within-group standard deviations reaches with "
                 "80 % probability; smaller differences are likely to be missed at this n (cluster "
                 "inference can detect spatially extended ones below that).")
    elif t_fwe is not None and pw.get("undetectable_at_this_n"):
        text += (f" Power: the voxel-level FWE threshold of this analysis was t &ge; {t_fwe:.2f} "
                 f"({pw.get('n_permutations')} permutations, {pw.get('dof')} degrees of freedom), "
                 "which no group difference reaches with 80 % probability at this n.")
    elif t_fwe is not None:
        text += " Too few permutations to reach this FWE level."
    return f"<p>{text}</p>"


def _section_postmortem(inp: _Inputs) -> str:
    try:
        from ..roi import postmortem_iron_validation
    except ImportError:
        return _note("The post-mortem iron validation (qsmdask.roi.postmortem_iron_validation) is "
                     "not available in this version of qsmdask.")
    if inp.roi is None:
        return _note(f"No ROI tables: {inp.problems.get('roi', '')}")
    who, ids = "all subjects (group membership unknown)", None
    if inp.participants is not None and "group" in inp.participants.columns:
        ctrl = inp.design.groups[1]
        ids = inp.participants.loc[inp.participants["group"] == ctrl, "participant_id"].tolist()
        who = f"{ctrl}s"
        if not ids:
            ids, who = None, f"all subjects (no '{ctrl}' in participants.tsv)"
    res = postmortem_iron_validation(inp.roi, participants=ids)
    table = pd.DataFrame(res.get("table")) if res.get("table") is not None else pd.DataFrame()
    num = [c for c in table.columns if pd.api.types.is_numeric_dtype(table[c])]
    xcol = next((c for c in num if "iron" in c.lower()), None)
    ycol = next((c for c in num if c != xcol and ("chi" in c.lower() or "ppm" in c.lower())), None)
    out = [f"<p>Mean susceptibility of ROIs ({_esc(who)}, both hemispheres) against the "
           f"non-haem iron concentration "
           f"reported post mortem by Hallgren &amp; Sourander (1958): r = {_fmt(res.get('r'))}, "
           f"p = {_fmt_p(res.get('p'))}, slope = {_fmt(res.get('slope'), 4)} ppm per (mg/100 g), "
           f"n = {_fmt(res.get('n'))} ROIs.</p>"]
    if xcol and ycol and len(table):
        fig = _fig(6.4, 4.6)
        fig.set_layout_engine("constrained")
        ax = fig.add_subplot(1, 1, 1)
        x, y = table[xcol].to_numpy(float), table[ycol].to_numpy(float)
        ax.scatter(x, y, color="#444444", s=28, zorder=3)
        names = table["roi"] if "roi" in table.columns else table.index
        # labels beside their points, alternating above and below, inside the axes (margins)
        order = np.argsort(x)
        for rank, i in enumerate(order):
            dy = 6 if rank % 2 == 0 else -12
            right = x[i] < np.nanmedian(x) if np.isfinite(x).any() else True
            ax.annotate(str(names.iloc[i] if hasattr(names, "iloc") else names[i]), (x[i], y[i]), fontsize=9,
                        xytext=(6 if right else -6, dy), textcoords="offset points",
                        ha="left" if right else "right")
        ax.margins(x=0.18, y=0.15)
        if res.get("slope") is not None and np.isfinite(x).any():
            xx = np.linspace(np.nanmin(x), np.nanmax(x), 20)
            ax.plot(xx, float(res["intercept"]) + float(res["slope"]) * xx, color="#d95f02",
                    label=f"least-squares fit: r = {_fmt(res.get('r'), 2)}, n = {_fmt(res.get('n'))}")
            ax.legend(fontsize=8, frameon=False, loc="upper left")
        ax.set_xlabel("non-haem iron post mortem (mg / 100 g fresh weight; Hallgren & Sourander 1958)",
                      fontsize=9)
        ax.set_ylabel("mean susceptibility (ppm)" if "ppm" in ycol or "chi" in ycol.lower() else ycol,
                      fontsize=9)
        ax.tick_params(labelsize=8)
        out.append(_img(fig, "susceptibility vs post-mortem iron"))
    out.append(_table(table))
    return "".join(out)


def _section_failures(inp: _Inputs) -> str:
    out = []
    f = inp.failures
    if f is None:
        out.append(_note("No failures table (failures.parquet): "
                         + inp.problems.get("failures", "no failures were recorded")))
    elif len(f) == 0:
        out.append("<p>No subject-session failed.</p>")
    else:
        out.append(f"<p><b>{len(f)}</b> subject-session(s) failed. Stage: where the pipeline "
                   "stopped (ingest = reading and validating the BIDS files, reconstruct = QSM, "
                   "standardise = registration, roi = atlas statistics, write = outputs); "
                   "file: the input involved.</p>")
        cols = [c for c in ("participant_id", "session_id", "stage", "error_type", "message", "file")
                if c in f.columns]
        out.append(_table(f[cols].sort_values(cols[:2])))
    if inp.participants is not None:
        processed = set() if inp.roi is None else set(inp.roi["participant_id"])
        failed = set() if f is None or len(f) == 0 else set(f["participant_id"])
        missing = sorted(set(inp.participants["participant_id"]) - processed - failed)
        if missing:
            out.append(f"<p>In participants.tsv but neither processed nor failed (not run, or "
                       f"no MEGRE data): {_esc(', '.join(missing))}.</p>")
    return "".join(out)


def _section_qc(inp: _Inputs) -> str:
    if inp.roi is None:
        return _note(f"No ROI tables: {inp.problems.get('roi', '')}")
    qcols = [c for c in inp.roi.columns if c.startswith("qc_") and not c.startswith("qc_time")]
    if not qcols:
        return _note("The ROI tables carry no qc_* columns.")
    q = inp.roi.groupby(["participant_id", "session_id"])[qcols].first().reset_index()
    summ = []
    flags = pd.Series(False, index=q.index)
    reasons = [[] for _ in range(len(q))]
    for c in qcols:
        v = pd.to_numeric(q[c], errors="coerce")
        med = v.median()
        mad = 1.4826 * (v - med).abs().median()
        summ.append({"metric": c[3:], "median": med, "min": v.min(), "max": v.max()})
        if mad > 0 and c not in ("qc_n_echoes", "qc_recon_seconds"):
            z = (v - med) / mad
            bad = z.abs() > 3.5
            flags |= bad.fillna(False)
            for i in np.flatnonzero(bad.fillna(False).to_numpy()):
                reasons[i].append(f"{c[3:]} = {_fmt(v.iloc[i])} (robust z {z.iloc[i]:+.1f})")
    out = [f"<p>Reconstruction QC numbers of {len(q)} subject-session(s) (from the qc_* columns "
           "of the ROI tables). Outliers: robust z-score (median / 1.4826 MAD) above 3.5.</p>",
           _table(pd.DataFrame(summ))]
    if flags.any():
        fl = q.loc[flags, ["participant_id", "session_id"]].copy()
        fl["why"] = ["; ".join(reasons[i]) for i in np.flatnonzero(flags.to_numpy())]
        out.append("<p><b>Subject-sessions to inspect:</b></p>" + _table(fl))
        out.append(_qc_images(inp.output_dir, fl[["participant_id", "session_id"]].to_numpy()))
    else:
        out.append("<p>No QC outliers.</p>")
    return "".join(out)


def _qc_images(output_dir: Path, keys, limit: int = 8) -> str:
    """Inline the QC figures (``*_qc.png`` written by the workflow) of the given subject-sessions."""
    parts = []
    for pid, ses in list(keys)[:limit]:
        stem = f"{pid}_{ses}" if ses else str(pid)
        folder = output_dir / str(pid) / (str(ses) if ses else "")
        pngs = sorted(folder.glob(f"**/{stem}*_qc.png")) if folder.is_dir() else []
        if not pngs:
            continue
        data = base64.b64encode(pngs[0].read_bytes()).decode("ascii")
        parts.append(f"<figure><figcaption>{_esc(pngs[0].name)}</figcaption>"
                     f'<img alt="QC figure {_esc(stem)}" src="data:image/png;base64,{data}" '
                     'style="max-width:600px"></figure>')
    return "".join(parts)


def _of_interest(t: pd.DataFrame) -> pd.Series:
    """Rows that are contrasts of interest: never intercepts or covariate terms."""
    if "contrast_of_interest" in t.columns:
        return t["contrast_of_interest"].fillna(False).astype(bool)
    if "term" in t.columns:
        return ~t["term"].astype(str).isin(["const", "Intercept", "intercept"])
    return pd.Series(True, index=t.index)


def _section_other(inp: _Inputs) -> str:
    shown = {"group_wilcoxon", "group_ols", "skipped", "design_diagnostics",
             "perm_design_diagnostics", "perm_clusters"}
    out = []
    alpha = inp.design.alpha
    for name, t in sorted(inp.group_tables.items()):
        if name in shown:
            continue
        t = t[_of_interest(t)]
        n_sig = int(_finding(t, alpha).sum()) if "p_corrected" in t.columns else 0
        caveat = (f" (intercepts and rows of fewer than {MIN_STRATUM_N} participants are not counted or "
                  "highlighted)" if {"term", "n"} & set(t.columns) else "")
        out.append(f"<h3>{_esc(name)}</h3><p>{len(t)} row(s), {n_sig} with corrected p &lt; {alpha}"
                   f"{caveat}; the 15 smallest p values:</p>")
        cols = [c for c in ("session_id", "roi", "hemisphere", "variable", "correlation", "term",
                            "stratum", "n", "statistic", "effect_size_name", "effect_size", "ci_low",
                            "ci_high", "p", "p_corrected") if c in t.columns]
        tt = t.sort_values("p")[cols].head(15) if "p" in t.columns else t.head(15)
        out.append(_table(tt, highlight=_finding(t.loc[tt.index], alpha) if "p_corrected" in t.columns
                          else None, formats=_p_formats(tt)))
    sk = inp.group_tables.get("skipped")
    if sk is not None and len(sk):
        out.append("<h3>Analyses not run, covariates left out</h3>" + _table(sk))
    for name in ("design_diagnostics", "perm_design_diagnostics"):
        dd = inp.group_tables.get(name)
        if dd is not None and len(dd):
            out.append(f"<h3>Design diagnostics ({_esc(name)})</h3><p>Per model: variance "
                       "inflation (VIF) of every design column, design rank, per-group coverage "
                       "of each covariate; left_out: nearly nested in the tested effect.</p>"
                       + _table(dd, highlight=dd["left_out"].astype(bool) if "left_out" in dd else None))
    if not out:
        return _note("No further group tables in OUTPUT_DIR/group.")
    return "".join(out)


def _early_correction_text(ch) -> str:
    """Methods sentence of the boundary-field correction with sources from an early-stopped TV
    estimate (``lbv_boundary_estimate_iter``; with ``lbv_boundary_shell_mm`` the deep ones from a
    full TV solve)."""
    if ch.lbv_boundary_shell_mm > 0:  # two estimates: deep part from a full solve, shell from an early one
        return (f"Before the inversion, the part of the field of the sources deeper than "
                f"{ch.lbv_boundary_depth_mm:g} mm (deviating by more than {ch.lbv_boundary_threshold_ppm:g} ppm "
                f"from their median) of a TV estimate ({ch.tv_max_iter} iterations) and of the sources "
                f"{ch.lbv_boundary_shell_mm:g} to {ch.lbv_boundary_depth_mm:g} mm deep (deviating by more than "
                f"{ch.lbv_boundary_shell_threshold_ppm:g} ppm from their median) of an early-stopped TV "
                f"estimate ({ch.lbv_boundary_estimate_iter} iterations) that LBV's boundary condition had "
                "removed was added back to the data, from the inversion's first iteration.")
    return (f"Before the inversion, the part of the field of the sources deeper than "
            f"{ch.lbv_boundary_depth_mm:g} mm (deviating by more than {ch.lbv_boundary_threshold_ppm:g} ppm "
            f"from their median) of an early-stopped TV estimate ({ch.lbv_boundary_estimate_iter} "
            "iterations) that LBV's boundary condition had removed was added back to the data, from "
            "the inversion's first iteration.")


def methods_paragraph(config: dict | None, *, design=None, voxelwise: bool = False,
                      postmortem: bool = False, voxelwise_scheme: str = "huh_jhun") -> tuple[str, list[str]]:
    """Methods text generated from the recorded run configuration.

    Parameters
    ----------
    config : dict or None
        The ``config`` entry of ``logs/qsmdask_config.json`` (:meth:`PipelineConfig.to_dict`).
    design : GroupDesign or None
        The group design (defaults when None).
    voxelwise, postmortem : bool
        Mention the voxel-wise permutation analysis / post-mortem validation.
    voxelwise_scheme : str
        Permutation scheme of the voxel-wise analysis ("huh_jhun" or "freedman_lane", as
        recorded in ``logs/qsmdask_voxelwise_config.json``).

    Returns
    -------
    (text, reference keys)
        Plain text with bracketed citation numbers, and the cited keys of
        :data:`qsmdask.report.references.REFERENCES` in citation order.
    """
    from ..chain import ChainConfig
    from ..config import PipelineConfig
    from ..stats.design import GroupDesign

    cited: list[str] = []

    def cite(*keys):
        for k in keys:
            if k not in cited:
                cited.append(k)
        return "[" + ", ".join(str(cited.index(k) + 1) for k in keys) + "]"

    recorded = config is not None
    try:
        pc = PipelineConfig.from_dict(config or {})
        cfg = pc.to_dict()
    except (TypeError, ValueError):
        pc, cfg = PipelineConfig(), PipelineConfig().to_dict()
        recorded = False
    ch = ChainConfig.from_dict(cfg["chain"])
    design = design or GroupDesign()
    s = []
    s.append(f"Quantitative susceptibility maps were reconstructed with qsmdask {__version__}"
             + ("" if recorded else " (configuration not recorded; defaults shown)") + ".")
    if ch.mask_method == "bet":
        mask = (f"with a surface-model brain extraction {cite('smith2002')} (fractional intensity "
                f"threshold {ch.bet_fraction:g}) of the first-echo magnitude")
    elif ch.mask_threshold_fraction is None:
        mask = f"by Otsu thresholding {cite('otsu1979')} of the first-echo magnitude"
    else:
        mask = (f"by thresholding the first-echo magnitude at {ch.mask_threshold_fraction:g} of "
                "its robust maximum")
    s.append(f"A brain mask was obtained {mask}, followed by morphological opening and closing "
             f"with a {ch.mask_open_mm:g} mm sphere"
             + (", and voxels with aliased wrapped phase (neighbour differences above "
                f"{ch.quality_max_gradient_rad:g} rad) were excluded" if ch.quality_mask else "")
             + (f", with their neighbours within {ch.quality_dilate_voxels} "
                f"voxel{'s' if ch.quality_dilate_voxels > 1 else ''}"
                + (f" whose own largest difference exceeded {ch.quality_dilate_min_gradient_rad:g} rad"
                   if ch.quality_dilate_min_gradient_rad > 0 else "")
                if ch.quality_mask and ch.quality_dilate_voxels > 0 else "") + ".")
    if ch.unwrap_method == "temporal":
        unwrap = (f"The phase difference between consecutive echoes was unwrapped with the Laplacian "
                  f"method {cite('schofield2003')} ({ch.laplacian_form} form) and the echoes were "
                  "unwrapped in time from it")
    elif ch.unwrap_method == "laplacian":
        unwrap = (f"The phase of each echo was unwrapped with the Laplacian method "
                  f"{cite('schofield2003')} ({ch.laplacian_form} form)")
    else:
        unwrap = "The phase of each echo was unwrapped by quality-guided region growing"
    s.append(f"{unwrap}, and the field was estimated by a magnitude-weighted "
             f"linear fit over echo time{' with a phase offset' if ch.fit_offset else ''}"
             + (" using the left-handed sign convention" if ch.phase_sign == -1 else "") + ".")
    if ch.inversion_method == "tv_laplacian":
        if not ch.tv_bregman_iterations:
            breg = ""
        elif ch.tv_bregman_fraction == 0:  # no residual added back, no boundary-field correction here
            breg = f", then {ch.tv_bregman_max_iter} more iterations"
        else:
            part = ("" if ch.tv_bregman_fraction == 1 else
                    f" adding back {ch.tv_bregman_fraction:g} of the field residual")
            breg = (f", followed by {ch.tv_bregman_iterations} Bregman debiasing step(s) "
                    f"{cite('osher2005')} of {ch.tv_bregman_max_iter} iterations{part}")
        s.append("Background removal and dipole inversion were done in one step: total-variation "
                 f"regularised inversion solved by ADMM {cite('bilgic2014')} with the Laplacian of the "
                 f"field inside the brain mask as data {cite('langkammer2015')}, so that harmonic "
                 f"background fields drop out (lambda {ch.tv_laplacian_lambda:g}, {ch.tv_max_iter} "
                 f"iterations{breg}).")
    elif ch.bgremove_method == "lbv":
        s.append(f"Background fields were removed by solving the Laplacian boundary value problem "
                 f"(LBV) {cite('zhou2014')}.")
    elif ch.bgremove_method == "vsharp":
        s.append(f"Background fields were removed with V-SHARP {cite('wu2012')}, the variable-"
                 f"kernel variant of SHARP {cite('schweser2011')}, with spherical kernels up to "
                 f"{ch.sharp_radius_mm:g} mm and truncation {ch.sharp_threshold:g}.")
    elif ch.bgremove_method == "pdf":
        s.append(f"Background fields were removed by projection onto dipole fields (PDF) "
                 f"{cite('liu2011')}.")
    else:
        s.append(f"Background fields were removed with SHARP {cite('schweser2011')} (radius "
                 f"{ch.sharp_radius_mm:g} mm, truncation {ch.sharp_threshold:g}).")
    if ch.inversion_method == "tv_laplacian":
        pass
    elif ch.inversion_method == "tv":
        tv_ref = cite('bilgic2014')  # cited before the Bregman reference, in reading order
        if not ch.tv_bregman_iterations:
            breg = ""
        elif ch.tv_bregman_fraction == 0:  # no residual added back: a second solve on corrected data
            breg = (f", then {ch.tv_bregman_max_iter} more iterations"
                    + (" on the data with the boundary-field correction" if ch.boundary_correction_stage else ""))
        else:
            part = ("" if ch.tv_bregman_fraction == 1 else
                    f" adding back {ch.tv_bregman_fraction:g} of the field residual")
            breg = (f", followed by {ch.tv_bregman_iterations} Bregman debiasing step(s) "
                    f"{cite('osher2005')} of {ch.tv_bregman_max_iter} iterations{part}")
        s.append(f"Susceptibility was computed by total-variation regularised dipole inversion "
                 f"solved by ADMM {tv_ref} (lambda {ch.tv_lambda:g}, {ch.tv_max_iter} "
                 f"iterations{breg}"
                 + ("; the field was fitted inside the mask only" if ch.tv_mask_data and not ch.tv_outside_weight
                    else "")
                 + (f"; the field was also fitted outside the mask with weight {ch.tv_outside_weight:g}, taken "
                    "as 0 there" + (" plus the field of the deep sources below"
                                    if ch.boundary_correction_stage else "")
                    if ch.tv_outside_weight else "")
                 + ")"
                 + ((", followed by a least-squares refit of its amplitude and of the well-conditioned "
                     if ch.tv_refit_amplitude else ", followed by a least-squares refit (no amplitude step) of "
                     "the well-conditioned ")
                    + f"part of the field residual (Tikhonov weight {ch.tv_refit_mu:g}) "
                    f"{cite('deledalle2015')}" if ch.tv_debias == "refit" else "")
                 + ".")
        if ch.tv_outside_reg_weight < 1:
            s.append("Susceptibility outside the mask was an auxiliary unknown of the inversion whose total "
                     f"variation was weighted by {ch.tv_outside_reg_weight:g} (inside: 1), so that sources outside "
                     "the mask explained the part of the field that is harmonic inside it (the part of the deep "
                     "sources' field that the background removal's boundary condition removes) instead of a "
                     f"broad change of susceptibility inside it, as in total field inversion {cite('liu2017')}.")
        if ch.boundary_correction_stage == "start":
            s.append(_early_correction_text(ch))
        elif ch.boundary_correction_stage == "bregman":
            s.append(f"Before the {'second solve' if ch.tv_bregman_fraction == 0 else 'Bregman step'}, the part of the field of the first estimate's sources "
                     f"deeper than {ch.lbv_boundary_depth_mm:g} mm (deviating by more than "
                     f"{ch.lbv_boundary_threshold_ppm:g} ppm from their median) that LBV's boundary "
                     "condition had removed was added back to the data.")
            if ch.boundary_pass2_depth_mm > 0:
                s.append(f"In a second pass, the same part of the field of the final estimate's sources deeper "
                         f"than {ch.boundary_pass2_depth_mm:g} mm (deviating from their median by more "
                         f"than {ch.lbv_boundary_threshold_ppm:g} ppm deeper than {ch.lbv_boundary_depth_mm:g} mm "
                         f"and by more than {ch.lbv_boundary_pass2_threshold_ppm:g} ppm above) replaced the "
                         "first correction in the data, and the inversion was repeated from the start.")
    elif ch.inversion_method == "tgv":
        tgv_ref = cite("bredies2010", "langkammer2015")
        breg = (f", followed by {ch.tgv_bregman_iterations} Bregman debiasing step(s) "
                f"{cite('osher2005')} of {ch.tgv_bregman_max_iter} iterations" if ch.tgv_bregman_iterations else "")
        s.append(f"Susceptibility was computed by second-order total generalised variation (TGV) "
                 f"regularised dipole inversion {tgv_ref} solved by ADMM (alpha1 {ch.tgv_alpha1:g}, alpha0 "
                 f"{ch.tgv_alpha0:g}, {ch.tgv_max_iter} iterations{breg}"
                 + ("; the field was fitted inside the mask only and chi held at 0 outside it"
                    if ch.tgv_mask_data else "")
                 + (f"; the strongest magnitude gradients (a fraction {ch.tgv_edge_fraction:g}) were not penalised"
                    if ch.tgv_edge_fraction > 0 else "") + ").")
        if ch.boundary_correction_stage == "start":
            s.append(_early_correction_text(ch))
        elif ch.boundary_correction_stage == "bregman":
            s.append(f"Before the Bregman step, the part of the field of the first estimate's sources "
                     f"deeper than {ch.lbv_boundary_depth_mm:g} mm (deviating by more than "
                     f"{ch.lbv_boundary_threshold_ppm:g} ppm from their median) that LBV's boundary "
                     "condition had removed was added back to the data.")
    elif ch.inversion_method == "iterative_tkd":
        s.append(f"Susceptibility was computed by the iterative thresholded k-space division of "
                 f"Tang et al. {cite('tang2013')} (threshold {ch.iterative_tkd_threshold:g}, "
                 f"at most {ch.iterative_tkd_max_iter} iterations).")
    else:
        s.append(f"Susceptibility was computed by thresholded k-space division (TKD) "
                 f"{cite('shmueli2009')} with threshold {ch.tkd_threshold:g}.")
    if ch.boundary_layer_kept:  # only "tv" / "tgv" with the field fitted inside the mask (ChainConfig)
        layer = ("one-voxel boundary layer that LBV's boundary condition sets to zero local field"
                 if ch.bgremove_method == "lbv" else "boundary layer that the background removal erodes")
        s.append(f"The final mask kept the {layer}: the susceptibility reported there is the "
                 "inversion's estimate without data on that layer (the data term leaves it out"
                 + (", although it covers the solver's grid outside the mask" if ch.inversion_method == "tv"
                    and ch.tv_outside_weight else "")
                 + "), set by the field its sources make inside and by the regularisation.")
    reg = {"affine": "affine", "rigid": "rigid", "syn": "symmetric diffeomorphic (SyN)"}[pc.registration]
    s.append(f"Images were registered to the MNI152 2009 template {cite('fonov2011')} "
             f"({pc.template_resolution_mm} mm) with ANTs {reg} registration {cite('avants2008')} "
             "(through the T1-weighted image when one was available; random seed "
             f"{pc.registration_seed} and one ITK thread per registration, so that reruns give "
             "identical results).")
    atlas = str(pc.atlas)
    if atlas.lower() == "aal":
        at = f"the AAL atlas {cite('tzouriomazoyer2002')}"
    elif "brainnetome" in atlas.lower() or "bn_atlas" in atlas.lower():
        at = f"the Brainnetome atlas {cite('fan2016')}"
    else:
        at = f"the atlas {Path(atlas).name}"
    if pc.reference == "none":
        s.append("Susceptibility was not referenced: values are relative to the mean over the "
                 "brain mask left by the inversion.")
    else:
        from ..reference import describe_reference
        s.append("Susceptibility was referenced per subject-session before any other step (the "
                 "native, template-space and smoothed maps and the ROI values all use the same "
                 f"referenced map): {describe_reference(pc.reference, pc.reference_erode_mm)}.")
    s.append(f"ROI statistics were extracted in native space from {at}, brought to native space "
             f"with the inverse transform; labels were eroded by {pc.erode_mm:g} mm and ROIs with "
             f"fewer than {pc.min_voxels} voxels were excluded. Template-space maps were smoothed "
             f"with a {pc.smoothing_fwhm_mm:g} mm FWHM Gaussian for voxel-wise analyses.")
    # only the correction that was applied is named and cited (a dict of f-strings would
    # cite every alternative)
    if design.correction == "holm":
        corr = f"Holm {cite('holm1979')}"
    elif design.correction == "fdr_bh":
        corr = f"Benjamini-Hochberg FDR {cite('benjamini1995')}"
    else:
        corr = {"bonferroni": "Bonferroni", "none": "no"}[design.correction]
    g1, g2 = design.groups
    s.append(f"Groups ({g1} vs {g2}) were compared per ROI and hemisphere with the Wilcoxon "
             f"rank-sum test {cite('mannwhitney1947')} with the rank-biserial correlation as "
             f"effect size {cite('kerby2014')}; {corr} correction was applied over all ROI x "
             f"hemisphere tests (alpha = {design.alpha:g}). Associations with clinical variables "
             f"({', '.join(design.clinical_variables)}) and inflammatory markers "
             f"({', '.join(design.markers)}) were assessed with Pearson and Spearman correlations "
             "and least-squares fits.")
    s.append("Every regression design was checked (rank, variance inflation, per-group covariate "
             "coverage); a covariate nearly nested in the tested effect (VIF > 5 or constant in "
             "one group) was left out"
             + (f" unless kept on purpose ({', '.join(design.keep_covariates)} kept)"
                if design.keep_covariates else "")
             + f", and mediation, interaction and sex-stratified models with fewer than "
             f"{design.min_residual_dof} residual degrees of freedom (or strata under "
             f"{design.min_stratum_n} subjects) were not run.")
    if design.combat:
        s.append(f"Site effects were harmonised with ComBat {cite('johnson2007')}.")
    if voxelwise:
        s.append("Voxel-wise analyses used one session per subject, the chronological baseline "
                 "unless configured otherwise. "
                 f"Voxel-wise inference used permutation tests {cite('nichols2002', 'winkler2014')} "
                 + (f"of a general linear model with Freedman-Lane permutation {cite('freedman1983')}, "
                    if voxelwise_scheme == "freedman_lane" else
                    "of a general linear model, permuting the data projected on the complement of the "
                    f"nuisance covariates (Huh-Jhun {cite('huh2001')}; exact for Gaussian errors), ")
                 + f"with family-wise error control by the maximum statistic, cluster size and TFCE "
                 f"{cite('smith2009')}.")
    if postmortem:
        s.append(f"ROI susceptibility of controls was validated against post-mortem non-haem iron "
                 f"concentrations {cite('hallgren1958')}.")
    return " ".join(s), cited


def _section_methods(inp: _Inputs) -> str:
    try:
        from ..roi import postmortem_iron_validation  # noqa: F401
        pm = inp.roi is not None
    except ImportError:
        pm = False
    cfg = inp.pipeline if inp.config else None
    design = inp.design
    gw = inp.group_tables.get("group_wilcoxon")
    if gw is not None and len(gw) and gw["correction"].iloc[0] != design.correction:
        import dataclasses
        design = dataclasses.replace(design, correction=str(gw["correction"].iloc[0]))
    vpath = Path(inp.output_dir) / "logs" / "qsmdask_voxelwise_config.json"
    try:
        vopts = json.loads(vpath.read_text()).get("options", {}) if vpath.exists() else {}
    except (OSError, json.JSONDecodeError, AttributeError):
        vopts = {}
    # runs recorded before the scheme option existed used Freedman-Lane
    scheme = str(vopts.get("scheme", "freedman_lane")) if vopts else "huh_jhun"
    text, cited = methods_paragraph(cfg, design=design, voxelwise=bool(inp.perm), postmortem=pm,
                                    voxelwise_scheme=scheme)
    out = []
    if inp.config is None:
        out.append(_note("logs/qsmdask_config.json not found: the text shows the default "
                         "configuration, which may differ from the run."))
    else:
        out.append(f"<p class=\"small\">From logs/qsmdask_config.json written "
                   f"{_esc(inp.config.get('written', ''))} by qsmdask "
                   f"{_esc(inp.config.get('qsmdask_version', ''))}.</p>")
    from ..io.derivatives import configuration_differences
    differ = configuration_differences(inp.output_dir)
    if differ:
        out.append(_note("The subject-sessions were reconstructed with different configurations "
                         "(their manifests differ on: " + "; ".join(differ) + "). The text below "
                         "describes the last participant run's configuration only; rerun the "
                         "participant level of the others with it (--force) before comparing them."))
    out.append(f"<p>{_esc(text)}</p>")
    out.append("<ol class=\"refs\">" + "".join(f"<li>{_esc(REFERENCES[k])}</li>" for k in cited)
               + "</ol>")
    if inp.config is not None:
        out.append("<details><summary>Full recorded configuration</summary><pre>"
                   + _esc(json.dumps(inp.config, indent=2, sort_keys=True, default=str))
                   + "</pre></details>")
    return "".join(out)


def _section_versions(inp: _Inputs) -> str:
    rows = [{"package": "qsmdask", "version": __version__}]
    for dist in ("numpy", "scipy", "nibabel", "dask", "distributed", "prefect", "pandas",
                 "statsmodels", "zarr", "antspyx", "matplotlib"):
        rows.append({"package": dist, "version": _version(dist)})
    rows.append({"package": "python", "version": platform.python_version()})
    return "<p>Versions of the software that wrote this report:</p>" + _table(pd.DataFrame(rows))


_SECTIONS = [
    ("findings", "Key findings", _section_findings),
    ("cohort", "Cohort", _section_cohort),
    ("group", "Where iron differs between groups (ROI comparisons)", _section_group),
    ("course", "How iron tracks the disease course", _section_course),
    ("voxelwise", "Voxel-wise: FWE-significant clusters", _section_voxelwise),
    ("postmortem", "Validation against post-mortem iron", _section_postmortem),
    ("failures", "Failed subjects", _section_failures),
    ("qc", "Reconstruction quality control", _section_qc),
    ("other", "Other analyses", _section_other),
    ("methods", "Methods", _section_methods),
    ("versions", "Software versions", _section_versions),
]

_CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#243447;color:#fff;padding:18px 32px}
header h1{margin:0;font-size:24px} header p{margin:4px 0 0;font-size:13px;color:#cfd8e3}
nav{background:#fff;border-bottom:1px solid #ddd;padding:8px 32px;font-size:13px;position:sticky;top:0}
nav a{margin-right:14px;color:#1f5f99;text-decoration:none}
main{padding:8px 32px 40px;max-width:1400px}
section{background:#fff;border:1px solid #e2e2e2;border-radius:6px;padding:6px 20px 14px;margin:16px 0}
h2{font-size:19px;border-bottom:2px solid #243447;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px} .kind{font-weight:normal;color:#777;font-size:13px}
p,li{font-size:14px;line-height:1.45}
.note{color:#8a5a00;background:#fff6e0;border-left:4px solid #e6a700;padding:6px 10px}
.error{color:#8b0000;background:#fdecec;border-left:4px solid #c00;padding:6px 10px}
.tw{overflow-x:auto;margin:8px 0}
table{border-collapse:collapse;font-size:12px}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#eef1f5} tr.sig td{background:#e3f4e1;font-weight:bold}
img{max-width:100%;height:auto;display:block;margin:6px 0}
pre{font-size:11px;background:#f4f4f4;padding:8px;overflow-x:auto}
.refs li{font-size:12px} .small{font-size:12px;color:#666}
"""


def build_cohort_report(output_dir, bids_dir=None, *, perm_results=None,
                        title: str = "qsmdask cohort report", tables_url=None) -> Path:
    """Write the self-contained cohort report ``OUTPUT_DIR/report.html``.

    Parameters
    ----------
    output_dir : path
        The derivatives folder of a run (``roi/``, ``group/``, ``failures.parquet``,
        ``logs/qsmdask_config.json``, optional ``logs/qsmdask_group_config.json`` with the
        group ``design``, ``group/perm_*.nii.gz`` and ``group/perm_clusters.parquet``).
    bids_dir : path or None
        The BIDS dataset (participants.tsv, sessions.tsv); None: the ``bids_dir``
        recorded in ``logs/qsmdask_config.json``.
    perm_results : PermutationResult, dict or None
        Voxel-wise results to show instead of reading ``group/perm_*``: a
        :class:`qsmdask.perm.PermutationResult`, or a dict with 3-D arrays ``t``,
        ``logp_fwe`` (-log10 FWE p; or ``logp_fwe_tfce`` / ``logp_fwe_size`` /
        ``logp_fwe_t``), optional ``cluster_labels``, ``affine`` (4x4) and
        ``clusters`` (the cluster table).
    title : str
        Report title.
    tables_url : path, fsspec URL or None
        Where the Parquet tables (``roi/``, ``group/``, ``failures.parquet``) are; None:
        the ``tables_url`` recorded in ``logs/qsmdask_config.json``, else ``output_dir``.

    Returns
    -------
    Path
        The written report.
    """
    from ..io.nifti import atomic_write_bytes

    out_dir = Path(output_dir)
    if not out_dir.is_dir():
        raise ValueError(f"output_dir {out_dir} is not a folder")
    inp = _Inputs(out_dir, bids_dir, perm_results, tables_url)
    body = []
    for sid, heading, fn in _SECTIONS:
        try:
            content = fn(inp)
        except Exception as e:  # noqa: BLE001 - one section must never break the report
            content = (f'<p class="error">This section could not be built: '
                       f"{_esc(type(e).__name__)}: {_esc(e)}</p>")
        body.append(f'<section id="{sid}"><h2>{_esc(heading)}</h2>{content}</section>')
    nav = "".join(f'<a href="#{sid}">{_esc(h.split(" (")[0])}</a>' for sid, h, _ in _SECTIONS)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    problems = ""
    if inp.problems:
        problems = ("<details><summary>Inputs not found or unreadable</summary><ul>"
                    + "".join(f"<li>{_esc(k)}: {_esc(v)}</li>" for k, v in sorted(inp.problems.items()))
                    + "</ul></details>")
    doc = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
           f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
           f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>"
           f"<header><h1>{_esc(title)}</h1><p>Outputs: {_esc(out_dir.resolve())}"
           + (f" &middot; BIDS: {_esc(inp.bids_dir)}" if inp.bids_dir else "")
           + f" &middot; written {now} by qsmdask {_esc(__version__)}</p></header>"
           f"<nav>{nav}</nav><main>{problems}{''.join(body)}</main></body></html>\n")
    return atomic_write_bytes(out_dir / REPORT_NAME, doc.encode("utf-8"))

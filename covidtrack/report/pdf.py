"""Trend report PDFs (fpdf2): one patient's course, or a cohort's comparison by arm.

The pictures are the dashboard's own plotly figures exported to PNG
(:class:`~covidtrack.report.export.FigureExporter`); aligned CT slices are embedded directly as
PNG. Text uses DejaVu Sans (shipped with matplotlib) so any Unicode alias prints.
Only the pseudonymous key and a user-typed alias appear; never a name or raw patient ID.
"""

from __future__ import annotations

import datetime as dt
import io
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from fpdf import FPDF
from fpdf.fonts import FontFace

from covidtrack.report import figures
from covidtrack.report.data import LOBES, M, PatientHeader, flag_lines, lobe_table, metric_label, poi_text, select
from covidtrack.report.export import Engine, FigureExporter
from covidtrack.report.stats import MIN_CI_N, change_from_baseline, compare_arms, mean_ci, per_patient_series, responders
from covidtrack.report.viewer import LOBE_LEGEND, AlignedSeries, png_bytes, render

DISCLAIMER = (
    "These figures are computed automatically from CT segmentation by covidtrack. "
    "They are measurements to support review, not a diagnosis."
)
PAGE_W_MM = 210.0
MARGIN_MM = 12.0
CONTENT_W_MM = PAGE_W_MM - 2 * MARGIN_MM


@dataclass(frozen=True, eq=False)
class PatientReportData:
    """Everything a patient report shows. ``change`` columns: ``date``, ``region``, ``new_ml``,
    ``resolved_ml``, ``persistent_ml`` (mL, follow-up vs baseline in baseline space);
    ``change_notes``: follow-ups whose change is not shown, and why; ``lesions``: lesions tracked
    from the baseline per follow-up (:func:`covidtrack.report.load.lesion_table`)."""

    header: PatientHeader
    frame: pd.DataFrame
    aligned: AlignedSeries | None = None
    change: pd.DataFrame = field(default_factory=pd.DataFrame)
    change_notes: tuple[str, ...] = ()
    lesions: pd.DataFrame = field(default_factory=pd.DataFrame)  # covidtrack.report.load.lesion_table


def _font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


class _Pdf(FPDF):
    def __init__(self, title: str) -> None:
        super().__init__(orientation="P", unit="mm", format="A4")
        fonts = _font_dir()
        self.add_font("DejaVu", "", str(fonts / "DejaVuSans.ttf"))
        self.add_font("DejaVu", "B", str(fonts / "DejaVuSans-Bold.ttf"))
        self.set_margins(MARGIN_MM, MARGIN_MM, MARGIN_MM)
        self.set_auto_page_break(True, margin=16)
        self.report_title = title
        self.set_title(title)
        self.set_creator("covidtrack")

    def header(self) -> None:
        self.set_font("DejaVu", "", 8)
        self.set_text_color(110)
        self.cell(0, 5, self.report_title, align="L")
        self.cell(0, 5, f"generated {dt.date.today().isoformat()}", align="R", new_x="LMARGIN", new_y="NEXT")
        self.ln(2)
        self.set_text_color(0)

    def footer(self) -> None:
        self.set_y(-13)
        self.set_font("DejaVu", "", 7)
        self.set_text_color(110)
        self.multi_cell(CONTENT_W_MM - 20, 3.5, DISCLAIMER, align="L")
        self.set_xy(PAGE_W_MM - MARGIN_MM - 20, -13)
        self.cell(20, 4, f"page {self.page_no()}/{{nb}}", align="R")
        self.set_text_color(0)

    def h1(self, text: str) -> None:
        self.set_font("DejaVu", "B", 15)
        self.cell(0, 9, text, new_x="LMARGIN", new_y="NEXT")

    def h2(self, text: str, need_mm: float = 25.0) -> None:
        """Section heading; starts a new page unless ``need_mm`` of the section fits below it."""
        if self.get_y() + 9 + need_mm > self.h - 18:
            self.add_page()
        self.ln(2)
        self.set_font("DejaVu", "B", 11)
        self.cell(0, 7, text, new_x="LMARGIN", new_y="NEXT")
        self.set_font("DejaVu", "", 9)

    def para(self, text: str, size: float = 9) -> None:
        self.set_font("DejaVu", "", size)
        self.multi_cell(0, 4.5, text, new_x="LMARGIN", new_y="NEXT")

    def key_values(self, rows: list[tuple[str, str]]) -> None:
        for key, value in rows:
            self.set_font("DejaVu", "B", 9)
            self.cell(38, 5, key)
            self.set_font("DejaVu", "", 9)
            self.multi_cell(0, 5, value, new_x="LMARGIN", new_y="NEXT")

    def figure(self, png: bytes, width_mm: float = CONTENT_W_MM, aspect: float = 0.5) -> None:
        h = width_mm * aspect
        if self.get_y() + h > self.h - 18:
            self.add_page()
        self.image(io.BytesIO(png), x=self.l_margin, w=width_mm, h=h)
        self.ln(2)

    def dataframe(self, df: pd.DataFrame, col_widths: tuple[float, ...] | None = None, size: float = 7.5) -> None:
        self.set_font("DejaVu", "", size)
        head = FontFace(emphasis="BOLD", fill_color=(230, 230, 230))
        with self.table(
            col_widths=col_widths, text_align="CENTER", headings_style=head, line_height=4.2, padding=0.8,
            width=CONTENT_W_MM, first_row_as_headings=True,
        ) as table:
            row = table.row()
            for col in df.columns:
                row.cell(str(col))
            for rec in df.itertuples(index=False):
                row = table.row()
                for v in rec:
                    row.cell(_fmt(v))
        self.ln(2)


def _fmt(v: object) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"
    if isinstance(v, (pd.Timestamp, dt.date)):
        return str(pd.Timestamp(v).date())
    return str(v)


def _atomic_output(pdf: FPDF, out: Path) -> Path:
    """Write next to ``out`` then rename, so a crash never leaves half a PDF under the final name."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(bytes(pdf.output()))
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _ml_text(ml: float | None) -> str:
    """A volume (mL): a trace reads "<0.01", not "0.00"."""
    if ml is None or not np.isfinite(ml):
        return "–"
    return "<0.01" if 0 < ml < 0.005 else _fmt(float(ml))


def _signed_ml_text(ml: float | None) -> str:
    """A change (mL) that may be negative: a trace reads "+<0.01" / "-<0.01", not "0.00"."""
    if ml is not None and np.isfinite(ml) and 0 < abs(ml) < 0.005:
        return ("+" if ml > 0 else "-") + "<0.01"
    return _ml_text(ml)


def _lobe_table_for_pdf(frame: pd.DataFrame) -> pd.DataFrame:
    """Per date: POI % (score 0-5) for each lobe, total score 0-25, infection volume (mL)."""
    table = lobe_table(frame)
    if table.empty:
        return table
    out = pd.DataFrame({"Date": table["Date"].astype(str), "Day": table["Day"]})
    for lobe in LOBES:
        poi, score = table[f"{lobe} POI %"], table[f"{lobe} score"]
        out[lobe] = [poi_text(p) + (f" ({int(s)})" if pd.notna(p) and pd.notna(s) else "") for p, s in zip(poi, score)]
    out["Score /25"] = [str(int(v)) if pd.notna(v) else "–" for v in table["Total score"]]
    inf = select(frame, M.INFECTION_ML, "whole").drop_duplicates("study_date")
    poi = select(frame, M.POI, "whole").drop_duplicates("study_date")
    out["Infection mL"] = [_ml_text(v) for v in inf["value"]] if len(inf) == len(out) else "–"
    out["POI %"] = [poi_text(v, unit=False) for v in poi["value"]] if len(poi) == len(out) else "–"
    return out


def _image_grid(pdf: _Pdf, images: list[np.ndarray], captions: list[str], per_row: int = 3) -> None:
    gap = 3.0
    w = (CONTENT_W_MM - gap * (per_row - 1)) / per_row
    for start in range(0, len(images), per_row):
        chunk = images[start : start + per_row]
        h = max(w * img.shape[0] / img.shape[1] for img in chunk)
        if pdf.get_y() + h + 6 > pdf.h - 18:
            pdf.add_page()
        y = pdf.get_y()
        for i, img in enumerate(chunk):
            x = pdf.l_margin + i * (w + gap)
            pdf.image(io.BytesIO(png_bytes(img)), x=x, y=y, w=w, h=w * img.shape[0] / img.shape[1])
            pdf.set_xy(x, y + h + 0.5)
            pdf.set_font("DejaVu", "", 7.5)
            pdf.cell(w, 4, captions[start + i], align="C")
        pdf.set_xy(pdf.l_margin, y + h + 6)


def _change_summary(change: pd.DataFrame) -> pd.DataFrame:
    """One row per follow-up date and lobe (mL), plus the whole lung."""
    if change.empty:
        return change
    order = {r: i for i, r in enumerate(("whole", "right", "left", *LOBES))}
    c = change.copy()
    c["_o"] = c["region"].map(order).fillna(99)
    c = c.sort_values(["date", "_o"]).drop(columns="_o")
    return pd.DataFrame(
        {
            "Follow-up": c["date"].astype(str),
            "Region": c["region"],
            "New mL": [_ml_text(v) for v in c["new_ml"].astype(float)],
            "Resolved mL": [_ml_text(v) for v in c["resolved_ml"].astype(float)],
            "Persistent mL": [_ml_text(v) for v in c["persistent_ml"].astype(float)],
            "Net mL": [_signed_ml_text(v) for v in (c["new_ml"] - c["resolved_ml"]).astype(float)],
        }
    )


def write_patient_pdf(data: PatientReportData, out: str | Path, engine: Engine = "auto") -> Path:
    """Write the patient trend report to ``out`` (PDF) and return the path."""
    h = data.header
    pdf = _Pdf(f"covidtrack trend report · patient {h.label}")
    pdf.alias_nb_pages()
    pdf.add_page()
    pdf.h1(f"Patient {h.label}")
    pdf.key_values(
        [
            ("Pseudonymous key", h.patient_key),
            ("Arm", h.arm or "–"),
            ("Scans", f"{len(h.dates)}: {', '.join(h.dates)}"),
            ("Model versions", ", ".join(h.model_versions) or "–"),
        ]
    )
    pdf.set_font("DejaVu", "B", 8.5)
    pdf.set_text_color(150, 30, 30)
    pdf.multi_cell(0, 4.5, DISCLAIMER, new_x="LMARGIN", new_y="NEXT")
    pdf.set_text_color(0)
    flags = flag_lines(data.frame)
    if flags:
        pdf.h2("Check before reading these numbers", need_mm=15)
        for line in flags:
            pdf.para(f"- {line}", 8.5)
    with FigureExporter(engine) as ex:
        pdf.h2("Trajectories", need_mm=CONTENT_W_MM * 0.56)
        pdf.figure(ex.png(figures.trajectory_figure(data.frame, x="date", height=560), 1000, 560), aspect=0.56)
        pdf.h2("POI per lobe and date", need_mm=CONTENT_W_MM * 0.3)
        pdf.figure(ex.png(figures.lobe_heatmap(data.frame, x="date", height=300), 1000, 300), aspect=0.3)
        engine_used = ex.engine_used
    pdf.h2("Per lobe and date: POI (%) and severity score (0-5; total 0-25, Pan et al. 2020)")
    table = _lobe_table_for_pdf(data.frame)
    if table.empty:
        pdf.para("No lobe metrics for this patient (lobes were not segmented).")
    else:
        pdf.dataframe(table, col_widths=(18, 8, 17, 17, 17, 17, 17, 12, 15, 12))
    if data.aligned is not None and len(data.aligned.dates):
        a = data.aligned
        k = a.key_slice("axial")
        pdf.h2(f"Aligned images: axial slice {k} of the baseline at every date", need_mm=70)
        if len(a.dates) < 2:
            aligned_note = ""
        elif all(a.registered[1:]):
            aligned_note = "Follow-ups are registered to the baseline (same anatomy)."
        else:
            aligned_note = ("Follow-ups marked (not aligned) could not be registered to the baseline: they are only resized "
                            "to its grid, so their slice does not show the same anatomy; the others are registered.")
        pdf.para(f"Infection overlay: GGO amber, consolidation red; {LOBE_LEGEND}. {aligned_note}".strip(), 8)
        _image_grid(pdf, [render(a, t, "axial", k, "lobes", 360) for t in range(len(a.dates))], _captions(a))
        follow = [t for t in range(1, len(a.dates)) if a.change[t] is not None]
        if follow:
            pdf.h2("Change map vs baseline (same slice)", need_mm=70)
            pdf.para("New infection red, resolved green, persistent amber.", 8)
            _image_grid(pdf, [render(a, t, "axial", k, "change", 360) for t in follow], [_captions(a)[t] for t in follow])
    summary = _change_summary(data.change)
    # heading, notes and table on one page where the table fits on one (~6 mm per row)
    pdf.h2("Change summary vs baseline (mL, in baseline space)", need_mm=min(30 + 6.5 * (len(summary) + 1), 200))
    for note in data.change_notes:
        pdf.para(note, 8)
    if summary.empty and not data.change_notes:  # the notes above already say why nothing is shown
        pdf.para("No registered follow-up yet: change per lobe needs a follow-up registered to the baseline.")
    else:
        pdf.para("Each follow-up's infection is warped onto the baseline and compared inside the baseline lungs; "
                 "net = new - resolved. It can differ from the change in the per-date infection volumes above by the "
                 "registration's local stretching and by infection that lands outside the baseline lungs.", 8)
    # the closing note goes before the last table, so it never stands alone on a page of its own
    pdf.para(f"Figures rendered with {engine_used or 'n/a'}. Metrics: model versions listed above; "
             "per-date volumes in mL from each scan's own voxel spacing.", 7)
    if not summary.empty:
        pdf.dataframe(summary, col_widths=(24, 18, 22, 22, 24, 20))
    counts = _lesion_counts_for_pdf(data.lesions)
    if not counts.empty:
        pdf.h2("Lesions vs baseline", need_mm=min(30 + 6.5 * (len(counts) + 1), 120))
        pdf.para("Each lesion (a connected piece of infection of at least 0.1 mL) followed from the baseline to the "
                 "registered follow-up: new, resolved, or still there and larger / smaller (by more than 25 % and at "
                 "least 0.5 mL) / stable; 'partly not imaged' when the follow-up did not cover all of it; lesions "
                 "that merged or split count as one. In brackets: how many are at least 1 mL (the smallest new ones "
                 "are often specks of the model's noise at one date).", 8)
        pdf.dataframe(counts, col_widths=(24, 20, 22, 20, 20, 20, 28))
    return _atomic_output(pdf, Path(out))


def _lesion_counts_for_pdf(lesions: pd.DataFrame) -> pd.DataFrame:
    """One row per analysed follow-up (``lesions.attrs["pairs"]``, also one without any lesion):
    how many lesions are new / resolved / larger / smaller / stable / partly not imaged."""
    from covidtrack.change import lesion_count_rows

    pairs = lesions.attrs.get("pairs", []) if lesions is not None else []
    return lesion_count_rows(lesions, pairs).rename(columns=str.capitalize) if pairs else pd.DataFrame()


def _captions(a: AlignedSeries) -> list[str]:
    return [f"{d} · day {day}" + ("" if a.registered[t] or t == 0 else " (not aligned)") for t, (d, day) in enumerate(zip(a.dates, a.days))]


def write_cohort_pdf(cohort: pd.DataFrame, out: str | Path, arms: list[str] | None = None, engine: Engine = "auto",
                     filters: str = "") -> Path:
    """Write the cohort report (per-arm trajectories, change at last follow-up, test, responders).
    ``filters``: how ``cohort`` was narrowed (printed in the header, so a subset never reads as
    the whole cohort)."""
    frame = cohort if arms is None else cohort[cohort["arm"].isin(arms)]
    arm_names = sorted(frame["arm"].dropna().unique())
    pdf = _Pdf("covidtrack trend report · cohort")
    pdf.alias_nb_pages()
    pdf.add_page()
    pdf.h1("Cohort report")
    n_pat = frame["patient_key"].nunique()
    dates = pd.to_datetime(frame["study_date"])
    per_arm = ", ".join(f"{a}: {frame.loc[frame.arm == a, 'patient_key'].nunique()}" for a in arm_names)
    pdf.key_values(
        [
            ("Arms", ", ".join(arm_names) or "–"),
            ("Patients", f"{n_pat} ({per_arm})"),
            ("Scans", str(frame["scan_id"].nunique())),
            ("Dates", f"{dates.min().date()} to {dates.max().date()}" if len(dates) else "–"),
            ("Model versions", ", ".join(sorted(str(v) for v in frame["model_version"].dropna().unique())) or "–"),
            ("Filters", filters or "none (every patient of these arms)"),
        ]
    )
    pdf.set_font("DejaVu", "B", 8.5)
    pdf.set_text_color(150, 30, 30)
    pdf.multi_cell(0, 4.5, DISCLAIMER, new_x="LMARGIN", new_y="NEXT")
    pdf.set_text_color(0)
    changes = change_from_baseline(frame)
    with FigureExporter(engine) as ex:
        for metric in (M.POI, M.INFECTION_ML):
            pdf.h2(f"{metric_label(metric)} by day since baseline: mean, 95 % CI, patients faint", need_mm=CONTENT_W_MM * 0.4)
            fig = figures.cohort_trajectory_figure(frame, metric, webgl=False, height=400)
            pdf.figure(ex.png(fig, 1000, 400), aspect=0.4)
        pdf.h2("Change in POI from baseline to the last follow-up", need_mm=CONTENT_W_MM * 0.36)
        pdf.figure(ex.png(figures.change_box_figure(changes, height=360), 1000, 360), aspect=0.36)
    pdf.h2("Per-arm summary of POI change (percentage points)")
    rows = []
    for a in arm_names:
        c = changes[changes.arm == a]["change"]
        rows.append({"Arm": a, "n": len(c), "Median": float(c.median()) if len(c) else np.nan,
                     "IQR low": float(c.quantile(0.25)) if len(c) else np.nan, "IQR high": float(c.quantile(0.75)) if len(c) else np.nan,
                     "Responders": int(((changes.arm == a) & changes.patient_key.isin(responders(changes).patient_key)).sum())})
    pdf.dataframe(pd.DataFrame(rows))
    tests = compare_arms(changes)
    if tests:
        pdf.h2("Two-sample test (Mann-Whitney U, two-sided) and effect size (rank-biserial r)")
        pdf.dataframe(pd.DataFrame([{"Arms": f"{t.arm_a} vs {t.arm_b}", "n": f"{t.n_a} / {t.n_b}", "Median change": f"{t.median_a:+.2f} / {t.median_b:+.2f}",
                                      "U": t.u, "p": f"{t.p_value:.3g}" if np.isfinite(t.p_value) else "–",
                                      "r": f"{t.rank_biserial:+.2f}" if np.isfinite(t.rank_biserial) else "–"} for t in tests]))
        pdf.para("r > 0: the first arm tends to have the larger (worse) change in POI. p and r need at least 2 patients "
                 "with a follow-up in each arm (– otherwise). p is not adjusted for comparing several pairs of arms.", 7.5)
    resp = responders(changes)
    pdf.h2(f"Responders: POI at last follow-up at most half of baseline ({len(resp)} of {len(changes)})")
    if len(resp):
        show = resp.head(40)
        pdf.dataframe(pd.DataFrame({"Patient": show["label"], "Arm": show["arm"], "Baseline POI %": show["baseline"],
                                    "Last POI %": show["last"], "Day": show["last_day"], "Ratio": show["relative"]}))
        if len(resp) > 40:
            pdf.para(f"... and {len(resp) - 40} more (see the dashboard's Cohort page for the full list).", 7.5)
    summary = mean_ci(per_patient_series(frame, M.POI), floor=0.0, ceiling=100.0)
    if len(summary):
        pdf.h2("Mean POI (%) by day bin and arm")
        pdf.para(f"t-based 95 % CI per 4-day bin; none (–) where a bin holds fewer than {MIN_CI_N} patients of the arm. "
                 "The ends are cut at 0 and 100 %, the values POI can take, so intervals near them look one-sided.", 7.5)
        pdf.dataframe(summary.rename(columns={"arm": "Arm", "day": "Day", "n": "n", "mean": "Mean", "lo": "95 % CI low", "hi": "95 % CI high"}))
    return _atomic_output(pdf, Path(out))

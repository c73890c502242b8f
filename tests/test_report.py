"""Trend report: cohort statistics with known answers, viewer rendering, figures, and the PDFs
(rendered with poppler's pdftoppm and read back with pdftotext)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covidtrack.__main__ import main as cli
from covidtrack.report import data, figures, load, stats, synthetic, viewer
from covidtrack.report.data import M
from covidtrack.store import Store

POPPLER = shutil.which("pdftoppm") and shutil.which("pdftotext")


def _cohort(changes: dict[str, list[tuple[float, float]]]) -> pd.DataFrame:
    """A cohort frame with two scans per patient: (baseline POI, last POI) per patient and arm."""
    rows = []
    for arm, pairs in changes.items():
        for i, (b, last) in enumerate(pairs):
            key = f"{arm}-{i}"
            for day, v in ((0, b), (7, last)):
                rows.append(dict(patient_key=key, label=key, arm=arm, scan_id=f"{key}-{day}", study_date=pd.Timestamp("2020-03-01") + pd.Timedelta(days=day),
                                 day=day, region="whole", metric=M.POI, value=v, unit="%", model_version="m"))
    return pd.DataFrame(rows)


def test_change_test_and_effect_size_known_answer() -> None:
    # arm A always worsens more than arm B: complete separation -> U = n_a * n_b, r = +1
    frame = _cohort({"A": [(10, 20), (10, 18), (10, 25)], "B": [(10, 5), (10, 2), (10, 9), (10, 4)]})
    ch = stats.change_from_baseline(frame)
    assert sorted(ch.loc[ch.arm == "A", "change"]) == [8, 10, 15]
    (res,) = stats.compare_arms(ch)
    assert (res.n_a, res.n_b) == (3, 4)
    assert res.u == 12.0 and res.rank_biserial == pytest.approx(1.0)
    assert res.p_value < 0.06
    resp = stats.responders(ch)
    assert set(resp["patient_key"]) == {"B-0", "B-1", "B-3"}  # 5 <= 5, 2, 4; not 9


def test_mean_ci_matches_t_interval() -> None:
    frame = _cohort({"A": [(1, 2), (3, 4), (5, 9)]})
    s = stats.per_patient_series(frame, M.POI)
    out = stats.mean_ci(s, bin_days=7)
    base = out[out.day == 0].iloc[0]
    assert base["n"] == 3 and base["mean"] == pytest.approx(3.0)
    half = 4.302652729911275 * 2.0 / np.sqrt(3)  # t(0.975, 2) * sd / sqrt(n)
    assert base["lo"] == pytest.approx(3 - half) and base["hi"] == pytest.approx(3 + half)


def test_no_ci_band_from_fewer_than_three_patients_and_such_means_are_hollow() -> None:
    from covidtrack.report import figures

    # days 0 and 16: 3 patients each (a band); day 8: 2 patients (no band, a hollow mean)
    visits = {"p0": [(0, 1.0), (8, 2.0), (16, 3.0)], "p1": [(0, 3.0), (8, 4.0), (16, 5.0)], "p2": [(0, 5.0), (16, 9.0)]}
    frame = pd.DataFrame([dict(patient_key=k, label=k, arm="A", scan_id=f"{k}-{d}", study_date=pd.Timestamp("2020-03-01") + pd.Timedelta(days=d),
                               day=d, region="whole", metric=M.POI, value=v, unit="%", model_version="m")
                          for k, rows in visits.items() for d, v in rows])
    out = stats.mean_ci(stats.per_patient_series(frame, M.POI), bin_days=4)
    assert out["n"].tolist() == [3, 2, 3]
    assert out["lo"].notna().tolist() == [True, False, True]
    fig = figures.cohort_trajectory_figure(frame, M.POI, bin_days=4)
    means = [t for t in fig.data if t.name == "A: mean"][0]
    assert list(means.marker.symbol) == ["circle", "circle-open", "circle"]
    bands = [t for t in fig.data if t.name == "A: 95 % CI"]
    assert len(bands) == 2 and [t.showlegend for t in bands] == [True, False]  # two runs, not bridged over day 8


def test_mean_ci_band_stops_at_the_floor() -> None:
    s = pd.DataFrame({"arm": ["A"] * 3, "patient_key": ["p1", "p2", "p3"], "day": [0, 0, 0], "value": [0.1, 0.2, 6.0]})
    free = stats.mean_ci(s, bin_days=7)
    floored = stats.mean_ci(s, bin_days=7, floor=0.0)
    assert float(free["lo"].iloc[0]) < 0  # the symmetric t-interval of a skewed sample dips below 0
    assert float(floored["lo"].iloc[0]) == 0.0
    assert float(floored["hi"].iloc[0]) == float(free["hi"].iloc[0])

def test_filters_and_summary() -> None:
    cohort = synthetic.cohort_frame(12, seed=1)
    only_a = stats.filter_cohort(cohort, arms=["arm A"])
    assert set(only_a.arm) == {"arm A"}
    base = stats.baseline_values(cohort)
    kept = stats.filter_cohort(cohort, baseline_severity=(0, float(base.median())))
    assert set(kept.patient_key) == set(base[base <= base.median()].index)
    summary = data.patient_summary(cohort)
    assert len(summary) == 12 and summary["trend"].str.len().gt(0).all()
    assert data.trend_arrow([5, 9]) == "↑ worse" and data.trend_arrow([9, 5]) == "↓ better" and data.trend_arrow([5, 5.5]) == "→ stable"


def test_lobe_table_has_scores_per_date() -> None:
    frame = synthetic.patient_frame(4)
    table = data.lobe_table(frame)
    assert len(table) == 4
    assert {f"{lobe} score" for lobe in data.LOBES} <= set(table.columns)
    total = frame[(frame.region == "whole") & (frame.metric == M.SEVERITY)].sort_values("study_date")["value"].astype(int).tolist()
    assert table["Total score"].tolist() == total


def test_viewer_render_colours_and_orientation() -> None:
    s = synthetic.aligned_series(3, shape=(20, 40, 40))
    k = s.key_slice("axial")
    assert (s.infection[2][k] > 0).any()  # the key slice shows infection
    img = viewer.render(s, 2, "axial", k, "lobes", max_px=1000, marks=False)  # pixel colours without the R/L letters
    assert img.shape == (40, 40, 3) and img.dtype == np.uint8
    # a consolidation voxel is tinted red; GGO amber (more green than red-only)
    cons = np.argwhere(s.infection[2][k] == 2)[0]
    r, g, b = img[tuple(cons)].astype(int)
    assert r > g + 60 and r > b + 60
    # coronal: square pixels (5 mm slices vs 1.5 mm rows -> taller image) and the head at the top
    cor = viewer.render(s, 0, "coronal", 20, "none", max_px=1000)
    assert cor.shape[0] == round(20 * 5.0 / 1.5)
    marker = s.ct[0].copy()
    marker[-1, 20, :] = 3000  # top axial slice (head end) made bright
    top = viewer.take_slice(marker, "coronal", 20)
    assert (top[0] == 3000).all()


def test_viewer_images_carry_patient_directions() -> None:
    s = synthetic.aligned_series(2, shape=(20, 80, 80))
    k = s.key_slice("axial")
    bare = viewer.render(s, 0, "axial", k, "none", max_px=1000, marks=False)
    marked = viewer.render(s, 0, "axial", k, "none", max_px=1000)
    changed = np.any(marked != bare, axis=2)
    h, w = changed.shape
    # ink at the middle of each edge (R, L, A, P) and nowhere in the centre of the image
    for rows, cols in ((slice(h // 3, 2 * h // 3), slice(0, w // 6)), (slice(h // 3, 2 * h // 3), slice(5 * w // 6, w)),
                       (slice(0, h // 6), slice(w // 3, 2 * w // 3)), (slice(5 * h // 6, h), slice(w // 3, 2 * w // 3))):
        assert changed[rows, cols].any()
    assert not changed[h // 3: 2 * h // 3, w // 3: 2 * w // 3].any()
    assert viewer.ORIENTATION["coronal"][2:] == ("S", "I")


def test_change_overlay_uses_change_map() -> None:
    s = synthetic.aligned_series(3, shape=(20, 40, 40))
    k = s.key_slice("axial")
    img = viewer.render(s, 1, "axial", k, "change", max_px=1000, marks=False)
    new = np.argwhere(s.change[1][k] == 1)
    assert len(new)
    r, g, b = img[tuple(new[0])].astype(int)
    assert r > g and r > b  # new infection is red
    # a follow-up without a change map (stale, failed QA) shows its own infection, titled so
    from dataclasses import replace

    stale = replace(s, change=(s.change[0], None, s.change[2]))
    shown = viewer.render(stale, 1, "axial", k, "change", max_px=1000, marks=False)
    assert np.array_equal(shown, viewer.render(stale, 1, "axial", k, "lobes", max_px=1000, marks=False))
    assert "change not shown" in figures._timepoint_title(stale, 1, overlay="change")


def test_figures_have_expected_traces() -> None:
    frame = synthetic.patient_frame(5)
    traj = figures.trajectory_figure(frame)
    names = {t.name for t in traj.data}
    assert {"infection volume", "POI whole", "POI RLL", "severity score"} <= names
    # without lobes (no lobe model): no empty lobe or severity panels
    no_lobes = figures.trajectory_figure(frame[frame.region.isin(["whole", "right", "left"]) & (frame.metric != M.SEVERITY)])
    assert [a.text for a in no_lobes.layout.annotations] == ["Infection volume (mL)", "POI (%): whole, right, left"]
    heat = figures.lobe_heatmap(frame)
    assert np.asarray(heat.data[0].z).shape == (5, 5)
    s = synthetic.aligned_series(4)
    view = figures.viewer_figure(s, "axial", 10)
    assert sum(t.type == "image" for t in view.data) == 4
    anim = figures.viewer_animation(s, "coronal", 30, "change")
    assert len(anim.frames) == 4
    coh = figures.cohort_trajectory_figure(synthetic.cohort_frame(30))
    assert len(coh.data) <= 6  # patients share one trace per arm
    big = figures.cohort_trajectory_figure(synthetic.cohort_frame(200), max_lines_per_arm=20)
    assert big.data[0].name == "arm A: 20 of 100 patients"  # faint lines sampled, mean over all


@pytest.fixture
def store_with_patients(covidtrack_home: Path) -> list[str]:
    with Store.open() as store:
        keys = synthetic.populate_store(store, n_patients=3, n_scans=3, shape=(16, 48, 48))
        store.set_patient(keys[0], alias="Zoë bed 7")  # non-Latin-1 alias must print
    return keys


def _pdf_text(path: Path, tmp: Path) -> str:
    subprocess.run(["pdftoppm", "-r", "40", "-png", str(path), str(tmp / "page")], check=True, timeout=60)
    assert list(tmp.glob("page*.png")), "pdftoppm rendered no page"
    return subprocess.run(["pdftotext", "-layout", str(path), "-"], check=True, capture_output=True, text=True, timeout=60).stdout


@pytest.mark.skipif(not POPPLER, reason="poppler-utils (pdftoppm, pdftotext) not installed")
def test_patient_pdf_via_cli(store_with_patients: list[str], tmp_path: Path) -> None:
    # one real registration (ANTs, covidtrack.longitudinal) so the report has an aligned follow-up
    from covidtrack import longitudinal

    key = store_with_patients[0]
    with Store.open() as store:
        follow = store.scans(key)["scan_id"].iloc[1]
        longitudinal.register_followup(store, follow)
        aligned = load.aligned_series(store, key)
        change = load.change_table(store, key)
        lesions = load.lesion_table(store, key)
        cached = list((store.home / load.VIEWER_CACHE).glob("*.npz"))
        again = load.aligned_series(store, key)  # read back from the viewer cache, not re-warped
    assert len(cached) == 1
    assert np.array_equal(again.ct[1], aligned.ct[1]) and np.array_equal(again.infection[1], aligned.infection[1])
    assert aligned.registered == (True, True, False)  # the unregistered one is flagged, not hidden
    assert aligned.change[1] is not None and aligned.change[1].shape == aligned.shape
    assert set(change["region"]) >= {"whole", "RLL"} and (change["new_ml"] >= 0).all()
    # lesions followed from the baseline: only the registered follow-up, volumes consistent with the change
    assert len(lesions) and set(lesions["scan_id"]) == {follow}
    whole = change[change["region"] == "whole"].iloc[0]
    tracked = lesions[lesions["status"] != "new"]["baseline_ml"].sum()
    assert tracked <= whole["resolved_ml"] + whole["persistent_ml"] + 0.05  # lesions are part of the baseline infection
    out = tmp_path / "patient.pdf"
    assert cli(["report", "--patient", "Zoë bed 7", "--out", str(out)]) == 0
    text = _pdf_text(out, tmp_path)
    assert "Zoë bed 7" in text and key in text
    assert "Change summary" in text and "No registered follow-up" not in text
    assert "Lesions vs baseline" in text
    # the export carries the same change and lesion tables, with the patient's identity columns
    from covidtrack.pipeline import export_metrics

    names = {p.name for p in export_metrics(tmp_path / "export", "csv", lesions=True)}
    assert {"change_vs_baseline.csv", "lesions.csv"} <= names
    exported = pd.read_csv(tmp_path / "export" / "change_vs_baseline.csv")
    assert set(exported["scan_id"]) == {follow} and (exported["patient_key"] == key).all()
    whole_export = exported[exported["region"] == "whole"].iloc[0]
    assert whole_export["new_ml"] == pytest.approx(whole["new_ml"]) and whole_export["alias"] == "Zoë bed 7"
    assert len(pd.read_csv(tmp_path / "export" / "lesions.csv")) == len(lesions)
    assert "lesions.csv" not in {p.name for p in export_metrics(tmp_path / "export2", "csv")}  # only when asked
    with Store.open() as store:
        frame = load.patient_frame(store, key)
    poi0 = frame[(frame.region == "whole") & (frame.metric == M.POI)].sort_values("study_date")["value"].iloc[0]
    assert data.poi_text(poi0, unit=False) in text  # the baseline whole-lung POI appears in the per-date table
    assert "not a diagnosis" in text
    assert not list(tmp_path.glob(".patient.pdf.*"))  # no temporary file left behind


@pytest.mark.skipif(not POPPLER, reason="poppler-utils (pdftoppm, pdftotext) not installed")
def test_cohort_pdf_with_matplotlib_fallback(store_with_patients: list[str], tmp_path: Path) -> None:
    out = tmp_path / "cohort.pdf"
    assert cli(["report", "--cohort", "--arm", "arm A", "--arm", "arm B", "--out", str(out), "--engine", "matplotlib"]) == 0
    text = _pdf_text(out, tmp_path)
    assert "Cohort report" in text and "Mann-Whitney" in text
    assert "arm A" in text and "arm B" in text


def test_unknown_patient_is_a_clear_error(store_with_patients: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["report", "--patient", "nobody", "--out", str(tmp_path / "x.pdf")]) == 2
    assert "no patient" in capsys.readouterr().err
    assert not (tmp_path / "x.pdf").exists()


def test_raised_flags_name_the_date_and_what_to_check() -> None:
    from covidtrack import metrics

    frame = pd.DataFrame({
        "study_date": pd.to_datetime(["2020-03-01"] * 3 + ["2020-03-05"] * 3),
        "region": ["whole", "whole", "RUL", "whole", "whole", "whole"],
        "metric": [metrics.FLAG_COARSE, metrics.FLAG_THICK, metrics.FLAG_SMALL_LUNG, metrics.FLAG_COARSE, metrics.POI, metrics.FLAG_THICK],
        "value": [1.0, 0.0, 1.0, 1.0, 30.0, 1.0],
    })
    flags = data.raised_flags(frame)
    assert [(str(d), f) for d, f in zip(flags["study_date"], flags["flag"])] == [
        ("2020-03-01", metrics.FLAG_COARSE), ("2020-03-05", metrics.FLAG_COARSE), ("2020-03-05", metrics.FLAG_THICK)]
    assert "over-called" in flags["message"].iloc[0]
    assert data.raised_flags(frame[frame["metric"] == metrics.POI]).empty
    lines = data.flag_lines(frame)
    assert len(lines) == 2 and lines[0].endswith("(2020-03-01, 2020-03-05)")



def test_patients_list_counts_the_checks_of_each_patient() -> None:
    from covidtrack import metrics

    rows = []
    for key, coarse in (("P1", 1.0), ("P2", 0.0)):
        for day, (poi, slice_mm) in enumerate(((5.0, 1.0), (3.0, 5.0) if key == "P1" else (3.0, 1.0))):
            date = pd.Timestamp("2020-03-01") + pd.Timedelta(days=7 * day)
            for metric, value in ((metrics.POI, poi), (metrics.SEVERITY, 3.0), (metrics.FLAG_COARSE, coarse), (metrics.SLICE_MM, slice_mm)):
                rows.append(dict(patient_key=key, label=key, arm="A", scan_id=f"{key}-{day}", study_date=date, day=7 * day,
                                 region="whole", metric=metric, value=value, unit="", model_version="m"))
    table = data.patient_summary(pd.DataFrame(rows)).set_index("patient_key")
    assert table.loc["P1", "checks"] == 2  # coarse pixels + a 5x slice-thickness change
    assert table.loc["P2", "checks"] == 0


def test_a_resolution_change_between_dates_is_flagged() -> None:
    from covidtrack import metrics

    dates = pd.to_datetime(["2020-03-01", "2020-03-01", "2020-03-09", "2020-03-09", "2020-03-20", "2020-03-20"])
    frame = pd.DataFrame({"study_date": dates, "region": ["whole"] * 6,
                          "metric": [metrics.SLICE_MM, metrics.PIXEL_MM] * 3,
                          "value": [1.0, 0.7, 1.25, 0.8, 5.0, 0.75]})
    lines = data.flag_lines(frame)
    assert len(lines) == 1 and "slice thickness differs" in lines[0]
    assert "1 mm on 2020-03-01" in lines[0] and "5 mm on 2020-03-20" in lines[0]
    # within a factor of 2 (1.0 vs 1.25 mm): nothing to say; older stores without the rows: nothing either
    assert data.flag_lines(frame[frame["study_date"] < "2020-03-15"]) == []
    assert data.flag_lines(frame[~frame["metric"].isin([metrics.SLICE_MM, metrics.PIXEL_MM])]) == []


def test_single_scan_trajectory_shows_whole_days() -> None:
    from covidtrack import metrics

    frame = pd.DataFrame({
        "study_date": pd.to_datetime(["2020-03-02"] * 3), "day": [0, 0, 0], "region": ["whole"] * 3,
        "metric": [metrics.POI, metrics.INFECTION_VOLUME, metrics.SEVERITY], "value": [1.1, 61.0, 5.0],
    })
    fig = figures.trajectory_figure(frame, x="date")
    lo, hi = (pd.Timestamp(v) for v in fig.layout.xaxis.range)
    assert (hi - lo) == pd.Timedelta(days=8)  # not a millisecond-wide axis around one point
    bars = [t for t in fig.data if t.type == "bar"]
    assert bars and bars[0].width == 86400000.0
    assert list(figures.trajectory_figure(frame, x="day").layout.xaxis.range) == [-4, 4]


def test_poi_text_never_contradicts_the_score() -> None:
    from covidtrack.metrics import severity_from_percent
    from covidtrack.report.data import poi_text

    cases = {0.0: "0.0 %", 0.01: "<0.1 %", 4.96: "4.96 %", 4.999: "<5.00 %", 5.0: "5.0 %", 25.04: "25.04 %",
             25.001: ">25.00 %", 49.96: "49.96 %", 75.04: "75.04 %", 12.34: "12.3 %", float("nan"): "–"}
    for value, text in cases.items():
        assert poi_text(value) == text
    for value in np.linspace(0.01, 99.99, 4001):  # whatever is printed scores like the value itself
        shown = poi_text(float(value), unit=False).lstrip("<>")
        if not poi_text(float(value)).startswith(("<", ">")):
            assert severity_from_percent(float(shown)) == severity_from_percent(float(value))


def test_patients_list_takes_latest_values_from_the_latest_scan() -> None:
    def row(key: str, day: int, metric: str, value: float) -> dict:
        return dict(patient_key=key, label=key, arm="A", scan_id=f"{key}-{day}", study_date=pd.Timestamp("2020-03-01") + pd.Timedelta(days=day),
                    day=day, region="whole", metric=metric, value=value, unit="", model_version="m")

    rows = [row("P1", 0, M.POI, 80.0), row("P1", 0, M.SEVERITY, 25.0), row("P1", 9, M.POI, 0.2),  # latest: no lobes
            row("P2", 0, M.POI, 5.0), row("P2", 4, M.POI, 30.0), row("P2", 8, M.POI, np.nan)]  # latest: empty lung mask
    table = data.patient_summary(pd.DataFrame(rows)).set_index("patient_key")
    assert table.loc["P1", "latest POI %"] == 0.2 and table.loc["P1", "latest score"] is None
    assert table.loc["P1", "trend"] == "↓ better"
    assert np.isnan(table.loc["P2", "latest POI %"]) and table.loc["P2", "trend"] == "·"


def test_pdf_lobe_table_shows_whole_scores_and_traces() -> None:
    from covidtrack.report.pdf import _lobe_table_for_pdf

    frame = synthetic.patient_frame(3)
    lobeless = frame["study_date"] == frame["study_date"].max()
    frame = frame[~(lobeless & (frame.region.isin(data.LOBES) | (frame.metric == M.SEVERITY)))].copy()
    whole = (frame.region == "whole") & lobeless
    frame.loc[whole & (frame.metric == M.POI), "value"] = 0.003
    frame.loc[whole & (frame.metric == M.INFECTION_ML), "value"] = 0.002
    table = _lobe_table_for_pdf(frame)
    assert table["Score /25"].iloc[0].isdigit() and table["Score /25"].iloc[-1] == "–"
    assert all(cell.endswith(")") and "." not in cell.split("(")[1] for cell in table["RUL"].iloc[:-1])
    assert table["POI %"].iloc[-1] == "<0.1" and table["Infection mL"].iloc[-1] == "<0.01"
    assert data.lobe_table(frame)["RUL score"].dtype == "Int64"


def _poi_rows(key: str, arm: str, values: dict[int, float], severity: dict[int, float] | None = None) -> list[dict]:
    rows = []
    for day, v in values.items():
        for metric, value in ((M.POI, v), *(((M.SEVERITY, severity[day]),) if severity and day in severity else ())):
            rows.append(dict(patient_key=key, label=key, arm=arm, scan_id=f"{key}-{day}", study_date=pd.Timestamp("2020-03-01") + pd.Timedelta(days=day),
                             day=day, region="whole", metric=metric, value=value, unit="", model_version="m"))
    return rows


def test_change_from_baseline_uses_the_first_scan_and_the_last_measured_one() -> None:
    frame = pd.DataFrame(_poi_rows("P1", "A", {0: 20.0, 4: 15.0, 9: np.nan})      # last scan unmeasured
                         + _poi_rows("P2", "A", {0: np.nan, 5: 30.0, 10: 12.0})  # baseline unmeasured
                         + _poi_rows("P3", "B", {0: 10.0, 6: np.nan}))           # nothing after baseline
    changes = stats.change_from_baseline(frame).set_index("patient_key")
    assert list(changes.index) == ["P1"]
    assert changes.loc["P1", "last"] == 15.0 and changes.loc["P1", "last_day"] == 4 and changes.loc["P1", "change"] == -5.0


def test_cohort_filters_keep_each_patients_baseline() -> None:
    frame = pd.DataFrame(_poi_rows("P1", "A", {0: 40.0, 6: 25.0, 12: 14.0}, {0: 12.0, 6: 9.0, 12: 6.0})
                         + _poi_rows("P2", "A", {3: 10.0, 9: 8.0}, {9: 4.0}))  # no score on its first scan
    # a date range after P1's baseline does not make its second scan the baseline: P1 is out
    late = stats.filter_cohort(frame, date_range=("2020-03-02", "2020-03-31"))
    assert set(late.patient_key) == {"P2"} and len(late) == len(frame[frame.patient_key == "P2"])
    early = stats.filter_cohort(frame, date_range=("2020-03-01", "2020-03-02"))
    assert stats.change_from_baseline(early).set_index("patient_key").loc["P1", "baseline"] == 40.0
    # P2's baseline score is unknown, not its day-9 score
    assert np.isnan(stats.baseline_values(frame)["P2"])
    assert set(stats.filter_cohort(frame, baseline_severity=(0, 25)).patient_key) == {"P1"}
    assert set(stats.filter_cohort(frame).patient_key) == {"P1", "P2"}


def test_cohort_lines_follow_each_patient_whatever_the_row_order() -> None:
    cohort = synthetic.cohort_frame(6, seed=2).sample(frac=1.0, random_state=0)  # rows shuffled
    fig = figures.cohort_trajectory_figure(cohort, M.POI)
    for trace in fig.data:
        if trace.mode != "lines" or not str(trace.name).endswith("patients"):
            continue
        days = np.asarray(trace.x, dtype=float)
        runs = np.split(days, np.flatnonzero(np.isnan(days)))
        assert all((np.diff(r[np.isfinite(r)]) > 0).all() for r in runs)  # each run: one patient, forward in time
        assert sum(len(r[np.isfinite(r)]) > 0 for r in runs) == cohort[cohort.arm == trace.legendgroup]["patient_key"].nunique()


def test_patients_without_an_arm_can_be_chosen_and_are_not_compared_by_default(store_with_patients: list[str], tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from covidtrack.report import pdf

    lone = store_with_patients[0]
    with Store.open() as store:
        cur = store._cursor()
        cur.execute("UPDATE patients SET arm = NULL WHERE patient_key = ?", [lone])
        cur.close()
        only = load.cohort_frame(store, arms=[data.NO_ARM])
        assert set(only["patient_key"]) == {lone} and set(only["arm"]) == {data.NO_ARM}
        both = load.cohort_frame(store, arms=[data.NO_ARM, "arm A"])
        assert lone in set(both["patient_key"])
    seen: dict[str, object] = {}
    monkeypatch.setattr(pdf, "write_cohort_pdf", lambda cohort, out, arms=None, engine="auto": seen.setdefault("arms", arms) and Path(out))
    assert cli(["report", "--cohort", "--out", str(tmp_path / "c.pdf")]) == 0
    assert data.NO_ARM not in seen["arms"] and seen["arms"]


def test_poi_band_stays_within_0_and_100_percent() -> None:
    s = pd.DataFrame({"patient_key": list("abc"), "label": list("abc"), "arm": "A", "day": 0,
                      "study_date": pd.Timestamp("2020-03-01"), "value": [100.0, 100.0, 40.0]})
    out = stats.mean_ci(s, floor=0.0, ceiling=100.0)
    assert out["hi"].item() == 100.0 and 0.0 <= out["lo"].item() < out["mean"].item() == 80.0
    assert stats.mean_ci(s)["hi"].item() > 100.0  # the plain t-interval, for contrast


def test_matplotlib_heatmap_prints_the_shared_poi_text() -> None:
    from unittest import mock

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.axes

    from covidtrack.report.export import matplotlib_png

    frame = synthetic.patient_frame(n_scans=2, seed=0)
    idx = frame[(frame.metric == M.POI) & (frame.region == "RUL")].index
    frame.loc[idx[0], "value"], frame.loc[idx[1], "value"] = 4.96, 0.03
    texts, orig = [], matplotlib.axes.Axes.text

    def spy(self, x, y, s, *a, **k):
        texts.append(str(s))
        return orig(self, x, y, s, *a, **k)

    with mock.patch.object(matplotlib.axes.Axes, "text", spy):
        matplotlib_png(figures.lobe_heatmap(frame), 1000, 300, scale=0.5)
    assert "4.96" in texts and "<0.1" in texts, texts  # not "5.0" (reads as score 2) and "0.0" (reads as clear)


def test_patient_pdf_change_summary_shows_a_trace_as_a_trace(tmp_path: Path) -> None:
    if shutil.which("pdftotext") is None:
        pytest.skip("pdftotext (poppler-utils) not installed")
    from covidtrack.report.data import header_from_frame
    from covidtrack.report.pdf import PatientReportData, write_patient_pdf

    frame = synthetic.patient_frame(n_scans=2, seed=0)
    change = pd.DataFrame({"date": ["2020-03-05"], "scan_id": ["SYN0000-s1"], "region": ["whole"],
                           "new_ml": [0.003], "resolved_ml": [0.0], "persistent_ml": [12.0]})
    data = PatientReportData(header=header_from_frame("SYN0000", "SYN0000", "arm A", frame), frame=frame, change=change)
    pdf = write_patient_pdf(data, tmp_path / "p.pdf", engine="matplotlib")
    text = subprocess.run(["pdftotext", "-layout", str(pdf), "-"], capture_output=True, text=True, check=True).stdout
    row = next(line for line in text.splitlines() if line.strip().startswith("2020-03-05") and "whole" in line)
    assert row.split()[2:] == ["<0.01", "0.00", "12.0", "+<0.01"], row

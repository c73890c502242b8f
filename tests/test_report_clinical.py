"""What a clinician reads: units, labels, colours and wording of the report figures, the PDF and the
patient page. Each test failed before session 9 (a clinical reading's findings)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covidtrack.report import export, figures, stats, synthetic
from covidtrack.report.data import M

POPPLER = shutil.which("pdftotext")


def _changes() -> pd.DataFrame:
    return stats.change_from_baseline(synthetic.cohort_frame(30, seed=3, arms=("arm A", "arm B", "arm C")))


def _capture_matplotlib(monkeypatch: pytest.MonkeyPatch) -> list:
    """Keep the matplotlib figures the PDF fallback draws (instead of closing them)."""
    import matplotlib.pyplot as plt

    seen: list = []
    monkeypatch.setattr(plt, "close", lambda fig=None: seen.append(fig))
    return seen


def test_box_plot_axis_calls_a_percentage_point_change_percent() -> None:
    # a change of POI from 10 % to 15 % is +5 percentage points (the PDF's own table says so),
    # not +5 % (which reads as a relative change: 10 % -> 10.5 %)
    fig = figures.change_box_figure(_changes())
    title = fig.layout.yaxis.title.text
    assert "(%)" not in title and ("percentage point" in title or "pp" in title), title


def test_matplotlib_box_plot_labels_each_box_with_its_arm(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _capture_matplotlib(monkeypatch)
    export.matplotlib_png(figures.change_box_figure(_changes()), 1000, 360, scale=1.0)
    ax = seen[-1].axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["arm A", "arm B", "arm C"], labels  # got ['2', '', 'arm C']
    assert "<br>" not in ax.get_ylabel(), ax.get_ylabel()


def test_matplotlib_ci_bands_have_their_arms_colour(monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib.colors as mcolors

    seen = _capture_matplotlib(monkeypatch)
    fig = figures.cohort_trajectory_figure(synthetic.cohort_frame(30, seed=3), M.POI, webgl=False)
    export.matplotlib_png(fig, 1000, 400, scale=1.0)
    ax = seen[-1].axes[0]
    bands = [t for t in fig.data if t.name and t.name.endswith("95 % CI")]
    assert bands
    want = [mcolors.to_rgb(t.fillcolor) for t in bands]
    got = [tuple(np.round(p.get_facecolor()[:3], 3)) for p in ax.patches]
    # every band is drawn in '#333333' (grey): a reader cannot tell whose CI is whose
    assert [tuple(np.round(w, 3)) for w in want] == got, (want, got)
    # a bin mean from fewer than 3 patients stays hollow, as in the dashboard
    small_n = [t for t in fig.data if isinstance(t.marker.symbol, tuple) and "circle-open" in t.marker.symbol]
    assert small_n, "the synthetic cohort should have a bin with fewer than 3 patients"
    hollow = [c for c in ax.collections if len(c.get_facecolor()) == 0 or float(np.max(c.get_facecolor()[:, 3])) == 0.0]
    assert hollow, "no hollow markers drawn"


def test_matplotlib_heatmap_prints_whole_dates(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _capture_matplotlib(monkeypatch)
    frame = synthetic.patient_frame(6, seed=2)
    export.matplotlib_png(figures.lobe_heatmap(frame, x="date", height=300), 1000, 300, scale=1.0)
    mfig = seen[-1]
    renderer = mfig.canvas.get_renderer()
    ax = mfig.axes[0]
    cut = [t.get_text() for t in ax.get_xticklabels() if t.get_window_extent(renderer).y0 < 0]
    assert not cut, f"date labels run off the bottom of the picture: {cut}"


@pytest.mark.skipif(not POPPLER, reason="poppler-utils not installed")
def test_pdf_does_not_call_unaligned_follow_ups_registered(tmp_path: Path) -> None:
    from covidtrack.report.data import header_from_frame
    from covidtrack.report.pdf import PatientReportData, write_patient_pdf
    from covidtrack.report.viewer import AlignedSeries

    a = synthetic.aligned_series(3)
    a = AlignedSeries(dates=a.dates, days=a.days, spacing=a.spacing, ct=a.ct, infection=a.infection, lungs=a.lungs,
                      lobes=a.lobes, change=(None, None, None), registered=(True, False, False))
    frame = synthetic.patient_frame(3)
    data = PatientReportData(header=header_from_frame("SYN0000", "SYN0000", "arm A", frame), frame=frame, aligned=a)
    out = write_patient_pdf(data, tmp_path / "p.pdf", engine="matplotlib")
    text = subprocess.run(["pdftotext", str(out), "-"], capture_output=True, text=True, check=True).stdout
    text = " ".join(text.split())
    assert "(not aligned)" in text
    assert "Follow-ups are registered to the baseline (same anatomy)" not in text


def test_patient_page_table_poi_never_reads_as_another_score(covidtrack_home: Path) -> None:
    """The on-screen per-date table printed every metric with %.2f: a lobe POI of 4.996 % with a
    lobe score of 1 read "5.00" (score 2 territory) on the same row, and scores read "2.00". POI
    now uses the shared poi_text wording and scores / lesion counts whole numbers."""
    import json

    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from covidtrack.report.data import poi_text
    from covidtrack.store import Store

    assert poi_text(4.996, unit=False) == "<5.00"  # what the page now shows for the reviewer's case
    st.cache_resource.clear()
    st.cache_data.clear()
    with Store.open() as store:
        keys = synthetic.populate_store(store, n_patients=1, n_scans=2, shape=(16, 48, 48))
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "app.py"), default_timeout=60)
    at.query_params["patient"] = keys[0]
    at.run()
    at.switch_page("covidtrack/ui/pages/patient.py")
    at.run()
    assert not at.exception
    df = [d for d in at.dataframe if "region" in d.value.columns][-1]
    cfg = json.loads(df.proto.columns)
    fmt = {k: v.get("type_config", {}).get("format") for k, v in cfg.items()}
    st.cache_resource.clear()
    assert fmt["CT severity score"] == "%d" and fmt["Lesions (n)"] == "%d"
    shown = df.value["POI (%)"]
    assert all(isinstance(v, str) for v in shown)
    with Store.open(read_only=True) as store:
        poi = store.metrics(model_version=None)
    values = poi[(poi["metric"] == "poi")]["value"]
    assert set(shown) <= {poi_text(v, unit=False) for v in values}


def test_baseline_panel_of_the_change_view_does_not_call_resolved_infection_persistent() -> None:
    """Dashboard change overlay: the baseline panel paints all its infection in the 'persistent'
    colour of the legend (new / resolved / persistent vs the baseline), also infection that the
    follow-up beside it shows as resolved."""
    from covidtrack.report.viewer import CHANGE_COLOURS, AlignedSeries, render

    a = synthetic.aligned_series(2)
    inf1 = np.zeros_like(a.infection[1])  # everything resolved at the follow-up
    change1 = np.where(a.infection[0] > 0, 2, 0).astype(np.uint8)
    a = AlignedSeries(dates=a.dates, days=a.days, spacing=a.spacing, ct=a.ct, infection=(a.infection[0], inf1),
                      lungs=a.lungs, lobes=a.lobes, change=(None, change1), registered=(True, True))
    k = a.key_slice("axial")
    base = render(a, 0, "axial", k, "change", marks=False).astype(int)
    follow = render(a, 1, "axial", k, "change", marks=False).astype(int)
    grey = render(a, 0, "axial", k, "none", marks=False).astype(int)
    # the expected blend of the legend colour over the grey CT (OVERLAY_ALPHA 0.5)
    resolved_in_follow_up = (np.abs(follow - (grey + np.array(CHANGE_COLOURS[2])) // 2).sum(-1) <= 3) & (follow != grey).any(-1)
    persistent_in_base = (np.abs(base - (grey + np.array(CHANGE_COLOURS[3])) // 2).sum(-1) <= 3) & (base != grey).any(-1)
    assert resolved_in_follow_up.any()  # the follow-up says: resolved (green)
    assert not (persistent_in_base & resolved_in_follow_up).any(), "baseline panel paints the same lesion 'persistent'"


def test_matplotlib_keeps_the_fixed_0_to_25_severity_axis(monkeypatch: pytest.MonkeyPatch) -> None:
    """The severity panel's 0-25 axis (plotly range) was autoscaled to the data by the fallback,
    so a moderate score of 8 looked near-maximal."""
    seen = _capture_matplotlib(monkeypatch)
    fig = figures.trajectory_figure(synthetic.patient_frame(5, seed=2))
    export.matplotlib_png(fig, 1000, 620, scale=1.0)
    ranges = [tuple(ax.get_ylim()) for ax in seen[-1].axes]
    assert (0.0, 25.0) in [tuple(round(v, 6) for v in r) for r in ranges], ranges

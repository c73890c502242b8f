"""Plotly figures shared by the dashboard and the PDF (which exports the very same figures).

Inputs are the long frames documented in :mod:`covidtrack.report.data` and the
:class:`~covidtrack.report.viewer.AlignedSeries`; every function returns a ``go.Figure`` and
touches no files.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from covidtrack import metrics
from covidtrack.report.data import LOBES, M, change_label, metric_label, poi_text, select
from covidtrack.report.stats import MIN_CI_N, mean_ci, per_patient_series
from covidtrack.labels import CHANGE_LABELS
from covidtrack.report.viewer import (
    BASELINE_COLOUR,
    CHANGE_COLOURS,
    INFECTION_COLOURS,
    LOBE_COLOURS,
    AlignedSeries,
    Overlay,
    Plane,
    data_uri,
    strip,
)

XAxis = Literal["date", "day"]

# every legend entry of the trajectory figure gets its own colour: the sides must not reuse the
# lobes' (RUL blue, RML purple, RLL cyan, LUL green, LLL orange) nor the infection's (amber, red)
REGION_COLOURS = {
    "whole": "#222222",
    "right": "#bcbd22",
    "left": "#e377c2",
    **{lobe: "rgb({},{},{})".format(*LOBE_COLOURS[i + 1]) for i, lobe in enumerate(LOBES)},
}
INFECTION_VOLUME_COLOUR = "#8c564b"
ARM_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
GGO_COLOUR = "rgb({},{},{})".format(*INFECTION_COLOURS[1])
CONS_COLOUR = "rgb({},{},{})".format(*INFECTION_COLOURS[2])
FONT = dict(family="DejaVu Sans, Arial, sans-serif", size=12)


def _x(rows: pd.DataFrame, x: XAxis) -> pd.Series:
    return rows["study_date"] if x == "date" else rows["day"]


def _x_title(x: XAxis) -> str:
    return "Study date" if x == "date" else "Days since baseline"


def _layout(fig: go.Figure, title: str | None, height: int) -> go.Figure:
    fig.update_layout(
        title=dict(text=title) if title else None,
        height=height,
        margin=dict(l=60, r=20, t=60 if title else 30, b=50),
        font=FONT,
        template="plotly_white",
        hovermode="x unified",
        legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="left", x=0),
    )
    return fig


def _line(rows: pd.DataFrame, x: XAxis, name: str, colour: str, unit: str, dash: str | None = None, **kw) -> go.Scatter:
    return go.Scatter(
        x=_x(rows, x),
        y=rows["value"],
        name=name,
        mode="lines+markers",
        line=dict(color=colour, dash=dash, width=2),
        marker=dict(size=7),
        customdata=rows[["day"]].to_numpy(),
        hovertemplate=f"{name}: %{{y:.2f}} {unit}<extra>day %{{customdata[0]}}</extra>",
        **kw,
    )


def trajectory_figure(frame: pd.DataFrame, x: XAxis = "date", lobe_view: bool = True, height: int = 620) -> go.Figure:
    """The patient's course in up to four panels sharing the x axis.

    (1) infection volume (mL) with GGO and consolidation; (2) POI (%) whole / right / left;
    (3) POI (%) per lobe (5-lobe view) or GGO vs consolidation POI (4-region view);
    (4) CT severity score 0-25. Panels without data (e.g. no lobes segmented) are left out.
    """
    has_lobes = frame["region"].isin(LOBES).any() and (frame["metric"] == M.POI).any()
    has_severity = len(select(frame, M.SEVERITY, "whole")) > 0
    panels = ["volume", "poi"]
    if lobe_view and has_lobes:
        panels.append("lobes")
    elif not lobe_view:
        panels.append("ggo_cons")
    if has_severity:
        panels.append("severity")
    titles = {
        "volume": "Infection volume (mL)",
        "poi": "POI (%): whole, right, left",
        "lobes": "POI (%) per lobe",
        "ggo_cons": "GGO vs consolidation POI (%)",
        "severity": "CT severity score (0-25)",
    }
    rows = (len(panels) + 1) // 2
    fig = make_subplots(
        rows=rows, cols=2, shared_xaxes=True, subplot_titles=[titles[p] for p in panels],
        vertical_spacing=0.14 if rows > 1 else 0.1, horizontal_spacing=0.08,
    )
    where = {p: (i // 2 + 1, i % 2 + 1) for i, p in enumerate(panels)}
    r, c = where["volume"]
    for metric, name, colour, dash in (
        (M.INFECTION_ML, "infection", INFECTION_VOLUME_COLOUR, None),
        (M.GGO_ML, "GGO", GGO_COLOUR, "dot"),
        (M.CONS_ML, "consolidation", CONS_COLOUR, "dash"),
    ):
        rows_ = select(frame, metric, "whole")
        if len(rows_):
            fig.add_trace(_line(rows_, x, f"{name} volume", colour, "mL", dash, legendgroup="vol"), row=r, col=c)
    r, c = where["poi"]
    for region in ("whole", "right", "left"):
        rows_ = select(frame, M.POI, region)
        if len(rows_):
            fig.add_trace(_line(rows_, x, f"POI {region}", REGION_COLOURS[region], "%", legendgroup="poi"), row=r, col=c)
    if "lobes" in where:
        r, c = where["lobes"]
        for lobe in LOBES:
            rows_ = select(frame, M.POI, lobe)
            if len(rows_):
                fig.add_trace(_line(rows_, x, f"POI {lobe}", REGION_COLOURS[lobe], "%", legendgroup="lobe"), row=r, col=c)
    if "ggo_cons" in where:
        r, c = where["ggo_cons"]
        for metric, name, colour in ((M.POI_GGO, "GGO POI", GGO_COLOUR), (M.POI_CONS, "consolidation POI", CONS_COLOUR)):
            rows_ = select(frame, metric, "whole")
            if len(rows_):
                fig.add_trace(_line(rows_, x, name, colour, "%"), row=r, col=c)
    if "severity" in where:
        r, c = where["severity"]
        rows_ = select(frame, M.SEVERITY, "whole")
        fig.add_trace(
            go.Bar(
                x=_x(rows_, x), y=rows_["value"], name="severity score", marker_color="#7f7f7f",
                # one day wide, centred on its date (plotly would size bars to the gap between scans)
                width=[0.8 * 86_400_000 if x == "date" else 0.8] * len(rows_),
                hovertemplate="severity: %{y:.0f} / 25<extra></extra>",
            ),
            row=r, col=c,
        )
        fig.update_yaxes(range=[0, 25], row=r, col=c)
    for col in (1, 2):
        fig.update_xaxes(title_text=_x_title(x), row=rows, col=col)
    dates = pd.to_datetime(frame["study_date"]).dropna().unique() if len(frame) else []
    if len(dates) == 1:  # one scan: a week around it, whole days (plotly would zoom to milliseconds)
        day0 = pd.Timestamp(dates[0])
        if x == "date":
            fig.update_xaxes(range=[day0 - pd.Timedelta(days=4), day0 + pd.Timedelta(days=4)], tickformat="%b %d\n%Y", dtick=86400000.0 * 2)
        else:
            fig.update_xaxes(range=[-4, 4], dtick=2)
        fig.update_traces(width=86400000.0 if x == "date" else 1.0, selector=dict(type="bar"))  # one day wide
    fig.update_yaxes(rangemode="tozero")
    _layout(fig, None, height if rows > 1 else max(320, height // 2 + 40))
    # a legend on the right keeps the subplot titles readable
    fig.update_layout(legend=dict(orientation="v", x=1.02, xanchor="left", y=1, yanchor="top", font=dict(size=11)), margin=dict(r=170))
    return fig


def lobe_heatmap(frame: pd.DataFrame, x: XAxis = "date", height: int = 300) -> go.Figure:
    """POI (%) per lobe (rows) and date (columns), values printed in the cells."""
    rows = frame[(frame.metric == M.POI) & frame.region.isin(LOBES)]
    if rows.empty:
        return _layout(go.Figure(), "POI per lobe: no lobe metrics", height)
    piv = rows.pivot_table(index="region", columns="study_date", values="value", aggfunc="first").reindex(list(LOBES))
    dates = list(piv.columns)
    days = rows.drop_duplicates("study_date").set_index("study_date")["day"].reindex(dates).tolist()
    labels = [str(pd.Timestamp(d).date()) for d in dates] if x == "date" else [f"day {d}" for d in days]
    z = piv.to_numpy(dtype=float)
    fig = go.Figure(
        go.Heatmap(
            z=z, x=labels, y=list(piv.index), colorscale="YlOrRd", zmin=0, zmax=max(25.0, float(np.nanmax(z)) if np.isfinite(z).any() else 25.0),
            text=[[poi_text(v, unit=False) if np.isfinite(v) else "" for v in row] for row in z], texttemplate="%{text}",
            colorbar=dict(title=dict(text="POI %")),
            hovertemplate="%{y} %{x}: %{z:.2f} %<extra></extra>",
        )
    )
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(type="category")
    return _layout(fig, "POI (%) per lobe and date", height)


def _legend_items(overlay: Overlay) -> list[tuple[str, tuple[int, int, int]]]:
    if overlay == "change":
        return [(CHANGE_LABELS[k], CHANGE_COLOURS[k]) for k in CHANGE_LABELS] + [("baseline infection (reference)", BASELINE_COLOUR)]
    if overlay == "none":
        return []
    return [("GGO", INFECTION_COLOURS[1]), ("consolidation", INFECTION_COLOURS[2])]


def _add_legend(fig: go.Figure, overlay: Overlay) -> None:
    # Invisible markers give the image panels a legend for the overlay colours.
    for name, col in _legend_items(overlay):
        fig.add_trace(
            go.Scatter(x=[None], y=[None], mode="markers", name=name, marker=dict(size=12, symbol="square", color="rgb({},{},{})".format(*col))),
        )


def _timepoint_title(series: AlignedSeries, t: int, html: bool = True, overlay: Overlay = "lobes") -> str:
    note = "" if series.registered[t] or t == 0 else "not aligned"
    if overlay == "change" and t > 0 and series.change[t] is None:
        note = ", ".join(x for x in (note, "change not shown: infection as is") if x)
    if not html:
        return f"{series.dates[t]} · day {series.days[t]}" + (f" ({note})" if note else "")
    # two lines (three when flagged) so six dates side by side do not overlap
    return f"{series.dates[t]}<br>day {series.days[t]}" + (f"<br><i>{note}</i>" if note else "")


def viewer_figure(
    series: AlignedSeries, plane: Plane, index: int, overlay: Overlay = "lobes", max_px: int = 320, height: int | None = None, width_px: int = 1000
) -> go.Figure:
    """Every timepoint's registered slice side by side, same anatomy, baseline first.

    ``height`` defaults to what ``width_px`` of page width gives each image at its aspect ratio.
    """
    images = strip(series, plane, index, overlay, max_px)
    n = len(images)
    if height is None:
        aspect = images[0].shape[0] / images[0].shape[1]
        height = int(min(520, max(220, width_px / n * aspect + 110)))
    fig = make_subplots(rows=1, cols=n, subplot_titles=[_timepoint_title(series, t, overlay=overlay) for t in range(n)], horizontal_spacing=0.01)
    for t, img in enumerate(images):
        fig.add_trace(go.Image(source=data_uri(img), hoverinfo="skip"), row=1, col=t + 1)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    _add_legend(fig, overlay)
    fig.update_layout(
        height=height, margin=dict(l=5, r=5, t=60, b=5), font=FONT, template="plotly_white",
        legend=dict(orientation="h", yanchor="top", y=-0.02, xanchor="left", x=0),
    )
    fig.update_annotations(font_size=11)
    return fig


def viewer_animation(series: AlignedSeries, plane: Plane, index: int, overlay: Overlay = "lobes", max_px: int = 420, height: int = 520) -> go.Figure:
    """The follow-up sequence: one slice of the same anatomy played through the dates (plotly frames)."""
    images = strip(series, plane, index, overlay, max_px)
    uris = [data_uri(img) for img in images]
    names = [_timepoint_title(series, t, html=False, overlay=overlay) for t in range(len(images))]
    title = f"Follow-up sequence · {plane} slice {index}"
    # the date shown goes into the title (a slider's own current-value label sits under the play buttons)
    fig = go.Figure(data=[go.Image(source=uris[0], hoverinfo="skip")],
                    frames=[go.Frame(data=[go.Image(source=u)], name=nm, layout=dict(title=dict(text=f"{title} · {nm}")))
                            for u, nm in zip(uris, names)])
    steps = [
        dict(method="animate", label=nm, args=[[nm], dict(mode="immediate", frame=dict(duration=0, redraw=True), transition=dict(duration=0))])
        for nm in names
    ]
    fig.update_layout(
        height=height, margin=dict(l=5, r=5, t=40, b=60), font=FONT, template="plotly_white",
        title=dict(text=f"{title} · {names[0]}" if names else title),
        updatemenus=[
            dict(
                type="buttons", direction="left", x=0, y=-0.02, xanchor="left", yanchor="top", pad=dict(t=8),
                buttons=[
                    dict(label="▶ Play", method="animate", args=[None, dict(frame=dict(duration=900, redraw=True), fromcurrent=True, transition=dict(duration=0))]),
                    dict(label="❚❚ Pause", method="animate", args=[[None], dict(mode="immediate", frame=dict(duration=0, redraw=False))]),
                ],
            )
        ],
        # inset at both ends so the first and last date labels are not cut off
        sliders=[dict(active=0, steps=steps, x=0.24, len=0.68, y=-0.02, yanchor="top", pad=dict(t=8), currentvalue=dict(visible=False))],
    )
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


def change_bar_figure(change: pd.DataFrame, height: int = 300) -> go.Figure:
    """New / resolved / persistent infection volume (mL) per lobe at each follow-up vs baseline.

    ``change`` columns: ``date`` (label), ``region``, ``new_ml``, ``resolved_ml``, ``persistent_ml``.
    """
    fig = go.Figure()
    if change.empty:
        return _layout(fig, "Change vs baseline: no registered follow-up", height)
    order = {r: i for i, r in enumerate(("whole", "right", "left", *LOBES))}
    change = change.assign(_o=change["region"].map(order).fillna(99)).sort_values(["date", "_o"])
    # two-level axis: the follow-up date under its group of regions, region names upright
    x = [change["date"].astype(str).tolist(), change["region"].astype(str).tolist()]
    for col, key in (("new_ml", 1), ("resolved_ml", 2), ("persistent_ml", 3)):
        fig.add_trace(
            go.Bar(
                x=x, y=change[col], name=CHANGE_LABELS[key], marker_color="rgb({},{},{})".format(*CHANGE_COLOURS[key]),
                hovertemplate=f"{CHANGE_LABELS[key]}: %{{y:.1f}} mL<extra>%{{x}}</extra>",
            )
        )
    fig.update_layout(barmode="group", yaxis_title="mL")
    fig.update_xaxes(tickangle=0)
    _layout(fig, "Change vs baseline by region: whole lung, sides, lobes (mL)", height)
    fig.update_layout(hovermode="closest")
    return fig


def cohort_trajectory_figure(
    cohort: pd.DataFrame, metric: str = M.POI, region: str = "whole", bin_days: int = 4, height: int = 420, webgl: bool = False,
    max_lines_per_arm: int = 150,
) -> go.Figure:
    """Per arm: every patient as a faint line, the arm mean with its 95 % CI band, by day since baseline.

    Individual patients of one arm share one WebGL trace (gaps between patients), so 1,000
    patients cost a handful of traces, not 1,000. ``webgl=False`` for static export (software
    WebGL in a headless browser is slow).
    """
    # SVG by default: one path per arm is cheap, and WebGL is slow where the browser has no GPU
    scatter = go.Scattergl if webgl else go.Scatter
    series = per_patient_series(cohort, metric, region)
    # volumes and POI cannot be negative: the band stops at 0 (a mean HU series keeps its sign)
    floor = 0.0 if len(series) and float(series["value"].min()) >= 0 else None
    # and a percentage (POI) cannot exceed 100 %
    ceiling = 100.0 if metrics.UNITS.get(metric) == "%" else None
    summary = mean_ci(series, bin_days=bin_days, floor=floor, ceiling=ceiling)
    fig = go.Figure()
    for i, arm in enumerate(sorted(series["arm"].dropna().unique())):
        colour = ARM_COLOURS[i % len(ARM_COLOURS)]
        s_all = series[series.arm == arm]
        keys = sorted(s_all["patient_key"].unique())
        # beyond a few hundred faint lines nothing more is visible, but drawing them costs the
        # browser seconds: show an even sample (the mean and CI still use every patient)
        shown = keys[:: int(np.ceil(len(keys) / max_lines_per_arm))] if len(keys) > max_lines_per_arm else keys
        s = s_all[s_all["patient_key"].isin(shown)]
        label = f"{arm}: patients" if len(shown) == len(keys) else f"{arm}: {len(shown)} of {len(keys)} patients"
        # many overlapping lines add up: fade each more as the arm grows, so the mean stays readable
        faint = float(np.clip(15.0 / max(1, len(shown)), 0.08, 0.3))
        # one line per patient in day order, a NaN row after each to break the line
        s = s.sort_values(["patient_key", "day"], kind="stable").reset_index(drop=True)
        gap = s.groupby("patient_key", sort=False).tail(1).assign(day=np.nan, value=np.nan)
        lines = pd.concat([s, gap]).sort_index(kind="stable")
        fig.add_trace(
            scatter(
                x=lines["day"], y=lines["value"], mode="lines", line=dict(color=colour, width=1), opacity=faint,
                name=label, legendgroup=arm, hoverinfo="skip", connectgaps=False,
            )
        )
        m = summary[summary.arm == arm].sort_values("day").reset_index(drop=True)
        # the band only over consecutive bins that have one (too few patients break it)
        has = m["lo"].notna() & m["hi"].notna()
        for k, run in enumerate(m[has].groupby((~has).cumsum()[has])):
            band = run[1]
            fig.add_trace(
                go.Scatter(
                    x=np.concatenate([band["day"], band["day"][::-1]]), y=np.concatenate([band["hi"], band["lo"][::-1]]),
                    mode="lines", fill="toself", fillcolor=colour, opacity=0.2, line=dict(width=0), name=f"{arm}: 95 % CI",
                    legendgroup=arm, hoverinfo="skip", showlegend=k == 0,
                )
            )
        ci = [f"95 % CI {lo:.2f}-{hi:.2f}" if np.isfinite(lo) and np.isfinite(hi) else f"no CI: fewer than {MIN_CI_N} patients"
              for lo, hi in zip(m["lo"].astype(float), m["hi"].astype(float))]
        fig.add_trace(
            go.Scatter(
                x=m["day"], y=m["mean"], mode="lines+markers", line=dict(color=colour, width=3), name=f"{arm}: mean",
                # a bin mean from fewer than MIN_CI_N patients is drawn hollow
                marker=dict(size=8, symbol=["circle" if n >= MIN_CI_N else "circle-open" for n in m["n"]],
                            line=dict(width=2, color=colour)),
                legendgroup=arm, customdata=np.stack([m["n"].to_numpy(), np.array(ci, dtype=object)], axis=-1),
                hovertemplate=f"{arm} day %{{x}}: mean %{{y:.2f}} (%{{customdata[1]}}, n=%{{customdata[0]}})<extra></extra>",
            )
        )
    fig.update_xaxes(title_text="Days since baseline")
    fig.update_yaxes(title_text=metric_label(metric), rangemode="tozero")
    _layout(fig, f"{metric_label(metric)} by day since baseline ({region})", height)
    # legend below the plot: above it, it collides with the title
    fig.update_layout(hovermode="closest", legend=dict(orientation="h", y=-0.3, yanchor="top", x=0), margin=dict(b=120))
    return fig


def change_box_figure(changes: pd.DataFrame, metric: str = M.POI, height: int = 380) -> go.Figure:
    """Change from baseline at the last follow-up, one box (with every patient) per arm."""
    fig = go.Figure()
    # every patient as a point while that stays readable (and cheap to draw); outliers beyond
    points = "all" if len(changes) <= 300 else "outliers"
    for i, arm in enumerate(sorted(changes["arm"].dropna().unique())):
        c = changes[changes.arm == arm]
        fig.add_trace(
            go.Box(
                y=c["change"], name=str(arm), marker_color=ARM_COLOURS[i % len(ARM_COLOURS)], boxpoints=points, jitter=0.4,
                pointpos=0, text=c["label"], hovertemplate="%{text}: %{y:+.2f}<extra></extra>",
            )
        )
    fig.add_hline(y=0, line=dict(color="#888", dash="dot"))
    fig.update_yaxes(title_text=f"Change in {change_label(metric)}<br>(last - baseline)")
    _layout(fig, None, height)  # pages and the PDF put their own heading above it
    fig.update_layout(hovermode="closest", showlegend=False)
    return fig

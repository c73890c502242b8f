"""Static PNG export of the dashboard's plotly figures for the PDF.

First choice is kaleido 1.x driving a local Chromium (Debian's ``/usr/bin/chromium`` is found
automatically); one sync server is started per report so each figure costs ~0.2 s instead of
~2 s. When no browser is present (or kaleido fails), the same figure is drawn with matplotlib from
its traces, so a report is always produced; the fallback supports the trace types
:mod:`covidtrack.report.figures` uses (scatter lines/markers/fills, bars, heatmaps, boxes, images).
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import logging
import shutil
import warnings
from contextlib import AbstractContextManager
from typing import Literal

import numpy as np
import plotly.graph_objects as go

log = logging.getLogger(__name__)

Engine = Literal["auto", "kaleido", "matplotlib"]
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


def browser_available() -> bool:
    return any(shutil.which(b) for b in BROWSERS)


class FigureExporter(AbstractContextManager["FigureExporter"]):
    """Use as ``with FigureExporter() as ex: png = ex.png(fig, width, height)``.

    ``engine``: ``auto`` tries kaleido and falls back to matplotlib; ``engine_used`` says which ran
    last (the report prints it, so a reader knows how the pictures were made).
    """

    def __init__(self, engine: Engine = "auto", scale: float = 2.0) -> None:
        self.engine: Engine = engine
        self.scale = scale
        self.engine_used: str = ""
        self._server = False

    def __enter__(self) -> "FigureExporter":
        if self.engine in ("auto", "kaleido") and (self.engine == "kaleido" or browser_available()):
            try:
                import kaleido

                kaleido.start_sync_server(silence_warnings=True)
                self._server = True
            except Exception as err:  # no browser, sandbox refusal, ...: fall back, say why
                if self.engine == "kaleido":
                    raise
                log.warning("kaleido unavailable (%s); drawing figures with matplotlib", err)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server:
            import kaleido

            try:
                kaleido.stop_sync_server(silence_warnings=True)
            except Exception as err:  # the server may already be gone; nothing to clean up then
                log.debug("kaleido stop: %s", err)
            self._server = False

    def png(self, fig: go.Figure, width: int, height: int) -> bytes:
        """PNG bytes of ``fig`` at ``width`` x ``height`` CSS pixels (times ``scale``)."""
        if self._server:
            try:
                with warnings.catch_warnings():
                    # plotly warns that per-call kaleido options are ignored with a server: expected
                    warnings.filterwarnings("ignore", message="The kopts argument is ignored")
                    data = fig.to_image(format="png", width=width, height=height, scale=self.scale)
                self.engine_used = "kaleido"
                return data
            except Exception as err:
                if self.engine == "kaleido":
                    raise
                log.warning("kaleido export failed (%s); using matplotlib", err)
        self.engine_used = "matplotlib"
        return matplotlib_png(fig, width, height, scale=self.scale)


# --- matplotlib fallback -------------------------------------------------------------------------


def _colour(value: object, default: str = "#333333") -> object:
    if value is None:
        return default
    s = str(value)
    if s.startswith("rgb(") or s.startswith("rgba("):
        nums = [float(v) for v in s[s.index("(") + 1 : -1].split(",")]
        rgb = [v / 255 for v in nums[:3]]
        return (*rgb, nums[3]) if len(nums) == 4 else tuple(rgb)
    return s


def _decode_image(source: str) -> np.ndarray:
    from PIL import Image

    raw = base64.b64decode(source.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))


def _xvalues(values: object) -> np.ndarray:
    """x values as datetime64 when they are dates (plotly accepts ISO strings), else as given."""
    import pandas as pd

    arr = np.asarray(values, dtype=object)
    sample = next((v for v in arr if v is not None and not (isinstance(v, float) and np.isnan(v))), None)
    if isinstance(sample, (np.datetime64, pd.Timestamp, dt.date)) or (isinstance(sample, str) and len(sample) >= 10 and sample[4] == "-"):
        return pd.to_datetime(pd.Series(arr)).to_numpy()
    try:
        return arr.astype(float)
    except (TypeError, ValueError):
        return arr


def _is_date_axis(ax: object) -> bool:
    return any(np.issubdtype(np.asarray(line.get_xdata()).dtype, np.datetime64) for line in ax.get_lines())  # type: ignore[attr-defined]


def _axis_key(ref: str | None, letter: str) -> str:
    ref = ref or letter
    return f"{letter}axis{ref[1:]}"


def matplotlib_png(fig: go.Figure, width: int, height: int, scale: float = 2.0) -> bytes:
    """Draw a plotly figure's traces with matplotlib (Agg) and return PNG bytes."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    dpi = 100
    mfig = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi * scale)
    layout = fig.layout
    axes: dict[tuple[str, str], object] = {}

    def axis_for(trace: object) -> object:
        xa, ya = _axis_key(getattr(trace, "xaxis", None), "x"), _axis_key(getattr(trace, "yaxis", None), "y")
        if (xa, ya) not in axes:
            xd = list(layout[xa].domain or (0, 1)) if xa in layout else [0, 1]
            yd = list(layout[ya].domain or (0, 1)) if ya in layout else [0, 1]
            # leave room for tick labels and titles, as plotly's margins do
            # leave room for tick labels, titles and a legend column on the right
            ax = mfig.add_axes((xd[0] * 0.8 + 0.07, yd[0] + 0.1, (xd[1] - xd[0]) * 0.8 - 0.09, (yd[1] - yd[0]) - 0.18))
            axes[(xa, ya)] = ax
            if xa in layout and layout[xa].visible is False:
                ax.set_axis_off()
            else:
                if xa in layout and layout[xa].title.text:
                    ax.set_xlabel(_plain(layout[xa].title.text), fontsize=8)
                if ya in layout and layout[ya].title.text:
                    ax.set_ylabel(_plain(layout[ya].title.text), fontsize=8)
                if ya in layout and layout[ya].range is not None:
                    ax.set_ylim(*layout[ya].range)  # e.g. the severity score's fixed 0-25
                if ya in layout and layout[ya].autorange == "reversed":
                    ax.invert_yaxis()
                ax.tick_params(labelsize=7)
                ax.grid(alpha=0.3)
        return axes[(xa, ya)]

    box_pos, box_names = 0, []
    for tr in fig.data:
        ax = axis_for(tr)
        kind = tr.type
        if kind in ("scatter", "scattergl"):
            if tr.x is None or len([v for v in tr.x if v is not None]) == 0:
                continue
            x = _xvalues(tr.x)
            y = np.asarray(tr.y, dtype=float)
            col = _colour(tr.line.color if tr.line else None)
            if tr.fill == "toself":  # a band (e.g. an arm's 95 % CI) in its own fill colour
                ax.fill(x, y, color=_colour(tr.fillcolor or (tr.line.color if tr.line else None)), alpha=float(tr.opacity or 0.2),
                        lw=0, label=tr.name if tr.showlegend is not False else None)
                continue
            mode = tr.mode or "lines"
            symbols = tr.marker.symbol if tr.marker is not None else None
            hollow = (np.array([str(s).endswith("-open") for s in symbols]) if isinstance(symbols, (list, tuple)) and len(symbols) == len(y)
                      else np.zeros(len(y), bool))
            style = ("-" if "lines" in mode else "") + ("o" if "markers" in mode and not hollow.any() else "")
            alpha = float(tr.opacity) if tr.opacity is not None else 1.0
            label = tr.name if (tr.opacity or 1) > 0.5 else None
            if style:
                ax.plot(x, y, style, color=col, lw=float(tr.line.width or 1.5) if tr.line else 1.5, ms=3, alpha=alpha, label=label)
            if "markers" in mode and hollow.any():  # hollow markers keep their meaning (e.g. a mean of fewer than 3)
                ax.scatter(x[~hollow], y[~hollow], s=12, color=col, alpha=alpha, label=None if style else label)
                ax.scatter(x[hollow], y[hollow], s=12, facecolors="none", edgecolors=col, alpha=alpha)
        elif kind == "bar":
            x = _xvalues(tr.x)
            if np.issubdtype(x.dtype, np.datetime64):
                steps = np.diff(np.sort(x)).astype("timedelta64[D]").astype(float)
                width = 0.6 * (steps.min() if len(steps) else 1.0)
                ax.bar(x, tr.y, width=width, color=_colour(tr.marker.color, "#7f7f7f"), label=tr.name)
            else:
                ax.bar([str(v) for v in x], tr.y, color=_colour(tr.marker.color, "#7f7f7f"), label=tr.name)
                ax.tick_params(axis="x", labelrotation=30)
        elif kind == "heatmap":
            z = np.asarray(tr.z, dtype=float)
            im = ax.imshow(z, aspect="auto", cmap="YlOrRd", vmin=tr.zmin, vmax=tr.zmax)
            ax.set_xticks(range(len(tr.x)), [str(v) for v in tr.x], fontsize=7, rotation=30)
            ax.set_yticks(range(len(tr.y)), [str(v) for v in tr.y], fontsize=7)
            # the trace's own cell text when it has one (the shared POI wording: "4.96" for a score
            # of 1, "<0.1" for a trace), so the two engines print the same numbers
            text = np.asarray(tr.text, dtype=object) if tr.text is not None and np.shape(tr.text) == z.shape else None
            for (i, j), v in np.ndenumerate(z):
                if np.isfinite(v):
                    label = str(text[i, j]) if text is not None else f"{v:.1f}"
                    ax.text(j, i, label, ha="center", va="center", fontsize=7)
            mfig.colorbar(im, ax=ax, fraction=0.04)
        elif kind == "box":
            y = np.asarray(tr.y, dtype=float)
            ax.boxplot([y], positions=[box_pos], widths=0.5)
            ax.scatter(np.full(len(y), box_pos) + np.random.default_rng(0).uniform(-0.15, 0.15, len(y)), y, s=8, color=_colour(tr.marker.color))
            box_names.append(str(tr.name))
            box_pos += 1
        elif kind == "image" and tr.source:
            ax.imshow(_decode_image(tr.source))
            ax.set_axis_off()
    if box_names:  # after every box: boxplot() resets the ticks it is given
        ax = axis_for(next(tr for tr in fig.data if tr.type == "box"))
        ax.set_xticks(range(len(box_names)), box_names)
    for ax in axes.values():
        if ax.xaxis.get_major_formatter().__class__.__name__.endswith("DateFormatter") or _is_date_axis(ax):
            import matplotlib.dates as mdates

            ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(ax.xaxis.get_major_locator()))
    for ann in layout.annotations or ():
        # subplot titles are paper-positioned annotations
        if ann.xref == "paper" and ann.text:
            mfig.text(ann.x * 0.8 + 0.02 if ann.x > 0 else ann.x, ann.y - 0.07, _plain(ann.text), ha="center", va="bottom", fontsize=9)
    if layout.title and layout.title.text:
        mfig.suptitle(_plain(layout.title.text), fontsize=10)
    handles = [h for ax in axes.values() for h in ax.get_legend_handles_labels()[0]]
    if handles:
        labels = [lab for ax in axes.values() for lab in ax.get_legend_handles_labels()[1]]
        mfig.legend(handles, labels, loc="upper right", fontsize=7, frameon=False)
    _keep_tick_labels_inside(mfig)
    buf = io.BytesIO()
    mfig.savefig(buf, format="png")
    plt.close(mfig)
    return buf.getvalue()


def _plain(text: str) -> str:
    """Plotly's HTML line breaks and tags as matplotlib text."""
    import re

    return re.sub(r"<[^>]+>", "", str(text).replace("<br>", "\n"))


def _keep_tick_labels_inside(mfig: object) -> None:
    """Raise every axes whose x tick labels (e.g. dates rotated 30 degrees under a short
    heatmap) would run off the bottom of the picture, shrinking it from the top; the picture keeps
    its size, so the PDF layout does not change."""
    renderer = mfig.canvas.get_renderer()  # type: ignore[attr-defined]
    height = mfig.bbox.height  # type: ignore[attr-defined]
    for ax in mfig.axes:  # type: ignore[attr-defined]
        labels = [t for t in ax.get_xticklabels() if t.get_text()]
        if not labels:
            continue
        low = min(t.get_window_extent(renderer).y0 for t in labels)
        title = ax.xaxis.label.get_window_extent(renderer).y0 if ax.xaxis.label.get_text() else low
        lowest = min(low, title)
        if lowest < 2:
            need = (2 - lowest) / height
            pos = ax.get_position()
            ax.set_position((pos.x0, pos.y0 + need, pos.width, max(0.05, pos.height - need)))

"""Plotly figures of M3Bind results: an ECG on ECG paper, zero-shot probabilities, a library map.

Kept apart from the app so notebooks and reports draw the same pictures.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import plotly.graph_objects as go

from .explore import LibraryMap
from .modalities import get_modality
from .readers.ecg import CANONICAL_FS, LEADS
from .sample import Sample

# The standard 3 x 4 printout: columns of 2.5 s, then a 10 s rhythm strip of lead II.
_ECG_COLUMNS = (("I", "II", "III"), ("aVR", "aVL", "aVF"), ("V1", "V2", "V3"), ("V4", "V5", "V6"))
_ROW_MV = 3.0  # vertical distance between rows
_PAPER = "#fff5f5"
_MAJOR = "#f4a6a6"
_MINOR = "#fbdcdc"
_MISSING = "#9a9a9a"
_TEMPLATE = "none"  # no plotly theme: smaller figures over the wire, colours are set here
_NO_THEME = {"data": {"scatter": [{"type": "scatter"}]}}  # what plotly makes of "none"
_COLORWAY = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
             "#bcbd22", "#17becf"]


def ecg_figure(sample: Sample, title: str | None = None) -> go.Figure:
    """A 12-lead ECG as printed: 25 mm/s, 10 mm/mV, 3 x 4 leads plus a lead II rhythm strip.

    Leads the record lacks are drawn as a grey dashed line labelled "not recorded", never as a trace.
    """
    signal = np.asarray(sample.preview, dtype=np.float64)
    mask = list(sample.meta.get("lead_mask") or [True] * len(LEADS))
    seconds = signal.shape[1] / CANONICAL_FS
    segment = signal.shape[1] // len(_ECG_COLUMNS)
    fig = go.Figure()
    annotations = []
    rows = [(c, r, lead) for c, column in enumerate(_ECG_COLUMNS) for r, lead in enumerate(column)]
    rhythm = "II" if mask[LEADS.index("II")] else next((lead for lead, m in zip(LEADS, mask) if m), "II")
    for c, r, lead in [*rows, (None, 3, rhythm)]:
        i = LEADS.index(lead)
        start, stop = (0, signal.shape[1]) if c is None else (c * segment, (c + 1) * segment)
        t = np.arange(start, stop) / CANONICAL_FS
        offset = -_ROW_MV * r
        name = f"{lead} (rhythm)" if c is None else lead
        if mask[i]:
            values = signal[i, start:stop]
            fig.add_trace(go.Scatter(x=t, y=values + offset, customdata=values, mode="lines", name=name,
                                     line=dict(color="black", width=1.2),
                                     hovertemplate=f"{name}<br>%{{x:.2f}} s, %{{customdata:.2f}} mV<extra></extra>"))
            color, text = "black", name
        else:
            fig.add_trace(go.Scatter(x=[t[0], t[-1]], y=[offset, offset], mode="lines", name=name, hoverinfo="skip",
                                     line=dict(color=_MISSING, width=1, dash="dash")))
            color, text = _MISSING, f"{name}: not recorded"
        annotations.append(dict(x=t[0] + 0.05, y=offset + 1.1, text=f"<b>{text}</b>", showarrow=False,
                                xanchor="left", font=dict(size=12, color=color)))
    missing = [lead for lead, m in zip(LEADS, mask) if not m]
    subtitle = f"Leads not recorded: {', '.join(missing)}" if missing else "25 mm/s, 10 mm/mV"
    fig.update_layout(
        title=dict(text=f"{title or 'ECG'}<br><sup>{subtitle}</sup>", x=0.01),
        template=_TEMPLATE, annotations=annotations, showlegend=False, plot_bgcolor=_PAPER, paper_bgcolor="white",
        margin=dict(l=40, r=10, t=60, b=40), height=520, hovermode="closest",
        xaxis=dict(range=[0, seconds], dtick=0.2, gridcolor=_MAJOR, showticklabels=True, tickvals=list(range(11)),
                   title="seconds", zeroline=False, minor=dict(dtick=0.04, gridcolor=_MINOR, showgrid=True)),
        yaxis=dict(range=[-3.5 * _ROW_MV, 1.6], dtick=0.5, gridcolor=_MAJOR, showticklabels=False,
                   zeroline=False, scaleanchor="x", scaleratio=0.4,
                   minor=dict(dtick=0.1, gridcolor=_MINOR, showgrid=True)),
    )
    return fig


def probability_figure(probabilities: dict[str, float], title: str = "") -> go.Figure:
    """Horizontal bars, most probable finding on top, with percentages.

    Written as plotly's JSON form and not validated property by property: the classify endpoint draws one
    per request, and validation took a sixth of its time (``tests/test_app_api.py`` checks the figure).
    """
    ranked = sorted(probabilities.items(), key=lambda kv: kv[1])  # plotly draws the last bar on top
    labels = [label for label, _ in ranked]
    values = [100.0 * p for _, p in ranked]
    colors = ["#1f6feb" if i == len(ranked) - 1 else "#8bb6f0" for i in range(len(ranked))]
    bars = dict(type="bar", x=values, y=labels, orientation="h", marker=dict(color=colors),
                text=[percent(p) for _, p in ranked], textposition="outside", cliponaxis=False,
                hovertemplate="%{y}: %{text}<extra></extra>")
    layout = dict(template=_NO_THEME, title=dict(text=title, x=0.01), height=110 + 36 * len(labels),
                  margin=dict(l=10, r=60, t=50 if title else 10, b=30), plot_bgcolor="white",
                  xaxis=dict(range=[0, 112], title=dict(text="probability (%)"), gridcolor="#eeeeee",
                             tickvals=[0, 25, 50, 75, 100]),
                  yaxis=dict(automargin=True))
    return go.Figure(dict(data=[bars], layout=layout), _validate=False)


def percent(p: float) -> str:
    """A probability in whole percent, never "100 %" or "0 %": a model's softmax is never certain."""
    return "<1 %" if p < 0.005 else ">99 %" if p >= 0.995 else f"{100 * p:.0f} %"


def map_figure(library_map: LibraryMap, color_by: str = "modality", query: np.ndarray | None = None,
               query_name: str = "your upload", prompts: Sequence[tuple[str, np.ndarray]] = ()) -> go.Figure:
    """The library's 2-D map coloured by modality or label, with the query and text prompts placed in it."""
    if color_by == "modality":
        groups = [get_modality(m).title for m in library_map.modalities]
    else:
        groups = [label or "(no label)" for label in library_map.labels]
    fig = go.Figure()
    xy = library_map.coords
    for group in sorted(set(groups)):
        idx = [i for i, g in enumerate(groups) if g == group]
        hover = [f"{library_map.labels[i] or '(no label)'}<br>{library_map.sources[i] or ''}"
                 f"<br>{get_modality(library_map.modalities[i]).title}" for i in idx]
        fig.add_trace(go.Scattergl(x=xy[idx, 0], y=xy[idx, 1], mode="markers", name=f"{group} ({len(idx)})",
                                   marker=dict(size=7 if len(xy) < 2000 else 4, opacity=0.8),
                                   hovertext=hover, hoverinfo="text"))
    if prompts:
        pxy = np.stack([p for _, p in prompts])
        fig.add_trace(go.Scatter(x=pxy[:, 0], y=pxy[:, 1], mode="markers+text", name="text prompts",
                                 text=[t for t, _ in prompts], textposition="top center", cliponaxis=False,
                                 marker=dict(symbol="diamond", size=13, color="#111111",
                                             line=dict(color="white", width=1)),
                                 hovertext=[f"prompt: {t}" for t, _ in prompts], hoverinfo="text"))
    if query is not None:
        fig.add_trace(go.Scatter(x=[query[0]], y=[query[1]], mode="markers+text", name=query_name,
                                 text=[query_name], textposition="bottom center", cliponaxis=False,
                                 marker=dict(symbol="star", size=20, color="#d62728",
                                             line=dict(color="black", width=1)),
                                 hovertext=[query_name], hoverinfo="text"))
    fig.update_layout(template=_TEMPLATE, colorway=_COLORWAY, title=dict(text=library_map.note, x=0.01), height=560,
                      plot_bgcolor="white", hovermode="closest",
                      margin=dict(l=10, r=10, t=50, b=10), legend=dict(itemsizing="constant"),
                      xaxis=dict(showticklabels=False, zeroline=False, gridcolor="#f0f0f0",
                                 title=f"{library_map.method} 1"),
                      yaxis=dict(showticklabels=False, zeroline=False, gridcolor="#f0f0f0",
                                 title=f"{library_map.method} 2"))
    return fig

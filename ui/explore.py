"""The Explore tab: the library in 2-D, with the upload and text prompts placed into the map."""

from __future__ import annotations

import dataclasses
from typing import Any

import gradio as gr
import numpy as np

import m3bind
from m3bind import explore, figures
from m3bind.workspace import Workspace

from .classify import ClassifyInputs
from .common import friendly, parse_findings, plain, read_options


class ExploreTab:
    """The tab's actions; every model and library call goes through ``ws``."""

    def __init__(self, ws: Workspace):
        self.ws = ws

    @friendly("draw the map")
    def draw_map(self, color_by: str, prompts: str, place_query: bool, files: Any, modality: str,
                 centre: float | None, width: float | None, rate: Any, progress=gr.Progress()) -> tuple:
        progress(0.1, desc="Fitting the map (the first one after a server start also compiles UMAP's code)")
        ws = self.ws
        lmap = ws.library_map()
        texts = parse_findings(prompts)
        prompt_xy = lmap.place(ws.embed_text(texts)) if texts else np.zeros((0, 2))
        query = name = None
        if place_query and files:
            how = read_options(ws, files, modality, centre, width, rate)
            query = lmap.place(ws.embed(files, how))[0]
            name = f"your upload ({m3bind.get_modality(ws.read(files, how).modality).title})"
        # hover text and legend: no uploads' file names, and labels and prompts as text, never plotly markup
        shown = dataclasses.replace(
            lmap, labels=[plain(label) if label else label for label in lmap.labels],
            sources=[plain(src) if src else None for src in ws.shown_sources(lmap)])
        fig = figures.map_figure(shown, color_by, query, name or "your upload",
                                 [(plain(t), xy) for t, xy in zip(texts, prompt_xy)])
        return fig, (f"{lmap.method} map of {len(lmap.ids)} library items; the upload and the prompts are placed "
                     "into it without refitting it.")

    def warm_map(self) -> None:
        """Opening the Explore tab compiles UMAP in the background, while the user reads the page."""
        if self.ws.stats()["count"] >= explore.MIN_UMAP_ITEMS:
            explore.warm_up_in_background()


def render(tab: ExploreTab, upload: ClassifyInputs, tab_block: Any) -> None:
    """Lays the tab out and wires its events."""
    gr.Markdown("The library in 2-D (UMAP, or PCA for a handful of items). Hover over a point to see its label and "
                "file; the current upload (a star) and your text prompts (diamonds) are placed into the map.")
    with gr.Row():
        color_by = gr.Radio([("Modality", "modality"), ("Label", "label")], value="modality", label="Colour by")
        place_query = gr.Checkbox(True, label="Place the current upload")
    prompts = gr.Textbox(label="Text prompts to place (one per line)", lines=3,
                         value="pneumonia\nnormal ECG\nadenocarcinoma", elem_id="prompts")
    map_button = gr.Button("Draw map", variant="primary", elem_id="map-button")
    map_note = gr.Markdown()
    map_plot = gr.Plot(label="Embedding map", elem_id="map-plot")

    tab_block.select(tab.warm_map, None, None, api_visibility="private", queue=False)
    inputs = [color_by, prompts, place_query, *upload.view]
    heavy = dict(concurrency_id="heavy", concurrency_limit=1)  # a map fit is memory-hungry: one at a time
    map_button.click(tab.draw_map, inputs, [map_plot, map_note], api_name="explore", **heavy)
    color_by.input(tab.draw_map, inputs, [map_plot, map_note], api_name=False, **heavy)

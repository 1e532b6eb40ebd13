"""The Few-shot tab: teach classes from a few examples each, then classify the Classify tab's upload."""

from __future__ import annotations

from typing import Any

import gradio as gr

import m3bind
from m3bind import figures
from m3bind.workspace import Workspace

from .classify import ClassifyInputs
from .common import friendly, read_options

MAX_CLASSES = 6
SHOWN_CLASSES = 3  # the rest sit in an accordion
METHODS = [("Prototypes (class means, works from 1 example)", "prototype"),
           ("Linear probe (logistic regression, better with several)", "probe")]


def rounded(probabilities: dict[str, float]) -> dict[str, float]:
    """Probabilities to three decimals, within [0.001, 0.999]: a few examples never make a certainty."""
    return {name: round(min(max(p, 0.001), 0.999), 3) for name, p in probabilities.items()}


class FewShotTab:
    """The tab's action, a named API endpoint; every model and library call goes through ``ws``."""

    def __init__(self, ws: Workspace):
        self.ws = ws

    @friendly("classify with your examples")
    def fewshot(self, files: Any, modality: str, centre: float | None, width: float | None, rate: Any,
                method: str, use_library: bool, name1: str | None = None, examples1: Any = None,
                name2: str | None = None, examples2: Any = None, name3: str | None = None, examples3: Any = None,
                name4: str | None = None, examples4: Any = None, name5: str | None = None, examples5: Any = None,
                name6: str | None = None, examples6: Any = None) -> tuple:
        """Each class: a name and its example files (MAX_CLASSES at most; classes without a name are skipped,
        and an API caller may leave the last ones out)."""
        pairs = [(name1, examples1), (name2, examples2), (name3, examples3), (name4, examples4),
                 (name5, examples5), (name6, examples6)]
        named = {name.strip(): examples or [] for name, examples in pairs if name and name.strip()}
        how = read_options(self.ws, files, modality, centre, width, rate)
        result = self.ws.fewshot(files, named, method, how, bool(use_library))
        sample = self.ws.read(files, how)
        shown = {f"{name} ({n} example{'s' if n != 1 else ''})": p
                 for name, p in result.probabilities.items() for n in [result.support[name]]}
        title = "Few-shot probabilities (" + dict((v, k) for k, v in METHODS)[method].split(" (")[0] + ", calibrated)"
        support = ", ".join(f"{name} {n}" for name, n in result.support.items())
        note = (f"Classified: the file of the Classify tab ({m3bind.get_modality(sample.modality).title}). "
                f"Examples per class: {support}. Probabilities are calibrated on the examples themselves "
                "(each classified by the others), so few examples give cautious figures.")
        return figures.probability_figure(shown, title), rounded(result.probabilities), note


def render(tab: FewShotTab, upload: ClassifyInputs) -> None:
    """Lays the tab out and wires its event."""
    gr.Markdown("Teach classes from a few examples each, then classify the file of the Classify tab. Name each "
                "class; give its example files, or tick the box to use library items that carry that label.")
    with gr.Row():
        method = gr.Radio(METHODS, value="prototype", label="Method")
        use_library = gr.Checkbox(False, label="Also use library items with these labels")
    class_inputs: list = []
    placeholders = ["e.g. normal", "e.g. pneumonia", "optional third class"]
    for i in range(SHOWN_CLASSES):
        class_inputs += _class_row(i, placeholders[i])
    with gr.Accordion(f"More classes (up to {MAX_CLASSES})", open=False):
        for i in range(SHOWN_CLASSES, MAX_CLASSES):
            class_inputs += _class_row(i, "optional")
    button = gr.Button("Classify the current upload", variant="primary", elem_id="fewshot-button")
    note = gr.Markdown(elem_id="fewshot-note")
    plot = gr.Plot(label="Probabilities", elem_id="fewshot-plot")
    probabilities = gr.JSON(visible=False)
    button.click(tab.fewshot, [*upload.view, method, use_library, *class_inputs], [plot, probabilities, note],
                 api_name="fewshot")


def _class_row(i: int, placeholder: str) -> list:
    with gr.Row():
        name = gr.Textbox(label=f"Class {i + 1}", placeholder=placeholder, scale=1, elem_id=f"class-{i + 1}-name")
        examples = gr.File(label=f"Examples of class {i + 1}", file_count="multiple", scale=3, height=120,
                           elem_id=f"class-{i + 1}-files")
    return [name, examples]

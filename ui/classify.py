"""The Classify tab: upload a file, see it, and get zero-shot probabilities over candidate findings.

A click on Classify runs ``ClassifyTab.classify`` -> ``Workspace.classify`` (the upload read and embedded
once, then cached) -> ``M3BindModel.classify`` with that embedding -> ``figures.probability_figure``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import gradio as gr
from PIL import Image

import m3bind
from m3bind import figures
from m3bind.examples import EXAMPLES
from m3bind.workspace import ReadOptions, Workspace

from .common import (AUTO, friendly, markdown_text, modality_choices, modality_or_none, parse_findings, plain,
                     read_options, sampling_rate, warn)

WINDOW_PRESETS = {"Lung (C -600, W 1500)": (-600.0, 1500.0), "Soft tissue (C 40, W 400)": (40.0, 400.0),
                  "Bone (C 400, W 1800)": (400.0, 1800.0), "Brain (C 40, W 80)": (40.0, 80.0)}
_HOW = {"dicom": "from the DICOM header", "guess": "guessed from the pixels; override it if wrong",
        "user": "chosen by you"}


def how_settled(meta: dict[str, Any]) -> str:
    """How an input's modality was settled, in words."""
    if "detected_modality" in meta:
        return f"chosen by you (the file looked like {m3bind.get_modality(meta['detected_modality']).title})"
    if meta.get("modality_source") == "detector":
        how = f"recognised from the image, {meta.get('modality_confidence', 0):.0%} sure"
    else:
        how = _HOW.get(meta.get("modality_source"), "from the file")
    if meta.get("modality_unsure"):
        how += "; **not sure: please pick the modality above**"
    return how


def status_line(ws: Workspace, sample: m3bind.Sample) -> str:
    title = m3bind.get_modality(sample.modality).title
    return " · ".join(f for f in [f"**{title}** ({how_settled(sample.meta)})", *ws.describe(sample)] if f)


def default_findings(modality: str) -> str:
    return "\n".join(m3bind.get_modality(modality).default_labels)


def typed_by_user(current: str | None) -> bool:
    """Whether the findings box holds findings the user typed (not one modality's defaults, not empty)."""
    mine = parse_findings(current)
    return bool(mine) and mine not in [list(m3bind.get_modality(n).default_labels) for n in m3bind.modality_names()]


def findings_for(modality: str, current: str | None) -> str:
    """The modality's default findings, unless the user has typed findings of their own."""
    return current or "" if typed_by_user(current) else default_findings(modality)


def findings_note(modality: str, findings: list[str]) -> str:
    """Which of the scored findings the user typed and which are the modality's defaults."""
    defaults = {label.lower() for label in m3bind.get_modality(modality).default_labels}
    yours = [f for f in findings if f.lower() not in defaults]
    title = m3bind.get_modality(modality).title
    parts = [f"{len(yours)} typed by you ({markdown_text(', '.join(yours))})"] if yours else []
    if len(yours) < len(findings):
        parts.append(f"{len(findings) - len(yours)} default{'s' if len(findings) - len(yours) > 1 else ''} "
                     f"for {title}")
    return "Findings scored: " + " and ".join(parts) + "."


def views(ws: Workspace, sample: m3bind.Sample) -> tuple[Any, Any]:
    """(image update, ECG plot update): the workspace's preview goes to whichever fits it."""
    shown = ws.preview(sample)
    is_plot = not isinstance(shown, Image.Image)  # else a plotly figure
    return (gr.update(value=None if is_plot else shown, visible=not is_plot),
            gr.update(value=shown if is_plot else None, visible=is_plot))


class ClassifyTab:
    """The tab's actions, each a named API endpoint; every model and library call goes through ``ws``."""

    def __init__(self, ws: Workspace):
        self.ws = ws

    @friendly("classify")
    def classify(self, files: Any, modality: str, labels: str, centre: float | None, width: float | None,
                 rate: Any) -> tuple[str, Any, dict[str, float]]:
        how = read_options(self.ws, files, modality, centre, width, rate)
        sample, probs = self.ws.classify(files, parse_findings(labels), how)
        title = f"{m3bind.get_modality(sample.modality).title}: zero-shot probabilities"
        status = f"{status_line(self.ws, sample)}  \n{findings_note(sample.modality, list(probs))}"
        return status, figures.probability_figure(probs, title), probs

    @friendly("explain this classification")
    def explain(self, files: Any, modality: str, labels: str, centre: float | None, width: float | None,
                rate: Any) -> tuple:
        """Which words of the top finding and which regions (or seconds) of the input drive it."""
        how = read_options(self.ws, files, modality, centre, width, rate)
        explanation, shown = self.ws.explain(files, parse_findings(labels), how)
        strongest = max([abs(share) for _, share in explanation.words] + [1e-9])
        words = [(f"{word} ", round(share / strongest, 3)) for word, share in explanation.words]
        is_plot = not isinstance(shown, Image.Image)
        region = "second of the ECG" if is_plot else "patch of the image"
        note = (f"Top finding **{markdown_text(explanation.label)}** (similarity {explanation.similarity:.3f}). "
                f"Words: red raises the score, blue lowers it (each left out in turn). Each {region} was covered "
                "in turn; darker red: covering it lowers the score more.")
        return (note, words, gr.update(value=None if is_plot else shown, visible=not is_plot),
                gr.update(value=shown if is_plot else None, visible=is_plot))

    @staticmethod
    def forget_explanation() -> tuple:
        """A new file: the previous file's explanation goes."""
        return "", None, gr.update(value=None, visible=False), gr.update(value=None, visible=False)

    @friendly("show this file")
    def show(self, files: Any, modality: str, centre: float | None, width: float | None, rate: Any) -> tuple:
        """The view of the upload as read now (after a new window, say): image or ECG plot."""
        sample = self.ws.read(files, read_options(self.ws, files, modality, centre, width, rate))
        return (status_line(self.ws, sample), *views(self.ws, sample))

    def open_file(self, files: Any, labels: str, rate: Any, keep_findings: bool = False) -> list:
        """A new upload: show it, detect its modality, offer its findings and classify, in one step. The
        findings become the new file's modality's defaults, unless ``keep_findings`` (the user's tick) keeps
        findings the user typed. Unreadable files clear the page and say why (in the page and as a toast)."""
        cleared = [gr.update(value=None), gr.update(value=None, visible=False), AUTO, labels,
                   gr.update(visible=False), None, None, None, None, None]
        if not files:
            return ["Upload a file or pick an example.", *cleared]
        try:
            sample = self.ws.read(files, ReadOptions(sampling_rate=sampling_rate(rate)))
        except m3bind.InputError as exc:
            warn(plain(exc), title="Cannot read this file")
            return [f"**Cannot read this file.** {markdown_text(exc)}", *cleared]
        window = sample.meta.get("window")
        keep = keep_findings and typed_by_user(labels)
        findings = labels if keep else default_findings(sample.modality)
        described, plot, probs = self.classify(files, AUTO, findings, None, None, rate)
        return [described, *views(self.ws, sample), AUTO, findings, gr.update(visible=window is not None),
                *(window or (None, None)), window, plot, probs]

    @friendly("change the modality")
    def change_modality(self, files: Any, modality: str, labels: str, rate: Any) -> str:
        if modality_or_none(modality) is not None:
            return findings_for(modality, labels)
        if not files:
            return labels
        return findings_for(self.ws.read(files, read_options(self.ws, files, AUTO, None, None, rate)).modality,
                            labels)

    @staticmethod
    def window_preset(preset: str, file_window: Any) -> tuple:
        if preset in WINDOW_PRESETS:
            return WINDOW_PRESETS[preset]
        return tuple(file_window) if file_window else (None, None)

    def example(self, key: str) -> list[str]:
        return [str(self.ws.example_path(key))]


@dataclass
class ClassifyInputs:
    """The components other tabs read: the upload and how to read it."""

    files: Any
    modality: Any
    centre: Any
    width: Any
    rate: Any

    @property
    def view(self) -> list:
        return [self.files, self.modality, self.centre, self.width, self.rate]


def render(tab: ClassifyTab) -> ClassifyInputs:
    """Lays the tab out and wires its events; returns the inputs other tabs use."""
    with gr.Row():
        with gr.Column(scale=2, min_width=320):
            upload = _upload_column(tab)
        with gr.Column(scale=3):
            results = _result_column()
    page = SimpleNamespace(**upload, **results)
    _wire(tab, page)
    return ClassifyInputs(page.files, page.modality, page.centre, page.width, page.rate)


def _upload_column(tab: ClassifyTab) -> dict[str, Any]:
    files = gr.File(label="Image, DICOM or ECG (for a WFDB record, select its .hea and .dat/.mat together)",
                    file_count="multiple", elem_id="upload")
    gr.Markdown("**Examples** (from pydicom and scikit-image):")
    with gr.Row():
        examples = [(gr.Button(e.title, size="sm"), e.key) for e in EXAMPLES]
    with gr.Row():
        modality = gr.Dropdown(modality_choices(tab.ws), value=AUTO, label="Modality", scale=2,
                               info="Detected from the file; change it if the detection is wrong.")
        # a text box: a number box shows an empty value as "0", which reads as a rate of 0 Hz
        rate = gr.Textbox(label="ECG sampling rate (Hz)", scale=1, placeholder="e.g. 500", elem_id="rate",
                          info="Only for CSV/NPY ECGs that do not state it.")
    with gr.Accordion("DICOM window", open=True, visible=False) as window_box:
        with gr.Row():
            preset = gr.Dropdown(["File default", *WINDOW_PRESETS], value="File default", label="Preset", scale=2,
                                 min_width=140)
            centre = gr.Number(label="Centre", precision=1, min_width=80)
            width = gr.Number(label="Width", precision=1, minimum=0, min_width=80)
        apply_window = gr.Button("Apply window", size="sm")
    labels = gr.Textbox(label="Candidate findings (one per line)", lines=6, elem_id="findings",
                        placeholder="Upload a file to get the modality's default findings")
    keep = gr.Checkbox(False, label="Keep my findings for the next file", elem_id="keep-findings",
                       info="Otherwise each new file starts from its modality's default findings.")
    classify_button = gr.Button("Classify", variant="primary", elem_id="classify-button")
    return dict(files=files, examples=examples, modality=modality, rate=rate, window_box=window_box, preset=preset,
                centre=centre, width=width, apply_window=apply_window, file_window=gr.State(None), labels=labels,
                keep=keep, classify_button=classify_button)


def _result_column() -> dict[str, Any]:
    status = gr.Markdown("Upload a file or pick an example.", elem_id="status")
    preview = gr.Image(label="Preview", interactive=False, format="png", height=360, buttons=["fullscreen"])
    ecg_plot = gr.Plot(label="ECG", visible=False, elem_id="ecg-plot")
    prob_plot = gr.Plot(label="Probabilities", elem_id="prob-plot")
    prob_json = gr.JSON(label="Probabilities (JSON)", visible=False)
    with gr.Accordion("Why this finding?", open=False, elem_id="explain-box"):
        explain_button = gr.Button("Explain the top finding", size="sm", elem_id="explain-button")
        explain_note = gr.Markdown(elem_id="explain-note")
        words = gr.HighlightedText(label="Words of the finding", show_legend=False, elem_id="explain-words")
        heatmap = gr.Image(label="Regions that drive it", interactive=False, format="png", height=360,
                           visible=False, elem_id="explain-heatmap")
        ecg_shaded = gr.Plot(label="Seconds that drive it", visible=False, elem_id="explain-ecg")
    return dict(status=status, preview=preview, ecg_plot=ecg_plot, prob_plot=prob_plot, prob_json=prob_json,
                explain_button=explain_button, explained=[explain_note, words, heatmap, ecg_shaded])


def _wire(tab: ClassifyTab, page: SimpleNamespace) -> None:
    """Every event of the tab, each to a ``ClassifyTab`` method; the named ones are API endpoints."""
    p = page
    view = [p.files, p.modality, p.centre, p.width, p.rate]
    classify_inputs = [p.files, p.modality, p.labels, p.centre, p.width, p.rate]
    classified = [p.status, p.prob_plot, p.prob_json]
    shown = [p.status, p.preview, p.ecg_plot]
    opened = [p.status, p.preview, p.ecg_plot, p.modality, p.labels, p.window_box, p.centre, p.width, p.file_window,
              p.prob_plot, p.prob_json]
    p.files.change(tab.open_file, [p.files, p.labels, p.rate, p.keep], opened, api_name="open_file")
    p.files.change(tab.forget_explanation, None, p.explained, api_name=False, queue=False)
    p.rate.submit(tab.open_file, [p.files, p.labels, p.rate, gr.State(True)], opened, api_name=False)  # same file
    p.classify_button.click(tab.classify, classify_inputs, classified, api_name="classify")
    p.labels.submit(tab.classify, classify_inputs, classified, api_name=False)
    p.modality.input(tab.change_modality, [p.files, p.modality, p.labels, p.rate], p.labels,
                     api_name="default_findings").success(tab.classify, classify_inputs, classified, api_name=False)
    p.preset.input(tab.window_preset, [p.preset, p.file_window], [p.centre, p.width], api_name=False).success(
        tab.show, view, shown, api_name=False).success(tab.classify, classify_inputs, classified, api_name=False)
    p.apply_window.click(tab.show, view, shown, api_name="show").success(
        tab.classify, classify_inputs, classified, api_name=False)
    p.explain_button.click(tab.explain, classify_inputs, p.explained, api_name="explain")
    for button, key in p.examples:
        button.click(functools.partial(tab.example, key), None, p.files, api_name=f"example_{key}")

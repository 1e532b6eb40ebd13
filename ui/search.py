"""The Search tab: find library items by a finding or by the upload, and curate the library (add, remove, reset)."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import gradio as gr
from PIL import Image

import m3bind
from m3bind.library import Hit
from m3bind.workspace import Workspace

from .classify import ClassifyInputs
from .common import (AUTO, allow_reset, friendly, library_summary, markdown_text, modality_choices, modality_or_none,
                     read_options, warn)


def item_id_of(value: Any) -> int:
    """A library item id from the API or the page: a whole number that fits, else a readable refusal
    (1.5 used to be rounded to item 2, 1e30 to fail with "Something went wrong")."""
    if value is None or value == "":
        raise m3bind.InputError("Click a search result first; that item is then removed.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise m3bind.InputError(f"{value!r} is not an item id; click a search result.") from None
    if not number.is_integer() or not 0 <= number < 2**53:
        raise m3bind.InputError(f"{value!r} is not an item id (ids are whole numbers from 0); "
                                "click a search result.")
    return int(number)


def gallery(ws: Workspace, hits: list[Hit], folder: Path) -> list[tuple[str, str]]:
    """(image file, caption) per hit: modality · score · label or public name. Each thumbnail is written to
    ``folder``, this response's own (Gradio names an image by its content, so two requests showing the same
    item rewrote one file while a client was downloading it)."""
    items = []
    for rank, hit in enumerate(hits):
        png = ws.thumbnail(hit.id)
        image = Image.open(io.BytesIO(png)) if png else Image.new("RGB", (128, 48), "#dddddd")
        path = folder / f"{rank}.{(image.format or 'png').lower()}"
        if png:
            path.write_bytes(png)
        else:
            image.save(path)
        title = m3bind.get_modality(hit.modality).title
        # file names are patient data: only an example's name, or the owner's opt-in (Workspace.keep_names)
        name = hit.label or ws.shown_source(hit.source, hit.sha256) or f"item {hit.id}"
        items.append((str(path), f"{title} · {hit.score:.3f} · {name}"))
    return items


def routed_how(entry: dict[str, Any]) -> str:
    """How an added input's modality was settled: given (by the user, by a DICOM header) or guessed."""
    if entry["source"] == "user":
        return "given by you"
    if entry["source"] == "dicom":
        return "given by the DICOM header"
    if entry["source"] == "detector":
        how = f"guessed by the modality detector, {entry['confidence'] or 0:.0%} sure"
        return how + " (**unsure: check it**)" if entry["unsure"] else how
    return "guessed from the pixels"


def routing_report(routed: list[dict[str, Any]]) -> list[str]:
    """One line per modality with its count, then each added input's modality (by its place in the upload:
    file names are patient data)."""
    counts = Counter(m3bind.get_modality(e["modality"]).title for e in routed)
    lines = ["Modalities: " + ", ".join(f"{title} {n}" for title, n in counts.most_common()) + "."] if routed else []
    lines += [f"- input {e['input']}: **{m3bind.get_modality(e['modality']).title}**, {routed_how(e)}"
              for e in routed[:100]]
    return lines


class SearchTab:
    """The tab's actions, each a named API endpoint; every model and library call goes through ``ws``."""

    def __init__(self, ws: Workspace, results_folder: Callable[[], Path]):
        self.ws = ws
        self.results_folder = results_folder  # a new folder per response, swept with the uploads (ui.private)

    @friendly("search")
    def search_text(self, query: str, modalities: list[str] | None, k: float, per_modality: bool) -> tuple:
        hits = self.ws.search_text(query, int(k), modalities or None, bool(per_modality))
        note = f"{len(hits)} results for “{markdown_text(query)}”."
        return gallery(self.ws, hits, self.results_folder()), note, [h.id for h in hits]

    @friendly("search")
    def search_similar(self, files: Any, modality: str, centre: float | None, width: float | None, rate: Any,
                       k: float, other: bool) -> tuple:
        how = read_options(self.ws, files, modality, centre, width, rate)
        sample, hits = self.ws.search_similar(files, how, int(k), bool(other))
        scope = "other modalities than " if other else "all modalities, including "
        note = f"{len(hits)} nearest items from {scope}{m3bind.get_modality(sample.modality).title}."
        return gallery(self.ws, hits, self.results_folder()), note, [h.id for h in hits]

    @staticmethod
    def pick_result(ids: list[int], event: gr.SelectData) -> str | None:
        """A clicked result becomes the one the remove button acts on (its id, as the box shows it)."""
        return str(ids[event.index]) if ids and event.index < len(ids) else None

    @friendly("remove this item")
    def remove_item(self, item_id: Any, confirmed: bool) -> tuple:
        """Removes the clicked item, only with the confirmation ticked; the example items of the shared
        library only where the operator allows it (M3BIND_ALLOW_RESET=1)."""
        item_id = item_id_of(item_id)
        if not confirmed:
            raise m3bind.InputError(f"Tick \"Yes, change the shared library\" to remove item {item_id}; "
                                    "nothing was removed.")
        if self.ws.is_example(item_id) and not allow_reset():
            raise m3bind.InputError(f"Item {item_id} is one of the library's example files; this server does not "
                                    "let them be removed (its operator can allow it with M3BIND_ALLOW_RESET=1).")
        self.ws.remove_item(item_id)
        return None, False, f"Item {item_id} was removed from the library.", library_summary(self.ws)

    @friendly("add these files")
    def add_files(self, files: list[str] | None, label: str, modality: str, progress=gr.Progress()) -> tuple:
        if not files:
            raise m3bind.InputError("Choose the files to add first.")
        # not deleted here: another client may have uploaded the same bytes (one shared file); swept (ui.private)
        result = self.ws.add_files(files, label, modality_or_none(modality), progress=lambda f, d: progress(f, desc=d))
        lines = [f"Added **{result['added']}**, already in the library {result['skipped']}, "
                 f"refused {len(result['refused'])}.", *routing_report(result["routed"])]
        if result["refused"]:
            lines.append("Refused:")
        lines += [f"- {markdown_text(name)}: {markdown_text(reason)}" for name, reason in result["refused"][:20]]
        if result["refused"]:
            warn(f"{len(result['refused'])} file(s) could not be added; see the list.", "Some files were refused")
        return "\n".join(lines), library_summary(self.ws)

    @friendly("reset the library")
    def reset_library(self, confirmed: bool) -> tuple:
        if not allow_reset():
            raise m3bind.InputError("This server does not let clients reset its shared library (its operator "
                                    "can allow it with M3BIND_ALLOW_RESET=1); nothing was changed.")
        if not confirmed:
            raise m3bind.InputError("Tick \"Yes, change the shared library\" to reset it; nothing was changed.")
        self.ws.reset_library()
        return "The library holds the example files again.", False, library_summary(self.ws)

    def library_stats(self) -> str:
        return library_summary(self.ws)


def render(tab: SearchTab, upload: ClassifyInputs) -> Any:
    """Lays the tab out and wires its events; returns the library summary (refreshed on page load)."""
    summary = gr.Markdown(library_summary(tab.ws), elem_id="library-summary")
    page = SimpleNamespace(summary=summary, **_search_block(tab.ws), **_remove_row(), **_add_box(tab.ws))
    _wire(tab, page, upload)
    return summary


def _search_block(ws: Workspace) -> dict[str, Any]:
    with gr.Row():
        query = gr.Textbox(label="Findings to search for", scale=4, elem_id="search-query",
                           placeholder="e.g. consolidation in the left lower lobe")
        modalities = gr.Dropdown([(m3bind.get_modality(m).title, m) for m in ws.model.modalities],
                                 multiselect=True, label="Only these modalities", scale=2)
    with gr.Row():
        k = gr.Slider(1, 48, value=12, step=1, label="Results")
        per_modality = gr.Checkbox(False, label="Best of each modality")
        search_button = gr.Button("Search", variant="primary", elem_id="search-button")
    search_note = gr.Markdown()
    results = gr.Gallery(label="Results", columns=4, height="auto", format="png", object_fit="contain",
                         elem_id="results")
    gr.Markdown("### Similar items of other modalities\nUses the file of the Classify tab as the query.")
    with gr.Row():
        other_only = gr.Checkbox(True, label="Other modalities only")
        similar_button = gr.Button("Find similar to the current upload", elem_id="similar-button")
    similar_note = gr.Markdown()
    similar = gr.Gallery(label="Similar items", columns=4, height="auto", format="png", object_fit="contain",
                         elem_id="similar")
    return dict(query=query, modalities=modalities, k=k, per_modality=per_modality, search_button=search_button,
                search_note=search_note, results=results, other_only=other_only, similar_button=similar_button,
                similar_note=similar_note, similar=similar, result_ids=gr.State([]), similar_ids=gr.State([]))


def _remove_row() -> dict[str, Any]:
    with gr.Row():
        # text, not a number box: an empty number box shows "0", which reads as item 0 (see item_id_of)
        selected = gr.Textbox(None, label="Clicked result (library item)", interactive=False,
                              placeholder="click a result", elem_id="selected-item")
        confirm = gr.Checkbox(False, label="Yes, change the shared library", elem_id="confirm-change",
                              info="Needed to remove an item or to reset; cleared after each change.")
        remove_button = gr.Button("Remove it from the library", variant="stop", elem_id="remove-button")
    return dict(selected=selected, confirm=confirm, remove_button=remove_button, remove_note=gr.Markdown())


def _add_box(ws: Workspace) -> dict[str, Any]:
    with gr.Accordion("Add files to the library", open=False):
        gr.Markdown("Only a hash, your label and a thumbnail are kept: no file name and nothing from DICOM headers "
                    "that identifies a patient. The library is saved on the server; the upload is deleted "
                    "within minutes.")
        add_input = gr.File(label="Files", file_count="multiple")
        with gr.Row():
            add_label = gr.Textbox(label="Label for these files (optional)", placeholder="e.g. pneumonia")
            add_modality = gr.Dropdown(modality_choices(ws), value=AUTO, label="Modality")
        with gr.Row():
            add_button = gr.Button("Add to library", variant="primary")
            reset_button = gr.Button("Reset to the examples", variant="stop", visible=allow_reset())
        add_status = gr.Markdown(elem_id="add-status")
    return dict(add_input=add_input, add_label=add_label, add_modality=add_modality, add_button=add_button,
                reset_button=reset_button, add_status=add_status)


def _wire(tab: SearchTab, page: SimpleNamespace, upload: ClassifyInputs) -> None:
    """Every event of the tab, each to a ``SearchTab`` method; the named ones are API endpoints."""
    p = page
    query_inputs = [p.query, p.modalities, p.k, p.per_modality]
    searched = [p.results, p.search_note, p.result_ids]
    p.search_button.click(tab.search_text, query_inputs, searched, api_name="search_text")
    p.query.submit(tab.search_text, query_inputs, searched, api_name=False)
    p.similar_button.click(tab.search_similar, [*upload.view, p.k, p.other_only],
                           [p.similar, p.similar_note, p.similar_ids], api_name="search_similar")
    p.results.select(tab.pick_result, p.result_ids, p.selected, api_name=False)
    p.similar.select(tab.pick_result, p.similar_ids, p.selected, api_name=False)
    heavy = dict(concurrency_id="heavy", concurrency_limit=1)  # library changes: one at a time
    p.remove_button.click(tab.remove_item, [p.selected, p.confirm], [p.selected, p.confirm, p.remove_note, p.summary],
                          api_name="remove_from_library", **heavy)
    p.add_button.click(tab.add_files, [p.add_input, p.add_label, p.add_modality], [p.add_status, p.summary],
                       api_name="add_to_library", **heavy)
    p.reset_button.click(tab.reset_library, p.confirm, [p.add_status, p.confirm, p.summary], api_name="reset_library",
                         **heavy)

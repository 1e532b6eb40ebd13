"""The M3Bind web app: classify, search, explore and few-shot, on images and ECGs of every modality.

``python app.py`` serves it (127.0.0.1:7860 unless GRADIO_SERVER_NAME / GRADIO_SERVER_PORT or a Hugging
Face Space say otherwise). The page only lays things out: files, the model and the library are handled
by ``m3bind.workspace.Workspace``; figures come from ``m3bind.figures``. Every action is a named API
endpoint (``gradio_client``), and every unusable input ends in a readable message, never a traceback.
"""

from __future__ import annotations

import atexit
import dataclasses
import fcntl
import functools
import html
import io
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a clinical tool phones nowhere by default

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import m3bind  # noqa: E402
from m3bind import explore, figures  # noqa: E402
from m3bind.examples import EXAMPLES  # noqa: E402
from m3bind.readers.ecg import LEADS  # noqa: E402
from m3bind.workspace import ReadOptions, Workspace  # noqa: E402

log = logging.getLogger("m3bind.app")

MAX_UPLOAD = "100mb"
PREVIEW_MIN_SIDE = 384
# Worker threads of the server. Every thread that runs the model keeps its own scratch buffers, so
# Gradio's default of 40 let memory creep past 2 GiB; the queue runs only a few actions at a time anyway.
MAX_THREADS = 8
AUTO = "auto"
METHODS = [("Prototypes (class means, works from 1 example)", "prototype"),
           ("Linear probe (logistic regression, better with several)", "probe")]
WINDOW_PRESETS = {"Lung (C -600, W 1500)": (-600.0, 1500.0), "Soft tissue (C 40, W 400)": (40.0, 400.0),
                  "Bone (C 400, W 1800)": (400.0, 1800.0), "Brain (C 40, W 80)": (40.0, 80.0)}
CSS = """
.m3b-warning {background:#fff4e5; border:1px solid #f0a020; border-radius:8px; padding:8px 14px;}
.m3b-warning p {margin:0; color:#7a4700;}
#results .caption-label, #similar .caption-label {white-space:normal; max-width:100%; font-size:12px;}
"""


# ------------------------------------------------------------------------------- private temp folders
# Uploads (DICOM headers full of patient identifiers), previews and the library's working copy never go to
# the machine-wide /tmp/gradio: each app process owns <parent>/app-<pid>-*/ (mode 0700, under a 0700 parent
# of this user), holding uploads/ (Gradio's cache: GRADIO_TEMP_DIR) and tmp/ (the process's temporary files
# when served by main()). Uploads are deleted once added to the library, and any upload older than
# UPLOAD_TTL_S seconds is swept; the folder goes when the process ends (SIGTERM/SIGINT included), and the
# folders of dead processes (SIGKILL) are removed when the next app starts.
UPLOAD_TTL_S = float(os.environ.get("M3BIND_UPLOAD_TTL", "600"))
_private: "PrivateDirs | None" = None
_private_lock = threading.Lock()


class PrivateDirs:
    def __init__(self, root: Path, lock: int):
        self.root, self.uploads, self.tmp, self._lock = root, root / "uploads", root / "tmp", lock
        for folder in (self.uploads, self.tmp):
            folder.mkdir(mode=0o700, exist_ok=True)
        self._sweeper: threading.Thread | None = None

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def owns(self, path: str | os.PathLike) -> bool:
        """True for a path inside this process's upload folder."""
        try:
            return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(self.uploads))
        except (OSError, ValueError):
            return False

    def sweep(self, max_age_s: float = UPLOAD_TTL_S) -> int:
        """Deletes uploads (and cached previews) older than ``max_age_s``; returns how many."""
        cutoff, removed = time.time() - max_age_s, 0
        for folder, dirs, names in os.walk(self.uploads, topdown=False):
            for name in names:
                path = os.path.join(folder, name)
                try:
                    st = os.lstat(path)
                    # ctime too: Gradio copies an example into the cache keeping the example's old mtime
                    if max(st.st_mtime, st.st_ctime) < cutoff:
                        os.unlink(path)
                        removed += 1
                except OSError:
                    pass
            for name in dirs:
                try:
                    os.rmdir(os.path.join(folder, name))  # only empty ones
                except OSError:
                    pass
        return removed

    def start_sweeper(self) -> None:
        if self._sweeper is None:
            def loop() -> None:
                while self.root.exists():
                    time.sleep(max(1.0, min(60.0, UPLOAD_TTL_S / 2)))
                    self.sweep()
            self._sweeper = threading.Thread(target=loop, name="m3bind-upload-sweeper", daemon=True)
            self._sweeper.start()


def private_parent() -> Path:
    """This user's private parent folder (M3BIND_RUNTIME_DIR, default <tmp>/m3bind-<uid>), mode 0700."""
    parent = Path(os.environ.get("M3BIND_RUNTIME_DIR") or Path(tempfile.gettempdir()) / f"m3bind-{os.getuid()}")
    parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(parent)
    if not os.path.isdir(parent) or os.path.islink(parent) or st.st_uid != os.getuid():
        raise RuntimeError(f"{parent} is not a private folder of this user; set M3BIND_RUNTIME_DIR.")
    if st.st_mode & 0o077:
        os.chmod(parent, 0o700)
    return parent


def clean_dead_processes(parent: Path) -> list[str]:
    """Removes the folders of app processes that are gone (their lock is free); returns their names."""
    removed = []
    for folder in parent.glob("app-*"):
        try:
            fd = os.open(folder / ".lock", os.O_RDWR)
        except FileNotFoundError:  # being created right now, or broken: only an old one is removed
            if folder.is_dir() and time.time() - folder.stat().st_mtime > 60:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder.name)
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # alive
        finally:
            os.close(fd)
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder.name)
    return removed


def private_dirs() -> PrivateDirs:
    """This process's private folders, made (and the leftovers of dead processes removed) on first use;
    Gradio's cache is pointed at them before any component exists."""
    global _private
    with _private_lock:
        if _private is None or not _private.root.exists():
            parent = private_parent()
            gone = clean_dead_processes(parent)
            if gone:
                log.info("removed the temporary folders of %d stopped app process(es)", len(gone))
            root = Path(tempfile.mkdtemp(prefix=f"app-{os.getpid()}-", dir=parent))  # mode 0700
            lock = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(lock, fcntl.LOCK_EX)  # held (open) for the life of the process
            _private = PrivateDirs(root, lock)
            atexit.register(_private.remove)
        os.environ["GRADIO_TEMP_DIR"] = str(_private.uploads)
        return _private


# ------------------------------------------------------------------------------------------ helpers
# Markdown syntax, HTML, entities and the URL/e-mail autolinks (":" of "http://", "@", the dot of "www.")
_MARKDOWN_SPECIAL = str.maketrans({c: "\\" + c for c in "\\`*_{}[]()<>#!|~:@&"})


def plain(text: Any) -> str:
    """Text for a toast or an error message (rendered as HTML by the browser): <, > and & escaped, so file
    content quoted in a message (a CSV cell, a DICOM value) can never become markup."""
    return html.escape(str(text), quote=False)


def markdown_text(text: Any) -> str:
    """Untrusted text (a query, a file name, a reason quoting file content) placed into Markdown: every
    Markdown and HTML special character is backslash-escaped, so it shows as typed and never as a link,
    an image or a tag."""
    return re.sub(r"(?i)\b(www)\.", r"\1\\.", " ".join(str(text).split()).translate(_MARKDOWN_SPECIAL))


def _allow_reset() -> bool:
    """Resetting the shared library, or removing its example items, needs the operator's consent."""
    return os.environ.get("M3BIND_ALLOW_RESET", "").strip().lower() in ("1", "true", "yes")


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


def _friendly(action: str) -> Callable:
    """Turns InputError into a message in the page (gr.Error); any other failure into a short note,
    with the traceback in the server log only."""
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except gr.Error:
                raise
            except m3bind.InputError as exc:
                raise gr.Error(plain(exc), title=f"Cannot {action}", print_exception=False) from None
            except Exception:
                log.exception("unexpected failure while trying to %s", action)
                raise gr.Error("Something went wrong on the server; the details are in its log. "
                               "Try again, or with another file.", title=f"Cannot {action}",
                               print_exception=False) from None
        return run
    return wrap


def parse_findings(text: str | None) -> list[str]:
    """Candidate findings from the text box: one per line, or comma-separated on a single line."""
    lines = [line.strip().lstrip("-*• ").strip() for line in (text or "").splitlines()]
    lines = [line for line in lines if line]
    parts = lines if len(lines) > 1 else [p.strip() for p in (lines[0].split(",") if lines else [])]
    seen: dict[str, str] = {}
    for part in parts:
        if part and part.lower() not in seen:
            seen[part.lower()] = part
    return list(seen.values())


def findings_for(modality: str, current: str | None) -> str:
    """The modality's default findings, unless the user has typed findings of their own."""
    mine = parse_findings(current)
    defaults = [list(m3bind.get_modality(n).default_labels) for n in m3bind.modality_names()]
    if not mine or mine in defaults:
        return "\n".join(m3bind.get_modality(modality).default_labels)
    return current or ""


def _window(centre: float | None, width: float | None) -> tuple[float, float] | None:
    if centre is None or width is None or width <= 0:
        return None
    return float(centre), float(width)


def _modality(choice: str | None) -> str | None:
    return None if choice in (None, "", AUTO) else choice


def _describe(sample: m3bind.Sample) -> str:
    meta = sample.meta
    title = m3bind.get_modality(sample.modality).title
    if "detected_modality" in meta:
        how = f"chosen by you (the file looked like {m3bind.get_modality(meta['detected_modality']).title})"
    else:
        how = {"dicom": "from the DICOM header", "guess": "guessed from the pixels; override it if wrong",
               "user": "chosen by you",
               "detector": f"recognised from the image, {meta.get('modality_confidence', 0):.0%} sure"}.get(
            meta.get("modality_source"), "from the file")
        if meta.get("modality_unsure"):
            how += "; **not sure: please pick the modality above**"
    facts = [f"**{title}** ({how})", str(meta.get("format", "")).upper()]
    if sample.kind == "ecg":
        fs, seconds = meta.get("fs_original"), float(meta.get("duration_s", 10))
        span = (f"the first 10 s of {seconds:.0f} s" if seconds > 10.5 else
                f"{seconds:.1f} s, padded to 10 s" if meta.get("padded_s") else f"{seconds:.0f} s")
        facts.append(span + (f", recorded at {fs:g} Hz" if fs else ""))
        missing = [lead for lead, ok in zip(LEADS, meta.get("lead_mask", [])) if not ok]
        facts.append(f"leads not recorded: {', '.join(missing)}" if missing else "all 12 leads")
    else:
        h, w = sample.data.shape[:2]  # a large plain image is decoded reduced; its meta keeps the file's size
        facts.append(f"{meta.get('width', w)} x {meta.get('height', h)} px")
        if "window" in meta:
            facts.append(f"window C {meta['window'][0]:g} / W {meta['window'][1]:g} ({meta.get('window_source')})")
    return " · ".join(f for f in facts if f)


def _views(sample: m3bind.Sample) -> tuple[Any, Any]:
    """(image update, ECG plot update): show whichever fits the sample. Small images are enlarged by an
    integer factor (nearest neighbour: every pixel stays a visible square, nothing is interpolated)."""
    if sample.kind == "ecg":
        title = m3bind.get_modality(sample.modality).title
        return gr.update(value=None, visible=False), gr.update(value=figures.ecg_figure(sample, title), visible=True)
    factor = max(1, PREVIEW_MIN_SIDE // max(sample.preview.shape[:2]))
    image = np.repeat(np.repeat(sample.preview, factor, axis=0), factor, axis=1) if factor > 1 else sample.preview
    preview = Image.fromarray(image)
    # Gradio writes it as PNG with the default zlib level: 110 ms for a 512-px photo. Level 1, set on the
    # image as Pillow allows, takes a fifth of that for a file 15% larger.
    preview.encoderinfo = {"compress_level": 1}
    return gr.update(value=preview, visible=True), gr.update(value=None, visible=False)


def _gallery(ws: Workspace, hits: list) -> list[tuple[Image.Image, str]]:
    items = []
    for hit in hits:
        png = ws.thumbnail(hit.id)
        image = Image.open(io.BytesIO(png)).convert("RGB") if png else Image.new("RGB", (128, 48), "#dddddd")
        title = m3bind.get_modality(hit.modality).title
        # file names are patient data: only an example's name, or the owner's opt-in (Workspace.keep_names)
        name = hit.label or ws.shown_source(hit.source, hit.sha256) or f"item {hit.id}"
        caption = f"{title} · {hit.score:.3f} · {name}"
        items.append((image, caption))
    return items


def _library_summary(ws: Workspace) -> str:
    stats = ws.library.stats()
    parts = ", ".join(f"{m3bind.get_modality(m).title} {n}" for m, n in stats["per_modality"].items())
    return f"**Library:** {stats['count']} items ({parts or 'empty'}) · index {stats['index']}"


def _header(ws: Workspace) -> str:
    model = ws.model
    return (f"# M3Bind\nImages and ECGs of every modality and text in one shared space. "
            f"Model **{model.config.name}** (`{model.fingerprint}`) on **{model.device.type.upper()}**, "
            f"{model.dim}-d; encodes {', '.join(m3bind.get_modality(m).title for m in model.modalities)}.")


# ----------------------------------------------------------------------------------------------- app
def build_app(model: Any = None, home: str | os.PathLike | None = None) -> gr.Blocks:
    """The whole page, wired to one model (loaded once here if not given) and its library."""
    private = private_dirs()  # before any component: Gradio's cache is the app's own folder
    private.start_sweeper()
    model = model if model is not None else m3bind.load_model()
    ws = Workspace(model, home)
    modality_choices = [("Auto-detect", AUTO)] + [(m3bind.get_modality(m).title, m) for m in model.modalities]

    def options(files, modality, centre, width, rate) -> ReadOptions:
        """How to read the upload. A window equal to the file's own is dropped, so the file's VOI function
        (which may be non-linear) applies rather than a linear window with the same numbers."""
        rate = float(rate) if rate else None
        window = _window(centre, width)
        if window is not None and list(window) == ws.read(files, ReadOptions(sampling_rate=rate)).meta.get("window"):
            window = None
        return ReadOptions(_modality(modality), window, rate)

    @_friendly("classify")
    def classify(files, modality, labels, centre, width, rate):
        sample = ws.read(files, options(files, modality, centre, width, rate))
        probs = model.classify(sample, parse_findings(labels))
        title = f"{m3bind.get_modality(sample.modality).title}: zero-shot probabilities"
        return _describe(sample), figures.probability_figure(probs, title), probs

    @_friendly("show this file")
    def show(files, modality, centre, width, rate):
        """The view of the upload as read now (after a new window, say): image or ECG plot."""
        sample = ws.read(files, options(files, modality, centre, width, rate))
        return (_describe(sample), *_views(sample))

    def open_file(files, labels, rate):
        """A new upload: show it, detect its modality, offer its findings and classify, in one step.
        Unreadable files clear the page and say why (in the page and as a toast)."""
        cleared = [gr.update(value=None), gr.update(value=None, visible=False), AUTO, labels,
                   gr.update(visible=False), None, None, None, None, None]
        if not files:
            return ["Upload a file or pick an example.", *cleared]
        try:
            sample = ws.read(files, ReadOptions(sampling_rate=float(rate) if rate else None))
        except m3bind.InputError as exc:
            gr.Warning(plain(exc), title="Cannot read this file")
            return [f"❌ **Cannot read this file.** {markdown_text(exc)}", *cleared]
        is_dicom_image = sample.kind == "image" and sample.meta.get("format") == "dicom"
        window = sample.meta.get("window") if is_dicom_image else None
        findings = findings_for(sample.modality, labels)
        described, plot, probs = classify(files, AUTO, findings, None, None, rate)
        image, ecg = _views(sample)
        return [described, image, ecg, AUTO, findings, gr.update(visible=window is not None),
                *(window or (None, None)), window, plot, probs]

    @_friendly("change the modality")
    def change_modality(files, modality, labels, rate):
        if _modality(modality) is not None:
            return findings_for(modality, labels)
        if not files:
            return labels
        return findings_for(ws.read(files, options(files, AUTO, None, None, rate)).modality, labels)

    def window_preset(preset, file_window):
        if preset in WINDOW_PRESETS:
            return WINDOW_PRESETS[preset]
        return tuple(file_window) if file_window else (None, None)

    def example(key: str) -> Callable[[], list[str]]:
        def pick() -> list[str]:
            return [str(ws.example_path(key))]
        pick.__name__ = f"example_{key}"
        return pick

    @_friendly("search")
    def search_text(query, modalities, k, per_modality):
        hits = ws.search_text(query, int(k), modalities or None, bool(per_modality))
        return _gallery(ws, hits), f"{len(hits)} results for “{markdown_text(query)}”.", [h.id for h in hits]

    @_friendly("search")
    def search_similar(files, modality, centre, width, rate, k, other):
        sample, hits = ws.search_similar(files, options(files, modality, centre, width, rate), int(k), bool(other))
        scope = "other modalities than " if other else "all modalities, including "
        return _gallery(ws, hits), (f"{len(hits)} nearest items from {scope}"
                                    f"{m3bind.get_modality(sample.modality).title}."), [h.id for h in hits]

    def pick_result(ids, event: gr.SelectData):
        """A clicked result becomes the one the remove button acts on."""
        return ids[event.index] if ids and event.index < len(ids) else None

    @_friendly("remove this item")
    def remove_item(item_id, confirmed):
        """Removes the clicked item, only with the confirmation ticked; the example items of the shared
        library only where the operator allows it (M3BIND_ALLOW_RESET=1)."""
        item_id = item_id_of(item_id)
        if not confirmed:
            raise m3bind.InputError(f"Tick \"Yes, change the shared library\" to remove item {item_id}; "
                                    "nothing was removed.")
        if ws.is_example(item_id) and not _allow_reset():
            raise m3bind.InputError(f"Item {item_id} is one of the library's example files; this server does not "
                                    "let them be removed (its operator can allow it with M3BIND_ALLOW_RESET=1).")
        ws.remove_item(item_id)
        return None, False, f"Item {item_id} was removed from the library.", _library_summary(ws)

    @_friendly("add these files")
    def add_files(files, label, modality, progress=gr.Progress()):
        if not files:
            raise m3bind.InputError("Choose the files to add first.")
        try:
            result = ws.add_files(files, label, _modality(modality), progress=lambda f, d: progress(f, desc=d))
        finally:  # read once: the uploads are not kept
            for path in files:
                if private.owns(path):
                    Path(path).unlink(missing_ok=True)
        lines = [f"Added **{result['added']}**, already in the library {result['skipped']}, "
                 f"refused {len(result['refused'])}."]
        lines += [f"- {markdown_text(name)}: {markdown_text(reason)}" for name, reason in result["refused"][:20]]
        if result["refused"]:
            gr.Warning(f"{len(result['refused'])} file(s) could not be added; see the list.")
        return "\n".join(lines), _library_summary(ws)

    @_friendly("reset the library")
    def reset_library(confirmed):
        if not _allow_reset():
            raise m3bind.InputError("This server does not let clients reset its shared library (its operator "
                                    "can allow it with M3BIND_ALLOW_RESET=1); nothing was changed.")
        if not confirmed:
            raise m3bind.InputError("Tick \"Yes, change the shared library\" to reset it; nothing was changed.")
        ws.reset_library()
        return "The library holds the example files again.", False, _library_summary(ws)

    def library_stats():
        return _library_summary(ws)

    @_friendly("draw the map")
    def draw_map(color_by, prompts, place_query, files, modality, centre, width, rate, progress=gr.Progress()):
        progress(0.1, desc="Fitting the map (the first one after a server start also compiles UMAP's code)")
        lmap = ws.library_map()
        texts = parse_findings(prompts)
        prompt_xy = lmap.place(model.embed_text(texts)) if texts else np.zeros((0, 2))
        query = name = None
        if place_query and files:
            how = options(files, modality, centre, width, rate)
            sample = ws.read(files, how)
            query = lmap.place(ws.embed(files, how))[0]
            name = f"your upload ({m3bind.get_modality(sample.modality).title})"
        # hover text and legend: no uploads' file names, and labels and prompts as text, never plotly markup
        shown = dataclasses.replace(
            lmap, labels=[plain(label) if label else label for label in lmap.labels],
            sources=[plain(ws.shown_source(src, ws.library.item(int(i))["sha256"]) or "") or None if src else None
                     for i, src in zip(lmap.ids, lmap.sources)])
        fig = figures.map_figure(shown, color_by, query, name or "your upload",
                                 [(plain(t), xy) for t, xy in zip(texts, prompt_xy)])
        return fig, (f"{lmap.method} map of {len(lmap.ids)} library items; the upload and the prompts are placed "
                     "into it without refitting it.")

    def warm_map():
        """Opening the Explore tab compiles UMAP in the background, while the user reads the page."""
        if len(ws.library) >= explore.MIN_UMAP_ITEMS:
            explore.warm_up_in_background()

    @_friendly("classify with your examples")
    def fewshot(files, modality, centre, width, rate, method, use_library, name1, examples1, name2, examples2,
                name3, examples3, progress=gr.Progress()):
        named = {}
        for name, examples in ((name1, examples1), (name2, examples2), (name3, examples3)):
            if name and name.strip():
                named[name.strip()] = examples or []
        how = options(files, modality, centre, width, rate)
        probs = ws.fewshot(files, named, method, how, bool(use_library), progress=lambda f, d: progress(f, desc=d))
        sample = ws.read(files, how)
        title = "Few-shot probabilities (" + dict((v, k) for k, v in METHODS)[method].split(" (")[0] + ")"
        note = f"Classified: the file of the Classify tab ({m3bind.get_modality(sample.modality).title})."
        return figures.probability_figure(probs, title), probs, note

    # Uploads (possibly DICOM files with patient identifiers in their headers) live in the app's private
    # folder and leave it after UPLOAD_TTL_S (see private_dirs); the library keeps hashes and thumbnails.
    ttl = max(1, int(UPLOAD_TTL_S))
    with gr.Blocks(title="M3Bind", delete_cache=(max(1, min(60, ttl // 2)), ttl)) as demo:
        gr.Markdown(_header(ws))
        if "untrained" in model.config.name:
            gr.Markdown("⚠️ **This model is untrained.** Its probabilities and search results are meaningless; "
                        "they only show that the app works. Train a model with `train/` and ship it in `assets/`.",
                        elem_classes="m3b-warning", elem_id="untrained-warning")
        if ws.notice:
            gr.Markdown(f"ℹ️ {ws.notice}", elem_classes="m3b-warning")

        with gr.Tabs():
            with gr.Tab("Classify", id="classify"):
                with gr.Row():
                    with gr.Column(scale=2, min_width=320):
                        files = gr.File(label="Image, DICOM or ECG (for a WFDB record, select its .hea and "
                                              ".dat/.mat together)", file_count="multiple", elem_id="upload")
                        gr.Markdown("**Examples** (from pydicom and scikit-image):")
                        with gr.Row():
                            example_buttons = [(gr.Button(e.title, size="sm"), e.key) for e in EXAMPLES]
                        with gr.Row():
                            modality = gr.Dropdown(modality_choices, value=AUTO, label="Modality", scale=2,
                                                   info="Detected from the file; change it if the detection is wrong.")
                            rate = gr.Number(None, label="ECG sampling rate (Hz)", precision=0, minimum=0, scale=1,
                                             placeholder="e.g. 500", elem_id="rate",
                                             info="Only for CSV/NPY ECGs that do not state it (0: not given).")
                        with gr.Accordion("DICOM window", open=True, visible=False) as window_box:
                            with gr.Row():
                                preset = gr.Dropdown(["File default", *WINDOW_PRESETS], value="File default",
                                                     label="Preset", scale=2, min_width=140)
                                centre = gr.Number(label="Centre", precision=1, min_width=80)
                                width = gr.Number(label="Width", precision=1, minimum=0, min_width=80)
                            apply_window = gr.Button("Apply window", size="sm")
                        file_window = gr.State(None)
                        labels = gr.Textbox(label="Candidate findings (one per line)", lines=6,
                                            placeholder="Upload a file to get the modality's default findings",
                                            elem_id="findings")
                        classify_button = gr.Button("Classify", variant="primary", elem_id="classify-button")
                    with gr.Column(scale=3):
                        status = gr.Markdown("Upload a file or pick an example.", elem_id="status")
                        preview = gr.Image(label="Preview", interactive=False, format="png", height=360,
                                           buttons=["fullscreen"])
                        ecg_plot = gr.Plot(label="ECG", visible=False, elem_id="ecg-plot")
                        prob_plot = gr.Plot(label="Probabilities", elem_id="prob-plot")
                        prob_json = gr.JSON(label="Probabilities (JSON)", visible=False)

            with gr.Tab("Search", id="search"):
                summary = gr.Markdown(_library_summary(ws), elem_id="library-summary")
                with gr.Row():
                    query = gr.Textbox(label="Findings to search for", scale=4, elem_id="search-query",
                                       placeholder="e.g. consolidation in the left lower lobe")
                    search_modalities = gr.Dropdown([(m3bind.get_modality(m).title, m) for m in model.modalities],
                                                    multiselect=True, label="Only these modalities", scale=2)
                with gr.Row():
                    k = gr.Slider(1, 48, value=12, step=1, label="Results")
                    per_modality = gr.Checkbox(False, label="Best of each modality")
                    search_button = gr.Button("Search", variant="primary", elem_id="search-button")
                search_note = gr.Markdown()
                gallery = gr.Gallery(label="Results", columns=4, height="auto", format="png", object_fit="contain",
                                     elem_id="results")
                gr.Markdown("### Similar items of other modalities\nUses the file of the Classify tab as the query.")
                with gr.Row():
                    other_only = gr.Checkbox(True, label="Other modalities only")
                    similar_button = gr.Button("Find similar to the current upload", elem_id="similar-button")
                similar_note = gr.Markdown()
                similar_gallery = gr.Gallery(label="Similar items", columns=4, height="auto", format="png",
                                             object_fit="contain", elem_id="similar")
                result_ids, similar_ids = gr.State([]), gr.State([])
                with gr.Row():
                    # no default (0 would name item 0) and no rounding (1.5 would name item 2): see item_id_of
                    selected_item = gr.Number(None, label="Clicked result (library item)", interactive=False,
                                              elem_id="selected-item")
                    confirm = gr.Checkbox(False, label="Yes, change the shared library", elem_id="confirm-change",
                                          info="Needed to remove an item or to reset; cleared after each change.")
                    remove_button = gr.Button("Remove it from the library", variant="stop", elem_id="remove-button")
                remove_note = gr.Markdown()
                with gr.Accordion("Add files to the library", open=False):
                    gr.Markdown("Only a hash, your label and a thumbnail are kept: no file name and nothing from "
                                "DICOM headers that identifies a patient. The library is saved on the server and "
                                "the upload is deleted once read.")
                    add_files_input = gr.File(label="Files", file_count="multiple")
                    with gr.Row():
                        add_label = gr.Textbox(label="Label for these files (optional)", placeholder="e.g. pneumonia")
                        add_modality = gr.Dropdown(modality_choices, value=AUTO, label="Modality")
                    with gr.Row():
                        add_button = gr.Button("Add to library", variant="primary")
                        reset_button = gr.Button("Reset to the examples", variant="stop", visible=_allow_reset())
                    add_status = gr.Markdown()

            with gr.Tab("Explore", id="explore") as explore_tab:
                gr.Markdown("The library in 2-D (UMAP, or PCA for a handful of items). Hover over a point to see "
                            "its label and file; the current upload (a star) and your text prompts (diamonds) "
                            "are placed into the map.")
                with gr.Row():
                    color_by = gr.Radio([("Modality", "modality"), ("Label", "label")], value="modality",
                                        label="Colour by")
                    place_query = gr.Checkbox(True, label="Place the current upload")
                prompts = gr.Textbox(label="Text prompts to place (one per line)", lines=3,
                                     value="pneumonia\nnormal ECG\nadenocarcinoma", elem_id="prompts")
                map_button = gr.Button("Draw map", variant="primary", elem_id="map-button")
                map_note = gr.Markdown()
                map_plot = gr.Plot(label="Embedding map", elem_id="map-plot")

            with gr.Tab("Few-shot", id="fewshot"):
                gr.Markdown("Teach classes from a few examples each, then classify the file of the Classify tab. "
                            "Name each class; give its example files, or tick the box to use library items "
                            "that carry that label.")
                with gr.Row():
                    method = gr.Radio(METHODS, value="prototype", label="Method")
                    use_library = gr.Checkbox(False, label="Also use library items with these labels")
                class_inputs = []
                for i, placeholder in enumerate(("e.g. normal", "e.g. pneumonia", "optional third class")):
                    with gr.Row():
                        name = gr.Textbox(label=f"Class {i + 1}", placeholder=placeholder, scale=1,
                                          elem_id=f"class-{i + 1}-name")
                        examples = gr.File(label=f"Examples of class {i + 1}", file_count="multiple", scale=3,
                                           height=120, elem_id=f"class-{i + 1}-files")
                    class_inputs += [name, examples]
                fewshot_button = gr.Button("Classify the current upload", variant="primary", elem_id="fewshot-button")
                fewshot_note = gr.Markdown(elem_id="fewshot-note")
                fewshot_plot = gr.Plot(label="Probabilities", elem_id="fewshot-plot")
                fewshot_json = gr.JSON(visible=False)

        # ---- wiring: every action has a public API name
        view = [files, modality, centre, width, rate]
        classified = [status, prob_plot, prob_json]
        shown = [status, preview, ecg_plot]
        opened = [status, preview, ecg_plot, modality, labels, window_box, centre, width, file_window, prob_plot,
                  prob_json]
        files.change(open_file, [files, labels, rate], opened, api_name="open_file")
        rate.submit(open_file, [files, labels, rate], opened, api_name=False)
        classify_inputs = [files, modality, labels, centre, width, rate]
        classify_button.click(classify, classify_inputs, classified, api_name="classify")
        labels.submit(classify, classify_inputs, classified, api_name=False)
        modality.input(change_modality, [files, modality, labels, rate], labels, api_name="default_findings").success(
            classify, classify_inputs, classified, api_name=False)
        preset.input(window_preset, [preset, file_window], [centre, width], api_name=False).success(
            show, view, shown, api_name=False).success(classify, classify_inputs, classified, api_name=False)
        apply_window.click(show, view, shown, api_name="show").success(
            classify, classify_inputs, classified, api_name=False)
        for button, key in example_buttons:
            button.click(example(key), None, files, api_name=f"example_{key}")

        searched = [gallery, search_note, result_ids]
        search_button.click(search_text, [query, search_modalities, k, per_modality], searched, api_name="search_text")
        query.submit(search_text, [query, search_modalities, k, per_modality], searched, api_name=False)
        similar_button.click(search_similar, [*view, k, other_only], [similar_gallery, similar_note, similar_ids],
                             api_name="search_similar")
        gallery.select(pick_result, result_ids, selected_item, api_name=False)
        similar_gallery.select(pick_result, similar_ids, selected_item, api_name=False)
        remove_button.click(remove_item, [selected_item, confirm], [selected_item, confirm, remove_note, summary],
                            api_name="remove_from_library", concurrency_id="heavy", concurrency_limit=1)
        add_button.click(add_files, [add_files_input, add_label, add_modality], [add_status, summary],
                         api_name="add_to_library", concurrency_id="heavy", concurrency_limit=1)
        reset_button.click(reset_library, confirm, [add_status, confirm, summary], api_name="reset_library",
                           concurrency_id="heavy", concurrency_limit=1)
        demo.load(library_stats, None, summary, api_name="library_stats")

        explore_tab.select(warm_map, None, None, api_visibility="private", queue=False)
        map_button.click(draw_map, [color_by, prompts, place_query, *view], [map_plot, map_note], api_name="explore",
                         concurrency_id="heavy", concurrency_limit=1)
        color_by.input(draw_map, [color_by, prompts, place_query, *view], [map_plot, map_note], api_name=False,
                       concurrency_id="heavy", concurrency_limit=1)
        fewshot_button.click(fewshot, [*view, method, use_library, *class_inputs],
                             [fewshot_plot, fewshot_json, fewshot_note],
                             api_name="fewshot")
    demo.queue(default_concurrency_limit=2)
    demo.m3bind_workspace = ws  # for tests and benchmarks: the app's own state
    demo.m3bind_private = private
    return demo


def launch_options(workspace: Workspace) -> dict[str, Any]:
    """Where and how to serve: localhost unless told otherwise (a Space listens on all interfaces)."""
    host = os.environ.get("GRADIO_SERVER_NAME") or ("0.0.0.0" if os.environ.get("SPACE_ID") else "127.0.0.1")
    return dict(server_name=host, server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
                max_threads=MAX_THREADS, max_file_size=MAX_UPLOAD, allowed_paths=[str(workspace.examples_dir)],
                show_error=False,
                footer_links=["api"], css=CSS,
                theme=gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"],  # no web-font requests
                                     font_mono=["ui-monospace", "monospace"]))


def serving_threads() -> int:
    """Torch threads per request: a quarter of the cores, at least one.

    Requests run side by side (two per action), and small CPUs are often shared: when the threads of
    concurrent computations outnumber the cores, every small matrix product waits at a thread barrier.
    Measured on a busy 2-core machine: classify 130 ms with one thread, over 2 s with two.
    ``OMP_NUM_THREADS``, when set, wins.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return int(os.environ["OMP_NUM_THREADS"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // 4)


def main() -> None:
    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(serving_threads())
    private = private_dirs()
    tempfile.tempdir = str(private.tmp)  # the library's working copy and every other temporary file too
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    demo = build_app()
    demo.launch(**launch_options(demo.m3bind_workspace), prevent_thread_lock=True)
    while not stop.wait(0.5):
        pass
    log.info("stopping: closing the server and removing the app's temporary folders")
    demo.close()
    demo.m3bind_workspace.library.close()
    private.remove()


if __name__ == "__main__":
    main()

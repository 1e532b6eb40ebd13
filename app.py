"""The M3Bind web app: classify, search, explore and few-shot, on images and ECGs of every modality.

``python app.py`` serves it (127.0.0.1:7860 unless GRADIO_SERVER_NAME / GRADIO_SERVER_PORT or a Hugging
Face Space say otherwise). This file only puts the page together: each tab lives in ``ui/`` (its handlers,
its layout and wiring), files, the model and the library are handled by ``m3bind.workspace.Workspace``,
and figures come from ``m3bind.figures``. Every action is a named API endpoint (``gradio_client``), and
every unusable input ends in a readable message, never a traceback.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import os
import signal
import tempfile
import threading
from typing import Any, Callable

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a clinical tool phones nowhere by default

import gradio as gr  # noqa: E402

import m3bind  # noqa: E402
from m3bind.errors import ConfigError  # noqa: E402
from m3bind.workspace import Workspace  # noqa: E402
from ui import classify, explore, fewshot, search  # noqa: E402
from ui.private import UPLOAD_TTL_S, private_dirs  # noqa: E402

log = logging.getLogger("m3bind.app")

MAX_UPLOAD = "100mb"
# Worker threads of the server. Every thread that runs the model keeps its own scratch buffers, so
# Gradio's default of 40 let memory creep past 2 GiB; the queue runs only a few actions at a time anyway.
MAX_THREADS = 8
# Sessions whose state the server keeps. Gradio keeps a copy of every component's settings per session
# (about 200 KiB here) up to 10,000 sessions, and each API call without a session hash opens a new one:
# memory would climb by up to 2 GiB. The least recently used session goes first (its page's remembered
# values, such as the last search's results, start over).
SESSIONS = 256
# Galleries grow with their results (no inner scroll hiding the rows after the second), captions sit under
# their picture, whole; toasts appear at the bottom, clear of the status line.
CSS = """
.m3b-warning {background:#fff4e5; border:1px solid #f0a020; border-radius:8px; padding:8px 14px;}
.m3b-warning p {margin:0; color:#7a4700;}
#results .grid-wrap, #similar .grid-wrap {max-height:none; overflow-y:visible;}
#results .thumbnail-item, #similar .thumbnail-item {aspect-ratio:auto; display:flex; flex-direction:column;}
#results .thumbnail-item > img, #similar .thumbnail-item > img {aspect-ratio:1; height:auto; flex:none;}
#results .caption-label, #similar .caption-label {position:static; max-width:100%; white-space:normal;
  overflow:visible; border:none; border-radius:0; font-size:13px; line-height:1.3; opacity:1;}
.toast-wrap {top:auto !important; bottom:var(--size-4);}
"""


def concurrency() -> int:
    """How many actions run at once, app-wide (``M3BIND_CONCURRENCY``, default 2): each holds a model
    forward pass, and on a small CPU more at once only makes each slower."""
    value = os.environ.get("M3BIND_CONCURRENCY", "2").strip()
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"M3BIND_CONCURRENCY must be a whole number from 1, not {value!r}")
    return int(value)


def header(ws: Workspace) -> str:
    model = ws.model
    return (f"# M3Bind\nImages and ECGs of every modality and text in one shared space. "
            f"Model **{model.config.name}** (`{model.fingerprint}`) on **{model.device.type.upper()}**, "
            f"{model.dim}-d; encodes {', '.join(m3bind.get_modality(m).title for m in model.modalities)}.")


def build_app(model: Any = None, home: str | os.PathLike | None = None) -> gr.Blocks:
    """The whole page, wired to one model (loaded once here if not given) and its library."""
    private = private_dirs()  # before any component: Gradio's cache is the app's own folder
    # decoded uploads are kept only as long as the uploads themselves (UPLOAD_TTL_S of disuse)
    ws = Workspace(model if model is not None else m3bind.load_model(), home, cache_ttl_s=UPLOAD_TTL_S)
    private.start_sweeper(ws.expire_cache)
    classify_tab, search_tab = classify.ClassifyTab(ws), search.SearchTab(ws, private.results_folder)
    explore_tab, fewshot_tab = explore.ExploreTab(ws), fewshot.FewShotTab(ws)
    # Uploads (possibly DICOM files with patient identifiers in their headers) live in the app's private
    # folder and leave it after UPLOAD_TTL_S (see ui.private); the library keeps hashes and thumbnails.
    ttl = max(1, int(UPLOAD_TTL_S))
    with gr.Blocks(title="M3Bind", delete_cache=(max(1, min(60, ttl // 2)), ttl)) as demo:
        gr.Markdown(header(ws))
        if not ws.trained:
            gr.Markdown("**This model is untrained.** Its probabilities and search results are meaningless; they "
                        "only show that the app works. Train a model with `train/` and ship it in `assets/`.",
                        elem_classes="m3b-warning", elem_id="untrained-warning")
        if ws.notice:
            gr.Markdown(ws.notice, elem_classes="m3b-warning")
        with gr.Tabs():
            with gr.Tab("Classify", id="classify"):
                upload = classify.render(classify_tab)
            with gr.Tab("Search", id="search"):
                summary = search.render(search_tab, upload)
            with gr.Tab("Explore", id="explore") as explore_block:
                explore.render(explore_tab, upload, explore_block)
            with gr.Tab("Few-shot", id="fewshot"):
                fewshot.render(fewshot_tab, upload)
        demo.load(search_tab.library_stats, None, summary, api_name="library_stats")
    demo.queue(default_concurrency_limit=concurrency())
    demo.m3bind_workspace = ws  # for tests and benchmarks: the app's own state
    demo.m3bind_private = private
    return demo


def launch_options(workspace: Workspace) -> dict[str, Any]:
    """Where and how to serve: localhost unless told otherwise (a Space listens on all interfaces)."""
    host = os.environ.get("GRADIO_SERVER_NAME") or ("0.0.0.0" if os.environ.get("SPACE_ID") else "127.0.0.1")
    return dict(server_name=host, server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
                max_threads=MAX_THREADS, state_session_capacity=SESSIONS, max_file_size=MAX_UPLOAD,
                allowed_paths=[str(workspace.examples_dir)], show_error=False,
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


def malloc_trimmer() -> Callable[[], None]:
    """glibc gives each request thread a heap of its own (up to eight per core) and keeps what is freed there, so
    the app's memory climbs with every large decode while what it holds does not. Caps the heaps at two and
    returns the call that hands freed pages back to the system (a no-op without glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, 2)  # M_ARENA_MAX
        return lambda: libc.malloc_trim(0)
    except (OSError, AttributeError):
        return lambda: None


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
    trim = malloc_trimmer()
    for tick in itertools.count(1):  # a stop signal is seen within half a second; freed memory goes back every 5 s
        if stop.wait(0.5):
            break
        if tick % 10 == 0:
            trim()
    log.info("stopping: closing the server and removing the app's temporary folders")
    demo.close()
    demo.m3bind_workspace.library.close()
    private.remove()


if __name__ == "__main__":
    main()

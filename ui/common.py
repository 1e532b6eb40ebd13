"""What every tab of the app shares: escaping untrusted text, turning errors into messages, reading the
Classify tab's inputs into ``ReadOptions``, and the library's one-line summary."""

from __future__ import annotations

import functools
import html
import logging
import os
import re
from typing import Any, Callable

import gradio as gr

import m3bind
from m3bind.workspace import ReadOptions, Workspace

log = logging.getLogger("m3bind.app")

AUTO = "auto"
# Toasts sit at the bottom right, clear of the status line, and go after a few seconds
TOAST_S = 6
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


def allow_reset() -> bool:
    """Resetting the shared library, or removing its example items, needs the operator's consent."""
    return os.environ.get("M3BIND_ALLOW_RESET", "").strip().lower() in ("1", "true", "yes")


def friendly(action: str) -> Callable:
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
                raise gr.Error(plain(exc), title=f"Cannot {action}", print_exception=False,
                               duration=TOAST_S) from None
            except Exception:
                log.exception("unexpected failure while trying to %s", action)
                raise gr.Error("Something went wrong on the server; the details are in its log. "
                               "Try again, or with another file.", title=f"Cannot {action}",
                               print_exception=False, duration=TOAST_S) from None
        return run
    return wrap


def warn(message: str, title: str) -> None:
    """A toast that goes by itself (the page's own message stays)."""
    gr.Warning(message, title=title, duration=TOAST_S)


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


def modality_or_none(choice: str | None) -> str | None:
    return None if choice in (None, "", AUTO) else choice


def sampling_rate(value: Any) -> float | None:
    """The ECG sampling rate box: empty (or 0, from older clients) means "not given"."""
    if value in (None, ""):
        return None
    try:
        rate = float(value)
    except (TypeError, ValueError):
        raise m3bind.OptionError(f"{value!r} is not a sampling rate; type a number of Hz, e.g. 500.") from None
    return rate or None


def read_options(ws: Workspace, files: Any, modality: str | None, centre: float | None, width: float | None,
                 rate: Any) -> ReadOptions:
    """How to read the upload, from the Classify tab's boxes. A window equal to the file's own is dropped, so
    the file's VOI function (which may be non-linear) applies rather than a linear window with the same numbers."""
    rate = sampling_rate(rate)
    window = None if centre is None or width is None or width <= 0 else (float(centre), float(width))
    if window is not None and list(window) == ws.read(files, ReadOptions(sampling_rate=rate)).meta.get("window"):
        window = None
    return ReadOptions(modality_or_none(modality), window, rate)


def modality_choices(ws: Workspace) -> list[tuple[str, str]]:
    return [("Auto-detect", AUTO)] + [(m3bind.get_modality(m).title, m) for m in ws.model.modalities]


def library_summary(ws: Workspace) -> str:
    stats = ws.stats()
    parts = ", ".join(f"{m3bind.get_modality(m).title} {n}" for m, n in stats["per_modality"].items())
    return f"**Library:** {stats['count']} items ({parts or 'empty'}) · index {stats['index']}"

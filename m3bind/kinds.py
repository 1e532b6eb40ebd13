"""Input kinds: what every modality of one reader family ("image", "ecg") shares, declared once, here.

A kind says how a file of it is named to a person, how its library thumbnail is drawn and which facts
describe a sample of it. Every modality names its kind (``Modality.kind``); modules ask the kind's table
instead of branching on its name. How a tower prepares a sample is the tower's own ``prepare``
(``m3bind.encoders``), and the config class of a kind's default tower is ``m3bind.config.TOWER_CONFIGS[kind]``.
Adding a kind is one ``register_kind(InputKind(...))`` call, plus a reader and a tower for it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from .errors import ConfigError

if TYPE_CHECKING:
    from PIL import Image as PILImage

    from .sample import Sample

THUMBNAIL_PX = 128  # the long side of a library thumbnail
_ECG_THUMBNAIL_HEIGHT = 48


@dataclass(frozen=True)
class InputKind:
    name: str
    description: str  # what a file of this kind is, for messages: "an image", "an ECG recording"
    item_word: str  # what follows a modality's title: "Chest X-ray image", "12-lead ECG recording"
    draw_thumbnail: Callable[["Sample"], "PILImage.Image | None"]  # the library's small picture, None: nothing
    facts: Callable[["Sample"], list[str]]  # plain facts about a sample for the person who sent it

    def thumbnail(self, sample: "Sample") -> bytes | None:
        """A small PNG of the sample's preview (at most ``THUMBNAIL_PX`` wide), or None if there is nothing to
        draw."""
        image = self.draw_thumbnail(sample)
        if image is None:
            return None
        out = io.BytesIO()
        image.save(out, format="PNG", optimize=True)
        return out.getvalue()


_KINDS: dict[str, InputKind] = {}


def register_kind(kind: InputKind) -> InputKind:
    _KINDS[kind.name] = kind
    return kind


def input_kind(name: str) -> InputKind:
    """The kind named ``name``; a ``ConfigError`` for an unknown one (kinds are declared in code)."""
    try:
        return _KINDS[name]
    except KeyError:
        raise ConfigError(f"unknown input kind {name!r}; known: {', '.join(_KINDS)}") from None


def kind_names() -> list[str]:
    return list(_KINDS)


def thumbnail_png(sample: "Sample") -> bytes | None:
    """The library thumbnail of a sample of any kind (PNG bytes, or None when there is nothing to draw)."""
    return input_kind(sample.kind).thumbnail(sample)


# ------------------------------------------------------------------------------------------- image
def _image_thumbnail(sample: "Sample") -> "PILImage.Image":
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(sample.preview, dtype=np.uint8))
    image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    return image


def _image_facts(sample: "Sample") -> list[str]:
    meta = sample.meta
    h, w = sample.data.shape[:2]  # a large plain image is decoded reduced; its meta keeps the file's size
    facts = [f"{meta.get('width', w)} x {meta.get('height', h)} px"]
    if "window" in meta:
        facts.append(f"window C {meta['window'][0]:g} / W {meta['window'][1]:g} ({meta.get('window_source')})")
    return facts


# --------------------------------------------------------------------------------------------- ECG
def _ecg_thumbnail(sample: "Sample") -> "PILImage.Image | None":
    """Lead II (or the first recorded lead) as a 128 x 48 trace."""
    from PIL import Image, ImageDraw

    from .readers.ecg import LEADS

    preview = np.asarray(sample.preview)
    mask = sample.meta.get("lead_mask") or [True] * len(preview)
    lead = LEADS.index("II") if mask[LEADS.index("II")] else next((i for i, m in enumerate(mask) if m), None)
    if lead is None:
        return None
    trace = np.nan_to_num(preview[lead].astype(np.float64))
    low, high = np.percentile(trace, [1, 99])
    centre, half = (low + high) / 2, max((high - low) / 2, 0.5)  # at least +-0.5 mV of scale
    width, height = THUMBNAIL_PX, _ECG_THUMBNAIL_HEIGHT
    xs = np.linspace(0, width - 1, len(trace))
    ys = (height - 1) / 2 - np.clip((trace - centre) / half, -1, 1) * (height / 2 - 2)
    image = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(image).line(list(zip(xs.tolist(), ys.tolist())), fill=(20, 20, 20), width=1)
    return image


def _ecg_facts(sample: "Sample") -> list[str]:
    from .readers.ecg import LEADS

    meta = sample.meta
    fs, seconds = meta.get("fs_original"), float(meta.get("duration_s", 10))
    span = (f"the first 10 s of {seconds:.0f} s" if seconds > 10.5 else
            f"{seconds:.1f} s, padded to 10 s" if meta.get("padded_s") else f"{seconds:.0f} s")
    missing = [lead for lead, ok in zip(LEADS, meta.get("lead_mask", [])) if not ok]
    return [span + (f", recorded at {fs:g} Hz" if fs else ""),
            f"leads not recorded: {', '.join(missing)}" if missing else "all 12 leads"]


# the two kinds M3Bind reads; a reader that builds samples of one names it through these
IMAGE = register_kind(InputKind(name="image", description="an image", item_word="image",
                                draw_thumbnail=_image_thumbnail, facts=_image_facts))
ECG = register_kind(InputKind(name="ecg", description="an ECG recording", item_word="recording",
                              draw_thumbnail=_ecg_thumbnail, facts=_ecg_facts))

"""The app's working state: one model, its persistent library, the example files, and the uploads.

Everything the web app does with files, the model and the library goes through here, so ``app.py``
only lays out the page. Where things live on disk (``M3BIND_HOME``, default ``~/.cache/m3bind``)::

    examples/                 the example files (see ``m3bind.examples``), the only folder the app serves
    libraries/<fingerprint>/  one library per model, so a new model never mixes with an old library

The library keeps a hash, the user's label and a thumbnail of each item; file names are patient data
(``Doe_John.dcm``), so an upload's name is stored only when the library's owner asks for it
(``keep_names=True``); readers never emit patient identifiers, so none are stored.

A home that cannot be written (read-only ``M3BIND_HOME``) does not stop the app: a saved library is opened
read-only (adding, removing and resetting are refused with a message), and without one an in-memory library
of the examples is used (nothing is saved); ``notice`` says which.
"""

from __future__ import annotations

import html
import os
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from . import figures
from .batch import decode_size, group_records, input_sha256, library_hashes
from .errors import CorruptFileError, InputError
from .examples import EXAMPLES, example_files, get_example
from .explain import Explanation, explain
from .explore import LibraryMap, MapCache
from .fewshot import FewShotResult, LogisticProbe, PrototypeClassifier
from .kinds import input_kind
from .library import Hit, Library
from .modalities import get_modality
from .readers import load_input
from .readers.image import PREVIEW_SIDE
from .sample import Sample
from .search import search

Progress = Callable[[float, str], None]
# Decoded uploads are kept, so classify/search/explore of one upload decode it once; a 4000 px DICOM
# decodes to ~190 MB, so the cache is bounded by bytes, and by count (each entry's metadata and embedding).
_CACHE_BYTES = 192 * 2**20
_CACHE_ENTRIES = 64
_GONE = "An uploaded file is no longer available (uploads are kept for a few minutes); upload it again."
_ADD_BATCH = 32  # inputs decoded at a time when adding many files to the library
PREVIEW_MIN_SIDE = 384  # smaller images are enlarged for the page


@dataclass(frozen=True)
class ReadOptions:
    """How to read an upload: the user's modality override, a DICOM window (centre, width), and the
    sampling rate of a CSV/NPY ECG that does not state it."""

    modality: str | None = None
    window: tuple[float, float] | None = None
    sampling_rate: float | None = None


def default_home() -> Path:
    return Path(os.environ.get("M3BIND_HOME") or Path.home() / ".cache" / "m3bind").expanduser()


# --------------------------------------------- what a page shows of each input kind (its facts: m3bind.kinds)
def _enlarged(pixels: np.ndarray) -> Image.Image:
    """An image for the page, small ones enlarged by an integer factor (nearest neighbour: every pixel stays a
    visible square, nothing is interpolated)."""
    factor = max(1, PREVIEW_MIN_SIDE // max(pixels.shape[:2]))
    image = Image.fromarray(np.repeat(np.repeat(pixels, factor, axis=0), factor, axis=1) if factor > 1 else pixels)
    # Gradio writes it as PNG with the default zlib level: 110 ms for a 512-px photo. Level 1, set on the
    # image as Pillow allows, takes a fifth of that for a file 15% larger.
    image.encoderinfo = {"compress_level": 1}
    return image


def _image_preview(sample: Sample) -> Image.Image:
    return _enlarged(sample.preview)


def _ecg_preview(sample: Sample) -> Any:
    return figures.ecg_figure(sample, get_modality(sample.modality).title)


def _image_explained(sample: Sample, explanation: Explanation) -> Image.Image:
    return _enlarged(np.asarray(explanation.heatmap))


def _ecg_explained(sample: Sample, explanation: Explanation) -> Any:
    """The ECG plot with each second shaded by how much flattening it lowers the top finding's score."""
    figure = _ecg_preview(sample)
    strongest = max(float(explanation.importance.max()), 1e-9)
    for (start, stop), value in zip(explanation.regions, explanation.importance):
        if value > 0:
            figure.add_vrect(x0=start, x1=stop, fillcolor="#e61e1e", opacity=0.35 * value / strongest,
                             line_width=0, layer="below")
    label = html.escape(explanation.label)  # plotly titles take HTML-like markup; a finding is typed text
    figure.update_layout(title=dict(text=f"Seconds that drive \"{label}\" (darker: more)"))
    return figure


@dataclass(frozen=True)
class KindView:
    """What a page shows of one input kind: its preview (a PIL image or a plotly figure), and an explanation
    drawn over that preview."""

    preview: Callable[[Sample], Any]
    explained: Callable[[Sample, Explanation], Any]


KIND_VIEWS = {"image": KindView(_image_preview, _image_explained), "ecg": KindView(_ecg_preview, _ecg_explained)}


class UploadCache:
    """Decoded uploads and their embeddings, least recently used first out: at most ``max_bytes`` of decoded
    data (the newest entry always stays) and ``max_entries`` entries, and none unused for ``ttl_s`` seconds
    once ``expire`` runs (an upload's file is gone by then, so its entry could never be used again)."""

    def __init__(self, max_bytes: int = _CACHE_BYTES, max_entries: int = _CACHE_ENTRIES,
                 ttl_s: float | None = None):
        self.max_bytes, self.max_entries, self.ttl_s = max_bytes, max_entries, ttl_s
        self._entries: OrderedDict[tuple, tuple[Sample, np.ndarray | None, float]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def nbytes(self) -> int:
        with self._lock:
            return sum(_nbytes(sample) for sample, _, _ in self._entries.values())

    def get(self, key: tuple) -> tuple[Sample, np.ndarray | None] | None:
        with self._lock:
            if key not in self._entries:
                return None
            sample, vector, _ = self._entries.pop(key)
            self._entries[key] = (sample, vector, time.monotonic())
            return sample, vector

    def put(self, key: tuple, sample: Sample, vector: np.ndarray | None) -> None:
        with self._lock:
            self._entries.pop(key, None)
            self._entries[key] = (sample, vector, time.monotonic())
            total = sum(_nbytes(s) for s, _, _ in self._entries.values())
            while len(self._entries) > 1 and (total > self.max_bytes or len(self._entries) > self.max_entries):
                total -= _nbytes(self._entries.popitem(last=False)[1][0])

    def expire(self) -> int:
        """Drops the entries unused for ``ttl_s`` seconds; returns how many."""
        if self.ttl_s is None:
            return 0
        cutoff = time.monotonic() - self.ttl_s
        with self._lock:
            old = [key for key, (_, _, used) in self._entries.items() if used < cutoff]
            for key in old:
                del self._entries[key]
        return len(old)


class Workspace:
    def __init__(self, model: Any, home: str | os.PathLike | None = None, *, keep_names: bool = False,
                 read_only: bool = False, cache_ttl_s: float | None = None):
        self.model = model
        self.home = Path(home) if home is not None else default_home()
        self.keep_names = bool(keep_names)  # the owner's opt-in: store uploads' base names in the library
        self.read_only = bool(read_only) or not _writable(self.home)
        self.persistent = True  # False: an in-memory library, nothing saved (an unwritable home, no library)
        self.examples_dir = self.home / "examples"
        try:
            self.examples = example_files(self.examples_dir)
        except OSError:  # an unwritable home without the examples: they go to a private temporary folder
            self.examples_dir = Path(tempfile.mkdtemp(prefix="m3bind-examples-"))
            self.examples = example_files(self.examples_dir)
        self._example_hashes = {input_sha256((path,)) for path in self.examples.values()}
        self.library_dir = self.home / "libraries" / model.fingerprint
        # Plain 8-bit images are read no larger than the towers and the preview need (larger ones are resampled
        # to that size as they are read; DICOM is untouched): a 1411-px PNG photo takes 30% less time.
        self.decode_size = max(decode_size(model, thumbnails=True), PREVIEW_SIDE)
        self.notice = ""  # a one-time remark for the user (e.g. a damaged library was set aside)
        self._write_lock = threading.Lock()
        self.cache = UploadCache(ttl_s=cache_ttl_s)  # decoded uploads (``expire_cache`` drops idle ones)
        self.maps = MapCache()
        self.library = self._open_library()

    # ------------------------------------------------------------------------------------ library
    def _open_library(self) -> Library:
        if self.library_dir.exists():
            try:
                library = Library.load(self.library_dir, self.model.fingerprint)
                if self.read_only:
                    self.notice = ("The library folder cannot be written, so the library is open read-only: it "
                                   "can be searched and explored, but files cannot be added or removed.")
                return library
            except CorruptFileError:
                if self.read_only:
                    self.notice = "The saved library could not be read; "
                else:
                    aside = self.library_dir.with_name(f"{self.library_dir.name}.damaged-{int(time.time())}")
                    os.rename(self.library_dir, aside)
                    self.notice = (f"The saved library could not be read and was set aside ({aside.name}); "
                                   "a new one was started with the example files.")
        library = Library.for_model(self.model)
        self._add_examples(library)
        if self.read_only:
            self.persistent = False
            self.notice += ("The library folder (M3BIND_HOME) cannot be written, so the library is kept in memory "
                            "only: it holds the example files, and files added now are lost when the app stops.")
        else:
            library.save(self.library_dir)
        return library

    def _check_writable(self, action: str) -> None:
        if self.read_only and self.persistent:
            raise InputError(f"This library is read-only (its folder cannot be written), so files cannot be "
                             f"{action}; nothing was changed.")

    def _save(self, action: str) -> None:
        """Saves after a change; if that fails, the library is reloaded from disk (memory stays what disk
        holds) and the user is told."""
        if not self.persistent:
            return
        try:
            self.library.save(self.library_dir)
        except OSError as exc:
            old, self.library = self.library, Library.load(self.library_dir, self.model.fingerprint)
            old.close()
            raise InputError(f"The library could not be saved ({exc.strerror or type(exc).__name__}), so nothing "
                             f"was {action}.") from None

    def is_example(self, item_id: int) -> bool:
        """True for a library item made from one of the example files."""
        try:
            return self.library.item(int(item_id))["sha256"] in self._example_hashes
        except KeyError:
            return False

    def shown_source(self, source: str | None, sha256: str | None) -> str | None:
        """The file name a page may show: an example's (public) name, or any name when the owner opted in."""
        return source if self.keep_names or sha256 in self._example_hashes else None

    def _add_examples(self, library: Library) -> None:
        samples, items = [], []
        for example in EXAMPLES:
            if example.modality not in self.model.modalities:
                continue  # a model without that tower: the example stays a button, not a library item
            path = self.examples[example.key]
            samples.append(load_input(path, example.modality, decode_size=self.decode_size))
            items.append({"source": path.name, "sha256": input_sha256((path,)), "notes": example.notes})
        library.add_samples(self.model, samples, items)

    def reset_library(self) -> dict[str, Any]:
        """Back to the examples only: the saved library is replaced."""
        with self._write_lock:
            self._check_writable("reset")
            fresh = Library.for_model(self.model)
            self._add_examples(fresh)
            if self.persistent:
                try:
                    fresh.save(self.library_dir)
                except OSError as exc:
                    fresh.close()
                    raise InputError(f"The library could not be saved ({exc.strerror or type(exc).__name__}), so "
                                     "it was not reset.") from None
            old, self.library = self.library, fresh
            old.close()
        return self.library.stats()

    def add_files(self, files: Sequence[str | os.PathLike], label: str | None = None, modality: str | None = None,
                  progress: Progress | None = None) -> dict[str, Any]:
        """Reads, embeds and adds uploaded files (a WFDB record's files count as one input), then saves.

        Returns {"added", "skipped" (already in the library), "refused": [(name, reason)], "routed", "stats"};
        ``routed`` says, for each added input, its place in the upload (``input``, from 1), its modality and how
        that was settled (``source``: "user" given, "dicom" from the header, "detector" recognised, "guess"
        guessed) with the detector's confidence, so a wrongly routed batch shows.
        """
        label = (label or "").strip() or None
        records, refused = _records(files)
        added, skipped, routed = 0, 0, []
        with self._write_lock:
            self._check_writable("added")
            known = library_hashes(self.library)
            samples, items = [], []
            for i, record in enumerate(records):
                if progress is not None:
                    progress(i / max(1, len(records)), f"Reading and embedding input {i + 1} of {len(records)}")
                try:
                    sha = input_sha256(record)
                    if sha in known:
                        skipped += 1
                        continue
                    samples.append(load_input(list(record) if len(record) > 1 else record[0], modality,
                                              decode_size=self.decode_size))
                except InputError as exc:
                    refused.append((record[0].name, str(exc)))
                    continue
                known.add(sha)
                items.append({"source": record[0].name if self.keep_names else None, "sha256": sha,
                              "label": label})
                routed.append({"input": i + 1})
                if len(samples) == _ADD_BATCH or i == len(records) - 1:
                    added += self._add_batch(samples, items, routed)
                    samples, items = [], []  # decoded inputs are not kept: memory stays one batch
            if samples:
                added += self._add_batch(samples, items, routed)
            if added:
                self._save("added")
        return {"added": added, "skipped": skipped, "refused": refused, "routed": routed,
                "stats": self.library.stats()}

    def _add_batch(self, samples: list[Sample], items: list[dict[str, Any]], routed: list[dict[str, Any]]) -> int:
        """Adds one batch; the samples' modalities, as the model routed them, complete the batch's ``routed``."""
        count = len(self.library.add_samples(self.model, samples, items))
        for entry, s in zip(routed[-len(samples):], samples):
            entry.update(modality=s.modality, source=s.meta.get("modality_source"),
                         confidence=s.meta.get("modality_confidence"), unsure=bool(s.meta.get("modality_unsure")))
        return count

    def remove_item(self, item_id: int) -> dict[str, Any]:
        """Takes one item out of the library (a file added by mistake, say) and saves."""
        with self._write_lock:
            self._check_writable("removed")
            if not self.library.remove([item_id]):
                raise InputError(f"The library holds no item {item_id}; search again and pick a result.")
            self._save("removed")
        return self.library.stats()

    def stats(self) -> dict[str, Any]:
        """The library's size, per modality, and its index (``Library.stats``)."""
        return self.library.stats()

    def thumbnail(self, item_id: int) -> bytes | None:
        return self.library.item(item_id)["thumbnail"]

    def item_labels(self) -> dict[str, list[int]]:
        """Label -> ids of the library items that carry it (for few-shot classes picked from the library)."""
        by_label: dict[str, list[int]] = {}
        ids, _ = self.library.vectors()
        for item_id in ids:
            label = self.library.item(int(item_id))["label"]
            if label:
                by_label.setdefault(label, []).append(int(item_id))
        return by_label

    @property
    def trained(self) -> bool:
        """Whether the model went through ``train/``: training fits every tower's centre (its mean embedding,
        ``train.stages.fit_centres``); a model whose centres are all zero was never trained."""
        return any(bool(centre.abs().sum() > 0) for centre in self.model.centres.buffers())

    def describe(self, sample: Sample) -> list[str]:
        """The facts a page shows about an input (its size, window, span, leads), per reader kind."""
        return [str(sample.meta.get("format", "")).upper(), *input_kind(sample.kind).facts(sample)]

    def preview(self, sample: Sample) -> Any:
        """What a page shows of an input: a PIL image, or for an ECG a plotly figure."""
        return KIND_VIEWS[sample.kind].preview(sample)

    # ------------------------------------------------------------------------------------ uploads
    def read(self, files: str | os.PathLike | Sequence[str | os.PathLike] | None,
             options: ReadOptions = ReadOptions()) -> Sample:
        """One uploaded input (an image, a DICOM file, an ECG file or the files of one WFDB record)."""
        return self._entry(files, options)[0]

    def embed(self, files: Any, options: ReadOptions = ReadOptions()) -> np.ndarray:
        key = self._key(files, options)
        sample, vector = self._entry(files, options)
        if vector is None:
            vector = np.asarray(self.model.embed(sample), dtype=np.float32)
            self.cache.put(key, sample, vector)
        return vector

    def expire_cache(self) -> int:
        """Drops the decoded uploads unused for ``cache_ttl_s`` seconds (run by the app's upload sweeper)."""
        return self.cache.expire()

    def _entry(self, files: Any, options: ReadOptions) -> tuple[Sample, np.ndarray | None]:
        key = self._key(files, options)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        records, refused = _records(files)
        if refused:
            raise InputError(refused[0][1])
        if len(records) != 1:
            raise InputError("Give one input: one image or DICOM file, or the files of one ECG record "
                             f"(.hea with its .dat or .mat); {len(records)} were given.")
        record = records[0]
        sample = load_input(list(record) if len(record) > 1 else record[0], options.modality, window=options.window,
                            sampling_rate=options.sampling_rate, decode_size=self.decode_size)
        self.model.route(sample)  # a plain image's modality comes from the model's detector
        self.cache.put(key, sample, None)
        return sample, None

    @staticmethod
    def _key(files: Any, options: ReadOptions) -> tuple:
        parts = []
        for p in _as_list(files):
            try:
                st = os.stat(p)
            except OSError:
                raise InputError(_GONE) from None  # no file name: names can be patient names
            parts.append((str(p), st.st_size, st.st_mtime_ns))
        return tuple(parts), options

    def classify(self, files: Any, labels: Sequence[str], options: ReadOptions = ReadOptions()
                 ) -> tuple[Sample, dict[str, float]]:
        """Zero-shot probabilities of an upload over candidate findings, from its cached embedding."""
        sample = self.read(files, options)
        return sample, self.model.classify(sample, labels, embedding=self.embed(files, options))

    def explain(self, files: Any, labels: Sequence[str], options: ReadOptions = ReadOptions()
                ) -> tuple[Explanation, Any]:
        """Why the top finding won: its words' and the input's regions' shares (``m3bind.explain``), and
        the view of it a page shows (a heatmap over the image, or the ECG plot shaded per second)."""
        sample = self.read(files, options)
        explanation = explain(self.model, sample, labels, embedding=self.embed(files, options))
        return explanation, KIND_VIEWS[sample.kind].explained(sample, explanation)

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        return self.model.embed_text(list(texts))

    def example_path(self, key: str) -> Path:
        get_example(key)
        return self.examples[key]

    # ------------------------------------------------------------------------------------- search
    def search_text(self, text: str, k: int = 12, modalities: Sequence[str] | None = None,
                    per_modality: bool = False) -> list[Hit]:
        """Items nearest a finding, through ``m3bind.search.search``: the plain ranking of the shared space,
        or with ``per_modality`` the best of each modality, so every modality shows up even when one
        dominates the raw similarity scale."""
        return search(self.library, self.model, text or "", k, modality=modalities or None,
                      per_modality=per_modality)

    def search_similar(self, files: Any, options: ReadOptions = ReadOptions(), k: int = 12,
                       other_modalities: bool = True) -> tuple[Sample, list[Hit]]:
        """Items nearest an uploaded input; with ``other_modalities`` only those of other modalities, the
        query centred and the best of each modality shown (``m3bind.search.search``)."""
        sample = self.read(files, options)
        query = self.embed(files, options)  # cached: the upload was embedded once
        exclude = sample.modality if other_modalities else None
        return sample, search(self.library, self.model, query, k, exclude_modality=exclude,
                              per_modality=other_modalities, query_modality=sample.modality)

    # ------------------------------------------------------------------------------------ explore
    def library_map(self) -> LibraryMap:
        return self.maps.get(self.library)

    def shown_sources(self, library_map: LibraryMap) -> list[str | None]:
        """The file names a page may show for a map's items (``shown_source``): examples' only, by default."""
        return [self.shown_source(src, self.library.item(int(i))["sha256"]) if src else None
                for i, src in zip(library_map.ids, library_map.sources)]

    # ----------------------------------------------------------------------------------- few-shot
    def fewshot(self, query: Any, classes: dict[str, Sequence[Any]], method: str = "prototype",
                options: ReadOptions = ReadOptions(), use_library: bool = False,
                progress: Progress | None = None) -> FewShotResult:
        """Calibrated probabilities of the query over classes learnt from a few examples each, with each
        class's support size.

        ``classes`` maps a class name to its uploaded example files (a WFDB record's files form one example);
        with ``use_library`` the library items carrying that label are added to its examples.
        """
        classes = {name.strip(): list(inputs) for name, inputs in classes.items() if name and name.strip()}
        vectors, labels = [], []
        library_ids = self.item_labels() if use_library else {}
        total = sum(len(v) for v in classes.values())
        done = 0
        for name, inputs in classes.items():
            try:
                records, refused = _records(inputs) if inputs else ([], [])
                if refused:
                    raise InputError(refused[0][1])
                for record in records:
                    if progress is not None:
                        progress(done / max(1, total), f"Embedding examples of {name}")
                    vectors.append(self.embed(list(record)))
                    labels.append(name)
                    done += 1
            except InputError as exc:
                raise InputError(f"An example of \"{name}\" cannot be used: {exc}") from None
            ids = library_ids.get(name, [])
            if ids:
                vectors.extend(self.library.vectors(ids)[1])
                labels.extend([name] * len(ids))
        if len(set(labels)) < 2:
            raise InputError("Give examples (files, or library items with that label) for at least two classes.")
        if method == "prototype":
            clf: Any = PrototypeClassifier(temperature=1.0 / self.model.config.logit_scale)
        elif method == "probe":
            clf = LogisticProbe()
        else:
            raise InputError(f"Unknown few-shot method {method!r}; use \"prototype\" or \"probe\".")
        clf.fit(np.stack(vectors), labels)
        probs = clf.predict_proba(self.embed(query, options)[None])[0]
        return FewShotResult({c: float(p) for c, p in zip(clf.classes_, probs)},
                             {c: labels.count(c) for c in clf.classes_})


def _writable(folder: Path) -> bool:
    """Whether files can be made in ``folder`` (made if missing): tried, since permissions alone do not
    say it (a read-only mount, an immutable folder, root)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".m3bind-write-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
        return True
    except OSError:
        return False


def _nbytes(sample: Sample) -> int:
    return int(np.asarray(sample.data).nbytes + np.asarray(sample.preview).nbytes)


def _as_list(files: Any) -> list:
    if files is None:
        raise InputError("Upload a file first (or pick an example).")
    if isinstance(files, (str, os.PathLike)):
        return [files]
    items = [f for f in files if f]
    if not items:
        raise InputError("Upload a file first (or pick an example).")
    return items


def _records(files: Any) -> tuple[list[tuple[Path, ...]], list[tuple[str, str]]]:
    """Uploaded files grouped into inputs, a WFDB record's files together, by their original paths, in upload
    order; plus (file name, reason) of the files refused while grouping.

    Uploads arrive each in its own temporary folder, so they are grouped as if they sat side by side in
    one folder (same-named files apart). Grouping reads names only: nothing is copied or linked.
    """
    side_by_side: dict[Path, Path] = {}
    for i, original in enumerate(Path(f) for f in _as_list(files)):
        if not original.is_file():
            raise InputError(_GONE)
        name = Path("uploads", original.name)
        side_by_side[Path("uploads", f"dup{i}", original.name) if name in side_by_side else name] = original
    records, refused = group_records(list(side_by_side))
    uploaded = {p: i for i, p in enumerate(side_by_side)}
    records = sorted(records, key=lambda record: min(uploaded[p] for p in record))
    return ([tuple(side_by_side[p] for p in record) for record in records],
            [(Path(refusal[0]).name, refusal[1]) for refusal in refused])

"""The Library: embedded items of every modality kept searchable, and saved as one directory.

A small front over two parts, each with its own module:

* ``m3bind.index.VectorIndex``: the vectors, in faiss (exact while small, IVF when large, calibrated
  modality filters); see that module for the choices and their measurements.
* ``m3bind.store.ItemStore``: the metadata, in SQLite (sources reduced to their base name), and the
  atomic save of the library directory.

The front assigns ids (increasing, never reused), keeps the two parts in step under one lock (an add the
index refuses is rolled back in the store), checks that a model fits the library's embedding space, and
embeds samples with their thumbnails (``m3bind.kinds``). A saved library is a directory of three files:
``index.faiss``, ``items.sqlite`` and ``library.json`` (format version, dimension, model fingerprint and
the index's settings and state).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .errors import (ConfigError, CorruptFileError, InputError, LibraryMismatchError, OptionError, UnknownItemError,
                     WrongModalityError)
from .index import DEFAULT_EXACT_THRESHOLD, DEFAULT_TARGET_RECALL, VectorIndex
from .kinds import thumbnail_png
from .sample import Sample
from .store import ItemStore, item_row, recover_directory, save_directory

FORMAT_VERSION = 1
_INDEX_FILE, _ITEMS_FILE, _META_FILE = "index.faiss", "items.sqlite", "library.json"

__all__ = ["FORMAT_VERSION", "Hit", "Library", "LibraryMismatchError"]


@dataclass(frozen=True)
class Hit:
    id: int
    score: float  # cosine similarity
    modality: str
    label: str | None
    source: str | None
    sha256: str | None
    notes: str | None
    added_at: str


class Library:
    """A persistent, searchable collection of embedded items of every modality."""

    def __init__(self, dim: int, model_fingerprint: str, index_factory: str | None = None, *,
                 exact_threshold: int = DEFAULT_EXACT_THRESHOLD, target_recall: float = DEFAULT_TARGET_RECALL):
        """An empty library of ``dim``-dimensional vectors of one model; ``index_factory``, ``exact_threshold``
        and ``target_recall`` tune the vector index (``m3bind.index.VectorIndex``)."""
        self.fingerprint = str(model_fingerprint)
        self._vectors = VectorIndex(dim, index_factory, exact_threshold=exact_threshold, target_recall=target_recall)
        self._items = ItemStore()
        self._lock = threading.RLock()
        self._next_id = 0

    @classmethod
    def for_model(cls, model: Any, index_factory: str | None = None, **kwargs: Any) -> "Library":
        """An empty library for ``model``'s embedding space."""
        return cls(model.dim, model.fingerprint, index_factory, **kwargs)

    @property
    def dim(self) -> int:
        return self._vectors.dim

    # ---------------------------------------------------------------------------------------- core
    def __len__(self) -> int:
        return len(self._vectors)

    def close(self) -> None:
        """Deletes the working copy of the metadata; the library is unusable afterwards."""
        self._items.close()

    def __enter__(self) -> "Library":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, embeddings: np.ndarray, items: Sequence[dict[str, Any]]) -> list[int]:
        """Adds (N, D) unit vectors with one metadata dict each; returns their new ids.

        Item keys: ``modality`` (required, a registered modality), ``source`` (reduced to its base
        name), ``sha256``, ``label``, ``notes``, ``thumbnail`` (PNG bytes).
        """
        x = self._vectors.as_matrix(embeddings, "embeddings")
        if len(items) != len(x):
            raise ConfigError(f"{len(x)} embeddings but {len(items)} items")
        rows = [item_row(item) for item in items]
        with self._lock:
            ids = np.arange(self._next_id, self._next_id + len(x), dtype=np.int64)
            with self._items.transaction():  # rolled back if the index fails
                self._items.insert(ids.tolist(), rows, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
                self._vectors.add(x, ids, [row[0] for row in rows])
            self._next_id += len(x)
            self._vectors.calibrate_stale_filters()
        return ids.tolist()

    def remove(self, ids: Iterable[int]) -> int:
        """Removes items by id (unknown ids are ignored); returns how many were removed."""
        with self._lock:
            known = self._vectors.present(ids)
            if len(known) == 0:
                return 0
            with self._items.transaction():
                self._items.delete(known.tolist())
                return self._vectors.remove(known)

    def search(self, query: np.ndarray, k: int = 10, modality: str | Iterable[str] | None = None,
               exclude_modality: str | Iterable[str] | None = None,
               exact: bool = False) -> list[Hit] | list[list[Hit]]:
        """The k most similar items to a (D,) query, or one list per row of a (Q, D) batch.

        ``modality`` keeps only those modalities; ``exclude_modality`` drops some (cross-modal search).
        ``exact`` forces exact results from an approximate index (every list holding a selected item is
        scanned); a rare modality is always searched exactly.
        """
        single = np.ndim(query) == 1
        q = self._vectors.as_matrix(np.atleast_2d(query), "query")
        if k < 1:
            raise OptionError("Ask for at least one result.")
        with self._lock:
            found = self._vectors.search(q, k, modality, exclude_modality, exact)
            if found is None:
                results: list[list[Hit]] = [[] for _ in range(len(q))]
            else:
                scores, found_ids = found
                rows = self._items.hit_rows({int(i) for i in found_ids.ravel() if i >= 0})
                results = [[Hit(score=float(s), **rows[int(i)]) for s, i in zip(srow, irow) if i >= 0]
                           for srow, irow in zip(scores, found_ids)]
        return results[0] if single else results

    def item(self, item_id: int) -> dict[str, Any]:
        """Everything stored about one item, thumbnail included; ``UnknownItemError`` (a ``KeyError``) if the
        library holds no such item."""
        with self._lock:
            found = self._items.item(item_id)
        if found is None:
            raise UnknownItemError(f"The library holds no item {item_id}.")
        return found

    def vectors(self, ids: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, (N, D) vectors) of the given items or of all, in id order: a copy, for plots and exports;
        ``UnknownItemError`` if some id is not in the library."""
        with self._lock:
            return self._vectors.vectors(ids)

    def sha256s(self) -> set[str]:
        """The SHA-256 of every item that has one (to skip files already in the library)."""
        with self._lock:
            return self._items.sha256s()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {**self._vectors.stats(), "dim": self.dim, "fingerprint": self.fingerprint,
                    "exact_threshold": self._vectors.exact_threshold}

    # ------------------------------------------------------------------------------ model helpers
    def add_samples(self, model: Any, samples: Sequence[Sample], items: Sequence[dict[str, Any]] | None = None,
                    batch_size: int = 64) -> list[int]:
        """Embeds samples with ``model`` and adds them with thumbnails made from their previews.

        ``items`` may give per-sample ``source``, ``sha256``, ``label``, ``notes``; the SHA-256 defaults to
        the hash of the decoded data.
        """
        self.check_model(model)
        if items is not None and len(items) != len(samples):
            raise ConfigError(f"{len(samples)} samples but {len(items)} items")
        ids: list[int] = []
        for start in range(0, len(samples), batch_size):
            batch = samples[start:start + batch_size]
            extra = items[start:start + batch_size] if items is not None else [{}] * len(batch)
            rows = [_sample_item(s, e) for s, e in zip(batch, extra)]
            ids += self.add(np.asarray(model.embed(list(batch)), dtype=np.float32).reshape(len(batch), -1), rows)
        return ids

    def search_text(self, model: Any, text: str | Sequence[str], k: int = 10,
                    modality: str | Iterable[str] | None = None, exact: bool = False) -> list[Hit] | list[list[Hit]]:
        """Items closest to a finding written as text (one list per text for a list of texts):
        ``m3bind.search.search`` with a text query."""
        from .search import search

        texts = [text] if isinstance(text, str) else list(text)
        results = [search(self, model, t, k, modality=modality, exact=exact) for t in texts]
        return results[0] if isinstance(text, str) else results

    def search_sample(self, model: Any, sample: Sample, k: int = 10, modality: str | Iterable[str] | None = None,
                      exclude_modality: str | Iterable[str] | None = None, exact: bool = False) -> list[Hit]:
        """Items closest to a sample: ``m3bind.search.search`` with a sample query. With
        ``exclude_modality=sample.modality`` (cross-modal search) the query is centred (``M3BindModel.centre``)
        because only other modalities' items are ranked."""
        from .search import search

        return search(self, model, sample, k, modality=modality, exclude_modality=exclude_modality, exact=exact)

    def check_model(self, model: Any) -> None:
        """Refuses (``LibraryMismatchError``) a model whose embeddings this library cannot hold."""
        if model.fingerprint != self.fingerprint or model.dim != self.dim:
            raise LibraryMismatchError(
                f"This library was built with model {self.fingerprint}; the loaded model is "
                f"{model.fingerprint}. Rebuild the library with the loaded model.")

    # --------------------------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Writes the library directory atomically (``m3bind.store.save_directory``)."""
        target = Path(path)
        if target.exists() and not (target / _META_FILE).is_file():
            raise InputError(f"{target.name} exists and is not an M3Bind library; choose another folder.")

        def write(tmp: Path) -> None:
            with self._lock:
                self._vectors.write(tmp / _INDEX_FILE)
                self._items.write(tmp / _ITEMS_FILE)
                meta = {"version": FORMAT_VERSION, "dim": self.dim, "fingerprint": self.fingerprint,
                        "next_id": self._next_id, **self._vectors.state()}
            (tmp / _META_FILE).write_text(json.dumps(meta, indent=1))

        return save_directory(target, write)

    @classmethod
    def load(cls, path: str | os.PathLike, expected_fingerprint: str | None = None) -> "Library":
        """Opens a saved library; refuses one built with another model than ``expected_fingerprint``."""
        target = Path(path)
        recover_directory(target)
        if not (target / _META_FILE).is_file():
            raise InputError(f"No M3Bind library found at {target.name}.")
        meta = _read_meta(target)
        if expected_fingerprint is not None and meta["fingerprint"] != expected_fingerprint:
            raise LibraryMismatchError(
                f"This library was built with model {meta['fingerprint']}; the loaded model is "
                f"{expected_fingerprint}. Rebuild the library with the loaded model.")
        try:
            lib = cls(meta["dim"], meta["fingerprint"], meta["factory"], exact_threshold=meta["exact_threshold"],
                      target_recall=meta["target_recall"])
        except ValueError as exc:
            raise CorruptFileError(f"The library {target.name} is damaged (its settings are invalid).") from exc
        try:
            lib._items.read(target / _ITEMS_FILE)
            groups = lib._items.ids_by_modality()
            consistent = lib._vectors.restore(target / _INDEX_FILE, meta, groups)
        except (RuntimeError, OSError, sqlite3.Error, ValueError) as exc:
            lib.close()
            raise CorruptFileError(f"The library {target.name} is damaged (its index or items cannot be read).") \
                from exc
        if not consistent:
            lib.close()
            raise CorruptFileError(f"The library {target.name} is damaged (index and items disagree).")
        lib._next_id = max([meta["next_id"]] + [int(ids.max()) + 1 for _, ids in groups if len(ids)])
        return lib


# ---------------------------------------------------------------------------------------- helpers
def _read_meta(target: Path) -> dict[str, Any]:
    """The library's description, its fields typed; refuses a damaged one or another format version."""
    try:
        meta = json.loads((target / _META_FILE).read_text())
        version = meta["version"]
        if version == FORMAT_VERSION:
            typed = {"dim": int(meta["dim"]), "fingerprint": str(meta["fingerprint"]),
                     "factory": str(meta["factory"]), "exact_threshold": int(meta["exact_threshold"]),
                     "target_recall": float(meta["target_recall"]), "next_id": int(meta["next_id"]),
                     "trained_size": int(meta["trained_size"]), "nprobe": int(meta["nprobe"]),
                     "filter_gap": {str(m): (float(g), int(n)) for m, (g, n) in meta.get("filter_gap", {}).items()}}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorruptFileError(f"The library {target.name} is damaged (its description cannot be read).") from exc
    if version != FORMAT_VERSION:
        raise InputError(f"The library {target.name} has format version {version}; this M3Bind reads "
                         f"version {FORMAT_VERSION}. Rebuild it.")
    return typed


def _sample_item(sample: Sample, extra: dict[str, Any]) -> dict[str, Any]:
    if extra.get("modality", sample.modality) != sample.modality:
        raise WrongModalityError(f"An item says {extra['modality']!r} for a {sample.modality!r} sample; "
                                 "the modality is the sample's.")
    item = {"modality": sample.modality, "thumbnail": thumbnail_png(sample), **extra}
    if item.get("sha256") is None:
        item["sha256"] = hashlib.sha256(np.ascontiguousarray(sample.data).tobytes()).hexdigest()
    return item

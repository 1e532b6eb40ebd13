"""The Library: embedded items kept searchable, a faiss index for the vectors and SQLite for the rest.

Choices, and why:

* **Vectors live only in faiss.** Nothing keeps a second copy in Python, so searching a library takes
  about the index's size in RAM. Metadata (modality, label, notes, thumbnail) sits in a private SQLite
  working file on disk; only one small int16 per id (its modality) is held in memory, for filtering.
* **Ids** are assigned here, increase monotonically and are never reused; faiss stores them (an
  ``IndexIDMap2`` over the flat index, the IVF index's own ids later), so they survive removal,
  rebuilds, save and load.
* **Exact while small, IVF when large.** Up to ``exact_threshold`` items the index is ``IndexFlatIP``
  (cosine: vectors are unit norm). Above it the index is rebuilt from the factory string (default
  ``IVF{nlist},Flat``, nlist = 4 sqrt(N), trained on a sample of the library's own vectors) and rebuilt
  again each time the library grows 4x past its last training, so the lists stay balanced. IVF was
  picked over HNSW by measuring (bench/README.md): on 2 cores HNSW32 built 6x slower for the same
  recall and latency, and faiss cannot remove items from it. ``nprobe`` is calibrated at every build:
  held-out items are searched against exact search; the smallest nprobe whose recall@10 reaches
  ``target_recall`` wins.
* **Modality filter** is a faiss ``IDSelectorBitmap`` over ids. A modality with at most
  ``exact_threshold`` items is searched exactly, however rare, by scanning just the IVF lists that hold
  its items. A larger one probes, among the lists holding its items, those whose centroid scores within a
  margin of the query's nearest one: few lists for a query near the modality's items, many for one far from
  all of them (a cross-modal query, whose true top 10 is spread over many lists). The margin is calibrated
  per modality at every build, like ``nprobe``: items of the whole library, most of them of other
  modalities, are searched against exact filtered search, and the smallest margin whose recall@10 reaches
  ``target_recall`` is kept (saved with the library; one saved without it is calibrated when loaded). A
  search over several modalities uses the largest of their margins. ``exact=True`` makes any search exact.
* **Thumbnails**: images become a PNG of at most 128 px; ECGs a 128x48 PNG trace of lead II (or of the
  first recorded lead), so lists of hits need no plotting.
* **Sources** keep only a file's base name and a SHA-256, never a directory path.
* **Saving is atomic**: everything is written and fsynced into a temporary directory beside the target,
  then the old library is renamed to a backup, the new one to the target, and the backup is deleted. A
  crash at any point leaves a loadable library (``load`` renames a lone backup back). One process saves
  a given path at a time.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import sqlite3
import tempfile
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import Any, Iterable, Iterator, Sequence

import faiss
import numpy as np

from .errors import CorruptFileError, InputError, WrongModalityError
from .modalities import get_modality
from .sample import Sample

FORMAT_VERSION = 1
DEFAULT_FACTORY = "IVF{nlist},Flat"
DEFAULT_EXACT_THRESHOLD = 50_000
DEFAULT_TARGET_RECALL = 0.97  # calibrated on held-out items; the promise is >= 0.95 on new queries
THUMBNAIL_PX = 128
ITEM_FIELDS = ("modality", "source", "sha256", "label", "notes", "thumbnail")

_INDEX_FILE, _ITEMS_FILE, _META_FILE = "index.faiss", "items.sqlite", "library.json"
_REGROW = 4  # retrain the IVF index when the library has grown this many times past its training size
_CALIBRATION_QUERIES = 256
_CALIBRATION_K = 10
_FILTER_CALIBRATION_QUERIES = 1024  # the 97th percentile of a filter's probing margin is noisy: more queries
_TRAIN_PER_LIST = 40  # k-means sample size per IVF list (faiss asks for at least 39)
_TRAIN_ITERATIONS = 10
_MIN_EXACT_THRESHOLD = 1_000
# Below this many queries faiss works on one query per thread anyway, and waking idle OpenMP threads
# costs more than it brings (tens of ms on a busy 2-core machine), so small batches run single-threaded.
_PARALLEL_BATCH = 20
_SCHEMA = """CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY, modality TEXT NOT NULL, source TEXT, sha256 TEXT, label TEXT, notes TEXT,
    thumbnail BLOB, added_at TEXT NOT NULL)"""
_HIT_COLUMNS = "id, modality, label, source, sha256, notes, added_at"


class LibraryMismatchError(InputError):
    """The library and the model (or the vectors given) come from different embedding spaces."""


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
        if dim < 1:
            raise ValueError("dim must be positive")
        if exact_threshold < _MIN_EXACT_THRESHOLD:
            raise ValueError(f"exact_threshold must be at least {_MIN_EXACT_THRESHOLD}")
        if not 0 < target_recall <= 1:
            raise ValueError("target_recall must be in (0, 1]")
        self.dim = int(dim)
        self.fingerprint = str(model_fingerprint)
        self.index_factory = index_factory or DEFAULT_FACTORY
        self.exact_threshold = int(exact_threshold)
        self.target_recall = float(target_recall)
        _check_factory(self.dim, self.index_factory)
        self._lock = threading.RLock()
        self._next_id = 0
        self._trained_size = 0  # items the current IVF index was trained with; 0 while exact
        self._nprobe = 0
        # modality -> (probing margin of a search filtered to it, its items when that was calibrated)
        self._filter_gap: dict[str, tuple[float, int]] = {}
        self._modality_names: list[str] = []
        self._modality_of = np.full(0, -1, dtype=np.int16)  # code per id, -1 where absent
        self._counts: np.ndarray | None = None  # items per modality code, recomputed after changes
        self._selectors: dict[frozenset[int], tuple[np.ndarray, Any, Any]] = {}
        self._index = _flat_index(self.dim)
        fd, db_path = tempfile.mkstemp(prefix="m3bind-library-", suffix=".sqlite")
        os.close(fd)
        self._db = _open_working_db(db_path)
        self._finalizer = weakref.finalize(self, _discard_working_db, self._db, db_path)

    @classmethod
    def for_model(cls, model: Any, index_factory: str | None = None, **kwargs: Any) -> "Library":
        """An empty library for ``model``'s embedding space."""
        return cls(model.dim, model.fingerprint, index_factory, **kwargs)

    # ---------------------------------------------------------------------------------------- core
    def __len__(self) -> int:
        return int(self._index.ntotal)

    def close(self) -> None:
        """Deletes the working copy of the metadata; the library is unusable afterwards."""
        self._finalizer()

    def __enter__(self) -> "Library":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, embeddings: np.ndarray, items: Sequence[dict[str, Any]]) -> list[int]:
        """Adds (N, D) unit vectors with one metadata dict each; returns their new ids.

        Item keys: ``modality`` (required, a registered modality), ``source`` (reduced to its base
        name), ``sha256``, ``label``, ``notes``, ``thumbnail`` (PNG bytes).
        """
        x = self._as_matrix(embeddings, "embeddings")
        if len(items) != len(x):
            raise ValueError(f"{len(x)} embeddings but {len(items)} items")
        rows = [_item_row(item) for item in items]
        with self._lock:
            ids = np.arange(self._next_id, self._next_id + len(x), dtype=np.int64)
            codes = np.array([self._modality_code(row[0]) for row in rows], dtype=np.int16)
            added_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            with self._db:  # rolled back if faiss fails below
                self._db.executemany(
                    "INSERT INTO items (id, modality, source, sha256, label, notes, thumbnail, added_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [(int(i), *row, added_at) for i, row in zip(ids, rows)])
                total = len(self) + len(x)
                if total > self.exact_threshold and (self._trained_size == 0 or
                                                     total > _REGROW * self._trained_size):
                    self._rebuild(x, ids, codes)
                else:
                    self._index.add_with_ids(x, ids)
            self._next_id += len(x)
            self._set_modality(ids, codes)
            self._calibrate_stale_filters()
        return ids.tolist()

    def remove(self, ids: Iterable[int]) -> int:
        """Removes items by id (unknown ids are ignored); returns how many were removed."""
        wanted = np.unique(np.fromiter((int(i) for i in ids), dtype=np.int64))
        with self._lock:
            known = wanted[(wanted >= 0) & (wanted < len(self._modality_of))]
            known = known[self._modality_of[known] >= 0]
            if len(known) == 0:
                return 0
            with self._db:
                self._db.executemany("DELETE FROM items WHERE id = ?", [(int(i),) for i in known])
                # the IVF direct map (a hash table) removes only listed ids; the flat map wants a set
                selector = faiss.IDSelectorArray(known) if self._trained_size else faiss.IDSelectorBatch(known)
                removed = int(self._index.remove_ids(selector))
            self._set_modality(known, np.full(len(known), -1, dtype=np.int16))
            if self._trained_size and len(self) <= self.exact_threshold // 2:
                self._rebuild()
        return removed

    def search(self, query: np.ndarray, k: int = 10, modality: str | Iterable[str] | None = None,
               exclude_modality: str | Iterable[str] | None = None,
               exact: bool = False) -> list[Hit] | list[list[Hit]]:
        """The k most similar items to a (D,) query, or one list per row of a (Q, D) batch.

        ``modality`` keeps only those modalities; ``exclude_modality`` drops some (cross-modal search).
        ``exact`` forces exact results from an approximate index (every list holding a selected item is
        scanned); a rare modality is always searched exactly.
        """
        single = np.ndim(query) == 1
        q = self._as_matrix(np.atleast_2d(query), "query")
        if k < 1:
            raise ValueError("k must be at least 1")
        with self._lock:
            plan = self._plan(modality, exclude_modality, exact)
            if plan is None:
                results: list[list[Hit]] = [[] for _ in range(len(q))]
            else:
                params, lists, gap = plan
                with _faiss_threads(1 if len(q) < _PARALLEL_BATCH else None):
                    if lists is None:
                        scores, found = self._index.search(q, min(k, len(self)), params=params)
                    else:
                        scores, found = self._search_lists(q, min(k, len(self)), params, lists, gap)
                rows = self._hit_rows({int(i) for i in found.ravel() if i >= 0})
                results = [[Hit(score=float(s), **rows[int(i)]) for s, i in zip(srow, irow) if i >= 0]
                           for srow, irow in zip(scores, found)]
        return results[0] if single else results

    def item(self, item_id: int) -> dict[str, Any]:
        """Everything stored about one item, thumbnail included."""
        with self._lock:
            cur = self._db.execute(f"SELECT {_HIT_COLUMNS}, thumbnail FROM items WHERE id = ?", (int(item_id),))
            row = cur.fetchone()
        if row is None:
            raise KeyError(item_id)
        return dict(zip([d[0] for d in cur.description], row))

    def vectors(self, ids: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, (N, D) vectors) of the given items or of all, in id order: a copy, for plots and exports."""
        with self._lock:
            if ids is None:
                chosen = np.flatnonzero(self._modality_of >= 0).astype(np.int64)
            else:
                chosen = np.asarray(list(ids), dtype=np.int64)
                present = (chosen >= 0) & (chosen < len(self._modality_of))
                if not present.all() or (self._modality_of[chosen] < 0).any():
                    raise KeyError("some ids are not in the library")
            return chosen, self._reconstruct(chosen)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            counts = self._modality_counts()
            return {
                "count": len(self),
                "per_modality": {n: int(c) for n, c in zip(self._modality_names, counts) if c},
                "index": self._index_description(),
                "nprobe": self._nprobe or None,
                "dim": self.dim,
                "fingerprint": self.fingerprint,
                "exact_threshold": self.exact_threshold,
            }

    # ------------------------------------------------------------------------------ model helpers
    def add_samples(self, model: Any, samples: Sequence[Sample], items: Sequence[dict[str, Any]] | None = None,
                    batch_size: int = 64) -> list[int]:
        """Embeds samples with ``model`` and adds them with thumbnails made from their previews.

        ``items`` may give per-sample ``source``, ``sha256``, ``label``, ``notes``; the SHA-256 defaults to
        the hash of the decoded data.
        """
        self._check_model(model)
        if items is not None and len(items) != len(samples):
            raise ValueError(f"{len(samples)} samples but {len(items)} items")
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

    def _check_model(self, model: Any) -> None:
        if model.fingerprint != self.fingerprint or model.dim != self.dim:
            raise LibraryMismatchError(
                f"This library was built with model {self.fingerprint}; the loaded model is "
                f"{model.fingerprint}. Rebuild the library with the loaded model.")

    # --------------------------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Writes the library directory atomically (see the module docstring)."""
        target = Path(path)
        if target.exists() and not (target / _META_FILE).is_file():
            raise InputError(f"{target.name} exists and is not an M3Bind library; choose another folder.")
        parent = target.parent
        parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=parent))
        try:
            with self._lock:
                faiss.write_index(self._index, str(tmp / _INDEX_FILE))
                dest = sqlite3.connect(tmp / _ITEMS_FILE)
                try:
                    self._db.backup(dest)
                finally:
                    dest.close()
                meta = {"version": FORMAT_VERSION, "dim": self.dim, "fingerprint": self.fingerprint,
                        "factory": self.index_factory, "exact_threshold": self.exact_threshold,
                        "target_recall": self.target_recall, "next_id": self._next_id,
                        "trained_size": self._trained_size, "nprobe": self._nprobe, "count": len(self),
                        "filter_gap": {m: list(g) for m, g in self._filter_gap.items()}}
            (tmp / _META_FILE).write_text(json.dumps(meta, indent=1))
            for name in (_INDEX_FILE, _ITEMS_FILE, _META_FILE):
                _fsync(tmp / name)
            _fsync(tmp)
            backup = _backup_path(target)
            if target.exists():
                if backup.exists():
                    shutil.rmtree(backup)  # left by a crash after the new library was in place
                os.rename(target, backup)
            os.rename(tmp, target)
            _fsync(parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(backup, ignore_errors=True)
        return target

    @classmethod
    def load(cls, path: str | os.PathLike, expected_fingerprint: str | None = None) -> "Library":
        """Opens a saved library; refuses one built with another model than ``expected_fingerprint``."""
        target = Path(path)
        backup = _backup_path(target)
        if not target.exists() and backup.is_dir():
            os.rename(backup, target)  # a save crashed between its two renames
        if not (target / _META_FILE).is_file():
            raise InputError(f"No M3Bind library found at {target.name}.")
        try:
            meta = json.loads((target / _META_FILE).read_text())
            version, dim, fingerprint = meta["version"], int(meta["dim"]), str(meta["fingerprint"])
            if version == FORMAT_VERSION:
                settings = {"index_factory": str(meta["factory"]), "exact_threshold": int(meta["exact_threshold"]),
                            "target_recall": float(meta["target_recall"])}
                state = int(meta["next_id"]), int(meta["trained_size"]), int(meta["nprobe"])
                gaps = {str(m): (float(g), int(n)) for m, (g, n) in meta.get("filter_gap", {}).items()}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CorruptFileError(f"The library {target.name} is damaged (its description cannot be read).") from exc
        if version != FORMAT_VERSION:
            raise InputError(f"The library {target.name} has format version {version}; this M3Bind reads "
                             f"version {FORMAT_VERSION}. Rebuild it.")
        if expected_fingerprint is not None and fingerprint != expected_fingerprint:
            raise LibraryMismatchError(
                f"This library was built with model {fingerprint}; the loaded model is {expected_fingerprint}. "
                "Rebuild the library with the loaded model.")
        try:
            lib = cls(dim, fingerprint, **settings)
        except ValueError as exc:
            raise CorruptFileError(f"The library {target.name} is damaged (its settings are invalid).") from exc
        try:
            index = faiss.read_index(str(target / _INDEX_FILE))
            lib._load_items(target / _ITEMS_FILE)
        except (RuntimeError, OSError, sqlite3.Error, ValueError) as exc:
            lib.close()
            raise CorruptFileError(f"The library {target.name} is damaged (its index or items cannot be read).") \
                from exc
        next_id, trained_size, nprobe = state
        is_ivf = isinstance(faiss.downcast_index(index), faiss.IndexIVF)
        if index.d != dim or index.ntotal != int((lib._modality_of >= 0).sum()) or is_ivf != (trained_size > 0):
            lib.close()
            raise CorruptFileError(f"The library {target.name} is damaged (index and items disagree).")
        lib._index, lib._trained_size, lib._nprobe = index, trained_size, nprobe
        lib._next_id = max(next_id, len(lib._modality_of))
        lib._filter_gap = {m: g for m, g in gaps.items() if m in lib._modality_names}
        lib._calibrate_stale_filters()  # a library saved before filters were calibrated: done here
        return lib

    def _load_items(self, items_path: Path) -> None:
        source = sqlite3.connect(f"file:{items_path}?mode=ro", uri=True)
        try:
            source.backup(self._db)
        finally:
            source.close()
        by_modality = self._db.execute("SELECT modality, COUNT(*), MAX(id) FROM items GROUP BY modality").fetchall()
        top = max((row[2] for row in by_modality), default=-1)
        self._modality_of = np.full(top + 1, -1, dtype=np.int16)
        for name, count, _ in by_modality:
            ids = np.fromiter((r[0] for r in self._db.execute("SELECT id FROM items WHERE modality = ?", (name,))),
                              dtype=np.int64, count=count)
            self._modality_of[ids] = self._modality_code(name)

    # ------------------------------------------------------------------------------------ internals
    def _as_matrix(self, x: np.ndarray, what: str) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise LibraryMismatchError(
                f"The {what} have shape {x.shape}; this library holds {self.dim}-dimensional vectors.")
        x = np.ascontiguousarray(x, dtype=np.float32)
        norms = np.linalg.norm(x, axis=1)
        if not np.isfinite(norms).all() or (norms == 0).any():
            raise InputError(f"The {what} contain empty or non-finite vectors.")
        if np.abs(norms - 1).max(initial=0) > 1e-3:
            x = x / norms[:, None]
        return x

    def _modality_code(self, name: str) -> int:
        if name not in self._modality_names:
            self._modality_names.append(name)
        return self._modality_names.index(name)

    def _set_modality(self, ids: np.ndarray, codes: np.ndarray) -> None:
        if len(ids) and ids.max() >= len(self._modality_of):
            grown = np.full(max(int(ids.max()) + 1, 2 * len(self._modality_of)), -1, dtype=np.int16)
            grown[:len(self._modality_of)] = self._modality_of
            self._modality_of = grown
        self._modality_of[ids] = codes
        self._counts = None
        self._selectors.clear()

    def _modality_counts(self) -> np.ndarray:
        if self._counts is None:
            self._counts = np.bincount(self._modality_of[self._modality_of >= 0], minlength=len(self._modality_names))
        return self._counts

    def _plan(self, modality: Any, exclude: Any, exact: bool) -> tuple[faiss.SearchParameters, Any, Any] | None:
        """(faiss parameters, IVF lists to probe among or None for faiss's own probing, probing margin or
        None for ``params.nprobe`` lists); None: nothing selected."""
        codes = set(range(len(self._modality_names)))
        if modality is not None:
            codes &= {self._modality_names.index(m) for m in _names(modality) if m in self._modality_names}
        if exclude is not None:
            codes -= {self._modality_names.index(m) for m in _names(exclude) if m in self._modality_names}
        selected = int(sum(self._modality_counts()[c] for c in codes))
        if selected == 0:
            return None
        if selected == len(self):
            selector, holding_lists = None, None
        else:
            selector, holding_lists = self._selection(frozenset(codes))
        if not self._trained_size:
            return faiss.SearchParameters(sel=selector), None, None
        nlist = faiss.extract_index_ivf(self._index).nlist
        if selector is None:
            return faiss.SearchParametersIVF(nprobe=nlist if exact else self._nprobe), None, None
        lists, holding = holding_lists()
        if exact or selected <= self.exact_threshold:  # exact: every list that holds a selected item
            return faiss.SearchParametersIVF(sel=selector, nprobe=len(lists)), lists, None
        gaps = [self._filter_gap[name][0] for name in (self._modality_names[c] for c in codes)
                if name in self._filter_gap]
        if not gaps:  # none calibrated (only modalities of a handful of items): as many selected items as usual
            nprobe = max(1, min(len(lists), math.ceil(self._nprobe * holding / selected)))
            return faiss.SearchParametersIVF(sel=selector, nprobe=nprobe), lists, None
        # the lists holding selected items whose centroid is within the calibrated margin of the nearest one
        return faiss.SearchParametersIVF(sel=selector), lists, max(gaps)

    def _selection(self, codes: frozenset[int]) -> tuple[Any, Any]:
        """A faiss selector of the items of these modalities, and a function giving the IVF lists that
        hold them with those lists' total size."""
        if codes not in self._selectors:
            member = np.isin(self._modality_of, np.fromiter(codes, dtype=np.int16))
            bitmap = np.packbits(member, bitorder="little")
            cache: list[tuple[np.ndarray, int]] = []

            def holding_lists() -> tuple[np.ndarray, int]:  # computed once per selection, when first needed
                if not cache:
                    invlists = faiss.extract_index_ivf(self._index).invlists
                    sizes = np.array([invlists.list_size(i) for i in range(invlists.nlist)])
                    lists = np.array([i for i, n in enumerate(sizes)
                                      if n and member[faiss.rev_swig_ptr(invlists.get_ids(i), int(n))].any()],
                                     dtype=np.int64)
                    cache.append((lists, int(sizes[lists].sum())))
                return cache[0]

            self._selectors[codes] = (bitmap, faiss.IDSelectorBitmap(bitmap), holding_lists)  # selector borrows bitmap
        return self._selectors[codes][1:]

    def _search_lists(self, q: np.ndarray, k: int, params: Any, lists: np.ndarray,
                      gap: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """IVF search, among ``lists``, of the ``params.nprobe`` lists nearest each query, or with ``gap``
        of the lists whose centroid scores within ``gap`` of the query's nearest one.

        faiss's C entry point is used: its Python wrapper takes no search parameters.
        """
        ivf = faiss.extract_index_ivf(self._index)
        coarse = q @ ivf.quantizer.reconstruct_batch(lists).T
        if gap is not None:
            floor = coarse.max(axis=1, keepdims=True) - gap
            params.nprobe = int((coarse >= floor).sum(axis=1).max())
        if params.nprobe < len(lists):
            nearest = np.argpartition(-coarse, params.nprobe - 1, axis=1)[:, :params.nprobe]
            assign, coarse = lists[nearest], np.take_along_axis(coarse, nearest, axis=1)
            if gap is not None:
                assign[coarse < floor] = -1  # faiss skips list -1: each query probes its own lists
        else:
            assign = np.broadcast_to(lists, coarse.shape)
        assign, coarse = np.ascontiguousarray(assign), np.ascontiguousarray(coarse)  # coarse: by-residual codecs
        scores, found = np.empty((len(q), k), np.float32), np.empty((len(q), k), np.int64)
        ivf.search_preassigned_c(len(q), faiss.swig_ptr(q), k, faiss.swig_ptr(assign), faiss.swig_ptr(coarse),
                                 faiss.swig_ptr(scores), faiss.swig_ptr(found), False, params)
        return scores, found

    def _hit_rows(self, ids: set[int]) -> dict[int, dict[str, Any]]:
        wanted, rows = sorted(ids), {}
        for start in range(0, len(wanted), 10_000):  # SQLite caps the parameters of one statement
            chunk = wanted[start:start + 10_000]
            cur = self._db.execute(f"SELECT {_HIT_COLUMNS} FROM items WHERE id IN ({','.join('?' * len(chunk))})",
                                   chunk)
            names = [d[0] for d in cur.description]
            rows.update((row[0], dict(zip(names, row))) for row in cur)
        return rows

    def _reconstruct(self, ids: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        if out is None:
            out = np.empty((len(ids), self.dim), dtype=np.float32)
        for start in range(0, len(ids), 65536):
            out[start:start + 65536] = self._index.reconstruct_batch(ids[start:start + 65536])
        return out

    def _rebuild(self, extra: np.ndarray | None = None, extra_ids: np.ndarray | None = None,
                 extra_codes: np.ndarray | None = None) -> None:
        """Rebuilds the index for the current size (plus ``extra`` vectors about to be added, with their
        modality codes)."""
        ids = np.flatnonzero(self._modality_of >= 0).astype(np.int64)
        codes = self._modality_of[ids]
        kept = len(ids)
        if extra is not None and kept == 0:
            x, ids, codes = extra, extra_ids, extra_codes
        else:
            x = np.empty((kept + (0 if extra is None else len(extra)), self.dim), dtype=np.float32)
            self._reconstruct(ids, out=x[:kept])
            if extra is not None:
                x[kept:], ids, codes = extra, np.concatenate([ids, extra_ids]), np.concatenate([codes, extra_codes])
        self._index, self._filter_gap = None, {}  # frees the old index before the new one is built
        try:
            self._index, self._trained_size, self._nprobe = self._build(x, ids)
            if self._trained_size:
                present, counts = np.unique(codes, return_counts=True)
                self._filter_gap = _calibrate_filters(
                    self._index, x, ids, codes, present[counts > _CALIBRATION_K], self._modality_names,
                    self.target_recall, np.random.default_rng(len(x) + 1))
        except BaseException:
            self._index, self._trained_size, self._nprobe = self._build(x[:kept], ids[:kept], exact=True)
            self._filter_gap = {}
            raise

    def _calibrate_stale_filters(self) -> None:
        """Calibrates the probing margin of every modality (of more than ten items) that has none or has more
        than doubled since it was calibrated, from vectors read back from the index: a modality added since the
        last build, or a library saved before margins were calibrated."""
        if not self._trained_size:
            return
        counts = self._modality_counts()
        stale = [c for c, name in enumerate(self._modality_names)
                 if counts[c] > _CALIBRATION_K and counts[c] > 2 * self._filter_gap.get(name, (0, 0))[1]]
        if not stale:
            return
        ids = np.flatnonzero(self._modality_of >= 0).astype(np.int64)
        codes = self._modality_of[ids]
        self._filter_gap.update(_calibrate_filters(
            self._index, self._reconstruct, ids, codes, stale, self._modality_names, self.target_recall,
            np.random.default_rng(len(ids) + 1)))

    def _build(self, x: np.ndarray, ids: np.ndarray, exact: bool = False) -> tuple[faiss.Index, int, int]:
        """A new index holding ``x``: (index, trained size, nprobe), the last two 0 for an exact index."""
        if exact or len(x) <= self.exact_threshold:
            flat = _flat_index(self.dim)
            flat.add_with_ids(x, ids)
            return flat, 0, 0
        nlist = max(1, min(int(4 * math.sqrt(len(x))), len(x) // 39))
        index = faiss.index_factory(self.dim, self.index_factory.format(nlist=nlist), faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.extract_index_ivf(index)
        rng = np.random.default_rng(len(x))
        train = x[np.sort(rng.choice(len(x), min(len(x), _TRAIN_PER_LIST * nlist), replace=False))]
        ivf.cp.max_points_per_centroid = _TRAIN_PER_LIST  # the sample above is the training set, used whole
        ivf.cp.niter = _TRAIN_ITERATIONS
        index.train(train)
        del train
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # reconstruct by id, removal with any ids
        index.add_with_ids(x, ids)
        return index, len(x), _calibrate_nprobe(index, x, ids, self.target_recall, rng)

    def _index_description(self) -> str:
        if not self._trained_size:
            return "Flat (exact)"
        return self.index_factory.format(nlist=faiss.extract_index_ivf(self._index).nlist)


# ---------------------------------------------------------------------------------------- helpers
def _flat_index(dim: int) -> faiss.Index:
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def _check_factory(dim: int, factory: str) -> None:
    try:
        index = faiss.downcast_index(faiss.index_factory(dim, factory.format(nlist=16), faiss.METRIC_INNER_PRODUCT))
    except (RuntimeError, KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"index_factory {factory!r} is not a faiss factory string") from exc
    if not isinstance(index, faiss.IndexIVF):
        raise ValueError(f"index_factory {factory!r} must describe a faiss IVF index without pre-transform, "
                         f"e.g. {DEFAULT_FACTORY!r}")


def _calibrate_nprobe(index: faiss.Index, x: np.ndarray, ids: np.ndarray, target: float,
                      rng: np.random.Generator) -> int:
    """The smallest nprobe whose recall@10, on held-out items against exact search, reaches ``target``."""
    ivf = faiss.extract_index_ivf(index)
    picked = rng.choice(len(x), min(_CALIBRATION_QUERIES, len(x)), replace=False)
    queries, k = x[picked], _CALIBRATION_K + 1  # +1: each query finds itself, which does not count
    exact_scores, exact_pos = faiss.knn(queries, x, k, faiss.METRIC_INNER_PRODUCT)
    kth = np.array([row[ids[pos] != ids[p]][_CALIBRATION_K - 1]
                    for row, pos, p in zip(exact_scores, exact_pos, picked)])

    def recall(nprobe: int) -> float:
        scores, found = index.search(queries, k, params=faiss.SearchParametersIVF(nprobe=nprobe))
        hits = [(s[(f != ids[p]) & (f >= 0)][:_CALIBRATION_K] >= t - 1e-5).sum()
                for s, f, p, t in zip(scores, found, picked, kth)]
        return float(np.mean(hits)) / _CALIBRATION_K

    low, high = 0, 1  # recall(low) < target <= recall(high), found by doubling then bisection
    while high < ivf.nlist and recall(high) < target:
        low, high = high, min(ivf.nlist, 2 * high)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if recall(mid) >= target else (mid, high)
    return high


def _calibrate_filters(index: faiss.Index, vectors: Any, ids: np.ndarray, codes: np.ndarray,
                       filters: Iterable[int], names: Sequence[str], target: float,
                       rng: np.random.Generator) -> dict[str, tuple[float, int]]:
    """For each modality code in ``filters`` (each of more than ten items), (the probing margin of a search filtered to it: it probes the IVF
    lists holding the modality's items whose centroid scores within the margin of the nearest such list,
    and the smallest margin whose recall@10 against exact filtered search reaches ``target`` is chosen, the
    modality's item count).

    ``vectors`` are the rows of ``ids`` (``codes`` their modalities), as an array or as a function of ids.
    The queries are items drawn from the whole library, so most of them come from other modalities: a
    query far from every item of the filter is the hard case (its true top 10 is spread over many lists, so
    many centroids score alike), a query near them needs few lists, and the margin serves both. A filtered
    search finds a true neighbour exactly when it probes the list holding it (lists are scanned exactly), so
    one exact search per query gives the recall of every margin.
    """
    ivf = faiss.extract_index_ivf(index)
    list_of = np.full(int(ids.max()) + 1, -1, dtype=np.int64)  # id -> the IVF list holding it
    for i in range(ivf.nlist):
        size = ivf.invlists.list_size(i)
        if size:
            list_of[faiss.rev_swig_ptr(ivf.invlists.get_ids(i), size)] = i
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    picked = np.sort(rng.choice(len(ids), min(_FILTER_CALIBRATION_QUERIES, len(ids)), replace=False))
    query_ids = ids[picked]
    queries = np.ascontiguousarray(vectors(query_ids) if callable(vectors) else vectors[picked])
    gaps = {}
    for code in filters:
        rows = np.flatnonzero(codes == code)
        members = ids[rows]
        x = vectors(members) if callable(vectors) else vectors[rows]
        truth = members[_top_inner_products(queries, x, _CALIBRATION_K + 1)]  # +1: a query may find itself
        del x
        lists = np.unique(list_of[members])
        coarse = queries @ centroids[lists].T
        below = coarse.max(axis=1, keepdims=True) - np.take_along_axis(coarse, np.searchsorted(lists, list_of[truth]),
                                                                        axis=1)  # how far below the nearest list
        below = np.sort(np.concatenate([row[t != q][:_CALIBRATION_K] for row, t, q in zip(below, truth, query_ids)]))
        gaps[names[int(code)]] = (float(below[max(0, math.ceil(target * len(below)) - 1)]) + 1e-6, len(members))
    return gaps


def _top_inner_products(queries: np.ndarray, x: np.ndarray, k: int) -> np.ndarray:
    """Row positions in ``x`` of each query's k largest inner products, best first (exact; numpy's BLAS,
    several times faster than ``faiss.knn`` for many queries, in blocks of x to bound memory)."""
    k = min(k, len(x))
    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, len(x), 32768):
        scores = queries @ x[start:start + 32768].T
        top = np.argpartition(-scores, min(k, scores.shape[1]) - 1, axis=1)[:, :k]
        best_scores = np.concatenate([best_scores, np.take_along_axis(scores, top, axis=1)], axis=1)
        best = np.concatenate([best, top + start], axis=1)
        if best.shape[1] > k:
            keep = np.argpartition(-best_scores, k - 1, axis=1)[:, :k]
            best_scores, best = np.take_along_axis(best_scores, keep, axis=1), np.take_along_axis(best, keep, axis=1)
    order = np.argsort(-best_scores, axis=1, kind="stable")
    return np.take_along_axis(best, order, axis=1)


@contextmanager
def _faiss_threads(count: int | None) -> Iterator[None]:
    """Sets faiss's OpenMP thread count for the calling thread only (libgomp keeps it per thread)."""
    if count is None:
        yield
        return
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(count)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def _searches(name: str, modality: Any, exclude: Any) -> bool:
    """Whether a search with these filters ranks items of modality ``name``."""
    return (modality is None or name in _names(modality)) and (exclude is None or name not in _names(exclude))


def _names(modality: str | Iterable[str]) -> list[str]:
    return [modality] if isinstance(modality, str) else list(modality)


def _item_row(item: dict[str, Any]) -> tuple[Any, ...]:
    unknown = set(item) - set(ITEM_FIELDS)
    if unknown:
        raise ValueError(f"unknown item fields {sorted(unknown)}; known: {ITEM_FIELDS}")
    modality = get_modality(str(item.get("modality"))).name
    source = item.get("source")
    if source is not None:
        source = PureWindowsPath(str(source)).name  # drops POSIX and Windows directories alike
    thumbnail = item.get("thumbnail")
    return (modality, source, item.get("sha256"), _text(item.get("label")), _text(item.get("notes")),
            None if thumbnail is None else bytes(thumbnail))


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _sample_item(sample: Sample, extra: dict[str, Any]) -> dict[str, Any]:
    if extra.get("modality", sample.modality) != sample.modality:
        raise WrongModalityError(f"An item says {extra['modality']!r} for a {sample.modality!r} sample; "
                                 "the modality is the sample's.")
    item = {"modality": sample.modality, "thumbnail": thumbnail_png(sample), **extra}
    if item.get("sha256") is None:
        item["sha256"] = hashlib.sha256(np.ascontiguousarray(sample.data).tobytes()).hexdigest()
    return item


def thumbnail_png(sample: Sample) -> bytes | None:
    """A small PNG of the sample's preview: the image (<= 128 px) or an ECG's lead II trace."""
    from PIL import Image, ImageDraw

    preview = np.asarray(sample.preview)
    if sample.kind == "ecg":
        from .readers.ecg import LEADS

        mask = sample.meta.get("lead_mask") or [True] * len(preview)
        lead = LEADS.index("II") if mask[LEADS.index("II")] else next((i for i, m in enumerate(mask) if m), None)
        if lead is None:
            return None
        trace = np.nan_to_num(preview[lead].astype(np.float64))
        low, high = np.percentile(trace, [1, 99])
        centre, half = (low + high) / 2, max((high - low) / 2, 0.5)  # at least +-0.5 mV of scale
        width, height = THUMBNAIL_PX, 48
        xs = np.linspace(0, width - 1, len(trace))
        ys = (height - 1) / 2 - np.clip((trace - centre) / half, -1, 1) * (height / 2 - 2)
        image = Image.new("RGB", (width, height), "white")
        ImageDraw.Draw(image).line(list(zip(xs.tolist(), ys.tolist())), fill=(20, 20, 20), width=1)
    else:
        image = Image.fromarray(np.ascontiguousarray(preview, dtype=np.uint8))
        image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()


def _open_working_db(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, check_same_thread=False)  # guarded by the library's lock
    db.execute("PRAGMA journal_mode=MEMORY")  # a scratch copy: rollback yes, durability no
    db.execute("PRAGMA synchronous=OFF")
    db.execute(_SCHEMA)
    return db


def _discard_working_db(db: sqlite3.Connection, path: str) -> None:
    db.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _backup_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.backup")


def _remove_stale_temporaries(target: Path) -> None:
    """Deletes temporary directories left by saves whose process has died."""
    prefix = f".{target.name}.tmp-"
    for tmp in target.parent.iterdir():
        if not tmp.name.startswith(prefix):
            continue
        try:
            pid = int(tmp.name[len(prefix):].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, PermissionError, OSError):
            continue  # not ours to judge, or its process is alive


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():
            return  # directories cannot be opened for fsync on some systems (Windows)
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

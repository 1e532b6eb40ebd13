"""2-D maps of a library's shared embedding space, for looking at it (the app's Explore tab).

A map is fitted once per library state (the set of item ids, which the library never reuses, and the
model fingerprint) and cached; new points (a query, text prompts) are *placed* into the fitted map with
the reducer's ``transform``, never by refitting, so the library's layout stays put while one explores.
UMAP (cosine metric, after a PCA to 50 dimensions for speed) draws libraries of ``MIN_UMAP_ITEMS``
items or more; smaller ones get a PCA map, because UMAP's neighbourhood graph means little on a handful
of points. Libraries above ``MAX_MAP_ITEMS`` are drawn from a fixed random sample of them, which keeps
fitting within a minute and the plot within a browser's reach.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import InputError

MIN_UMAP_ITEMS = 15
MAX_MAP_ITEMS = 20_000  # larger libraries are drawn from a fixed random sample of this size
PCA_DIMS = 50


@dataclass
class LibraryMap:
    """Library items laid out in 2-D, with what a plot needs to colour and label them."""

    ids: np.ndarray
    coords: np.ndarray  # (N, 2)
    modalities: list[str]
    labels: list[str | None]
    sources: list[str | None]
    method: str  # "UMAP" or "PCA"
    note: str
    _pca: Any = field(repr=False, default=None)
    _umap: Any = field(repr=False, default=None)
    _lock: threading.Lock = field(repr=False, default_factory=threading.Lock)

    def place(self, vectors: np.ndarray) -> np.ndarray:
        """(M, 2) positions of new (M, D) vectors in this map, the map itself unchanged."""
        x = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        if len(x) == 0:
            return np.zeros((0, 2), dtype=np.float32)
        with self._lock:  # umap's transform builds its search graph lazily; once is enough
            reduced = self._pca.transform(x)
            if self._umap is None:
                return reduced[:, :2].astype(np.float32)
            return np.asarray(self._umap.transform(reduced), dtype=np.float32)


def fit_map(vectors: np.ndarray, random_state: int = 0) -> tuple[np.ndarray, Any, Any, str, str]:
    """(coords, pca, umap or None, method, note) for (N, D) vectors."""
    from sklearn.decomposition import PCA

    x = np.asarray(vectors, dtype=np.float32)
    n = len(x)
    if n < 3:
        raise InputError("The library needs at least 3 items to draw a map; add some files first.")
    if n < MIN_UMAP_ITEMS:
        pca = PCA(n_components=2, random_state=random_state).fit(x)
        return (pca.transform(x).astype(np.float32), pca, None, "PCA",
                f"Only {n} items: shown with PCA (UMAP needs at least {MIN_UMAP_ITEMS}).")
    import umap

    pca = PCA(n_components=min(PCA_DIMS, n - 1, x.shape[1]), random_state=random_state).fit(x)
    reduced = pca.transform(x)
    n_neighbors = int(min(15, max(5, n // 4)))
    reducer = umap.UMAP(n_neighbors=n_neighbors, min_dist=0.1, metric="cosine", init="pca",
                        random_state=random_state, n_jobs=1)
    coords = reducer.fit_transform(reduced)
    reducer.transform(reduced[:1])  # builds the search graph and compiles transform now, not on first query
    return (np.asarray(coords, dtype=np.float32), pca, reducer, "UMAP",
            f"UMAP of {n} items (cosine, {n_neighbors} neighbours).")


def warm_up() -> None:
    """Compiles UMAP's numba code (about a minute of CPU the first time in a process) on random points,
    both the exact path of small maps and the approximate one of large maps, so a user's first map is quick."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, PCA_DIMS)).astype(np.float32)
    import umap

    for approximate in (False, True):
        reducer = umap.UMAP(n_neighbors=5, metric="cosine", init="pca", random_state=0, n_jobs=1,
                            n_epochs=20, force_approximation_algorithm=approximate)
        reducer.fit(x)
        reducer.transform(x[:1])


_warming = threading.Lock()
_warmed = False


def warm_up_in_background() -> None:
    """Starts ``warm_up`` in a daemon thread, once per process."""
    global _warmed
    with _warming:
        if _warmed:
            return
        _warmed = True
    threading.Thread(target=warm_up, name="umap-warm-up", daemon=True).start()


def _state_key(library: Any, ids: np.ndarray) -> str:
    return hashlib.sha1(library.fingerprint.encode() + np.ascontiguousarray(ids, dtype=np.int64).tobytes()).hexdigest()


class MapCache:
    """Keeps the maps of the last few library states; one fit at a time."""

    def __init__(self, size: int = 2):
        self.size = size
        self._maps: OrderedDict[str, LibraryMap] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, library: Any) -> LibraryMap:
        with self._lock:
            ids, vectors = library.vectors()
            key = _state_key(library, ids)
            if key in self._maps:
                self._maps.move_to_end(key)
                return self._maps[key]
            if len(ids) > MAX_MAP_ITEMS:
                keep = np.sort(np.random.default_rng(int(key[:8], 16)).choice(len(ids), MAX_MAP_ITEMS, replace=False))
                ids, vectors = ids[keep], vectors[keep]
            coords, pca, reducer, method, note = fit_map(vectors)
            if len(ids) < len(library):
                note += f" A random {len(ids):,} of the library's {len(library):,} items are shown."
            items = [library.item(int(i)) for i in ids]
            found = LibraryMap(ids=ids, coords=coords, modalities=[it["modality"] for it in items],
                               labels=[it["label"] for it in items], sources=[it["source"] for it in items],
                               method=method, note=note, _pca=pca, _umap=reducer)
            self._maps[key] = found
            while len(self._maps) > self.size:
                self._maps.popitem(last=False)
            return found

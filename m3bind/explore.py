"""2-D maps of a library's shared embedding space, for looking at it (the app's Explore tab).

A map is fitted once per library state (the set of item ids, which the library never reuses, and the
model fingerprint) and cached; new points (a query, text prompts) are *placed* into the fitted map,
never by refitting, so the library's layout stays put while one explores.
UMAP (cosine, after a PCA to 50 dimensions) draws libraries of ``MIN_UMAP_ITEMS`` items or more;
smaller ones get a PCA map, because UMAP's neighbourhood graph means little on a handful of points.
Libraries above ``MAX_MAP_ITEMS`` are drawn from a fixed random sample of them, which keeps fitting
within a minute and the plot within a browser's reach.

The k nearest neighbours UMAP starts from are found exactly by faiss and handed to it
(``precomputed_knn``) instead of being searched by pynndescent, whose numba compilation made the first
map of a process take 42 s on a 2-core CPU (4 s once compiled). What is left to compile, UMAP's graph
and layout code, takes a few seconds; ``warm_up_in_background`` does it before the first map is asked
for. New points are placed the way UMAP's ``transform`` begins (see ``NeighbourPlacement``).
"""

from __future__ import annotations

import hashlib
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import InputError

MIN_UMAP_ITEMS = 15
MAX_MAP_ITEMS = 20_000  # larger libraries are drawn from a fixed random sample of this size
PCA_DIMS = 50
# UMAP's own choice above 10,000 items. Its default of 500 below that takes 2.5 times as long for the same
# layout quality (5,000 real library items: trustworthiness 0.988 and 77% same-label map neighbours either way).
N_EPOCHS = 200
# Numba's fallback threading layer (workqueue) aborts the process on concurrent parallel calls, and a
# warm-up can run beside a user's map: UMAP's numba code runs one call at a time.
_NUMBA = threading.Lock()


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
    _umap: Any = field(repr=False, default=None)  # a NeighbourPlacement for UMAP maps

    def place(self, vectors: np.ndarray) -> np.ndarray:
        """(M, 2) positions of new (M, D) vectors in this map, the map itself unchanged."""
        x = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        if len(x) == 0:
            return np.zeros((0, 2), dtype=np.float32)
        reduced = self._pca.transform(x)
        if self._umap is None:
            return reduced[:, :2].astype(np.float32)
        return self._umap.transform(reduced)


class NeighbourPlacement:
    """Places new points into a fitted UMAP map the way UMAP's own ``transform`` begins: at the mean of
    the map positions of their ``k`` nearest items (cosine, exact), weighted by UMAP's membership strengths
    (its ``smooth_knn_dist`` calibration, with the local connectivity ``transform`` uses).

    ``transform`` then refines that start with a short optimisation against pynndescent's search index,
    which a map fitted on faiss neighbours does not have; for showing where a query falls among the
    library's items the weighted mean is what matters, and it takes a fraction of a millisecond.
    """

    def __init__(self, index: Any, coords: np.ndarray, k: int):
        self.index, self.coords, self.k = index, coords, k  # index: faiss, of the map's unit vectors

    def transform(self, reduced: np.ndarray) -> np.ndarray:
        import numba
        from umap.umap_ import smooth_knn_dist

        neighbours, distances = _knn(self.index, _unit(reduced), self.k)
        with _NUMBA:
            threads = numba.get_num_threads()
            numba.set_num_threads(1)  # a few rows: waking parallel workers took 30 ms on a busy CPU, this 0.01
            try:
                sigmas, rhos = smooth_knn_dist(distances, float(self.k), local_connectivity=0.0)
            finally:
                numba.set_num_threads(threads)
        weights = np.exp(-np.maximum(distances - rhos[:, None], 0.0) / sigmas[:, None])
        placed = np.einsum("mk,mkd->md", weights, self.coords[neighbours]) / weights.sum(1, keepdims=True)
        return placed.astype(np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _flat_index(unit: np.ndarray) -> Any:
    import faiss

    index = faiss.IndexFlatIP(unit.shape[1])
    index.add(unit)
    return index


def _knn(index: Any, unit: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices int64, cosine distances float32), both (M, k), nearest first; exact."""
    similarities, neighbours = index.search(unit, k)
    return neighbours, np.clip(1.0 - similarities, 0.0, 2.0).astype(np.float32)


def fit_map(vectors: np.ndarray, random_state: int = 0) -> tuple[np.ndarray, Any, Any, str, str]:
    """(coords, pca, placement or None, method, note) for (N, D) vectors."""
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
    unit = _unit(pca.transform(x))
    n_neighbors = int(min(15, max(5, n // 4)))
    index = _flat_index(unit)
    reducer = umap.UMAP(n_neighbors=n_neighbors, min_dist=0.1, metric="cosine", init="pca", n_epochs=N_EPOCHS,
                        random_state=random_state, n_jobs=1, precomputed_knn=(*_knn(index, unit, n_neighbors), None))
    with _NUMBA, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no search index, so no transform": NeighbourPlacement does without
        coords = np.asarray(reducer.fit_transform(unit), dtype=np.float32)
    return (coords, pca, NeighbourPlacement(index, coords, n_neighbors), "UMAP",
            f"UMAP of {n} items (cosine, {n_neighbors} neighbours).")


def warm_up() -> None:
    """Compiles UMAP's numba code (a few seconds of CPU, once per process) on random points with the
    array types of a real map, so that a user's first map is quick."""
    x = np.random.default_rng(0).normal(size=(64, PCA_DIMS)).astype(np.float32)
    _, pca, placement, _, _ = fit_map(x)
    placement.transform(pca.transform(x[:1]))


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

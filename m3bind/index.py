"""The vector index of a library: faiss, its lifecycle and modality-filtered search.

Choices, and why:

* **Vectors live only in faiss.** Nothing keeps a second copy in Python, so searching a library takes
  about the index's size in RAM; only one small int16 per id (its modality) is held in memory, for filtering.
* **Ids** are given by the library; faiss stores them (an ``IndexIDMap2`` over the flat index, the IVF
  index's own ids later), so they survive removal, rebuilds, save and load.
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

Not thread-safe on its own: the ``Library`` front serialises every call.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import faiss
import numpy as np

from .errors import ConfigError, InputError, LibraryMismatchError, UnknownItemError

DEFAULT_FACTORY = "IVF{nlist},Flat"
DEFAULT_EXACT_THRESHOLD = 50_000
DEFAULT_TARGET_RECALL = 0.97  # calibrated on held-out items; the promise is >= 0.95 on new queries

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


class VectorIndex:
    """Unit vectors by id, each of one modality, searchable exactly or approximately, filtered by modality."""

    def __init__(self, dim: int, index_factory: str | None = None, *,
                 exact_threshold: int = DEFAULT_EXACT_THRESHOLD, target_recall: float = DEFAULT_TARGET_RECALL):
        if dim < 1:
            raise ConfigError("dim must be positive")
        if exact_threshold < _MIN_EXACT_THRESHOLD:
            raise ConfigError(f"exact_threshold must be at least {_MIN_EXACT_THRESHOLD}")
        if not 0 < target_recall <= 1:
            raise ConfigError("target_recall must be in (0, 1]")
        self.dim = int(dim)
        self.index_factory = index_factory or DEFAULT_FACTORY
        self.exact_threshold = int(exact_threshold)
        self.target_recall = float(target_recall)
        _check_factory(self.dim, self.index_factory)
        self._trained_size = 0  # items the current IVF index was trained with; 0 while exact
        self._nprobe = 0
        # modality -> (probing margin of a search filtered to it, its items when that was calibrated)
        self._filter_gap: dict[str, tuple[float, int]] = {}
        self._modality_names: list[str] = []
        self._modality_of = np.full(0, -1, dtype=np.int16)  # code per id, -1 where absent
        self._counts: np.ndarray | None = None  # items per modality code, recomputed after changes
        self._selectors: dict[frozenset[int], tuple[np.ndarray, Any, Any]] = {}
        self._index = _flat_index(self.dim)

    def __len__(self) -> int:
        return int(self._index.ntotal)

    # ------------------------------------------------------------------------------------ changes
    def as_matrix(self, x: np.ndarray, what: str) -> np.ndarray:
        """``x`` as a contiguous float32 (N, D) matrix of unit rows; refuses other dimensions and empty rows."""
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

    def add(self, x: np.ndarray, ids: np.ndarray, modalities: Sequence[str]) -> None:
        """Adds unit rows ``x`` (from ``as_matrix``) under new ``ids``, one modality each; rebuilds the index
        when it crosses ``exact_threshold`` or has grown past its training."""
        codes = np.array([self._modality_code(name) for name in modalities], dtype=np.int16)
        total = len(self) + len(x)
        if total > self.exact_threshold and (self._trained_size == 0 or total > _REGROW * self._trained_size):
            self._rebuild(x, ids, codes)
        else:
            self._index.add_with_ids(x, ids)
        self._set_modality(ids, codes)

    def present(self, ids: Iterable[int]) -> np.ndarray:
        """The distinct ids among ``ids`` that the index holds, sorted."""
        wanted = np.unique(np.fromiter((int(i) for i in ids), dtype=np.int64))
        known = wanted[(wanted >= 0) & (wanted < len(self._modality_of))]
        return known[self._modality_of[known] >= 0]

    def remove(self, known: np.ndarray) -> int:
        """Removes ids that ``present`` returned; returns how many were removed."""
        # the IVF direct map (a hash table) removes only listed ids; the flat map wants a set
        selector = faiss.IDSelectorArray(known) if self._trained_size else faiss.IDSelectorBatch(known)
        removed = int(self._index.remove_ids(selector))
        self._set_modality(known, np.full(len(known), -1, dtype=np.int16))
        if self._trained_size and len(self) <= self.exact_threshold // 2:
            self._rebuild()
        return removed

    # ------------------------------------------------------------------------------------ queries
    def search(self, q: np.ndarray, k: int, modality: str | Iterable[str] | None = None,
               exclude_modality: str | Iterable[str] | None = None,
               exact: bool = False) -> tuple[np.ndarray, np.ndarray] | None:
        """(scores, ids) of each row of ``q``'s k nearest items among the selected modalities (ids -1 pad a
        row); None when the filters select nothing."""
        plan = self._plan(modality, exclude_modality, exact)
        if plan is None:
            return None
        params, lists, gap = plan
        with _faiss_threads(1 if len(q) < _PARALLEL_BATCH else None):
            if lists is None:
                return self._index.search(q, min(k, len(self)), params=params)
            return self._search_lists(q, min(k, len(self)), params, lists, gap)

    def vectors(self, ids: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, (N, D) vectors) of the given items or of all, in id order: a copy."""
        if ids is None:
            chosen = np.flatnonzero(self._modality_of >= 0).astype(np.int64)
        else:
            chosen = np.asarray(list(ids), dtype=np.int64)
            present = (chosen >= 0) & (chosen < len(self._modality_of))
            if not present.all() or (self._modality_of[chosen[present]] < 0).any():
                raise UnknownItemError("Some of these items are not in the library.")
        return chosen, self._reconstruct(chosen)

    def stats(self) -> dict[str, Any]:
        counts = self._modality_counts()
        return {
            "count": len(self),
            "per_modality": {n: int(c) for n, c in zip(self._modality_names, counts) if c},
            "index": self._index_description(),
            "nprobe": self._nprobe or None,
        }

    # ------------------------------------------------------------------------------- persistence
    def state(self) -> dict[str, Any]:
        """Settings and state for a library's description file (``restore`` reads them back)."""
        return {"factory": self.index_factory, "exact_threshold": self.exact_threshold,
                "target_recall": self.target_recall, "trained_size": self._trained_size, "nprobe": self._nprobe,
                "count": len(self), "filter_gap": {m: list(g) for m, g in self._filter_gap.items()}}

    def write(self, path: Path) -> None:
        faiss.write_index(self._index, str(path))

    def restore(self, path: Path, state: dict[str, Any], modality_ids: Iterable[tuple[str, np.ndarray]]) -> bool:
        """Reads the index written by ``write`` with its ``state``, and each modality's ids (from the item
        store); False when they disagree (a damaged library). Raises faiss's RuntimeError on a broken file."""
        index = faiss.read_index(str(path))
        groups = list(modality_ids)
        top = max((int(ids.max()) for _, ids in groups if len(ids)), default=-1)
        self._modality_of = np.full(top + 1, -1, dtype=np.int16)
        for name, ids in groups:
            self._modality_of[ids] = self._modality_code(name)
        self._counts = None
        trained_size = int(state["trained_size"])
        is_ivf = isinstance(faiss.downcast_index(index), faiss.IndexIVF)
        if index.d != self.dim or index.ntotal != int((self._modality_of >= 0).sum()) or is_ivf != (trained_size > 0):
            return False
        self._index, self._trained_size, self._nprobe = index, trained_size, int(state["nprobe"])
        gaps = {str(m): (float(g), int(n)) for m, (g, n) in state.get("filter_gap", {}).items()}
        self._filter_gap = {m: g for m, g in gaps.items() if m in self._modality_names}
        self.calibrate_stale_filters()  # a library saved before filters were calibrated: done here
        return True

    def calibrate_stale_filters(self) -> None:
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

    # ------------------------------------------------------------------------------------ internals
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
        raise ConfigError(f"index_factory {factory!r} is not a faiss factory string") from exc
    if not isinstance(index, faiss.IndexIVF):
        raise ConfigError(f"index_factory {factory!r} must describe a faiss IVF index without pre-transform, "
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
    """For each modality code in ``filters`` (each of more than ten items): (the probing margin of a search
    filtered to it, the modality's item count). Such a search probes the IVF lists holding the modality's
    items whose centroid scores within the margin of the nearest such list; the smallest margin whose
    recall@10 against exact filtered search reaches ``target`` is chosen.

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


def selects(name: str, modality: str | Iterable[str] | None, exclude: str | Iterable[str] | None) -> bool:
    """Whether a search with these filters ranks items of modality ``name``."""
    return (modality is None or name in _names(modality)) and (exclude is None or name not in _names(exclude))


def _names(modality: str | Iterable[str]) -> list[str]:
    return [modality] if isinstance(modality, str) else list(modality)

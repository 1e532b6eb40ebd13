"""The one search service: a text, an input or a vector in, library hits out.

The CLI (``m3bind search``), the app's workspace and ``Library.search_text`` / ``Library.search_sample``
all call :func:`search`, so a query ranks the same items wherever it is asked.

* **Default: the plain ranking of the shared space.** The query's embedding is compared with every
  selected item by cosine similarity, whatever their modality.
* **Per-modality view** (``per_modality=True``): the best items of each modality present, merged by score,
  so every modality shows up even when one of them dominates the raw similarity scale.
* **An input's query is centred only when its own modality is not searched** (``M3BindModel.centre``):
  ranking only other modalities' items, the large offset shared by its modality ranks them the same way
  for every query. Text queries and searches that include the input's own modality are not centred.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from .errors import ConfigError, InputError, OptionError
from .index import selects
from .library import Hit, Library
from .sample import Sample


def search(library: Library, model: Any, query: str | Sample | np.ndarray, k: int = 10, *,
           modality: str | Iterable[str] | None = None, exclude_modality: str | Iterable[str] | None = None,
           per_modality: bool = False, exact: bool = False, query_modality: str | None = None) -> list[Hit]:
    """The k library items nearest ``query``: a finding written as text, a ``Sample``, or a (D,) embedding.

    ``modality`` keeps only those modalities, ``exclude_modality`` leaves some out. ``per_modality``
    takes the best ``ceil(k / modalities)`` of each selected modality present in the library (at least
    one of each, so more than k hits when k is smaller than the number of modalities). ``exact`` forces
    exact search of an approximate index. ``query_modality`` names the modality of an embedding given as
    ``query`` (an input's, to be centred when that modality is not searched); ``None`` for text.
    """
    if k < 1:
        raise OptionError("Ask for at least one result.")
    vector = query_vector(library, model, query, modality, exclude_modality, query_modality)
    if not per_modality:
        return library.search(vector, k, modality, exclude_modality, exact)
    present = [m for m in library.stats()["per_modality"] if selects(m, modality, exclude_modality)]
    if not present:
        return []
    each = -(-k // len(present))
    hits = [h for m in present for h in library.search(vector, each, m, exact=exact)]
    return sorted(hits, key=lambda h: -h.score)[:max(k, len(present))]


def query_vector(library: Library, model: Any, query: str | Sample | np.ndarray,
                 modality: str | Iterable[str] | None = None, exclude_modality: str | Iterable[str] | None = None,
                 query_modality: str | None = None) -> np.ndarray:
    """The (D,) vector a query is searched with (see :func:`search`)."""
    if model is not None:
        library.check_model(model)
    if isinstance(query, str):
        text = query.strip()
        if not text:
            raise InputError("Type a finding to search for, e.g. \"pleural effusion\".")
        if query_modality is not None:
            raise ConfigError("query_modality is for embeddings of inputs, not for text")
        return _one(model.embed_text([text]))
    if isinstance(query, Sample):
        vector, query_modality = _one(model.embed(query)), query.modality
    else:
        vector = _one(query)
    if query_modality is not None and not selects(query_modality, modality, exclude_modality):
        if model is None:
            raise ConfigError("centring an input's embedding needs its model")
        vector = _one(model.centre(vector, query_modality))
    return vector


def _one(vectors: Any) -> np.ndarray:
    return np.asarray(vectors, dtype=np.float32).reshape(-1)


__all__ = ["search", "query_vector"]

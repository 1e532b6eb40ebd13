"""The evaluation's metrics: pure numpy functions of scores and relevance, no model and no data.

AUCs are Mann-Whitney (ties count half) and NaN where a class lacks positives or negatives; means skip
NaN; intervals are percentile bootstraps over items. ``train.suites`` feeds them embeddings.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
from scipy.stats import rankdata


def rowwise_auc(scores: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """ROC AUC of each row (Mann-Whitney, ties count half); NaN where a row lacks positives or negatives."""
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    positives = np.atleast_2d(np.asarray(positives, dtype=bool))
    ranks = rankdata(scores, axis=1)
    n_pos = positives.sum(1)
    n_neg = positives.shape[1] - n_pos
    u = np.where(positives, ranks, 0.0).sum(1) - n_pos * (n_pos + 1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan)


def auc(scores: np.ndarray, positives: np.ndarray) -> float:
    """The AUC of one score vector against 0/1 labels."""
    return float(rowwise_auc(scores, positives)[0])


def per_class_auc(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """One-vs-rest AUC of each class column of (N, C) scores against (N, C) 0/1 targets (NaN if undefined)."""
    return rowwise_auc(np.asarray(scores).T, np.asarray(targets).T)


def top1_accuracy(scores: np.ndarray, targets: np.ndarray) -> float:
    """Share of items whose highest-scoring class is one of theirs (items without any class left out)."""
    targets = np.asarray(targets, dtype=bool)
    has = targets.any(1)
    if not has.any():
        return math.nan
    hit = targets[np.arange(len(targets)), np.argmax(scores, axis=1)]
    return float(hit[has].mean())


def recall_at_k(similarity: np.ndarray, relevant: np.ndarray, ks: Iterable[int]) -> dict[int, np.ndarray]:
    """Per query: 1.0 when a relevant item is among the k most similar, for each k."""
    order = np.argsort(-similarity, axis=1, kind="stable")
    ranked = np.take_along_axis(np.asarray(relevant, dtype=bool), order, axis=1)
    return {k: ranked[:, :k].any(1).astype(np.float64) for k in ks}


def precision_at_k(similarity: np.ndarray, relevant: np.ndarray, k: int) -> np.ndarray:
    """Per query: the share of relevant items among the k most similar."""
    k = min(k, similarity.shape[1])
    top = np.argpartition(-similarity, k - 1, axis=1)[:, :k] if k < similarity.shape[1] else \
        np.broadcast_to(np.arange(k), similarity.shape)
    return np.take_along_axis(np.asarray(relevant, dtype=bool), top, axis=1).mean(1)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, shifted by each row's maximum so that large logits do not overflow."""
    z = np.exp(logits - logits.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def classification_metrics(scores: np.ndarray, targets: np.ndarray) -> dict:
    """Macro AUC over the classes where it is defined, per-class AUC and top-1 accuracy."""
    per_class = per_class_auc(scores, targets)
    return {"auc": nanmean(per_class), "accuracy": top1_accuracy(scores, targets),
            "per_class_auc": [_num(a) for a in per_class]}


def bootstrap_interval(scores: np.ndarray, targets: np.ndarray, rounds: int = 1000, level: float = 0.95,
                       seed: int = 0) -> list[float] | None:
    """Percentile bootstrap interval of the macro AUC over items drawn again with replacement: how far the
    figure could move on another test set of the same size (a 156-item set moves it by several hundredths)."""
    rng = np.random.default_rng(seed)
    targets = np.asarray(targets, dtype=bool)
    values = [nanmean(per_class_auc(scores[rows], targets[rows]))
              for rows in rng.integers(0, len(scores), (rounds, len(scores)))]
    return percentile_interval(values, level)


def zero_shot_scores(image_emb: np.ndarray, class_emb: np.ndarray, multi_label: bool,
                     logit_scale: float) -> np.ndarray:
    """Class scores: softmax over classes (single-label), raw cosine per class (multi-label)."""
    sims = image_emb @ class_emb.T
    return sims if multi_label else softmax(logit_scale * sims)


def cross_modal_metrics(query_emb: np.ndarray, query_abnormal: np.ndarray, item_emb: np.ndarray,
                        item_abnormal: np.ndarray, k: int = 10) -> dict:
    """Image-to-image across modalities: does the ranking put items of the query's status first?

    Per-query AUC and precision@k, averaged within normal and within abnormal queries and then over the
    two (status-balanced), so that a ranking which ignores the query scores exactly chance (0.5) however
    the statuses are mixed; the plain means over queries are kept as ``*_query_mean``.
    """
    query_abnormal = np.asarray(query_abnormal, bool)
    sims = query_emb @ item_emb.T
    same = query_abnormal[:, None] == np.asarray(item_abnormal, bool)[None, :]
    per_query = {"auc": rowwise_auc(sims, same), f"p@{k}": precision_at_k(sims, same, k),
                 f"chance_p@{k}": same.mean(1)}
    out = {}
    for key, values in per_query.items():
        out[key] = nanmean([nanmean(values[query_abnormal == s]) for s in (False, True)])
        out[f"{key}_query_mean"] = nanmean(values)
    return {**out, "n_queries": len(query_emb), "n_items": len(item_emb)}


def retrieval_metrics(query_emb: np.ndarray, library_emb: np.ndarray, relevant: np.ndarray,
                      ks: Sequence[int]) -> dict:
    """Mean Recall@K over the informative queries: some, but not all, library items are relevant."""
    relevant = np.asarray(relevant, bool)
    keep = relevant.any(1) & ~relevant.all(1)
    if not keep.any():
        return {"n_queries": 0, "n_library": len(library_emb), **{f"R@{k}": None for k in ks}}
    hits = recall_at_k(query_emb[keep] @ library_emb.T, relevant[keep], ks)
    return {"n_queries": int(keep.sum()), "n_library": len(library_emb),
            **{f"R@{k}": float(h.mean()) for k, h in hits.items()}}


def pair_mean(pairs: dict[str, dict], names: Iterable[str] | None = None) -> dict:
    """Mean of the cross-modal metrics over the scored ordered pairs (or over ``names`` among them)."""
    scored = [r for name, r in pairs.items() if "skipped" not in r and (names is None or name in names)]
    keys = [key for key in (scored[0] if scored else {}) if not key.startswith("n_")]
    return {**{key: nanmean([r[key] for r in scored]) for key in keys}, "n_pairs": len(scored), "chance_auc": 0.5}


def bootstrap_pair_mean(data: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], names: Sequence[str], k: int,
                        rounds: int = 200, level: float = 0.95, seed: int = 0) -> list[float] | None:
    """Percentile bootstrap interval of the mean AUC over the ordered pairs ``names`` ("a->b"): each round
    draws every modality's items again with replacement, as queries and as searched items alike.

    ``data`` maps a modality to (embeddings, centred queries, abnormal status), as ``suites.cross_modal`` has."""
    if not names:
        return None
    rng = np.random.default_rng(seed)
    means = []
    for _ in range(rounds):
        rows = {m: rng.integers(0, len(status), len(status)) for m, (_, _, status) in data.items()}
        aucs = []
        for name in names:
            a, b = name.split("->")
            aucs.append(cross_modal_metrics(data[a][1][rows[a]], data[a][2][rows[a]], data[b][0][rows[b]],
                                            data[b][2][rows[b]], k)["auc"])
        means.append(nanmean(aucs))
    return percentile_interval(means, level)


def mean_std(results: list[dict]) -> dict:
    """Mean and standard deviation of AUC and accuracy over runs (seeds), NaN runs left out."""
    out = {}
    for key in ("auc", "accuracy"):
        values = [r[key] for r in results if r[key] is not None and not math.isnan(r[key])]
        out[f"{key}_mean"] = float(np.mean(values)) if values else None
        out[f"{key}_std"] = float(np.std(values)) if values else None
    return out


def n_defined_classes(targets: np.ndarray) -> int:
    """Classes with both positives and negatives among the items (where an AUC exists)."""
    n_pos = np.asarray(targets, bool).sum(0)
    return int(((n_pos > 0) & (n_pos < len(targets))).sum())


def percentile_interval(values: Sequence[float | None], level: float) -> list[float] | None:
    """The central ``level`` interval of the defined values (None when none is)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    tail = 100 * (1 - level) / 2
    return [float(v) for v in np.percentile(values, [tail, 100 - tail])]


def nanmean(values: Iterable[float | None]) -> float | None:
    """The mean of the defined values; None when there are none (an undefined metric stays undefined)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(values)) if values else None


def _num(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else float(value)

"""Evaluation of the paper's tasks on held-out test splits, for the bound model and its counterparts.

Tasks (``SUITES``), each on the test split of every dataset whose modality a model encodes:
  * ``zero_shot``: class prompts (the data adapter's per-class prompt ensembles) against images.
    AUC: binary, macro one-vs-rest over the classes present (multi-class, softmax scores), or for
    multi-label PTB-XL macro one-vs-rest over the five superclasses on raw cosine similarities (a record
    may hold several). Accuracy: the top-1 class is one of the item's classes (for single-label data the
    usual argmax accuracy; for PTB-XL counted over records with at least one superclass).
  * ``few_shot``: k labelled items per class drawn from the TRAIN split (never test), nested across k
    for one seed, as class prototypes and as a logistic-regression probe; mean and std over seeds.
  * ``retrieval``: text-to-image. A library of every dataset's test items (balanced subsample, seeded),
    one query per class prompt; a retrieved item is relevant when it belongs to the query's dataset
    and modality and carries the query's class. Recall@K = share of queries with a relevant item in
    the top K; queries with no relevant item, or with every item relevant, are not counted. Reported
    over the library of all modalities and over each modality's own library.
  * ``cross_modal``: image-to-image across modalities on a normal/abnormal notion (``NORMAL_CLASS``):
    for each query of modality A, all items of B ranked by cosine; per-query AUC of "same status as the
    query" and precision@10 with its chance level (the base rate), averaged over queries balanced
    between normal and abnormal ones (chance is then 0.5 for both). Counterparts are unbound: each
    embeds its own modality in its own space, which is the chance-level baseline.

Zero-shot AUCs and the core cross-modal mean carry 95% percentile-bootstrap intervals over the items
(``auc_ci95``): with 78 to 1000 items per set, differences of a few hundredths are often within chance.

Only ``split`` items are scored (``test`` by default; ``val`` serves choices elsewhere); seeds are fixed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from scipy.stats import rankdata
from threadpoolctl import threadpool_limits

from m3bind import M3BindModel, load_model
from m3bind.fewshot import LogisticProbe, PrototypeClassifier

from .captions import (
    BRAIN_TUMOR_MRI, BREASTMNIST, COVID_CT, LC25000, PNEUMONIAMNIST, PTBXL_SUPERCLASSES, RETINAMNIST,
)
from .data import Pair, load_dataset
from .detector import detector_accuracy
from .eval_search import search_suite

log = logging.getLogger(__name__)

SUITES = ("zero_shot", "few_shot", "retrieval", "cross_modal", "search", "detection")
FEW_SHOT_METHODS = ("prototype", "logistic")

# (dataset, modality) test sets. CinC 2021 has no held-out split; covid CT is one class in test (zero-shot
# and few-shot skip what has fewer than two classes).
EVAL_SETS: tuple[tuple[str, str], ...] = (
    ("cxr_nih", "xray"), ("pneumoniamnist", "xray"), ("covid_cxr", "xray"), ("covid_ct", "ct"), ("covid_cxr", "ct"),
    ("brain_tumor_mri", "mri"), ("breastmnist", "ultrasound"), ("idrid", "retina"), ("retinamnist", "retina"),
    ("lc25000_lung", "pathology"), ("ptbxl", "ecg"),
)
# A two-class reading of a multi-class set, scored from its zero-shot softmax: the probability of the
# positive classes (IDRiD referable retinopathy: grade 2 or worse; brain MRI: any tumour).
BINARY_VIEWS: dict[str, tuple[str, tuple[str, ...]]] = {
    "idrid/retina": ("referable DR (grade >= 2)", tuple(c.name for c in RETINAMNIST[2:])),
    "brain_tumor_mri/mri": ("tumour vs no tumour", ("glioma", "meningioma", "pituitary tumor")),
}
# Cross-modal retrieval: one dataset per modality and its "normal" class. An item is normal when its
# classes are exactly that one, abnormal when it has any other class (ECG: NORM alone is normal, any of
# MI/STTC/CD/HYP abnormal; breast: malignant abnormal, normal-or-benign normal; retina: grade 0 normal;
# pathology: benign lung tissue normal, either carcinoma abnormal); items without a class are left out.
NORMAL_CLASS: dict[str, tuple[str, str]] = {
    "xray": ("pneumoniamnist", PNEUMONIAMNIST[0].name),
    "ultrasound": ("breastmnist", BREASTMNIST[1].name),
    "retina": ("retinamnist", RETINAMNIST[0].name),
    "pathology": ("lc25000_lung", LC25000["lung_n"].name),
    "ecg": ("ptbxl", PTBXL_SUPERCLASSES["NORM"].name),
    "ct": ("covid_ct", COVID_CT["NonCOVID"].name),
    "mri": ("brain_tumor_mri", BRAIN_TUMOR_MRI["no_tumor"].name),
}

# The modalities whose ordered pairs make the headline cross-modal mean (pathology pairs are reported too).
CORE_CROSS_MODAL = ("xray", "ultrasound", "retina", "ecg")


@dataclass(frozen=True)
class EvalConfig:
    shots: tuple[int, ...] = (1, 4, 16)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    max_test: int | None = None  # items per test set for classification (None: the whole split)
    max_library: int = 300  # items per test set in the retrieval library and the cross-modal sets
    recall_at: tuple[int, ...] = (1, 5, 10)
    precision_at: int = 10
    subsample_seed: int = 0
    batch_size: int = 64


FULL = EvalConfig()
QUICK = EvalConfig(shots=(1, 4), seeds=(0, 1), max_test=40, max_library=40)


# =========================================================================== metrics (pure numpy)

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
    z = np.exp(logits - logits.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def classification_metrics(scores: np.ndarray, targets: np.ndarray) -> dict:
    """Macro AUC over the classes where it is defined, per-class AUC and top-1 accuracy."""
    per_class = per_class_auc(scores, targets)
    return {"auc": _nanmean(per_class), "accuracy": top1_accuracy(scores, targets),
            "per_class_auc": [_num(a) for a in per_class]}


def bootstrap_interval(scores: np.ndarray, targets: np.ndarray, rounds: int = 1000, level: float = 0.95,
                       seed: int = 0) -> list[float] | None:
    """Percentile bootstrap interval of the macro AUC over items drawn again with replacement: how far the
    figure could move on another test set of the same size (a 156-item set moves it by several hundredths)."""
    rng = np.random.default_rng(seed)
    targets = np.asarray(targets, dtype=bool)
    values = [_nanmean(per_class_auc(scores[rows], targets[rows]))
              for rows in rng.integers(0, len(scores), (rounds, len(scores)))]
    return _percentile_interval(values, level)


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
        out[key] = _nanmean([_nanmean(values[query_abnormal == s]) for s in (False, True)])
        out[f"{key}_query_mean"] = _nanmean(values)
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


# =========================================================================== data

@dataclass
class EvalSet:
    """The items of one (dataset, modality) split with multi-hot targets and per-class prompt ensembles."""

    dataset: str
    modality: str
    split: str
    multi_label: bool
    class_names: list[str]
    prompts: dict[str, list[str]]
    pairs: list[Pair]
    normal_classes: tuple[str, ...] = ()  # the classes that mean "nothing abnormal"

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.modality}"

    @property
    def targets(self) -> np.ndarray:
        out = np.zeros((len(self.pairs), len(self.class_names)), dtype=bool)
        for i, p in enumerate(self.pairs):
            out[i, list(p.targets)] = True
        return out

    def subset(self, limit: int | None, seed: int) -> "EvalSet":
        keep = balanced_subset([p.label for p in self.pairs], limit, seed)
        return replace(self, pairs=[self.pairs[i] for i in keep])


def load_eval_set(dataset: str, modality: str, split: str, data_root: str | Path | None = None) -> EvalSet:
    ds = load_dataset(dataset, split, data_root=data_root)
    return EvalSet(dataset, modality, split, ds.multi_label, ds.class_names, ds.prompts(modality),
                   [p for p in ds.pairs if p.modality == modality], tuple(c.name for c in ds.concepts if c.normal))


def balanced_subset(labels: Sequence[int], limit: int | None, seed: int) -> np.ndarray:
    """Sorted indices of at most ``limit`` items, classes as balanced as their sizes allow, seeded."""
    labels = np.asarray(labels)
    if limit is None or len(labels) <= limit:
        return np.arange(len(labels))
    perm = np.random.default_rng(seed).permutation(len(labels))
    rank = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels[perm] == c)
        rank[members] = np.arange(len(members))
    return np.sort(perm[np.lexsort((np.arange(len(labels)), rank))[:limit]])


def draw_support(targets: np.ndarray, k: int, seed: int) -> dict[int, np.ndarray]:
    """Indices of up to ``k`` items per class (fewer where a class has fewer), nested across k for a seed."""
    targets = np.asarray(targets, dtype=bool)
    support = {}
    for c in range(targets.shape[1]):
        pool = np.flatnonzero(targets[:, c])
        if len(pool):
            support[c] = pool[np.random.default_rng((seed, c)).permutation(len(pool))[:k]]
    return support


def check_disjoint(support: Sequence[Pair], evaluated: Sequence[Pair]) -> None:
    """Refuse a few-shot support that shares an item (or a patient / near-duplicate group) with the test items."""
    ids = {p.item_id for p in support} & {p.item_id for p in evaluated}
    groups = {p.group for p in support if p.group} & {p.group for p in evaluated if p.group}
    if ids or groups:
        raise RuntimeError(f"Few-shot support overlaps the evaluated items: {sorted(ids | groups)[:3]}")


# =========================================================================== embedding

class Embedder:
    """A model's embeddings of dataset items (by item id) and of texts, each computed once."""

    def __init__(self, model: M3BindModel, batch_size: int = 64, chunk: int = 256):
        self.model, self.batch_size, self.chunk = model, batch_size, chunk
        self.cache: dict[str, np.ndarray] = {}
        self.text_cache: dict[str, np.ndarray] = {}

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        missing = list(dict.fromkeys(t for t in texts if t not in self.text_cache))
        self.text_cache.update(zip(missing, self.model.embed_text(missing)))
        return np.stack([self.text_cache[t] for t in texts]) if texts else np.zeros((0, self.model.dim), np.float32)

    def __call__(self, pairs: Sequence[Pair]) -> np.ndarray:
        missing = list({p.item_id: p for p in pairs if p.item_id not in self.cache}.values())
        for start in range(0, len(missing), self.chunk):
            part = missing[start:start + self.chunk]
            vectors = self.model.embed([p.load() for p in part], batch_size=self.batch_size)
            self.cache.update(zip((p.item_id for p in part), vectors))
        if not pairs:
            return np.zeros((0, self.model.dim), dtype=np.float32)
        return np.stack([self.cache[p.item_id] for p in pairs])


def class_embeddings(embed: Embedder, prompts: dict[str, list[str]]) -> np.ndarray:
    """(C, D): per class, the normalised mean of its prompt embeddings (the ensemble)."""
    flat = embed.texts([p for group in prompts.values() for p in group])
    bounds = np.cumsum([0] + [len(group) for group in prompts.values()])
    vectors = np.stack([flat[a:b].mean(0) for a, b in zip(bounds, bounds[1:])])
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


# =========================================================================== tasks

def zero_shot(embed: Embedder, test: EvalSet) -> dict:
    targets = test.targets
    out = {"n": len(test.pairs), "classes": test.class_names}
    if _n_defined_classes(targets) == 0:
        return {**out, "skipped": "fewer than two classes among the test items"}
    scores = zero_shot_scores(embed(test.pairs), class_embeddings(embed, test.prompts), test.multi_label,
                              embed.model.config.logit_scale)
    out = {**out, **classification_metrics(scores, targets), "auc_ci95": bootstrap_interval(scores, targets)}
    if test.key in BINARY_VIEWS:
        name, positive = BINARY_VIEWS[test.key]
        columns = [test.class_names.index(c) for c in positive]
        score, target = scores[:, columns].sum(1), targets[:, columns].any(1)
        out["binary"] = {"name": name, "auc": auc(score, target),
                         "auc_ci95": bootstrap_interval(np.stack([1 - score, score], 1), np.stack([~target, target], 1))}
    return out


def few_shot(embed: Embedder, train: EvalSet, test: EvalSet, config: EvalConfig) -> dict:
    """Prototypes and a logistic probe from k train items per class, scored on the test items."""
    targets = test.targets
    train_targets = train.targets
    out: dict = {"n": len(test.pairs), "n_train_pool": len(train.pairs)}
    present = [c for c in range(len(train.class_names)) if train_targets[:, c].any()]
    if len(present) < 2 or _n_defined_classes(targets[:, present]) == 0:
        return {**out, "skipped": "fewer than two classes with train and test items"}
    test_emb = embed(test.pairs)
    runs: dict[str, dict[int, list[dict]]] = {m: {k: [] for k in config.shots} for m in FEW_SHOT_METHODS}
    support_sizes: dict[int, list[int]] = {k: [] for k in config.shots}
    for seed in config.seeds:
        deepest = draw_support(train_targets, max(config.shots), seed)
        embed([train.pairs[i] for i in np.unique(np.concatenate(list(deepest.values())))])  # cached for all k
        for k in config.shots:
            support = {c: idx[:k] for c, idx in deepest.items()}
            chosen = np.unique(np.concatenate(list(support.values())))
            check_disjoint([train.pairs[i] for i in chosen], test.pairs)
            support_sizes[k].append(len(chosen))
            for method in FEW_SHOT_METHODS:
                # one BLAS thread: tiny fits otherwise spend 20x longer synchronising threads
                with threadpool_limits(1):
                    scores = _few_shot_scores(method, embed, train, support, chosen, test_emb)
                runs[method][k].append(classification_metrics(scores[:, present], targets[:, present]))
    out["classes"] = [train.class_names[c] for c in present]
    out["support_items"] = {str(k): float(np.mean(v)) for k, v in support_sizes.items()}
    for method, by_k in runs.items():
        out[method] = {str(k): _mean_std(results) for k, results in by_k.items()}
    return out


def _few_shot_scores(method: str, embed: Embedder, train: EvalSet, support: dict[int, np.ndarray],
                     chosen: np.ndarray, test_emb: np.ndarray) -> np.ndarray:
    """(N, C) scores: probabilities (single-label) or per-class scores (multi-label); -inf without support."""
    names = train.class_names
    scores = np.full((len(test_emb), len(names)), -np.inf)
    if method == "prototype":
        classes = sorted(support)
        x = embed([train.pairs[i] for c in classes for i in support[c]])
        clf = PrototypeClassifier(1.0 / embed.model.config.logit_scale).fit(
            x, [names[c] for c in classes for _ in support[c]])
        columns = [names.index(c) for c in clf.classes_]
        # multi-label: cosine to each prototype, as zero-shot does; a softmax would couple the classes
        scores[:, columns] = test_emb @ clf.prototypes_.T if train.multi_label else clf.predict_proba(test_emb)
        return scores
    x = embed([train.pairs[i] for i in chosen])
    if train.multi_label:  # one binary probe per class on the union of the supports
        y = train.targets[chosen]
        for c in support:
            if 0 < y[:, c].sum() < len(y):
                probe = LogisticProbe().fit(x, ["yes" if v else "no" for v in y[:, c]])
                scores[:, c] = probe.predict_proba(test_emb)[:, probe.classes_.index("yes")]
        return scores
    probe = LogisticProbe().fit(x, [names[train.pairs[i].label] for i in chosen])
    scores[:, [names.index(c) for c in probe.classes_]] = probe.predict_proba(test_emb)
    return scores


def retrieval(embed: Embedder, library: Sequence[EvalSet], ks: Sequence[int]) -> dict:
    """Text-to-image Recall@K over the library of the given sets, overall and per dataset of the queries."""
    lib_emb = embed([p for s in library for p in s.pairs])
    owner = np.concatenate([[i] * len(s.pairs) for i, s in enumerate(library)]).astype(int) if library else \
        np.zeros(0, int)
    queries, relevant, source = [], [], []
    for i, s in enumerate(library):
        targets = s.targets
        for c, group in enumerate(s.prompts.values()):
            row = np.zeros(len(owner), dtype=bool)
            row[owner == i] = targets[:, c]
            queries += list(group)
            relevant += [row] * len(group)
            source += [i] * len(group)
    if not queries:
        return {"n_queries": 0}
    q = embed.texts(queries)
    relevant, source = np.array(relevant), np.array(source)
    out = retrieval_metrics(q, lib_emb, relevant, ks)
    out["per_set"] = {s.key: retrieval_metrics(q[source == i], lib_emb, relevant[source == i], ks)
                      for i, s in enumerate(library)}
    return out


def abnormal_status(test: EvalSet, normal_class: str) -> np.ndarray:
    """1 abnormal, 0 normal, -1 no class (left out); see ``NORMAL_CLASS``."""
    targets = test.targets
    normal = test.class_names.index(normal_class)
    others = np.delete(targets, normal, axis=1).any(1)
    return np.where(others, 1, np.where(targets[:, normal], 0, -1))


def cross_modal(embedders: dict[str, Embedder], sets: dict[str, EvalSet], k: int) -> dict:
    """Every ordered pair of modalities A != B: A's items query B's items, each embedded by its own embedder.

    Queries are centred by their model (``M3BindModel.centre``), as the library's cross-modal search does;
    ``raw_mean`` is the same with uncentred queries."""
    data = {}
    for modality, test in sets.items():
        status = abnormal_status(test, NORMAL_CLASS[modality][1])
        keep = status >= 0
        embedded = embedders[modality]([p for p, ok in zip(test.pairs, keep) if ok])
        data[modality] = (embedded, embedders[modality].model.centre(embedded, modality), status[keep])
    pairs, raw = {}, {}
    for a, (emb_a, query_a, status_a) in data.items():
        for b, (emb_b, _, status_b) in data.items():
            if a == b:
                continue
            if emb_a.shape[1] != emb_b.shape[1]:
                pairs[f"{a}->{b}"] = {"skipped": f"embedding sizes differ ({emb_a.shape[1]} vs {emb_b.shape[1]})"}
                continue
            pairs[f"{a}->{b}"] = cross_modal_metrics(query_a, status_a, emb_b, status_b, k)
            raw[f"{a}->{b}"] = cross_modal_metrics(emb_a, status_a, emb_b, status_b, k)
    core = [name for name in pairs if set(name.split("->")) <= set(CORE_CROSS_MODAL) and "skipped" not in pairs[name]]
    core_mean = {**pair_mean(pairs, core), "auc_ci95": bootstrap_pair_mean(data, core, k)}
    return {"pairs": pairs, "mean": pair_mean(pairs), "core_mean": core_mean, "raw_mean": pair_mean(raw),
            "status_counts": {m: {"normal": int((s == 0).sum()), "abnormal": int((s == 1).sum())}
                              for m, (_, _, s) in data.items()}}


def bootstrap_pair_mean(data: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], names: Sequence[str], k: int,
                        rounds: int = 200, level: float = 0.95, seed: int = 0) -> list[float] | None:
    """Percentile bootstrap interval of the mean AUC over the ordered pairs ``names`` ("a->b"): each round
    draws every modality's items again with replacement, as queries and as searched items alike.

    ``data`` maps a modality to (embeddings, centred queries, abnormal status), as in ``cross_modal``."""
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
        means.append(_nanmean(aucs))
    return _percentile_interval(means, level)


def pair_mean(pairs: dict[str, dict], names: Iterable[str] | None = None) -> dict:
    """Mean of the cross-modal metrics over the scored ordered pairs (or over ``names`` among them)."""
    scored = [r for name, r in pairs.items() if "skipped" not in r and (names is None or name in names)]
    keys = [key for key in (scored[0] if scored else {}) if not key.startswith("n_")]
    return {**{key: _nanmean([r[key] for r in scored]) for key in keys}, "n_pairs": len(scored), "chance_auc": 0.5}


# =========================================================================== drivers

def evaluate(model: M3BindModel, suites: Sequence[str] = SUITES, data_root: str | Path | None = None,
             split: str = "test", config: EvalConfig = FULL, modalities: Sequence[str] | None = None,
             embedder: Embedder | None = None) -> dict:
    """Every task of ``suites`` on the ``split`` items of each dataset whose modality the model encodes.

    ``modalities`` narrows the sets (a counterpart is evaluated on its own modality only).
    """
    unknown = set(suites) - set(SUITES)
    if unknown:
        raise ValueError(f"Unknown suite(s) {sorted(unknown)}; suites are {', '.join(SUITES)}.")
    if split == "train":
        raise ValueError("Evaluating on the train split would score items the model was fitted on.")
    covered = [m for m in model.modalities if modalities is None or m in modalities]
    embed = embedder or Embedder(model, config.batch_size)
    sets = [(d, m) for d, m in EVAL_SETS if m in covered]
    tests = {f"{d}/{m}": load_eval_set(d, m, split, data_root) for d, m in sets}
    tests = {key: s for key, s in tests.items() if s.pairs}
    library = {key: s.subset(config.max_library, config.subsample_seed) for key, s in tests.items()}
    results: dict = {"model": _model_info(model), "split": split, "config": asdict(config),
                     "sets": {key: {"n": len(s.pairs), "n_library": len(library[key].pairs)}
                              for key, s in tests.items()}}
    started = time.perf_counter()
    if "zero_shot" in suites:
        results["zero_shot"] = {key: zero_shot(embed, s.subset(config.max_test, config.subsample_seed))
                                for key, s in tests.items()}
        log.info("zero-shot done (%.0f s)", time.perf_counter() - started)
    if "few_shot" in suites:
        results["few_shot"] = {}
        for key, s in tests.items():
            train = load_eval_set(s.dataset, s.modality, "train", data_root)
            results["few_shot"][key] = few_shot(embed, train, s.subset(config.max_test, config.subsample_seed),
                                                config)
        log.info("few-shot done (%.0f s)", time.perf_counter() - started)
    if "retrieval" in suites:
        results["retrieval"] = {"all": retrieval(embed, list(library.values()), config.recall_at)}
        results["retrieval"]["per_modality"] = {
            m: retrieval(embed, [s for s in library.values() if s.modality == m], config.recall_at)
            for m in covered if any(s.modality == m for s in library.values())}
        log.info("retrieval done (%.0f s)", time.perf_counter() - started)
    if "cross_modal" in suites:
        cm_sets = _cross_modal_sets(library, covered)
        results["cross_modal"] = cross_modal({m: embed for m in cm_sets}, cm_sets, config.precision_at)
        log.info("cross-modal done (%.0f s)", time.perf_counter() - started)
    if "search" in suites and len({s.modality for s in library.values()}) > 1:
        results["search"] = search_suite(embed, list(library.values()))
    if "detection" in suites and model.detector is not None:
        image_sets: dict[str, list[str]] = {}
        for d, m in EVAL_SETS:
            if m in model.config.detector.modalities:
                image_sets.setdefault(m, []).append(d)
        results["detection"] = detector_accuracy(model, image_sets, split, data_root)
    return _json_safe(results)


def compare(bound: M3BindModel, teachers: dict[str, M3BindModel], suites: Sequence[str] = SUITES,
            data_root: str | Path | None = None, split: str = "test", config: EvalConfig = FULL) -> dict:
    """The bound model beside each modality's own model (its counterpart), on the same items.

    Cross-modal retrieval of the counterparts pairs two unrelated spaces: counterpart A embeds A's items,
    counterpart B embeds B's items (the unbound baseline).
    """
    results = {"bound": evaluate(bound, suites, data_root, split, config), "counterparts": {}}
    embedders: dict[int, Embedder] = {}
    for modality, teacher in teachers.items():
        if modality not in teacher.modalities:
            raise ValueError(f"The counterpart given for {modality!r} encodes only {teacher.modalities}.")
        embed = embedders.setdefault(id(teacher), Embedder(teacher, config.batch_size))
        own = [s for s in SUITES if s in suites and s not in ("cross_modal", "search", "detection")]
        results["counterparts"][modality] = evaluate(teacher, own, data_root, split, config, [modality], embed)
    if "cross_modal" in suites:
        library = {f"{d}/{m}": load_eval_set(d, m, split, data_root).subset(config.max_library, config.subsample_seed)
                   for d, m in EVAL_SETS if m in teachers and m in NORMAL_CLASS}
        cm_sets = _cross_modal_sets(library, list(teachers))
        unbound = cross_modal({m: embedders[id(teachers[m])] for m in cm_sets}, cm_sets, config.precision_at)
        results["unbound_cross_modal"] = unbound
        if "cross_modal" in results["bound"]:  # the bound model's mean over the same pairs, for a fair row
            results["bound"]["cross_modal"]["mean_on_counterpart_pairs"] = pair_mean(
                results["bound"]["cross_modal"]["pairs"], unbound["pairs"])
    return _json_safe(results)


def _cross_modal_sets(library: dict[str, EvalSet], modalities: Sequence[str]) -> dict[str, EvalSet]:
    return {m: library[f"{d}/{m}"] for m, (d, _) in NORMAL_CLASS.items()
            if m in modalities and f"{d}/{m}" in library}


# =========================================================================== reporting

def markdown_table(results: dict) -> str:
    """Markdown tables of ``evaluate`` results, or of ``compare`` results with the counterparts beside."""
    bound = results.get("bound", results)
    counterparts = results.get("counterparts", {})
    cols = ["bound"] + (["counterpart"] if counterparts else [])

    def other(modality: str, *path: str):
        node = counterparts.get(modality)
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        return node

    named = ", ".join(f"{m} = `{r['model']['name']}`" for m, r in counterparts.items())
    lines = [f"Model `{bound['model']['name']}`, split `{bound['split']}`"
             + (f"; counterparts: {named}" if counterparts else "") + "."]
    if "zero_shot" in bound:
        lines += ["", "### Zero-shot classification (prompt ensembles; AUC with its 95% bootstrap interval over "
                  "items)", "",
                  _row(["dataset", "modality", "n", *[f"AUC {c}" for c in cols], *[f"ACC {c}" for c in cols]]),
                  _row(["---"] * (3 + 2 * len(cols)))]
        for key, r in bound["zero_shot"].items():
            d, m = key.split("/")
            mine = [r] + ([other(m, "zero_shot", key)] if counterparts else [])
            acc = [r.get("accuracy")] + ([other(m, "zero_shot", key, "accuracy")] if counterparts else [])
            lines.append(_row([d, m, r["n"], *map(_fmt_ci, mine), *map(_fmt, acc)]))
            if "binary" in r:
                views = [r["binary"]] + ([other(m, "zero_shot", key, "binary")] if counterparts else [])
                lines.append(_row([f"{d}: {r['binary']['name']}", m, r["n"], *map(_fmt_ci, views),
                                   *["–"] * len(cols)]))
    if "few_shot" in bound:
        seeds = len(bound["config"]["seeds"])
        lines += ["", f"### Few-shot (k per class from train; mean ± std over {seeds} seeds)", "",
                  _row(["dataset", "method", "k", *[f"AUC {c}" for c in cols], *[f"ACC {c}" for c in cols]]),
                  _row(["---"] * (3 + 2 * len(cols)))]
        for key, r in bound["few_shot"].items():
            m = key.split("/")[1]
            for method in FEW_SHOT_METHODS:
                for k, stats in r.get(method, {}).items():
                    theirs = other(m, "few_shot", key, method, k)
                    aucs = [_fmt_ms(stats, "auc")] + ([_fmt_ms(theirs, "auc")] if counterparts else [])
                    accs = [_fmt_ms(stats, "accuracy")] + ([_fmt_ms(theirs, "accuracy")] if counterparts else [])
                    lines.append(_row([key, method, k, *aucs, *accs]))
    if "retrieval" in bound:
        ks = bound["config"]["recall_at"]
        lines += ["", "### Text-to-image retrieval (Recall@K, label-level relevance, mean over prompt queries)", "",
                  _row(["library", "queries", *[f"R@{k} {c}" for k in ks for c in cols]]),
                  _row(["---"] * (2 + len(ks) * len(cols)))]
        r = bound["retrieval"]["all"]
        lines.append(_row(["all modalities", r.get("n_queries"),
                           *[v for k in ks for v in [_fmt(r.get(f"R@{k}"))] + ["–"] * (len(cols) - 1)]]))
        for m, r in bound["retrieval"].get("per_modality", {}).items():
            theirs = other(m, "retrieval", "per_modality", m) or {}
            lines.append(_row([m, r.get("n_queries"), *[v for k in ks for v in [_fmt(r.get(f"R@{k}"))] + (
                [_fmt(theirs.get(f"R@{k}"))] if counterparts else [])]]))
    if "cross_modal" in bound:
        k = bound["config"]["precision_at"]
        unbound = results.get("unbound_cross_modal", {})
        ucols = ["bound"] + (["unbound"] if unbound else [])
        lines += ["", "### Cross-modal image-to-image retrieval (same normal/abnormal status as the query; "
                  "means balanced over normal and abnormal queries; queries centred by their modality's mean; "
                  "the core mean with its 95% bootstrap interval over items)", "",
                  _row(["query -> library", *[f"AUC {c}" for c in ucols], *[f"P@{k} {c}" for c in ucols],
                        f"chance P@{k}"]),
                  _row(["---"] * (2 + 2 * len(ucols)))]
        mean_row = "**mean**"
        rows = list(bound["cross_modal"]["pairs"].items()) + [(mean_row, bound["cross_modal"]["mean"])]
        fair = bound["cross_modal"].get("mean_on_counterpart_pairs")
        if fair and 0 < fair["n_pairs"] != bound["cross_modal"]["mean"]["n_pairs"]:  # compare means over equal pairs
            mean_row = "**mean over the pairs with counterparts**"
            rows.append((mean_row, fair))
        core_row, raw_row = f"**mean over {', '.join(CORE_CROSS_MODAL)}**", "mean, uncentred queries"
        for row, key in ((core_row, "core_mean"), (raw_row, "raw_mean")):
            if (bound["cross_modal"].get(key) or {}).get("n_pairs"):
                rows.append((row, bound["cross_modal"][key]))
        for pair, r in rows:
            u = {mean_row: unbound.get("mean"), raw_row: unbound.get("raw_mean"), core_row: unbound.get("core_mean")}.get(
                pair, unbound.get("pairs", {}).get(pair)) or {}
            lines.append(_row([pair, _fmt_ci(r), *([_fmt_ci(u)] if unbound else []),
                               _fmt(r.get(f"p@{k}")), *([_fmt(u.get(f"p@{k}"))] if unbound else []),
                               _fmt(r.get(f"chance_p@{k}"))]))
    lines += _search_lines(bound)
    return "\n".join(lines) + "\n"


def _search_lines(bound: dict) -> list[str]:
    """The mixed-library search and the modality detector, bound model only (counterparts cannot do either)."""
    lines = []
    search = bound.get("search", {})
    if search.get("queries"):
        q, notes = search["queries"], search.get("notes", {})
        lines += ["", f"### Search over one library of every modality ({search['n_library']} test items; plain "
                  "cosine ranking)", "", _row(["what", "n", "P@10", "R@10", "right modality in top 10", "landing"]),
                  _row(["---"] * 6),
                  _row(["free-text queries (`train/eval_search.py`)", q["n"], _fmt(q["p@10"]), _fmt(q["r@10"]),
                        _fmt(q["modality@10"]), _fmt(q["landing"])])]
        if notes.get("n"):
            lines.append(_row(["covid-chestxray clinical notes: abnormal chest images in top 10", notes["n"],
                               _fmt(notes["abnormal_chest@10"]), "–", f"chance {_fmt(notes['chance'])}", "–"]))
    if bound.get("detection"):
        d = bound["detection"]
        per = ", ".join(f"{m} {v:.3f}" for m, v in d["per_modality"].items())
        lines += ["", f"### Modality detection of plain image files: {d['accuracy']:.3f} right over {d['n']} test "
                  f"images ({per})"]
    return lines


def _row(cells: Sequence) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _fmt(value) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _fmt_ci(result: dict | None) -> str:
    """An AUC with its interval, e.g. "0.895 (0.84–0.94)"."""
    result = result or {}
    ci = result.get("auc_ci95")
    return _fmt(result.get("auc")) + (f" ({ci[0]:.2f}–{ci[1]:.2f})" if ci else "")


def _fmt_ms(stats: dict | None, key: str) -> str:
    if not stats or stats.get(f"{key}_mean") is None:
        return "–"
    return f"{stats[f'{key}_mean']:.3f} ± {stats[f'{key}_std']:.3f}"


def _mean_std(results: list[dict]) -> dict:
    out = {}
    for key in ("auc", "accuracy"):
        values = [r[key] for r in results if r[key] is not None and not math.isnan(r[key])]
        out[f"{key}_mean"] = float(np.mean(values)) if values else None
        out[f"{key}_std"] = float(np.std(values)) if values else None
    return out


def _n_defined_classes(targets: np.ndarray) -> int:
    """Classes with both positives and negatives among the items (where an AUC exists)."""
    n_pos = np.asarray(targets, bool).sum(0)
    return int(((n_pos > 0) & (n_pos < len(targets))).sum())


def _percentile_interval(values: Sequence[float | None], level: float) -> list[float] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    tail = 100 * (1 - level) / 2
    return [float(v) for v in np.percentile(values, [tail, 100 - tail])]


def _nanmean(values) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(values)) if values else None


def _num(value) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def _model_info(model: M3BindModel) -> dict:
    return {"name": model.config.name, "fingerprint": model.fingerprint, "modalities": model.modalities,
            "dim": model.dim}


def _json_safe(node):
    """Plain JSON: NaN becomes null, numpy scalars become Python numbers, tuples become lists."""
    if isinstance(node, dict):
        return {str(k): _json_safe(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_json_safe(v) for v in node]
    if isinstance(node, (np.floating, float)):
        return None if math.isnan(node) else float(node)
    if isinstance(node, np.integer):
        return int(node)
    return node


# =========================================================================== CLI

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model directory (default: the embedded default model)")
    parser.add_argument("--teachers", nargs="*", default=[], metavar="DIR",
                        help="counterpart model directories; each serves the modalities it encodes")
    parser.add_argument("--data-root", help="data folder (default: $M3BIND_DATA or ../shared/data)")
    parser.add_argument("--split", default="test", choices=("test", "val"))
    parser.add_argument("--suites", nargs="*", default=list(SUITES), choices=SUITES)
    parser.add_argument("--quick", action="store_true", help="small subsets, fewer shots and seeds (CI)")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    config = QUICK if args.quick else FULL
    bound = load_model(args.model, device=args.device)
    teachers: dict[str, M3BindModel] = {}
    for directory in args.teachers:
        teacher = load_model(directory, device=args.device)
        for modality in teacher.modalities:
            if modality in teachers:
                parser.error(f"two counterparts encode {modality!r}")
            teachers[modality] = teacher
    if teachers:
        results = compare(bound, teachers, args.suites, args.data_root, args.split, config)
    else:
        results = evaluate(bound, args.suites, args.data_root, args.split, config)
    print(markdown_table(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

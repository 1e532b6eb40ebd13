"""The evaluation's tasks, each scoring one model's ``Embedder`` on held-out sets (``train.eval_sets``):

  * ``zero_shot``: class prompts (the data adapter's per-class prompt ensembles) against images.
    AUC: binary, macro one-vs-rest over the classes present (multi-class, softmax scores), or for
    multi-label PTB-XL macro one-vs-rest over the five superclasses on raw cosine similarities (a record
    may hold several). Accuracy: the top-1 class is one of the item's classes (for single-label data the
    usual argmax accuracy; for PTB-XL counted over records with at least one superclass).
  * ``few_shot``: k labelled items per class drawn from the TRAIN split (never test), nested across k
    for one seed, as class prototypes and as a logistic-regression probe; mean and std over seeds.
  * ``retrieval``: text-to-image. A library of every dataset's test items (balanced subsample, seeded),
    one query per prompt of each (modality, class); a retrieved item is relevant when it is of the
    query's modality and carries the query's class, whichever dataset it comes from (as in the search
    suite). Recall@K = share of queries with a relevant item in the top K; queries with no relevant
    item, or with every item relevant, are not counted. Reported over the library of all modalities and
    over each modality's own library, and per dataset with only that dataset's items relevant.
  * ``cross_modal``: image-to-image across modalities on a normal/abnormal notion (``NORMAL_CLASS``):
    for each query of modality A, all items of B ranked by cosine; per-query AUC of "same status as the
    query" and precision@10 with its chance level (the base rate), averaged over queries balanced
    between normal and abnormal ones (chance is then 0.5 for both). Counterparts are unbound: each
    embeds its own modality in its own space, which is the chance-level baseline.
  * ``search`` (``train.eval_search``) and ``detection`` (``train.detector``) complete ``SUITES``.

Zero-shot AUCs and the core cross-modal mean carry 95% percentile-bootstrap intervals over the items
(``auc_ci95``): with 78 to 1000 items per set, differences of a few hundredths are often within chance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from threadpoolctl import threadpool_limits

from m3bind.fewshot import LogisticProbe, PrototypeClassifier

from .eval_sets import (
    BINARY_VIEWS, CORE_CROSS_MODAL, NORMAL_CLASS, Embedder, EvalSet, abnormal_status, check_disjoint, draw_support,
    item_labels,
)
from .metrics import (
    auc, bootstrap_interval, bootstrap_pair_mean, classification_metrics, cross_modal_metrics, mean_std,
    n_defined_classes, pair_mean, retrieval_metrics, zero_shot_scores,
)

SUITES = ("zero_shot", "few_shot", "retrieval", "cross_modal", "search", "detection")
FEW_SHOT_METHODS = ("prototype", "logistic")


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


def zero_shot(embed: Embedder, test: EvalSet) -> dict:
    """Prompt ensembles against the test items: macro AUC with its interval, accuracy, a binary view."""
    targets = test.targets
    out = {"n": len(test.pairs), "classes": test.class_names}
    if n_defined_classes(targets) == 0:
        return {**out, "skipped": "fewer than two classes among the test items"}
    scores = zero_shot_scores(embed(test.pairs), embed.classes(test.prompts), test.multi_label,
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
    if len(present) < 2 or n_defined_classes(targets[:, present]) == 0:
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
        out[method] = {str(k): mean_std(results) for k, results in by_k.items()}
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
    """Text-to-image Recall@K over the library of the given sets (see the module docstring).

    One query per prompt of each (modality, class): sets of one modality share their prompts, so the same
    words must find an item of that class from any of them. ``same_dataset`` scores the same queries once
    per set, counting only that set's items (a dataset's own prompt against a neighbour's look-alike items)."""
    lib_emb = embed([p for s in library for p in s.pairs])
    modality, classes = item_labels(library)
    owner = np.concatenate([[i] * len(s.pairs) for i, s in enumerate(library)]).astype(int) if library else \
        np.zeros(0, int)
    per_query: dict[tuple[str, str], list[str]] = {}
    for s in library:
        for name, group in s.prompts.items():
            per_query.setdefault((s.modality, name), list(group))
    if not per_query:
        return {"n_queries": 0}
    keys = [key for key, group in per_query.items() for _ in group]
    q = embed.texts([text for group in per_query.values() for text in group])
    relevant = np.array([[m == item_m and name in item_classes for item_m, item_classes in zip(modality, classes)]
                         for m, name in keys], dtype=bool).reshape(len(keys), len(owner))
    own = [np.array([m == s.modality and name in s.class_names for m, name in keys]) for s in library]
    out = retrieval_metrics(q, lib_emb, relevant, ks)
    out["same_dataset"] = retrieval_metrics(np.concatenate([q[o] for o in own]), lib_emb,
                                            np.concatenate([relevant[o] & (owner == i) for i, o in enumerate(own)]), ks)
    out["per_set"] = {s.key: retrieval_metrics(q[own[i]], lib_emb, relevant[own[i]] & (owner == i), ks)
                      for i, s in enumerate(library)}
    return out


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


def cross_modal_sets(library: dict[str, EvalSet], modalities: Sequence[str]) -> dict[str, EvalSet]:
    """Per modality among ``modalities``, its ``NORMAL_CLASS`` dataset's set in ``library`` (where present)."""
    return {m: library[f"{d}/{m}"] for m, (d, _) in NORMAL_CLASS.items()
            if m in modalities and f"{d}/{m}" in library}

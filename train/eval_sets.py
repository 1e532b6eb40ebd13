"""What the evaluation scores: the held-out (dataset, modality) sets, their subsets and few-shot supports, and
the one cache of a model's embeddings of their items and prompts (``Embedder``), shared by every suite."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from m3bind import M3BindModel

from .captions import (
    BRAIN_TUMOR_MRI, BREASTMNIST, COVID_CT, LC25000, PNEUMONIAMNIST, PTBXL_SUPERCLASSES, RETINAMNIST,
)
from .data import Pair, load_dataset

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
    """The ``modality`` items of one split of a registered dataset, with its classes and prompts."""
    ds = load_dataset(dataset, split, data_root=data_root)
    return EvalSet(dataset, modality, split, ds.multi_label, ds.class_names, ds.prompts(modality),
                   [p for p in ds.pairs if p.modality == modality], tuple(c.name for c in ds.concepts if c.normal))


def item_labels(library: Sequence[EvalSet]) -> tuple[np.ndarray, list[set[str]]]:
    """Per item of the sets, in order: its modality and the names of its classes (what relevance is read from)."""
    modality = np.array([s.modality for s in library for _ in s.pairs])
    return modality, [{s.class_names[t] for t in p.targets if t >= 0} for s in library for p in s.pairs]


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


def abnormal_status(test: EvalSet, normal_class: str) -> np.ndarray:
    """1 abnormal, 0 normal, -1 no class (left out); see ``NORMAL_CLASS``."""
    targets = test.targets
    normal = test.class_names.index(normal_class)
    others = np.delete(targets, normal, axis=1).any(1)
    return np.where(others, 1, np.where(targets[:, normal], 0, -1))


class Embedder:
    """A model's embeddings of dataset items (by item id) and of texts, each computed once: the suites ask for
    the same items again and again (every few-shot seed, retrieval and cross-modal sets overlap)."""

    def __init__(self, model: M3BindModel, batch_size: int = 64, chunk: int = 256):
        self.model, self.batch_size, self.chunk = model, batch_size, chunk
        self.cache: dict[str, np.ndarray] = {}
        self.text_cache: dict[str, np.ndarray] = {}

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        missing = list(dict.fromkeys(t for t in texts if t not in self.text_cache))
        if missing:
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

    def classes(self, prompts: dict[str, list[str]]) -> np.ndarray:
        """(C, D): per class, the normalised mean of its prompt embeddings (the ensemble)."""
        flat = self.texts([p for group in prompts.values() for p in group])
        bounds = np.cumsum([0] + [len(group) for group in prompts.values()])
        vectors = np.stack([flat[a:b].mean(0) for a, b in zip(bounds, bounds[1:])])
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

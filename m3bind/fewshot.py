"""Few-shot classifiers on shared-space embeddings: a handful of labelled examples per class.

``PrototypeClassifier`` (class-mean prototypes, cosine similarity, softmax at a temperature) works from
one example per class and needs no training; ``LogisticProbe`` (a regularised linear probe) usually wins
once there are several examples per class. Both follow scikit-learn's ``fit`` / ``predict_proba`` /
``classes_`` convention, so ``train/`` evaluation and the app use them alike.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import InputError


def _unit_rows(embeddings: np.ndarray) -> np.ndarray:
    x = np.atleast_2d(np.asarray(embeddings, dtype=np.float32))
    if x.ndim != 2 or not np.isfinite(x).all():
        raise InputError("The examples could not be embedded into usable vectors.")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _check_training_set(embeddings: np.ndarray, labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    x = _unit_rows(embeddings)
    y = np.asarray([str(label).strip() for label in labels], dtype=object)
    if len(y) != len(x):
        raise ValueError(f"{len(x)} embeddings but {len(y)} labels")
    if any(not label for label in y):
        raise InputError("Every example needs a class name.")
    classes = sorted(set(y.tolist()))
    if len(classes) < 2:
        raise InputError("Give examples of at least two different classes.")
    return x, y, classes


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


class PrototypeClassifier:
    """Nearest class mean by cosine similarity, with probabilities from ``softmax(cos / temperature)``."""

    def __init__(self, temperature: float = 0.02):
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        self.temperature = float(temperature)
        self.classes_: list[str] = []
        self.prototypes_: np.ndarray | None = None

    def fit(self, embeddings: np.ndarray, labels: Sequence[str]) -> "PrototypeClassifier":
        x, y, self.classes_ = _check_training_set(embeddings, labels)
        self.prototypes_ = _unit_rows(np.stack([x[y == c].mean(axis=0) for c in self.classes_]))
        return self

    def predict_proba(self, embeddings: np.ndarray) -> np.ndarray:
        if self.prototypes_ is None:
            raise RuntimeError("fit() first")
        return _softmax(_unit_rows(embeddings) @ self.prototypes_.T / self.temperature)

    def predict(self, embeddings: np.ndarray) -> list[str]:
        return [self.classes_[i] for i in self.predict_proba(embeddings).argmax(axis=1)]


class LogisticProbe:
    """Multinomial logistic regression on unit-norm embeddings (L2-regularised, strength ``1/C``)."""

    def __init__(self, C: float = 1.0, max_iter: int = 1000):
        self.C = float(C)
        self.max_iter = int(max_iter)
        self.classes_: list[str] = []
        self._model = None

    def fit(self, embeddings: np.ndarray, labels: Sequence[str]) -> "LogisticProbe":
        from sklearn.linear_model import LogisticRegression

        x, y, self.classes_ = _check_training_set(embeddings, labels)
        # Unit vectors have tiny per-feature scale; the sqrt(D) factor keeps C comparable across dims.
        self._scale = float(np.sqrt(x.shape[1]))
        self._model = LogisticRegression(C=self.C, max_iter=self.max_iter).fit(x * self._scale, y)
        return self

    def predict_proba(self, embeddings: np.ndarray) -> np.ndarray:
        if self._model is None:
            raise RuntimeError("fit() first")
        probs = self._model.predict_proba(_unit_rows(embeddings) * self._scale)
        order = [list(self._model.classes_).index(c) for c in self.classes_]
        return probs[:, order]

    def predict(self, embeddings: np.ndarray) -> list[str]:
        return [self.classes_[i] for i in self.predict_proba(embeddings).argmax(axis=1)]

"""Few-shot classifiers on shared-space embeddings: a handful of labelled examples per class.

``PrototypeClassifier`` (class-mean prototypes, cosine similarity, softmax at a temperature) works from
one example per class and needs no training; ``LogisticProbe`` (a regularised linear probe) usually wins
once there are several examples per class. Both follow scikit-learn's ``fit`` / ``predict_proba`` /
``classes_`` convention, so ``train/`` evaluation and the app use them alike.

Both are calibrated on their own support set: once a class has two examples, each example is classified
by a classifier fitted without it, and the softmax temperature is the one that best predicts those held-out
examples' classes. The held-out targets are smoothed by the rule of succession (n examples leave 1/(n+2) to
chance), and so are the probabilities given out, so a handful of examples never yields a certainty of 100 %
(one example of each of two classes: at most 87.5 %).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .errors import InputError

_TEMPERATURES = np.geomspace(1e-3, 1e3, 121)  # searched when calibrating (multiplies the base temperature)
_MAX_HELD_OUT = 40  # examples held out one at a time when calibrating (refits of the probe)


@dataclass(frozen=True)
class FewShotResult:
    """A few-shot classification: the probability of each class, and how many examples taught each."""

    probabilities: dict[str, float]
    support: dict[str, int]


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


def _towards_chance(probs: np.ndarray, n_examples: int) -> np.ndarray:
    """Probabilities from ``n_examples`` examples moved 1/(n+2) of the way to chance (rule of succession)."""
    share = 1.0 / (n_examples + 2)
    return (1 - share) * probs + share / probs.shape[1]


def _calibrated_temperature(x: np.ndarray, y: np.ndarray, classes: list[str],
                            held_out_logits: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray | None]
                            ) -> float:
    """The factor dividing the logits that best predicts examples held out one at a time (1.0 when no class
    has two examples). ``held_out_logits(train_x, train_y, test_x)`` fits on the rest; None if it cannot."""
    rows, truth = [], []
    for i in range(min(len(x), _MAX_HELD_OUT)):
        keep = np.arange(len(x)) != i
        if y[i] not in set(y[keep].tolist()) or len(set(y[keep].tolist())) < 2:
            continue
        fitted_classes = sorted(set(y[keep].tolist()))
        logits = held_out_logits(x[keep], y[keep], x[i:i + 1])
        if logits is None:
            continue
        full = np.full(len(classes), -np.inf)  # a class missing from the fit gets no probability
        full[[classes.index(c) for c in fitted_classes]] = logits[0]
        rows.append(full)
        truth.append(classes.index(y[i]))
    if not rows:
        return 1.0
    logits, n = np.stack(rows), len(rows)
    target = np.full(logits.shape, 1.0 / (n + 2) / len(classes))  # rule of succession: 1/(n+2) to chance
    target[np.arange(n), truth] += 1.0 - 1.0 / (n + 2)
    finite = np.isfinite(logits)
    losses = []
    for t in _TEMPERATURES:
        z = np.where(finite, logits / t, -np.inf)
        log_p = z - z.max(axis=1, keepdims=True)
        log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
        losses.append(-(target * np.where(finite, log_p, 0.0)).sum())
    return float(_TEMPERATURES[int(np.argmin(losses))])


class PrototypeClassifier:
    """Nearest class mean by cosine similarity, with probabilities from ``softmax(cos / temperature)``."""

    def __init__(self, temperature: float = 0.02):
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        self.temperature = float(temperature)
        self.classes_: list[str] = []
        self.prototypes_: np.ndarray | None = None

    def fit(self, embeddings: np.ndarray, labels: Sequence[str]) -> "PrototypeClassifier":
        """Class means; the temperature (``temperature_``) calibrated on the examples held out one at a time."""
        x, y, self.classes_ = _check_training_set(embeddings, labels)
        self.prototypes_ = _prototypes(x, y, self.classes_)

        def held_out(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray) -> np.ndarray:
            return test_x @ _prototypes(train_x, train_y, sorted(set(train_y.tolist()))).T / self.temperature

        self.temperature_ = self.temperature * _calibrated_temperature(x, y, self.classes_, held_out)
        self.n_examples_ = len(x)
        return self

    def predict_proba(self, embeddings: np.ndarray) -> np.ndarray:
        if self.prototypes_ is None:
            raise RuntimeError("fit() first")
        probs = _softmax(_unit_rows(embeddings) @ self.prototypes_.T / self.temperature_)
        return _towards_chance(probs, self.n_examples_)

    def predict(self, embeddings: np.ndarray) -> list[str]:
        return [self.classes_[i] for i in self.predict_proba(embeddings).argmax(axis=1)]


def _prototypes(x: np.ndarray, y: np.ndarray, classes: list[str]) -> np.ndarray:
    return _unit_rows(np.stack([x[y == c].mean(axis=0) for c in classes]))


class LogisticProbe:
    """Multinomial logistic regression on unit-norm embeddings (L2-regularised, strength ``1/C``)."""

    def __init__(self, C: float = 1.0, max_iter: int = 1000):
        self.C = float(C)
        self.max_iter = int(max_iter)
        self.classes_: list[str] = []
        self._model = None

    def fit(self, embeddings: np.ndarray, labels: Sequence[str]) -> "LogisticProbe":
        """The probe, and the temperature (``temperature_``) of its log-probabilities calibrated on the
        examples held out one at a time."""
        x, y, self.classes_ = _check_training_set(embeddings, labels)
        # Unit vectors have tiny per-feature scale; the sqrt(D) factor keeps C comparable across dims.
        self._scale = float(np.sqrt(x.shape[1]))
        self._model = self._regression(x, y)

        def held_out(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray) -> np.ndarray:
            return self._regression(train_x, train_y).predict_log_proba(test_x * self._scale)

        self.temperature_ = _calibrated_temperature(x, y, self.classes_, held_out)
        self.n_examples_ = len(x)
        return self

    def _regression(self, x: np.ndarray, y: np.ndarray):  # type: ignore[no-untyped-def]
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(C=self.C, max_iter=self.max_iter).fit(x * self._scale, y)

    def predict_proba(self, embeddings: np.ndarray) -> np.ndarray:
        if self._model is None:
            raise RuntimeError("fit() first")
        log_probs = self._model.predict_log_proba(_unit_rows(embeddings) * self._scale)
        order = [list(self._model.classes_).index(c) for c in self.classes_]
        return _towards_chance(_softmax(log_probs[:, order] / self.temperature_), self.n_examples_)

    def predict(self, embeddings: np.ndarray) -> list[str]:
        return [self.classes_[i] for i in self.predict_proba(embeddings).argmax(axis=1)]

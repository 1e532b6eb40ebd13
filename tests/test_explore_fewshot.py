"""Few-shot classifiers, library maps and the packaged example files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import m3bind
from m3bind.examples import EXAMPLES, example_files
from m3bind.explore import MIN_UMAP_ITEMS, LibraryMap, MapCache, _flat_index, _knn, fit_map
from m3bind.fewshot import LogisticProbe, PrototypeClassifier
from m3bind.library import Library

DIM = 32
REPO = Path(__file__).resolve().parents[1]


def clusters(n_per: int, names=("benign", "malignant", "normal"), spread: float = 0.3, seed: int = 0):
    """Unit vectors around one random centre per class, and their labels."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(names), DIM))
    x = np.concatenate([c + spread * rng.normal(size=(n_per, DIM)) for c in centres]).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), [n for n in names for _ in range(n_per)]


@pytest.mark.parametrize("classifier", [PrototypeClassifier(), LogisticProbe()], ids=["prototype", "probe"])
def test_fewshot_learns_from_a_few_examples(classifier):
    train_x, train_y = clusters(3)
    test_x, test_y = clusters(20, seed=0)  # same centres, new draws
    test_x, test_y = test_x[::7], test_y[::7]
    clf = classifier.fit(train_x, train_y)
    probs = clf.predict_proba(test_x)
    assert clf.classes_ == ["benign", "malignant", "normal"]
    assert probs.shape == (len(test_x), 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert clf.predict(test_x) == test_y


def test_prototype_temperature_and_single_examples():
    x, y = clusters(1, names=("a", "b"))
    sharp = PrototypeClassifier(temperature=0.01).fit(x, y).predict_proba(x)
    soft = PrototypeClassifier(temperature=1.0).fit(x, y).predict_proba(x)
    assert sharp[0, 0] > soft[0, 0] > 0.5


@pytest.mark.parametrize("make", [lambda: PrototypeClassifier(temperature=0.002), LogisticProbe],
                         ids=["prototype", "probe"])
def test_fewshot_probabilities_are_calibrated_on_the_support_set(make):
    """Overlapping classes: the temperature calibrated on held-out support examples predicts fresh draws better
    than the uncalibrated classifier, and no probability reaches certainty."""
    from sklearn.metrics import log_loss

    x, y = clusters(40, spread=2.5, seed=1)
    support = np.arange(len(x)) % 40 < 6  # six examples of each class; the other 34 of each are fresh draws
    train_x, train_y = x[support], [label for label, s in zip(y, support) if s]
    test_x, test_y = x[~support], [label for label, s in zip(y, support) if not s]
    calibrated = make().fit(train_x, train_y)
    raw = make().fit(train_x, train_y)
    raw.temperature_ = raw.temperature if isinstance(raw, PrototypeClassifier) else 1.0
    raw.n_examples_ = 10**9  # no move towards chance
    assert calibrated.temperature_ != raw.temperature_
    assert log_loss(test_y, calibrated.predict_proba(test_x), labels=calibrated.classes_) < \
        log_loss(test_y, raw.predict_proba(test_x), labels=raw.classes_)
    share = 1 / (len(train_x) + 2)
    assert calibrated.predict_proba(train_x).max() <= 1 - share + share / 3 + 1e-6


def test_one_example_per_class_is_never_a_certainty():
    x, y = clusters(1, names=("a", "b"))
    probs = PrototypeClassifier(temperature=0.001).fit(x, y).predict_proba(x)
    assert probs.max() <= 0.875 + 1e-6 and probs.argmax(axis=1).tolist() == [0, 1]


@pytest.mark.parametrize("labels, error", [(["a", "a"], m3bind.InputError), (["a", " "], m3bind.InputError),
                                           (["a"], ValueError)])
def test_fewshot_refuses_unusable_training_sets(labels, error):
    with pytest.raises(error):
        PrototypeClassifier().fit(np.eye(2, DIM, dtype=np.float32), labels)


def test_small_libraries_get_pca_and_tiny_ones_a_message():
    x, _ = clusters(5)
    coords, _, reducer, method, note = fit_map(x[:MIN_UMAP_ITEMS - 1])
    assert method == "PCA" and reducer is None and coords.shape == (MIN_UMAP_ITEMS - 1, 2) and "PCA" in note
    with pytest.raises(m3bind.InputError, match="at least 3 items"):
        fit_map(x[:2])


@pytest.mark.slow
def test_umap_map_is_cached_per_library_state_and_places_points_without_refitting():
    x, labels = clusters(12)
    library = Library(DIM, "test-model")
    library.add(x, [{"modality": "pathology", "label": label, "source": f"tile{i}.png"}
                    for i, label in enumerate(labels)])
    cache = MapCache()
    lmap = cache.get(library)
    assert lmap.method == "UMAP" and lmap.coords.shape == (36, 2) and lmap.labels == labels
    assert cache.get(library) is lmap
    before = lmap.coords.copy()
    placed = lmap.place(x[[0, 12, 24]])
    assert np.array_equal(lmap.coords, before)
    for point, own in zip(placed, (0, 12, 24)):  # a library item placed again lands among its own class
        nearest = np.argsort(np.linalg.norm(lmap.coords - point, axis=1))[:5]
        assert sum(labels[i] == labels[own] for i in nearest) >= 4
    library.add(x[:1], [{"modality": "pathology", "label": "benign"}])
    assert cache.get(library) is not lmap and len(cache.get(library).ids) == 37


def test_umap_starts_from_exact_cosine_neighbours():
    x, _ = clusters(30)
    neighbours, distances = _knn(_flat_index(x), x, 10)
    cosine = x @ x.T
    assert np.array_equal(neighbours[:, 0], np.arange(len(x)))  # each item first, as UMAP expects
    assert np.array_equal(np.sort(neighbours, 1), np.sort(np.argsort(-cosine, 1)[:, :10], 1))
    assert distances.dtype == np.float32 and np.allclose(distances, 1 - np.take_along_axis(cosine, neighbours, 1),
                                                         atol=1e-5)


def test_placed_points_land_near_their_neighbours_and_never_off_the_map():
    x, labels = clusters(12)
    coords, pca, placement, method, note = fit_map(x)
    lmap = LibraryMap(ids=np.arange(len(x)), coords=coords, modalities=[], labels=labels, sources=[],
                      method=method, note=note, _pca=pca, _umap=placement)
    extent = np.ptp(coords, axis=0).max()
    assert np.median(np.linalg.norm(lmap.place(x) - coords, axis=1)) < 0.05 * extent  # items placed again
    strangers = np.concatenate([-x.mean(0, keepdims=True), np.random.default_rng(1).normal(size=(5, DIM))])
    placed = lmap.place(strangers.astype(np.float32))
    assert placed.shape == (6, 2) and placed.dtype == np.float32
    assert (placed >= coords.min(0)).all() and (placed <= coords.max(0)).all()
    assert lmap.place(np.zeros((0, DIM))).shape == (0, 2)


@pytest.mark.slow
def test_after_the_warm_up_a_real_map_compiles_nothing():
    """In a fresh process: the warm-up's random points have the array types of a real map and its placement."""
    script = """
import numpy as np
from umap import layouts, umap_
from m3bind.explore import fit_map, warm_up
jitted = [umap_.smooth_knn_dist, umap_.compute_membership_strengths, layouts._nb_optimize_layout_euclidean_single_epoch]
warm_up()
compiled = [len(f.signatures) for f in jitted]
x = np.random.default_rng(0).normal(size=(300, 256)).astype(np.float32)
coords, pca, placement, method, _ = fit_map(x / np.linalg.norm(x, axis=1, keepdims=True))
placement.transform(pca.transform(x[:3]))
assert method == "UMAP" and all(compiled) and [len(f.signatures) for f in jitted] == compiled, compiled
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]


def test_examples_are_materialised_once_and_readable(tmp_path):
    paths = example_files(tmp_path)
    stamps = {k: p.stat().st_mtime_ns for k, p in paths.items()}
    assert example_files(tmp_path) == paths and {k: p.stat().st_mtime_ns for k, p in paths.items()} == stamps
    for example in EXAMPLES:
        sample = m3bind.load_input(paths[example.key])
        assert sample.modality == example.modality
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(e.filename for e in EXAMPLES)

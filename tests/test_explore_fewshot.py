"""Few-shot classifiers, library maps and the packaged example files."""

from __future__ import annotations

import numpy as np
import pytest

import m3bind
from m3bind.examples import EXAMPLES, example_files
from m3bind.explore import MIN_UMAP_ITEMS, MapCache, fit_map
from m3bind.fewshot import LogisticProbe, PrototypeClassifier
from m3bind.library import Library

DIM = 32


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


def test_examples_are_materialised_once_and_readable(tmp_path):
    paths = example_files(tmp_path)
    stamps = {k: p.stat().st_mtime_ns for k, p in paths.items()}
    assert example_files(tmp_path) == paths and {k: p.stat().st_mtime_ns for k, p in paths.items()} == stamps
    for example in EXAMPLES:
        sample = m3bind.load_input(paths[example.key])
        assert sample.modality == example.modality
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(e.filename for e in EXAMPLES)

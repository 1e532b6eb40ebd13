"""m3bind.explain: the words of the top finding and the regions of the input that drive it, by occlusion,
checked against independent forward passes of the real (tiny) model."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

import m3bind
from m3bind.explain import explain

CT = get_testdata_file("CT_small.dcm")
ECG = get_testdata_file("waveform_ecg.dcm")


def top_score(model, sample, label: str, data: np.ndarray) -> float:
    """The similarity of ``label`` to the sample with other data: an independent forward pass."""
    covered = replace(sample, data=data, meta=dict(sample.meta))
    return float(model.embed(covered) @ model.label_embeddings([label], sample.modality)[0])


def test_an_image_explanation_covers_the_preview_and_its_strongest_region_matters_most(tiny_model):
    sample = m3bind.load_input(CT)
    labels = ["normal lungs", "ground-glass opacities", "pulmonary nodule"]
    result = explain(tiny_model, sample, labels)
    assert result.label == max(result.probabilities, key=result.probabilities.get)
    assert result.probabilities == pytest.approx(tiny_model.classify(sample, labels), abs=1e-6)
    assert result.importance.shape == (7, 7) and np.isfinite(result.importance).all()
    assert isinstance(result.heatmap, Image.Image)
    assert result.heatmap.size == (sample.preview.shape[1], sample.preview.shape[0])
    assert np.asarray(result.heatmap).shape == sample.preview.shape
    flat = result.importance.ravel()
    data = np.asarray(sample.data, dtype=np.float32)
    fill = data.reshape(-1, 3).mean(axis=0)
    drops = []
    for cell in (int(flat.argmax()), int(flat.argmin())):
        top, left, bottom, right = result.regions[cell]
        covered = data.copy()
        covered[top:bottom, left:right] = fill
        drops.append(result.similarity - top_score(tiny_model, sample, result.label, covered))
    assert drops[0] > drops[1]
    assert drops == pytest.approx([flat.max(), flat.min()], abs=1e-4)
    # the heatmap is red where the map is strongest, untouched where covering raised the score
    r, c = np.unravel_index(flat.argmax(), result.importance.shape)
    top, left, bottom, right = result.regions[int(flat.argmax())]
    centre = (top + bottom) // 2, (left + right) // 2
    shown, original = np.asarray(result.heatmap, dtype=int), sample.preview.astype(int)
    assert shown[centre][0] - shown[centre][1] > original[centre][0] - original[centre][1]


def test_an_ecg_explanation_rates_every_second(tiny_model):
    sample = m3bind.load_input(ECG)
    result = explain(tiny_model, sample, ["normal ECG", "atrial fibrillation", "myocardial infarction"])
    assert result.heatmap is None and result.segment_s == 1.0
    assert result.importance.shape == (10,) and np.isfinite(result.importance).all()
    assert result.regions[0] == (0.0, 1.0) and result.regions[-1] == (9.0, 10.0)
    drops = []
    for segment in (int(result.importance.argmax()), int(result.importance.argmin())):
        flat = np.asarray(sample.data, dtype=np.float32).copy()
        part = slice(segment * 100, (segment + 1) * 100)
        flat[:, part] = np.median(flat[:, part], axis=1, keepdims=True)
        drops.append(result.similarity - top_score(tiny_model, sample, result.label, flat))
    assert drops[0] > drops[1]


def test_word_shares_are_leave_one_word_out_differences(tiny_model):
    sample = m3bind.load_input(CT)
    result = explain(tiny_model, sample, ["ground-glass opacities in both lungs", "normal"])
    vector = tiny_model.embed(sample)
    words = result.label.split()
    assert [w for w, _ in result.words] == words
    for i, (word, share) in enumerate(result.words):
        without = " ".join(words[:i] + words[i + 1:])
        expected = result.similarity - float(tiny_model.label_embeddings([without], "ct")[0] @ vector)
        assert share == pytest.approx(expected, abs=1e-5)

"""Why a classification chose its top finding: which words of the finding and which parts of the input drive it.

``explain(model, sample, labels)`` answers by occlusion, with the model's own forward passes and no gradients:

* words: each word of the top finding is left out in turn (in every prompt of the ensemble); how much the
  similarity between the input and the finding drops is that word's share. A word whose removal raises the
  similarity gets a negative share.
* input: for an image, a grid of patches is covered one at a time with the image's mean colour; for an ECG,
  each second of all leads is flattened in turn. How much the similarity to the top finding drops is that
  region's importance. Images get a heatmap drawn over the preview; ECGs get per-second importances (the
  app shades them over the ECG plot).

Occlusion is slower than a gradient map (one forward pass per region, batched) but works the same for every
tower, frozen or not, and its figures say what they mean: "covering this region lowers the score by so much".
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from .readers.ecg import CANONICAL_FS
from .sample import Sample

IMAGE_GRID = 7  # patches per side
ECG_SEGMENT_S = 1.0


@dataclass
class Explanation:
    """The top finding, its words' shares, and the input's region importances.

    ``words``: (word, drop in similarity when that word is left out). ``importance``: for an image a
    (grid, grid) array over the image, for an ECG one value per ``segment_s`` seconds; each the drop in the
    top finding's similarity when that region is covered. ``heatmap``: for an image, the importances drawn over
    the preview (a PIL image of the preview's size); None for an ECG.
    """

    label: str
    similarity: float
    probabilities: dict[str, float]
    words: list[tuple[str, float]]
    importance: np.ndarray
    regions: list[Any]  # per importance cell: its (top, left, bottom, right) pixels, or (start_s, stop_s)
    heatmap: Image.Image | None = None
    segment_s: float | None = None


def explain(model: Any, sample: Sample, labels: Sequence[str], embedding: np.ndarray | None = None) -> Explanation:
    """Classifies ``sample`` over ``labels`` and explains its top finding (see the module's docstring);
    ``embedding``: the sample's, when the caller holds it already."""
    vector = np.asarray(model.embed(sample) if embedding is None else embedding, dtype=np.float32)
    probabilities = model.classify(sample, labels, embedding=vector)
    label = max(probabilities, key=probabilities.get)
    target = model.label_embeddings([label], sample.modality)[0]
    similarity = float(target @ vector)
    words = word_shares(model, label, sample.modality, vector)
    occlude = _OCCLUDERS[sample.kind]
    variants, regions = occlude(sample)
    scores = np.concatenate([model.embed(variants[i:i + 16]) @ target for i in range(0, len(variants), 16)])
    importance = similarity - scores
    explanation = Explanation(label, similarity, probabilities, words, importance, regions)
    _FINISH[sample.kind](sample, explanation)
    return explanation


def word_shares(model: Any, label: str, modality: str, vector: np.ndarray) -> list[tuple[str, float]]:
    """Each word of ``label`` with the drop in similarity to ``vector`` when it is left out of the prompts."""
    words = label.split()
    shortened = [" ".join(words[:i] + words[i + 1:]) for i in range(len(words))]
    embeddings = model.label_embeddings([label, *shortened], modality)
    full, *without = (embeddings @ vector).tolist()
    return [(word, float(full - rest)) for word, rest in zip(words, without)]


# --------------------------------------------------------------------------------------------- images
def _occlude_image(sample: Sample, grid: int = IMAGE_GRID) -> tuple[list[Sample], list[Any]]:
    data = np.asarray(sample.data, dtype=np.float32)
    h, w = data.shape[:2]
    fill = data.reshape(-1, data.shape[-1]).mean(axis=0)
    rows, cols = np.linspace(0, h, grid + 1).astype(int), np.linspace(0, w, grid + 1).astype(int)
    variants, regions = [], []
    for r in range(grid):
        for c in range(grid):
            covered = data.copy()
            covered[rows[r]:rows[r + 1], cols[c]:cols[c + 1]] = fill
            variants.append(_variant(sample, covered))
            regions.append((int(rows[r]), int(cols[c]), int(rows[r + 1]), int(cols[c + 1])))
    return variants, regions


def _finish_image(sample: Sample, explanation: Explanation) -> None:
    grid = int(round(np.sqrt(len(explanation.importance))))
    explanation.importance = explanation.importance.reshape(grid, grid)
    explanation.heatmap = heatmap_over(sample.preview, explanation.importance)


def heatmap_over(preview: np.ndarray, importance: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """The importances (a grid over the image) as a red overlay on the preview: strongest where covering the
    region lowers the score most; regions that raise it when covered stay uncoloured."""
    base = Image.fromarray(np.asarray(preview, dtype=np.uint8)).convert("RGB")
    positive = np.clip(np.asarray(importance, dtype=np.float64), 0, None)
    scaled = positive / positive.max() if positive.max() > 0 else positive
    cells = Image.fromarray((255 * scaled).astype(np.uint8), mode="L")
    strength = np.asarray(cells.resize(base.size, Image.Resampling.BILINEAR), dtype=np.float32)[..., None] / 255
    red = np.array([230, 30, 30], dtype=np.float32)
    pixels = np.asarray(base, dtype=np.float32)
    blended = pixels * (1 - alpha * strength) + red * (alpha * strength)
    return Image.fromarray(blended.clip(0, 255).astype(np.uint8))


# ----------------------------------------------------------------------------------------------- ECGs
def _occlude_ecg(sample: Sample, segment_s: float = ECG_SEGMENT_S) -> tuple[list[Sample], list[Any]]:
    data = np.asarray(sample.data, dtype=np.float32)
    step = int(round(segment_s * CANONICAL_FS))
    variants, regions = [], []
    for start in range(0, data.shape[1], step):
        flat = data.copy()
        flat[:, start:start + step] = np.median(data[:, start:start + step], axis=1, keepdims=True)
        variants.append(_variant(sample, flat))
        regions.append((start / CANONICAL_FS, min(data.shape[1], start + step) / CANONICAL_FS))
    return variants, regions


def _finish_ecg(sample: Sample, explanation: Explanation) -> None:
    explanation.segment_s = ECG_SEGMENT_S


def _variant(sample: Sample, data: np.ndarray) -> Sample:
    """The sample with other data; its modality was settled when the original was embedded (routed)."""
    return replace(sample, data=data, meta=dict(sample.meta))


_OCCLUDERS: dict[str, Callable[[Sample], tuple[list[Sample], list[Any]]]] = {
    "image": _occlude_image, "ecg": _occlude_ecg}
_FINISH: dict[str, Callable[[Sample, Explanation], None]] = {"image": _finish_image, "ecg": _finish_ecg}

__all__ = ["Explanation", "explain", "heatmap_over", "word_shares"]

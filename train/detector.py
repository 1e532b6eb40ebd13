"""The modality detector of plain image files: which of the model's image modalities a PNG or JPEG shows.

A linear classifier over the pooled features of a frozen ImageNet trunk (``m3bind.config.DetectorConfig``),
fitted on the training images of every image dataset of the run, each class weighted equally. DICOM files
name their modality in the header and never reach it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from m3bind import M3BindModel
from m3bind.config import DetectorConfig, ImageTowerConfig
from m3bind.encoders import ImageTower

from .data import load_dataset


@dataclass
class DetectorPlan:
    """How the pipeline fits the detector (the ``detector:`` section of a pipeline config)."""

    image_size: int = 128
    max_per_dataset: int = 600  # training images per dataset (a random, seeded subset)
    steps: int = 400
    lr: float = 1e-2
    weight_decay: float = 1e-3
    min_confidence: float = 0.8


@torch.no_grad()
def detector_features(detector: ImageTower, datasets: dict[str, list[str]], split: str, data_root: str | None,
                      max_per_dataset: int | None, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Pooled frozen-trunk features of (a seeded subset of) each modality's images, with the modality index."""
    detector.eval()
    features, labels = [], []
    for index, (modality, names) in enumerate(datasets.items()):
        for name in names:
            pairs = [p for p in load_dataset(name, split, data_root=data_root, seed=seed).pairs if p.modality == modality]
            if max_per_dataset is not None and len(pairs) > max_per_dataset:
                keep = np.random.default_rng(seed).choice(len(pairs), max_per_dataset, replace=False)
                pairs = [pairs[i] for i in sorted(keep)]
            for start in tqdm(range(0, len(pairs), 64), desc=f"detector {name}/{split}", leave=False):
                # the colour input the model's modality detector reads (``M3BindModel.modality_probabilities``)
                batch = [detector.prepare(pair.load(), keep_colour=True) for pair in pairs[start:start + 64]]
                features.append(detector.body(torch.stack(batch).to(next(detector.parameters()).device)).cpu())
                labels += [index] * len(batch)
    return torch.cat(features), np.array(labels)


def fit_detector(model: M3BindModel, datasets: dict[str, list[str]], plan: DetectorPlan,
                 data_root: str | None = None, seed: int = 0) -> M3BindModel:
    """Give ``model`` a detector over ``datasets`` (modality -> its image datasets) and fit its classifier."""
    config = DetectorConfig(modalities=list(datasets), min_confidence=plan.min_confidence,
                            tower=ImageTowerConfig(image_size=plan.image_size))
    torch.manual_seed(seed)
    detector = ImageTower(copy.deepcopy(config.tower), len(config.modalities)).to(model.device)
    features, labels = detector_features(detector, datasets, "train", data_root, plan.max_per_dataset, seed)
    features = features.to(model.device)
    targets = torch.as_tensor(labels, device=model.device)
    weights = torch.as_tensor(1.0 / np.bincount(labels, minlength=len(datasets)), dtype=torch.float32,
                              device=model.device)
    head = detector.head_parameters()
    for p in detector.parameters():
        p.requires_grad_(False)
    for p in head:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(head, lr=plan.lr, weight_decay=plan.weight_decay)
    for _ in range(plan.steps):  # full batch: a few thousand pooled vectors
        loss = F.cross_entropy(detector.head(features), targets, weight=weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    for p in head:
        p.requires_grad_(False)
    model.config.detector = config
    model.detector = detector.eval()
    model._fingerprint = None
    return model


def detector_accuracy(model: M3BindModel, datasets: dict[str, list[str]], split: str,
                      data_root: str | None = None) -> dict:
    """Share of ``split`` images whose modality the model's detector names (``modality_probabilities``, the path
    an uploaded file takes), overall and per modality (every item)."""
    names = [m for m in datasets if m in model.config.detector.modalities]
    right, labels = [], []
    for index, modality in enumerate(names):
        for name in datasets[modality]:
            for pair in load_dataset(name, split, data_root=data_root).pairs:
                if pair.modality == modality:
                    probs = model.modality_probabilities(pair.load())
                    right.append(max(probs, key=probs.get) == modality)
                    labels.append(index)
    right, labels = np.array(right), np.array(labels)
    return {"n": int(len(right)), "accuracy": float(right.mean()),
            "per_modality": {m: float(right[labels == i].mean()) for i, m in enumerate(names) if (labels == i).any()}}

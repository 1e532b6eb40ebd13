"""Which input size an image tower needs: a frozen-feature probe on training and validation data only.

``python bench/bench_tower_size.py xray cxr_nih 128 224`` (modality, dataset, sizes; ``--cap`` items) embeds the
dataset's train+val images with the frozen ImageNet EfficientNet-Lite0 the default towers start from, at each
size, and prints the 5-fold cross-validated AUC (3 repeats; macro one-vs-rest for several classes) of a logistic
regression on the pooled features: a cheap stand-in for training a tower at each size. Test splits are never read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_app import DATA, machine  # noqa: E402
from m3bind.config import ImageTowerConfig, TextTowerConfig  # noqa: E402
from train.stages import body_features, load_modality_data, new_teacher  # noqa: E402


def cv_auc(features: np.ndarray, labels: np.ndarray, repeats: int = 3) -> tuple[float, float]:
    """Mean and standard error of the 5-fold AUC of a logistic regression (C = 0.1)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    aucs = []
    for repeat in range(repeats):
        for train, held in StratifiedKFold(5, shuffle=True, random_state=repeat).split(features, labels):
            p = LogisticRegression(C=0.1, max_iter=3000).fit(features[train], labels[train]).predict_proba(
                features[held])
            aucs.append(roc_auc_score(labels[held], p[:, 1]) if p.shape[1] == 2
                        else roc_auc_score(labels[held], p, multi_class="ovr"))
    return float(np.mean(aucs)), float(np.std(aucs) / np.sqrt(len(aucs)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modality")
    parser.add_argument("dataset")
    parser.add_argument("sizes", type=int, nargs="+")
    parser.add_argument("--cap", type=int, default=1200, help="at most this many train+val items (seeded)")
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(machine(), flush=True)
    text = TextTowerConfig(source="package:all-MiniLM-L6-v2", max_length=64)
    for size in args.sizes:
        model = new_teacher(args.modality, ImageTowerConfig(image_size=size, frozen_stages=6), 256, text, 0)
        data = load_modality_data(model, args.modality, [args.dataset], ["train", "val"], str(args.data),
                                  max_items=args.cap)
        classes = sorted({str(k) for k in data.keys})
        labels = np.array([classes.index(str(k)) for k in data.keys])
        mean, se = cv_auc(body_features(model, data).numpy(), labels)
        print(f"{args.dataset} at {size} px: 5-fold AUC {mean:.3f} +- {se:.3f} ({len(labels)} items, "
              f"{len(classes)} classes)", flush=True)


if __name__ == "__main__":
    main()

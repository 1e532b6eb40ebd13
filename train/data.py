"""Labelled real data as (sample, caption, label) pairs with deterministic splits.

Every dataset is an entry of ``DATASETS``; ``load_dataset(name, split)`` builds its pairs once per
process (cheap: tables and, for LC25000, small tile descriptors) and decodes samples only when an item
is read, through ``m3bind.load_input`` for files and the readers' ``image_sample`` for arrays that a
dataset ships already decoded (MedMNIST). The same code reads the full public downloads: pass ``path``.

Splits (``train`` / ``val`` / ``test``), chosen so that evaluation items are never trained on:
  * MedMNIST: the official split of the ``.npz``.
  * covid-chestxray: no official split; whole patients go to one split (a patient's images are
    near-identical follow-ups), 70/10/20 of the patients of each finding, seeded.
  * LC25000: built by augmenting ~250 originals per class (rotations up to 25 degrees, flips), so a
    random split puts copies of the same original in train and test. Tiles are linked when their
    colour descriptors (rotation- and flip-invariant) are within ``NEAR_DUPLICATE_DISTANCE``; linked
    tiles form clusters (connected components within a class) and whole clusters are split 70/10/20.
  * PTB-XL: its stratified folds are patient-disjoint. With fold 10 present (the full download) the
    official rule holds: 1-8 train, 9 val, 10 test. The copy here stops at fold 9, so fold 9 is the
    held-out test set and fold 8 is carved out of the training folds as validation.
  * CinC 2021: no split; its few records are training material only.
  * Real-resolution image folders with ``labels.csv`` (NIH chest X-rays, IDRiD fundus photographs, brain
    MRI, COVID CT): whole groups 70/10/20 per class, by ``patient`` (NIH) or source ``group`` (CT: one
    source figure or patient); files without a group column are their own group.
"""

from __future__ import annotations

import ast
import os
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from m3bind import InputError, Sample, get_modality, load_input
from m3bind.readers.image import image_sample

from .captions import (
    BRAIN_TUMOR_MRI, BREASTMNIST, COVID_CT, COVID_FINDINGS, IDRID_GRADES, LC25000, NIH_CXR, PNEUMONIAMNIST,
    PTBXL_SUPERCLASSES, RETINAMNIST, Concept,
    clean_text, concept_captions, concept_for, read_csv, resolve_data_root, statement_captions, unique,
)

SPLITS = ("train", "val", "test")
FRACTIONS = (0.7, 0.1, 0.2)  # train / val / test where a dataset has no official split
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


@dataclass(frozen=True)
class Pair:
    """One labelled item; ``load()`` decodes its sample only when called."""

    item_id: str
    split: str
    modality: str
    label: int  # index into the dataset's class names; -1 for a multi-label record with no class
    class_name: str
    texts: tuple[str, ...]
    load: Callable[[], Sample] = field(repr=False, compare=False)
    targets: tuple[int, ...] = ()  # every positive class (multi-label datasets); (label,) otherwise
    group: str = ""  # what the split kept together: patient, near-duplicate cluster
    source: str = ""  # the file the sample is read from, or the array entry it comes from
    report: str = ""  # the item's own free text (clinical notes, an ECG report), where the data has one

    @property
    def classes(self) -> set[int]:
        """Every positive class index (none for a multi-label record without one)."""
        return set(self.targets or (self.label,)) - {-1}


class PairDataset:
    """A map-style dataset of ``(Sample, caption, label)``, usable by ``torch.utils.data.DataLoader``.

    The caption of an item is drawn from its texts by a generator seeded with (seed, epoch, index), so
    a run is reproducible whatever the order, batch size or number of workers; ``set_epoch`` varies it.
    """

    def __init__(self, name: str, pairs: Sequence[Pair], concepts: Sequence[Concept], modality: str,
                 multi_label: bool = False, seed: int = 0):
        self.name = name
        self.pairs = list(pairs)
        self.concepts = list(concepts)
        self.modality = modality
        self.multi_label = multi_label
        self.seed = seed
        self.epoch = 0

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.concepts]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Sample, str, int]:
        pair = self.pairs[index]
        return pair.load(), self.caption(index), pair.label

    def caption(self, index: int) -> str:
        texts = self.pairs[index].texts
        rng = np.random.default_rng((self.seed, self.epoch, index))
        return texts[int(rng.integers(len(texts)))]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def prompts(self, modality: str | None = None) -> dict[str, list[str]]:
        """Zero-shot prompt ensembles per class, in the modality's own templates."""
        m = get_modality(modality or self.modality)
        return {c.name: m.prompts(c.name) for c in self.concepts}

    @property
    def labels(self) -> np.ndarray:
        return np.array([p.label for p in self.pairs], dtype=np.int64)

    def multi_hot(self) -> np.ndarray:
        """(N, classes) 0/1 targets: every positive class of multi-label records, one-hot otherwise."""
        out = np.zeros((len(self.pairs), len(self.concepts)), dtype=np.int8)
        for i, p in enumerate(self.pairs):
            out[i, list(p.targets)] = 1
        return out


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset lives under the data root and how its pairs are built."""

    path: str  # relative to the data root
    modality: str  # the dataset's main modality (prompts); pairs carry their own
    build: Callable[[Path, Path, int], tuple[list[Pair], list[Concept]]]  # (path, data_root, seed)
    multi_label: bool = False


def load_dataset(name: str, split: str | Sequence[str] = "train", data_root: str | os.PathLike | None = None,
                 path: str | os.PathLike | None = None, seed: int = 0) -> PairDataset:
    """The pairs of one split (or several) of a registered dataset.

    ``path`` points at a user's own copy (e.g. the full ``pneumoniamnist_224.npz`` or a PTB-XL
    download) instead of ``<data_root>/<spec.path>``. ``seed`` fixes the splits that are not official
    and the caption draws.
    """
    spec = _spec(name)
    splits = (split,) if isinstance(split, str) else tuple(split)
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ValueError(f"Unknown split {unknown[0]!r}; splits are {', '.join(SPLITS)}.")
    root = resolve_data_root(data_root)
    pairs, concepts = _all_pairs(name, str(Path(path) if path else root / spec.path), str(root), seed)
    return PairDataset(name, [p for p in pairs if p.split in splits], concepts, spec.modality,
                       spec.multi_label, seed)


def _spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"Unknown dataset {name!r}; known: {', '.join(DATASETS)}.") from None


@lru_cache(maxsize=16)
def _all_pairs(name: str, path: str, data_root: str, seed: int) -> tuple[tuple[Pair, ...], tuple[Concept, ...]]:
    if not Path(path).exists():
        raise FileNotFoundError(f"Dataset {name!r} not found at {path}.")
    pairs, concepts = _spec(name).build(Path(path), Path(data_root), seed)
    return tuple(pairs), tuple(concepts)


# --------------------------------------------------------------------------- splitting

def group_split(groups: Sequence[str], strata: Sequence[str], fractions: tuple[float, float, float] = FRACTIONS,
                seed: int = 0) -> list[str]:
    """Assign whole groups to train/val/test, separately within each stratum, deterministically.

    A group's stratum is its most frequent one. Counts are rounded per stratum and a stratum with any
    group keeps at least one in train, so rare classes are learnt before they are tested. The order
    within a stratum is seeded by (seed, crc32(stratum)), never by Python's salted ``hash``.
    """
    counts = Counter(zip(groups, strata))
    stratum_of: dict[str, str] = {}
    for (g, s), n in sorted(counts.items()):
        if g not in stratum_of or n > counts[(g, stratum_of[g])]:
            stratum_of[g] = s
    assigned: dict[str, str] = {}
    for stratum in sorted(set(stratum_of.values())):
        members = sorted(g for g, s in stratum_of.items() if s == stratum)
        rng = np.random.default_rng((seed, zlib.crc32(stratum.encode())))
        members = [members[i] for i in rng.permutation(len(members))]
        n = len(members)
        n_test = min(round(n * fractions[2]), n - 1)
        n_val = min(round(n * fractions[1]), n - 1 - n_test)
        for i, g in enumerate(members):
            assigned[g] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return [assigned[g] for g in groups]


# --------------------------------------------------------------------------- MedMNIST (.npz, official splits)

def _medmnist(concepts: tuple[Concept, ...], modality: str):
    captions = [tuple(concept_captions(c, modality)) for c in concepts]

    def build(path: Path, data_root: Path, seed: int) -> tuple[list[Pair], list[Concept]]:
        try:
            with np.load(path) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except Exception as exc:  # not a zip, truncated, pickled objects
            raise InputError(f"{path.name} is not a readable MedMNIST .npz file.") from exc
        pairs = []
        for split in SPLITS:
            images, labels = arrays.get(f"{split}_images"), arrays.get(f"{split}_labels")
            if images is None or labels is None:
                raise InputError(f"{path.name} lacks {split}_images / {split}_labels (the MedMNIST layout).")
            labels = np.asarray(labels).reshape(len(images), -1)
            if labels.shape[1] != 1 or len(labels) and not 0 <= labels.min() <= labels.max() < len(concepts):
                raise InputError(f"{path.name}: {split}_labels are not single labels 0-{len(concepts) - 1}.")
            for i, y in enumerate(labels[:, 0].astype(int)):
                item = f"{path.stem}/{split}/{i}"
                pairs.append(Pair(item, split, modality, int(y), concepts[y].name, captions[y],
                                  partial(_array_sample, images, i, modality, item), (int(y),), source=item))
        return pairs, list(concepts)
    return build


def _array_sample(images: np.ndarray, index: int, modality: str, item_id: str) -> Sample:
    return image_sample(images[index], modality, {"format": "npz", "source": item_id})


# --------------------------------------------------------------------------- covid-chestxray (patient split)

COVID_MODALITIES = {"x-ray": "xray", "xray": "xray", "ct": "ct"}


def _covid(path: Path, data_root: Path, seed: int) -> tuple[list[Pair], list[Concept]]:
    """``metadata.csv`` of covid-chestxray-dataset (2020 copy or the current repository's columns)."""
    table = path / "metadata.csv" if path.is_dir() else path
    rows = read_csv(table)
    col = {re.sub(r"[^a-z]", "", k.lower()): k for k in (rows[0] if rows else {})}
    missing = {"finding", "modality", "filename"} - set(col)
    if missing:
        raise InputError(f"{table.name} lacks the column(s) {', '.join(sorted(missing))}.")

    def get(row: dict[str, str], key: str) -> str:
        return (row.get(col.get(key, ""), "") or "").strip()

    items = []  # (row, concept, modality, image file)
    for row in rows:
        finding = get(row, "finding").split("/")[-1].strip()  # "Pneumonia/Viral/COVID-19" -> "COVID-19"
        modality = COVID_MODALITIES.get(get(row, "modality").lower())
        image = _find_file(table.parent, get(row, "filename"), get(row, "folder"))
        if modality and image and finding.lower() not in ("", "todo", "unknown"):
            items.append((row, concept_for(COVID_FINDINGS, finding), modality, image))
    if not items:
        raise InputError(f"No usable image rows in {table}.")
    counts = Counter(concept.name for _, concept, _, _ in items)
    names = sorted(counts, key=lambda n: (-counts[n], n))  # most frequent finding first
    concepts = {concept.name: concept for _, concept, _, _ in items}
    groups = [get(row, "patientid") or image.name for row, _, _, image in items]
    splits = group_split(groups, [concept.name for _, concept, _, _ in items], seed=seed)
    pairs = []
    for (row, concept, modality, image), group, split in zip(items, groups, splits):
        notes = clean_text(get(row, "clinicalnotes"))
        texts = unique([notes, *concept_captions(concept, modality)])
        y = names.index(concept.name)
        pairs.append(Pair(f"covid_cxr/{image.name}", split, modality, y, concept.name, tuple(texts),
                          partial(load_input, image, modality), (y,), group=f"patient:{group}", source=str(image),
                          report=notes or ""))
    return pairs, [concepts[n] for n in names]


def _find_file(root: Path, name: str, folder: str = "") -> Path | None:
    if not name:
        return None
    for candidate in (root / name, root / folder / name, root / "images" / name):
        if candidate.is_file() and candidate.suffix.lower() in IMAGE_SUFFIXES:
            return candidate
    return None


# --------------------------------------------------------------------------- LC25000 (near-duplicate clusters)

# Hellinger distance between central colour histograms. Calibrated on the tiles here against synthetic
# siblings (each tile rotated up to 25 degrees, cropped and flipped as LC25000 was built): at 0.16, 90% of
# siblings are linked while only 0.6% of tiles lie that close to a tile of another class.
NEAR_DUPLICATE_DISTANCE = 0.16
_SIDE, _BINS = 64, 8
_DISC = np.hypot(*np.mgrid[:_SIDE, :_SIDE] - (_SIDE - 1) / 2) <= 0.75 * _SIDE / 2


def tile_descriptors(paths: Sequence[str | os.PathLike]) -> np.ndarray:
    """(N, 512) unit vectors: square roots of 8x8x8 RGB histograms of the central disc of each tile.

    The disc is what survives a rotation with crop, and a histogram ignores rotation and flips, so
    augmented copies of one original land close together.
    """
    return _descriptors(tuple(str(p) for p in paths)).copy()


@lru_cache(maxsize=4)
def _descriptors(paths: tuple[str, ...]) -> np.ndarray:
    out = np.empty((len(paths), _BINS ** 3), dtype=np.float32)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as img:
                img.draft("RGB", (2 * _SIDE, 2 * _SIDE))  # JPEG: decode at reduced scale
                rgb = np.asarray(img.convert("RGB").resize((_SIDE, _SIDE), Image.Resampling.BILINEAR))
        except Exception as exc:
            raise InputError(f"The tile {Path(path).name} could not be decoded.") from exc
        q = rgb[_DISC].astype(np.int64) // (256 // _BINS)
        hist = np.bincount((q[:, 0] * _BINS + q[:, 1]) * _BINS + q[:, 2], minlength=_BINS ** 3)
        out[i] = np.sqrt(hist / hist.sum())
    return out


def _close_pairs(a: np.ndarray, b: np.ndarray, threshold: float, chunk: int = 2048):
    """Index pairs (i, j) with ||a_i - b_j|| <= threshold, for unit vectors, in memory-bounded chunks."""
    min_dot = 1.0 - threshold ** 2 / 2.0
    for start in range(0, len(a), chunk):
        i, j = np.nonzero(a[start:start + chunk] @ b.T >= min_dot)
        yield i + start, j


def near_duplicate_clusters(features: np.ndarray, labels: Sequence[str],
                            threshold: float = NEAR_DUPLICATE_DISTANCE) -> np.ndarray:
    """Cluster id per tile: connected components of the "within threshold" graph inside each class."""
    labels = np.asarray(labels)
    rows, cols = [], []
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        for i, j in _close_pairs(features[idx], features[idx], threshold):
            rows.append(idx[i])
            cols.append(idx[j])
    n = len(labels)
    r, c = (np.concatenate(rows), np.concatenate(cols)) if rows else (np.zeros(0, int), np.zeros(0, int))
    graph = coo_matrix((np.ones(len(r), dtype=np.int8), (r, c)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def near_duplicate_leakage(features: np.ndarray, labels: Sequence[str], splits: Sequence[str],
                           threshold: float = NEAR_DUPLICATE_DISTANCE, query: str = "test",
                           reference: str = "train") -> int:
    """How many ``query`` items have a same-class item of ``reference`` within ``threshold``."""
    labels, splits = np.asarray(labels), np.asarray(splits)
    leaked = 0
    for label in np.unique(labels):
        q = np.flatnonzero((labels == label) & (splits == query))
        r = np.flatnonzero((labels == label) & (splits == reference))
        if len(q) and len(r):
            hits = np.zeros(len(q), bool)
            for i, _ in _close_pairs(features[q], features[r], threshold):
                hits[i] = True
            leaked += int(hits.sum())
    return leaked


def _lc25000(path: Path, data_root: Path, seed: int) -> tuple[list[Pair], list[Concept]]:
    """``labels.csv`` (filename, label, label_name) when present, else one folder per class (the download)."""
    root = path if path.is_dir() else path.parent
    if (root / "labels.csv").is_file():
        rows = [(root / r["filename"], r["label"], r.get("label_name", "")) for r in read_csv(root / "labels.csv")]
    else:
        rows = [(p, p.parent.name, "") for p in sorted(root.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not rows:
        raise InputError(f"No tiles found in {root}.")
    labels = [label for _, label, _ in rows]
    keys = sorted(set(labels))
    stored_names = {label: name for _, label, name in rows if name}
    concepts = [concept_for(LC25000, k, stored_names.get(k) or k.replace("_", " ")) for k in keys]
    clusters = near_duplicate_clusters(tile_descriptors([p for p, _, _ in rows]), labels)
    groups = [f"cluster:{c}" for c in clusters]
    splits = group_split(groups, labels, seed=seed)
    captions = [tuple(concept_captions(c, "pathology")) for c in concepts]
    pairs = []
    for (tile, label, _), group, split in zip(rows, groups, splits):
        y = keys.index(label)
        pairs.append(Pair(f"lc25000/{tile.parent.name}/{tile.name}", split, "pathology", y, concepts[y].name,
                          captions[y], partial(load_input, tile, "pathology"), (y,), group=group,
                          source=str(tile)))
    return pairs, concepts


# --------------------------------------------------------------------------- image folders with labels.csv

def _labelled_images(concepts: dict[str, Concept], modality: str, label_column: str = "label",
                     group_column: str | None = None):
    """A folder of image files with ``labels.csv`` (``filename``, the label column, optionally a group column).

    Whole groups (patients, source figures) go to one split, 70/10/20 per class; without a group column
    each file is its own group. Class order is the table's order, so class indices are stable.
    """
    keys = list(concepts)
    captions = {k: tuple(concept_captions(c, modality)) for k, c in concepts.items()}

    def build(path: Path, data_root: Path, seed: int) -> tuple[list[Pair], list[Concept]]:
        root = path if path.is_dir() else path.parent
        rows = _checked_rows(root / "labels.csv", ("filename", label_column, *([group_column] if group_column else [])))
        unknown = sorted({r[label_column] for r in rows} - set(keys))
        if unknown:
            raise InputError(f"{root.name}/labels.csv has labels this dataset does not know: {', '.join(unknown[:5])}.")
        groups = [f"{group_column}:{r[group_column]}" if group_column else f"file:{r['filename']}" for r in rows]
        splits = group_split(groups, [r[label_column] for r in rows], seed=seed)
        pairs = []
        for row, group, split in zip(rows, groups, splits):
            key, image = row[label_column], root / row["filename"]
            y = keys.index(key)
            pairs.append(Pair(f"{root.name}/{row['filename']}", split, modality, y, concepts[key].name, captions[key],
                              partial(load_input, image, modality), (y,), group=group, source=str(image)))
        return pairs, [concepts[k] for k in keys]
    return build


# --------------------------------------------------------------------------- PTB-XL (folds) and CinC 2021

PTBXL_CLASSES = tuple(PTBXL_SUPERCLASSES)  # NORM, MI, STTC, CD, HYP: the multi-hot order
_PRIMARY_PRIORITY = ("MI", "STTC", "CD", "HYP", "NORM")  # ties between equally likely statements


def ptbxl_split(fold: int, has_fold_10: bool) -> str:
    """Official rule with fold 10 (1-8 train, 9 val, 10 test); without it fold 9 tests and fold 8 validates."""
    if has_fold_10:
        return "test" if fold == 10 else "val" if fold == 9 else "train"
    return "test" if fold == 9 else "val" if fold == 8 else "train"


def _ptbxl(path: Path, data_root: Path, seed: int) -> tuple[list[Pair], list[Concept]]:
    """``labels.csv`` (the copy here) or ``ptbxl_database.csv`` (the download), with ``scp_statements.csv``."""
    root = path if path.is_dir() else path.parent
    table = path if path.is_file() else next(
        (root / n for n in ("labels.csv", "ptbxl_database.csv") if (root / n).is_file()), root / "labels.csv")
    statements_file = next((p for p in (root / "scp_statements.csv", data_root / "text" / "ptbxl_scp_statements.csv")
                            if p.is_file()), None)
    if statements_file is None:
        raise FileNotFoundError(f"scp_statements.csv not found beside {table}.")
    statements = {r[""]: r for r in read_csv(statements_file) if r.get("")}
    rows = _checked_rows(table, ("ecg_id", "strat_fold", "scp_codes"))
    try:
        folds = [int(float(r["strat_fold"])) for r in rows]
    except ValueError as exc:
        raise InputError(f"{table.name}: strat_fold must hold fold numbers 1-10.") from exc
    has_fold_10 = 10 in folds
    pairs = []
    for row, fold in zip(rows, folds):
        try:
            codes = {str(k): float(v) for k, v in ast.literal_eval(row["scp_codes"]).items()}
        except (ValueError, TypeError, SyntaxError, AttributeError) as exc:
            raise InputError(f"Record {row['ecg_id']}: unreadable scp_codes {row['scp_codes']!r}.") from exc
        diagnostic = {c: lik for c, lik in codes.items()
                      if statements.get(c, {}).get("diagnostic", "").strip() not in ("", "0", "0.0")}
        classes = sorted({statements[c]["diagnostic_class"] for c in diagnostic}, key=PTBXL_CLASSES.index)
        primary = max(diagnostic, default=None, key=lambda c: (
            diagnostic[c], -_PRIMARY_PRIORITY.index(statements[c]["diagnostic_class"])))
        label = PTBXL_CLASSES.index(statements[primary]["diagnostic_class"]) if primary else -1
        descriptions = [statements[c]["description"] for c in codes if statements.get(c, {}).get("description")]
        names = [PTBXL_SUPERCLASSES[c].name for c in classes]
        texts = unique([clean_text(row.get("report")), *statement_captions(descriptions, "ecg"),
                        *statement_captions(names, "ecg")])
        record = row.get("record_path") or row.get("filename_lr")
        if not record:
            raise InputError(f"Record {row['ecg_id']} names no signal file (record_path or filename_lr).")
        pairs.append(Pair(f"ptbxl/{row['ecg_id']}", ptbxl_split(fold, has_fold_10), "ecg", label,
                          PTBXL_SUPERCLASSES[PTBXL_CLASSES[label]].name if label >= 0 else "", tuple(texts),
                          partial(load_input, f"{root / record}.hea", "ecg"),
                          tuple(PTBXL_CLASSES.index(c) for c in classes),
                          group=f"patient:{row.get('patient_id', '')}", source=f"{root / record}.hea"))
    return pairs, list(PTBXL_SUPERCLASSES.values())


def _cinc2021(path: Path, data_root: Path, seed: int) -> tuple[list[Pair], list[Concept]]:
    """``labels.csv`` with ``record`` and ``dx_names`` (";"-separated); every record is training material."""
    root = path if path.is_dir() else path.parent
    rows = _checked_rows(root / "labels.csv", ("record", "dx_names"))
    findings = [[n.strip() for n in (r.get("dx_names") or "").split(";") if n.strip()] for r in rows]
    names = sorted({n for f in findings for n in f})
    pairs = []
    for row, found in zip(rows, findings):
        targets = tuple(sorted(names.index(n) for n in found))
        texts = unique([*statement_captions(found, "ecg"),
                        *(p for n in found for p in get_modality("ecg").prompts(n))])
        hea = root / f"{row['record']}.hea"
        pairs.append(Pair(f"cinc2021/{row['record']}", "train", "ecg", names.index(found[0]) if found else -1,
                          found[0] if found else "", tuple(texts), partial(load_input, hea, "ecg"), targets,
                          group=f"record:{row['record']}", source=str(hea)))
    return pairs, [Concept(n) for n in names]


def _checked_rows(table: Path, columns: Sequence[str]) -> list[dict[str, str]]:
    rows = read_csv(table)
    missing = [c for c in columns if not rows or c not in rows[0]]
    if missing:
        raise InputError(f"{table.name} has no rows or lacks the column(s) {', '.join(missing)}.")
    return rows


DATASETS: dict[str, DatasetSpec] = {
    "pneumoniamnist": DatasetSpec("medmnist/pneumoniamnist.npz", "xray", _medmnist(PNEUMONIAMNIST, "xray")),
    "breastmnist": DatasetSpec("medmnist/breastmnist.npz", "ultrasound", _medmnist(BREASTMNIST, "ultrasound")),
    "retinamnist": DatasetSpec("medmnist/retinamnist.npz", "retina", _medmnist(RETINAMNIST, "retina")),
    "covid_cxr": DatasetSpec("covid_cxr", "xray", _covid),
    "lc25000_lung": DatasetSpec("pathology/lc25000_lung", "pathology", _lc25000),
    "ptbxl": DatasetSpec("ecg/ptbxl", "ecg", _ptbxl, multi_label=True),
    "cinc2021": DatasetSpec("ecg/cinc2021", "ecg", _cinc2021, multi_label=True),
    "cxr_nih": DatasetSpec("cxr_nih", "xray", _labelled_images(NIH_CXR, "xray", group_column="patient")),
    "idrid": DatasetSpec("retina/idrid", "retina", _labelled_images(IDRID_GRADES, "retina", label_column="dr_grade")),
    "brain_tumor_mri": DatasetSpec("mri/brain_tumor", "mri", _labelled_images(BRAIN_TUMOR_MRI, "mri")),
    "covid_ct": DatasetSpec("ct/covid_ct", "ct", _labelled_images(COVID_CT, "ct", group_column="group")),
}

"""Data adapters of the training pipeline, on the real data in ../shared/data."""

from __future__ import annotations

import csv
import re
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image

import m3bind
from train import data
from train.captions import MAX_CHARS, MIN_CHARS, resolve_data_root, modality_texts, shared_text_corpus
from train.data import SPLITS, load_dataset

ALL = tuple(data.DATASETS)


def _all_splits(name, root, **kw):
    return load_dataset(name, SPLITS, data_root=root, **kw)


@pytest.mark.parametrize("name,sizes", [
    ("pneumoniamnist", (2428, 270, 468)),
    ("breastmnist", (546, 78, 156)),
    ("retinamnist", (1080, 120, 400)),
])
def test_medmnist_uses_the_official_splits_and_labels(shared_data, name, sizes):
    npz = np.load(shared_data / "medmnist" / f"{name}.npz")
    for split, size in zip(SPLITS, sizes):
        ds = load_dataset(name, split, data_root=shared_data)
        assert len(ds) == size
        np.testing.assert_array_equal(ds.labels, npz[f"{split}_labels"].reshape(-1))
        sample, text, label = ds[size - 1]
        assert isinstance(sample, m3bind.Sample) and sample.modality == data.DATASETS[name].modality
        assert sample.data.shape[2] == 3 and sample.data.dtype == np.float32
        pixels = npz[f"{split}_images"][size - 1]
        grey = pixels if pixels.ndim == 2 else pixels[..., 0]
        np.testing.assert_allclose(sample.data[..., 0], grey / 255.0, atol=1e-6)
        assert label == int(npz[f"{split}_labels"].reshape(-1)[size - 1]) and text in ds.pairs[size - 1].texts


@pytest.mark.parametrize("name", ALL)
def test_no_item_is_in_two_splits_and_captions_name_the_class(shared_data, name):
    ds = _all_splits(name, shared_data)
    ids = [p.item_id for p in ds.pairs]
    assert len(ids) == len(set(ids))
    for p in ds.pairs:
        assert p.split in SPLITS and p.texts
        assert all(t == t.strip() and t for t in p.texts)
        if p.label >= 0:
            assert p.class_name == ds.class_names[p.label] and p.label in p.targets
            assert any(p.class_name.lower() in t.lower() for t in p.texts), (p.item_id, p.texts)
    prompts = ds.prompts()
    assert list(prompts) == ds.class_names
    assert all(any(c in t for t in prompts[c]) for c in ds.class_names)


def test_covid_split_keeps_patients_whole_and_uses_the_real_notes(shared_data):
    ds = _all_splits("covid_cxr", shared_data)
    rows = list(csv.DictReader(open(shared_data / "covid_cxr" / "metadata.csv", encoding="utf-8")))
    assert len(ds) == len(rows) == 112
    split_of_patient = defaultdict(set)
    for p in ds.pairs:
        split_of_patient[p.group].add(p.split)
    assert all(len(s) == 1 for s in split_of_patient.values())
    assert len(split_of_patient) == len({r["Patientid"] for r in rows})
    sizes = {s: sum(p.split == s for p in ds.pairs) for s in SPLITS}
    assert all(sizes.values()) and sizes["train"] > sizes["test"] > 0
    for label in range(len(ds.class_names)):  # every finding is seen in training
        assert any(p.split == "train" and p.label == label for p in ds.pairs)
    assert {p.modality for p in ds.pairs} == {"xray", "ct"}
    notes = {" ".join(r["clinical notes"].split())[:80] for r in rows if r["clinical notes"]}
    with_note = [p for p in ds.pairs if any(t[:80] in notes for t in p.texts)]
    assert len(with_note) >= 100
    sample = next(p for p in ds.pairs if p.modality == "ct").load()
    assert sample.modality == "ct" and sample.data.ndim == 3 and sample.data.shape[2] == 3


def _dihedral_ahash(path):
    """16x16 average hash of each of the 8 rotations/flips (independent of the split's own descriptor)."""
    g = np.asarray(Image.open(path).convert("L").resize((16, 16), Image.Resampling.BILINEAR), dtype=np.float32)
    views = [v for k in range(4) for v in (np.rot90(g, k), np.rot90(g, k)[:, ::-1])]
    return np.packbits(np.stack([(v > v.mean()).ravel() for v in views]), axis=-1).view(np.uint64)


def _ahash_leakage(hashes, labels, splits, max_bits=20):
    q, r = np.flatnonzero(splits == "test"), np.flatnonzero(splits == "train")
    dist = np.bitwise_count(hashes[q][:, None, None, 0, :] ^ hashes[r][None]).sum(-1).min(-1)
    return int(((dist <= max_bits) & (labels[q][:, None] == labels[r][None])).any(1).sum())


def test_lc25000_cluster_split_limits_near_duplicate_leakage(shared_data):
    ds = _all_splits("lc25000_lung", shared_data)
    assert len(ds) == 1800
    labels = np.array([p.class_name for p in ds.pairs])
    splits = np.array([p.split for p in ds.pairs])
    for s, frac in zip(SPLITS, data.FRACTIONS):
        assert abs((splits == s).mean() - frac) < 0.04
    cluster_splits = defaultdict(set)
    for p in ds.pairs:
        cluster_splits[p.group].add(p.split)
    assert all(len(s) == 1 for s in cluster_splits.values())
    assert len(cluster_splits) > 600  # about 250 originals per class: clusters must not chain into blobs

    features = data.tile_descriptors([p.source for p in ds.pairs])
    random_splits = np.array(data.group_split([p.item_id for p in ds.pairs], labels, seed=0))
    random_leak = data.near_duplicate_leakage(features, labels, random_splits)
    cluster_leak = data.near_duplicate_leakage(features, labels, splits)
    assert cluster_leak == 0 < random_leak
    assert random_leak > 0.4 * (random_splits == "test").sum()  # most random-split test tiles have a twin

    hashes = np.stack([_dihedral_ahash(p.source) for p in ds.pairs])
    random_hash_leak = _ahash_leakage(hashes, labels, random_splits)
    assert _ahash_leakage(hashes, labels, splits) < random_hash_leak / 5, random_hash_leak


def test_ptbxl_folds_never_train_on_the_test_fold(shared_data):
    rows = {f"ptbxl/{r['ecg_id']}": r for r in csv.DictReader(open(shared_data / "ecg/ptbxl/labels.csv"))}
    ds = _all_splits("ptbxl", shared_data)
    assert len(ds) == len(rows) == 5000
    by_split = defaultdict(list)
    for p in ds.pairs:
        by_split[p.split].append(int(rows[p.item_id]["strat_fold"]))
    assert set(by_split["test"]) == {9} and len(by_split["test"]) == 1000
    assert set(by_split["val"]) == {8} and 9 not in by_split["train"] and 8 not in by_split["train"]
    patients = {s: {p.group for p in ds.pairs if p.split == s} for s in SPLITS}
    assert not (patients["train"] & patients["test"]) and not (patients["val"] & patients["test"])
    assert (data.ptbxl_split(10, True), data.ptbxl_split(9, True), data.ptbxl_split(8, True)) == \
        ("test", "val", "train")

    hot = ds.multi_hot()
    assert hot.shape == (5000, 5) and ds.class_names[1] == "myocardial infarction"
    for p, h in zip(ds.pairs, hot):
        expected = set(filter(None, rows[p.item_id]["diagnostic_superclass"].split(";")))
        assert {data.PTBXL_CLASSES[i] for i in np.flatnonzero(h)} == expected
        assert (p.label == -1) == (not expected)
        report = " ".join(rows[p.item_id]["report"].split())
        assert p.texts[0] == report[:len(p.texts[0])]  # the real (mostly German) report, kept as written
        english = " ".join(p.texts[1:])
        assert all(d.strip() in english for d in rows[p.item_id]["scp_descriptions_en"].split(";"))
    sample, text, label = load_dataset("ptbxl", "test", data_root=shared_data)[0]
    assert sample.modality == "ecg" and sample.data.shape == (12, 1000) and isinstance(text, str)


def test_cinc2021_is_multi_label_training_material(shared_data):
    ds = _all_splits("cinc2021", shared_data)
    assert len(ds) == 40 and {p.split for p in ds.pairs} == {"train"}
    hot = ds.multi_hot()
    assert (hot.sum(1) >= 1).all() and hot.sum() > len(ds)  # some records carry several diagnoses
    sample, text, label = ds[0]
    assert sample.data.shape == (12, 1000) and text in ds.pairs[0].texts and label == ds.pairs[0].label


def test_splits_and_captions_are_deterministic(shared_data):
    first = {n: [(p.item_id, p.split) for p in _all_splits(n, shared_data, seed=3).pairs] for n in ALL}
    data._all_pairs.cache_clear()
    again = {n: [(p.item_id, p.split) for p in _all_splits(n, shared_data, seed=3).pairs] for n in ALL}
    assert first == again
    other = [(p.item_id, p.split) for p in _all_splits("covid_cxr", shared_data, seed=4).pairs]
    assert other != first["covid_cxr"]

    ds = load_dataset("ptbxl", "train", data_root=shared_data, seed=1)
    twin = load_dataset("ptbxl", "train", data_root=shared_data, seed=1)
    captions = [ds.caption(i) for i in range(300)]
    assert captions == [twin.caption(i) for i in reversed(range(300))][::-1]
    ds.set_epoch(1)
    assert captions != [ds.caption(i) for i in range(300)]
    assert len(set(captions)) > 100


def test_text_corpora_are_clean_unique_and_seeded(shared_data):
    corpus = shared_text_corpus(shared_data, max_per_source=1500, seed=0)
    assert len(corpus) > 7000 and len({t.casefold() for t in corpus}) == len(corpus)
    for t in corpus:
        assert MIN_CHARS <= len(t) <= MAX_CHARS and t == " ".join(t.split()) and "XXXX" not in t
    assert corpus == shared_text_corpus(shared_data, max_per_source=1500, seed=0)
    assert corpus != shared_text_corpus(shared_data, max_per_source=1500, seed=1)
    assert any("ECG" in t for t in corpus) and any("fundus" in t for t in corpus)

    ct = modality_texts("ct", shared_data)
    assert len(ct) > 1000 and all(re.search(r"\bCT\b|computed tomograph", t, re.I) for t in ct)
    assert len(modality_texts("xray", shared_data)) > 3000
    assert len(modality_texts("pathology", shared_data)) > 3000
    assert len(modality_texts("retina", shared_data)) > 500
    assert len(modality_texts("ecg", shared_data)) > 300
    with pytest.raises(m3bind.WrongModalityError):
        modality_texts("sonar", shared_data)


def test_data_root_comes_from_argument_env_or_default(shared_data, monkeypatch, tmp_path):
    monkeypatch.setenv("M3BIND_DATA", str(tmp_path))
    assert resolve_data_root() == tmp_path
    with pytest.raises(FileNotFoundError, match="pneumoniamnist"):
        load_dataset("pneumoniamnist")
    own = load_dataset("pneumoniamnist", "val", path=shared_data / "medmnist" / "pneumoniamnist.npz")
    assert len(own) == 270
    monkeypatch.delenv("M3BIND_DATA")
    assert resolve_data_root() == (data.Path(data.__file__).resolve().parents[2] / "shared" / "data")


def test_malformed_dataset_files_raise_input_errors(tmp_path):
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"PK\x03\x04 this is not a zip archive")
    with pytest.raises(m3bind.InputError, match="not a readable MedMNIST"):
        load_dataset("pneumoniamnist", path=broken)
    partial = tmp_path / "partial.npz"
    np.savez(partial, train_images=np.zeros((2, 28, 28), np.uint8), train_labels=np.zeros((2, 1)))
    with pytest.raises(m3bind.InputError, match="val_images"):
        load_dataset("pneumoniamnist", path=partial)
    wrong = tmp_path / "wrong.npz"
    arrays = {f"{s}_{k}": np.zeros((2, 28, 28), np.uint8) if k == "images" else np.array([[0], [7]])
              for s in SPLITS for k in ("images", "labels")}
    np.savez(wrong, **arrays)
    with pytest.raises(m3bind.InputError, match="single labels 0-1"):
        load_dataset("pneumoniamnist", path=wrong)
    with pytest.raises(ValueError, match="Unknown split"):
        load_dataset("pneumoniamnist", "holdout", path=wrong)
    with pytest.raises(ValueError, match="Unknown dataset"):
        load_dataset("imagenet")


def test_malformed_label_tables_raise_input_errors(shared_data, tmp_path):
    (tmp_path / "labels.csv").write_text("ecg_id,strat_fold,scp_codes,record_path\n1,3,not a dict,records100/x\n")
    with pytest.raises(m3bind.InputError, match="unreadable scp_codes"):
        load_dataset("ptbxl", path=tmp_path, data_root=shared_data)
    (tmp_path / "metadata.csv").write_text("patientid,finding\n1,COVID-19\n")
    with pytest.raises(m3bind.InputError, match="filename, modality"):
        load_dataset("covid_cxr", path=tmp_path)

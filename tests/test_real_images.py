"""Real-resolution images: the new adapters' splits, towers with frozen (cached) stages, the joint stage that
puts every modality in one space, and the modality detector, on the real files in ../shared/data."""

from __future__ import annotations

import csv
import io
from collections import Counter

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

import m3bind
from train.data import SPLITS, load_dataset
from train.detector import DetectorPlan, detector_accuracy, fit_detector
from train.stages import (
    StageConfig, item_embeddings, joint, load_modality_data, lower_features, new_teacher, train_teacher,
)

GROUPED = [("cxr_nih", "cxr_nih", "patient"), ("covid_ct", "ct/covid_ct", "group")]


@pytest.mark.parametrize("name,folder,column", GROUPED)
def test_real_image_sets_keep_patients_and_source_groups_in_one_split(shared_data, name, folder, column):
    ds = load_dataset(name, SPLITS, data_root=shared_data)
    with open(shared_data / folder / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(ds) == len(rows)
    assert sorted(Counter(r["label"] for r in rows).values()) == sorted(Counter(p.label for p in ds.pairs).values())
    split_of: dict[str, set[str]] = {}
    for p in ds.pairs:
        split_of.setdefault(p.group, set()).add(p.split)
    assert all(len(s) == 1 for s in split_of.values()), "a patient or source group spans two splits"
    assert all(p.group.startswith(f"{column}:") for p in ds.pairs)
    shares = Counter(p.split for p in ds.pairs)
    assert 0.6 < shares["train"] / len(ds) < 0.8 and shares["test"] / len(ds) > 0.15


@pytest.mark.parametrize("name,classes", [
    ("brain_tumor_mri", ["glioma", "meningioma", "pituitary tumor", "no tumor"]),
    ("idrid", [f"{g} diabetic retinopathy" for g in ("no", "mild", "moderate", "severe", "proliferative")]),
    ("covid_ct", ["COVID-19 pneumonia", "no COVID-19 pneumonia"]),
    ("cxr_nih", ["no acute cardiopulmonary abnormality", "pneumonia"]),
])
def test_real_image_sets_name_their_classes_as_the_zero_shot_prompts_do(shared_data, name, classes):
    ds = load_dataset(name, SPLITS, data_root=shared_data)
    assert ds.class_names == classes
    assert {p.split for p in ds.pairs} == set(SPLITS)
    assert {p.label for p in ds.pairs if p.split == "test"} == set(range(len(classes)))  # every class is tested
    sample = ds.pairs[0].load()
    assert sample.modality == ds.modality and sample.data.shape[0] >= 184  # real resolution, not thumbnails


@pytest.mark.slow
def test_a_tower_with_frozen_stages_trains_only_its_upper_stages_from_cached_maps(shared_data, tmp_path):
    tower = m3bind.ImageTowerConfig(image_size=64, frozen_stages=5)  # ImageNet EfficientNet-Lite0 from its package
    teacher = new_teacher("mri", tower, 32, m3bind.TextTowerConfig(max_length=32), seed=0)
    pixels = torch.rand(4, 3, 64, 64)
    towers = teacher.tower_for("mri")
    with torch.no_grad():
        torch.testing.assert_close(towers.body(pixels), towers.upper_body(towers.lower(pixels)))
    base = {k: v.clone() for k, v in towers.state_dict().items()}
    data = load_modality_data(teacher, "mri", ["brain_tumor_mri"], "train", str(shared_data), max_items=48)
    train_teacher(teacher, data, StageConfig(steps=3, batch_size=16, cached_views=2))
    assert data.lower is not None and data.lower.shape[:2] == (2, 48)
    lower = {f"visual.trunk.{n}" for n, _ in towers.visual.trunk.named_parameters()
             if n.startswith(("conv_stem", "bn1", *(f"blocks.{i}." for i in range(5))))}
    after = towers.state_dict()
    assert all(torch.equal(after[k], base[k]) for k in lower), "a frozen stage changed"
    assert not torch.equal(after["visual.trunk.blocks.6.0.conv_pw.weight"], base["visual.trunk.blocks.6.0.conv_pw.weight"])
    # embeddings from cached maps are those of the whole tower on the pixels
    torch.testing.assert_close(item_embeddings(teacher, data, np.arange(4)),
                               teacher.encode("mri", data.inputs[:4].float()), atol=2e-3, rtol=0)
    saved = teacher.save_pretrained(tmp_path / "t")
    from safetensors.torch import load_file

    stored = load_file(str(saved / "model.safetensors"))
    assert not any(k.removeprefix("towers.mri.") in lower for k in stored)  # base weights are referenced, not stored
    reloaded = m3bind.load_model(saved, device="cpu")
    sample = load_dataset("brain_tumor_mri", "test", data_root=shared_data).pairs[0].load()
    np.testing.assert_allclose(reloaded.embed(sample), teacher.embed(sample), atol=1e-6)


def test_lower_features_are_computed_once_per_view(shared_data):
    teacher = new_teacher("ct", m3bind.ImageTowerConfig(image_size=64, frozen_stages=4), 16,
                          m3bind.TextTowerConfig(max_length=16), seed=0)
    data = load_modality_data(teacher, "ct", ["covid_ct"], "train", str(shared_data), max_items=8)
    one = lower_features(teacher, data, 1)
    two = lower_features(teacher, data, 2, torch.Generator().manual_seed(0), ["horizontal"])
    assert torch.equal(two[0], one[0]) and two.shape[0] == 2 and not torch.equal(two[1], two[0])
    assert lower_features(teacher, data, 1) is two  # nothing is recomputed


def _mixed_top10_modality_share(model, data, texts_by_modality):
    items = {m: item_embeddings(model, d).numpy() for m, d in data.items()}
    library = np.concatenate(list(items.values()))
    owner = np.concatenate([[m] * len(v) for m, v in items.items()])
    shares = []
    for m, texts in texts_by_modality.items():
        q = model.embed_text(texts)
        top = np.argsort(-(q @ library.T), axis=1)[:, :10]
        shares.append((owner[top] == m).mean())
    return float(np.mean(shares))


@pytest.mark.slow
def test_the_joint_stage_puts_each_modalitys_findings_among_its_own_items(tiny_config, shared_data):
    """Before the joint stage a model whose towers were trained apart ranks items by tower, not by what a query
    says; afterwards a modality's own captions retrieve mostly its own items, and the centres are refitted."""
    torch.manual_seed(0)
    model = m3bind.M3BindModel(tiny_config)
    data = {m: load_modality_data(model, m, [d], "train", str(shared_data), max_items=96)
            for m, d in (("xray", "pneumoniamnist"), ("retina", "retinamnist"), ("ecg", "ptbxl"))}
    queries = {"xray": ["a chest x-ray showing pneumonia", "chest radiograph: no acute cardiopulmonary abnormality"],
               "retina": ["a fundus photograph showing moderate diabetic retinopathy", "retinal image: no diabetic "
                          "retinopathy"],
               "ecg": ["an ECG showing myocardial infarction", "12-lead ECG with normal ECG"]}
    before = _mixed_top10_modality_share(model, data, queries)
    centre = model.centres.get_buffer("retina").clone()
    joint(model, data, StageConfig(steps=60, batch_size=16, lr=3e-3, tower_lr=3e-3, status_captions=0.3))
    after = _mixed_top10_modality_share(model, data, queries)
    assert after > max(0.8, before + 0.2), (before, after)
    assert not torch.equal(model.centres.get_buffer("retina"), centre)
    assert all(not p.requires_grad for p in model.parameters())


@pytest.fixture(scope="module")
def detector_model(shared_data):
    torch.manual_seed(0)
    model = m3bind.M3BindModel(m3bind.ModelConfig(name="detecting", dim=16, text=m3bind.TextTowerConfig(max_length=16)))
    sets = {"xray": ["cxr_nih"], "ct": ["covid_ct"], "mri": ["brain_tumor_mri"], "retina": ["idrid"],
            "pathology": ["lc25000_lung"]}
    return fit_detector(model, sets, DetectorPlan(image_size=64, max_per_dataset=30, steps=200), str(shared_data)), sets


@pytest.mark.slow
def test_the_detector_tells_ct_from_xray_and_mri_from_both_on_held_out_files(detector_model, shared_data):
    model, sets = detector_model
    result = detector_accuracy(model, sets, "val", str(shared_data))
    assert result["accuracy"] >= 0.9 and min(result["per_modality"].values()) >= 0.8, result
    ct = m3bind.load_input(next(p.source for p in load_dataset("covid_ct", "test", data_root=shared_data).pairs))
    mri = m3bind.load_input(shared_data / "mri" / "brain_tumor" / "no_tumor" / sorted(
        (shared_data / "mri" / "brain_tumor" / "no_tumor").iterdir())[0].name)
    for sample, truth in ((ct, "ct"), (mri, "mri")):
        assert sample.meta["modality_source"] == "guess"
        model.route(sample)
        assert sample.modality == truth and sample.meta["modality_source"] == "detector"
        assert 0 < sample.meta["modality_confidence"] <= 1 and isinstance(sample.meta["modality_unsure"], bool)


@pytest.mark.slow
def test_the_detector_leaves_dicom_headers_and_the_users_choice_alone(detector_model, shared_data, tmp_path):
    from pydicom.data import get_testdata_file

    model, _ = detector_model
    dicom = m3bind.load_input(get_testdata_file("CT_small.dcm"))
    assert model.route(dicom).modality == "ct" and dicom.meta["modality_source"] == "dicom"
    chosen = m3bind.load_input(shared_data / "retina" / "idrid" / "IDRiD_001.jpg", "pathology")
    assert model.route(chosen).modality == "pathology"
    saved = model.save_pretrained(tmp_path / "with-detector")
    reloaded = m3bind.load_model(saved, device="cpu")
    photo = m3bind.load_input(shared_data / "retina" / "idrid" / "IDRiD_002.jpg")
    assert reloaded.modality_probabilities(photo) == pytest.approx(model.modality_probabilities(photo), abs=1e-5)
    assert (saved / "model.safetensors").stat().st_size < 100_000  # the ImageNet trunk is referenced, not stored


def test_the_default_detector_routes_coloured_stains_away_from_grey_modalities(shared_data):
    """The app's own immunohistochemistry example (a stain the pathology training tiles never show) went to the
    X-ray tower at 96%; a largely coloured image is now never given a grey modality, and grey files keep theirs."""
    model = m3bind.load_model()
    ihc = model.route(m3bind.load_input(_png(skimage.data.immunohistochemistry())))
    assert ihc.modality == "pathology" and ihc.meta["modality_source"] == "detector"
    path = next(p.source for p in load_dataset("cxr_nih", "test", data_root=shared_data).pairs)
    assert model.route(m3bind.load_input(path)).modality == "xray"
    grey = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    warm = np.stack([grey, grey * 0.95, grey * 0.9], axis=-1).astype(np.uint8)  # a film photographed in warm light
    assert model.route(m3bind.load_input(_png(warm))).modality == "xray"


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()

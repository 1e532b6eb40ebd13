"""Training: the losses behave as the method needs, distillation closes the gap, and the whole pipeline
(teachers, stage 1, stage 2, export) runs end to end on real data, resumes, and is deterministic."""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import m3bind
from train.captions import STATUS_CAPTIONS, status_reports
from train.data import load_dataset
from train.losses import (
    class_aware_contrastive, distillation, match_matrix, pairwise_alignment, relational_distillation, same_class_targets,
)
from train.pipeline import REPO, PipelineConfig, class_prompt_sets, config_from_args, run
from train.stages import (
    ModalityData, StageConfig, TextFeatures, align, augment, copy_trunk, distill, item_embeddings, load_modality_data,
    new_teacher, text_only_model, training_member,
)


def unit(x):
    return F.normalize(x, dim=-1)


def test_alignment_loss_is_zero_for_identical_encoders_and_grows_with_disagreement():
    torch.manual_seed(0)
    emb = unit(torch.randn(8, 16))
    assert pairwise_alignment([emb, emb.clone(), emb.clone()]).item() == 0.0
    other = unit(torch.randn(8, 16))
    two = pairwise_alignment([emb, other]).item()
    assert two > 0
    assert pairwise_alignment([emb, other, other]).item() == pytest.approx(2 * two, rel=1e-5)


def test_same_class_targets_spread_over_positives():
    targets = same_class_targets(["a", "b", "a", "c"])
    torch.testing.assert_close(targets.sum(1), torch.ones(4))
    assert targets[0, 2] == targets[0, 0] == 0.5 and targets[1, 1] == 1.0


def test_class_aware_contrastive_does_not_punish_same_class_captions():
    """Which caption of its class an item is paired with does not matter to the class-aware loss, whereas
    plain InfoNCE (every item its own class) treats the other same-class caption as a negative."""
    torch.manual_seed(0)
    classes = unit(torch.randn(3, 16))
    image = unit(classes[[0, 0, 1, 2]] + 0.1 * torch.randn(4, 16))
    text = unit(classes[[0, 0, 1, 2]] + 0.1 * torch.randn(4, 16))
    swapped = text[[1, 0, 2, 3]]  # the two class-0 captions exchanged
    keys, plain = [0, 0, 1, 2], [0, 1, 2, 3]
    torch.testing.assert_close(class_aware_contrastive(image, text, keys, 30.0),
                               class_aware_contrastive(image, swapped, keys, 30.0))
    assert abs(class_aware_contrastive(image, text, plain, 30.0) - class_aware_contrastive(image, swapped, plain, 30.0)) > 1e-3
    wrong = text[[2, 3, 0, 1]]  # captions of other classes
    assert class_aware_contrastive(image, wrong, keys, 30.0) > class_aware_contrastive(image, text, keys, 30.0) + 1


def test_status_captions_are_true_of_every_item_with_that_status():
    """A caption saying only "abnormal" is a positive for every abnormal item in the batch, whatever its class."""
    keys = ["pneumonia", "normal", "mild DR", "severe DR"]
    tags = [("status", False), ("status", True), ("status", False), ("status", False)]
    text_keys = [("status", False), "normal", "mild DR", ("status", True)]
    expected = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 1], [1, 0, 1, 0], [1, 0, 0, 0]], dtype=torch.float32)
    torch.testing.assert_close(match_matrix(keys, text_keys, tags), expected)
    torch.manual_seed(0)
    image = unit(torch.randn(4, 16))
    status = {False: unit(torch.randn(16)), True: unit(torch.randn(16))}
    right = torch.stack([status[False], status[True], status[False], status[False]])
    wrong = torch.stack([status[True], status[False], status[True], status[True]])
    status_keys = [("status", t[1]) for t in tags]
    assert (class_aware_contrastive(image + 3 * right, right, keys, 10.0, status_keys, tags)
            < class_aware_contrastive(image + 3 * right, wrong, keys, 10.0, status_keys, tags))


def test_batches_mix_in_status_captions_only_for_items_with_a_known_status():
    data = ModalityData("xray", torch.zeros(6, 3, 4, 4), [("Pneumonia.",)] * 3 + [("Normal chest.",)] * 2 + [("?",)],
                        [("p", 1)] * 3 + [("p", 0)] * 2 + [("p", -1)], [False, False, False, True, True, None])
    batches = data.batches(6, np.random.default_rng(0), status_rate=0.5)
    seen = [b for _ in range(20) for b in [next(batches)]]
    status_texts = {t: normal for normal, texts in STATUS_CAPTIONS.items() for t in texts}
    used = 0
    for batch in seen:
        for row, text, key, tag in zip(batch.rows, batch.texts, batch.text_keys, batch.tags):
            if text in status_texts:
                used += 1
                assert data.normal[row] is status_texts[text] and key == tag == ("status", data.normal[row])
            else:
                assert text in data.captions[row] and key == data.keys[row]
    assert 20 < used < 100  # about half of the 100 items with a status
    none = data.batches(6, np.random.default_rng(0))
    assert not any(t in status_texts for _ in range(5) for t in next(none).texts)


def test_report_captions_replace_other_captions_with_a_report_of_the_items_status():
    reports = {True: ("Lungs are clear.", "No acute disease."), False: ("Left lower lobe consolidation.",)}
    data = ModalityData("xray", torch.zeros(6, 3, 4, 4), [("Pneumonia.",)] * 3 + [("Normal chest.",)] * 2 + [("?",)],
                        [("p", 1)] * 3 + [("p", 0)] * 2 + [("p", -1)], [False, False, False, True, True, None],
                        reports=reports)
    batches = data.batches(6, np.random.default_rng(0), status_rate=0.2, report_rate=0.5)
    status_texts = {t for texts in STATUS_CAPTIONS.values() for t in texts}
    used = 0
    for _ in range(20):
        batch = next(batches)
        for row, text, key in zip(batch.rows, batch.texts, batch.text_keys):
            if text in status_texts:
                continue
            if text not in data.captions[row]:
                used += 1
                assert text in reports[data.normal[row]] and key == data.keys[row]  # keyed by the item's class
    assert 15 < used < 60  # about 0.8 * 0.5 of the 100 items with a status
    plain = data.batches(6, np.random.default_rng(0), status_rate=0.2)  # report_rate 0: no report, same draws
    status_only = data.batches(6, np.random.default_rng(0), status_rate=0.2, report_rate=0.0)
    assert all(next(plain).texts == next(status_only).texts for _ in range(5))


def test_note_captions_draw_from_their_own_pool_before_the_reports():
    """A small share of clinical notes, apart from the report pool (mixed into it, the notes took its whole share)."""
    reports = {True: ("Lungs are clear.",), False: ("Left lower lobe consolidation.",)}
    notes = {True: (), False: ("65-year-old man with fever and cough; bilateral ground-glass opacities on CT.",)}
    data = ModalityData("ct", torch.zeros(6, 3, 4, 4), [("COVID-19.",)] * 4 + [("Normal.",)] * 2,
                        [("c", 1)] * 4 + [("c", 0)] * 2, [False] * 4 + [True] * 2, reports=reports, notes=notes)
    batches = data.batches(6, np.random.default_rng(0), note_rate=0.3, report_rate=0.5)
    drawn = Counter(t for _ in range(50) for t in next(batches).texts)
    assert 40 < drawn[notes[False][0]] < 100  # about 0.3 of the 200 abnormal items, none of the normal ones
    assert 40 < drawn[reports[False][0]] < 120 and drawn[reports[True][0]] > 20
    plain = data.batches(6, np.random.default_rng(0), report_rate=0.5)  # note_rate 0: never a note
    assert not any(notes[False][0] in next(plain).texts for _ in range(50))


def test_the_training_patients_notes_are_collected_by_status(shared_data):
    model = m3bind.M3BindModel(m3bind.ModelConfig(
        name="notes", dim=8, text=m3bind.TextTowerConfig(max_length=16),
        towers={"ct": m3bind.ImageTowerConfig(source=None, image_size=16, vision_cfg={"cnn_widths": [4]})},
        modality_towers={"ct": "ct"}))
    data = load_modality_data(model, "ct", ["covid_cxr"], "train", str(shared_data))
    test = {p.report for p in load_dataset("covid_cxr", "test", data_root=shared_data).pairs if p.report}
    assert len(data.notes[False]) > 10 and not set(data.notes[False]) & test  # other patients' notes only


def test_status_reports_pair_normal_and_parenchymal_iu_reports(shared_data):
    reports = status_reports("xray", str(shared_data))
    assert len(reports[True]) > 500 and len(reports[False]) > 300
    assert not set(reports[True]) & set(reports[False])
    assert not any("XXXX" in t for texts in reports.values() for t in texts)
    assert sum("opacit" in t.lower() or "consolidat" in t.lower() or "airspace" in t.lower()
               for t in reports[False]) > 0.6 * len(reports[False])
    assert status_reports("ecg", str(shared_data)) == {True: (), False: ()}


def test_class_balanced_batches_favour_rare_classes_by_the_chosen_power():
    keys = [("g", 0)] * 90 + [("g", 1)] * 10
    data = ModalityData("retina", torch.zeros(100, 3, 4, 4), [("x",)] * 100, keys, [None] * 100)

    def rare_share(class_balance: float) -> float:
        batches = data.batches(10, np.random.default_rng(0), class_balance=class_balance)
        rows = np.concatenate([next(batches).rows for _ in range(300)])
        assert all(len(set(next(batches).rows)) == 10 for _ in range(5))  # no item twice in a batch
        return float(np.mean(rows >= 90))

    plain, root, full = rare_share(0.0), rare_share(0.5), rare_share(1.0)
    assert plain == pytest.approx(0.10, abs=1e-9)  # epochs: every item once per pass
    assert root == pytest.approx(0.25, abs=0.03)  # weights 1/sqrt(count): 10/sqrt(10) vs 90/sqrt(90)
    assert 0.4 < full < 0.5  # each class about equally often (a little less: no item twice in a batch)


def test_image_augmentation_adds_the_black_bars_of_padded_inputs_and_keeps_the_range():
    generator = torch.Generator().manual_seed(0)
    images = torch.ones(4, 3, 32, 32)
    barred = 0
    for _ in range(40):
        out = augment(images, "image", generator)
        assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
        rows, cols = out.amax(dim=(1, 3)), out.amax(dim=(1, 2))  # (N, 32): brightest pixel per row / column
        assert (rows.amax(1) > 0.5).all()  # the image itself stays
        barred += bool((rows == 0).any() or (cols == 0).any())  # a whole black row or column
    assert 5 < barred < 35  # about half of the batches


def test_image_augmentation_flips_only_along_the_allowed_axes():
    generator = torch.Generator().manual_seed(0)
    images = torch.zeros(8, 3, 32, 32)
    images[:, :, :16, :16] = 1  # bright top-left quadrant
    left_bright = top_bright = 0
    for _ in range(20):
        out = augment(images, "image", generator, flips=("horizontal",))
        left_bright += int((out[..., :16].mean(dim=(1, 2, 3)) > out[..., 16:].mean(dim=(1, 2, 3))).sum())
        top_bright += int((out[..., :16, :].mean(dim=(1, 2, 3)) > out[..., 16:, :].mean(dim=(1, 2, 3))).sum())
    assert 40 < left_bright < 120  # about half of 160 images flipped left-right
    assert top_bright == 160  # never upside down
    plain = augment(images, "image", generator)
    assert (plain[..., :16].mean(dim=(1, 2, 3)) > plain[..., 16:].mean(dim=(1, 2, 3))).all()


def test_ecg_augmentation_keeps_missing_leads_empty():
    generator = torch.Generator().manual_seed(0)
    signal, mask = torch.randn(2, 12, 1000), torch.ones(2, 12, 1000)
    mask[:, 3:6] = 0
    out = augment(torch.cat([signal * mask, mask], dim=1), "ecg", generator)
    assert out.shape == (2, 24, 1000) and (out[:, 3:6] == 0).all() and torch.equal(out[:, 12:], mask)


def test_distillation_loss():
    x = unit(torch.randn(5, 8))
    assert distillation(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation(x, -x).item() == pytest.approx(2.0, abs=1e-5)


def test_relational_distillation_is_zero_only_when_the_images_choose_the_same_texts():
    images, teacher = unit(torch.randn(6, 8)), unit(torch.randn(4, 8))
    assert relational_distillation(images, teacher, teacher, 50.0).item() == pytest.approx(0.0, abs=1e-6)
    swapped = teacher[[1, 0, 2, 3]]  # the same texts, two of them exchanged
    assert relational_distillation(images, swapped, teacher, 50.0).item() > 0.1
    student = swapped.clone().requires_grad_(True)
    relational_distillation(images, student, teacher, 50.0).backward()
    assert student.grad.abs().sum() > 0  # it trains the student only: the teacher's side is detached


@pytest.mark.slow
def test_distillation_reduces_the_student_teacher_gap_on_held_out_texts(tiny_model, shared_data):
    from train.captions import shared_text_corpus

    teacher = copy.deepcopy(tiny_model)
    texts = shared_text_corpus(shared_data, max_per_source=80, seed=0)
    train_texts, held_out = texts[:300], texts[300:400]
    student = text_only_model(tiny_model.config.text, tiny_model.dim, "student", seed=1)

    def gap() -> float:
        return float(1 - (student.embed_text(held_out) * teacher.embed_text(held_out)).sum(1).mean())

    before = gap()
    distill(student, {"xray": teacher}, {"xray": train_texts}, StageConfig(steps=80, batch_size=64, lr=1e-2))
    after = gap()
    assert after < 0.5 * before, (before, after)


@pytest.mark.slow
def test_class_prompt_distillation_keeps_how_the_teachers_images_choose_among_the_classes(tiny_model, shared_data):
    from train.captions import shared_text_corpus

    teacher = copy.deepcopy(tiny_model)
    texts = shared_text_corpus(shared_data, max_per_source=40, seed=0)
    sets = class_prompt_sets(["retinamnist"], "retina", shared_data)
    assert [len(classes) for classes in sets] == [5] and all(len(prompts) > 1 for prompts in sets[0])
    images = unit(torch.randn(64, tiny_model.dim, generator=torch.Generator().manual_seed(0)))

    def classes(model):
        return unit(torch.stack([torch.from_numpy(model.embed_text(prompts)).mean(0) for prompts in sets[0]]))

    def gap(class_weight: float) -> float:
        student = text_only_model(tiny_model.config.text, tiny_model.dim, "student", seed=1)
        distill(student, {"retina": teacher}, {"retina": texts}, StageConfig(
            steps=30, batch_size=64, lr=1e-2, class_weight=class_weight), images={"retina": images},
            class_prompts={"retina": sets})
        return relational_distillation(images, classes(student), classes(teacher), 100.0).item()

    without, with_classes = gap(0.0), gap(5.0)
    assert with_classes < 0.5 * without, (without, with_classes)
    with pytest.raises(ValueError, match="class_weight"):
        distill(text_only_model(tiny_model.config.text, tiny_model.dim, "student", seed=1), {"retina": teacher},
                {"retina": texts}, StageConfig(steps=1, class_weight=1.0), images={"retina": images})


@pytest.mark.slow
def test_stage_1_class_term_holds_a_teacher_to_its_zero_shot_choice_while_the_alignment_pulls(
        tiny_config, shared_data):
    from train.captions import shared_text_corpus

    tower = m3bind.ImageTowerConfig(source=None, image_size=32, vision_cfg={"cnn_widths": [8, 16]})
    teachers = {m: new_teacher(m, tower, tiny_config.dim, tiny_config.text, seed) for seed, m in
                enumerate(["retina", "ultrasound"])}
    data = {m: load_modality_data(t, m, [d], "train", shared_data, max_items=48) for (m, t), d in
            zip(teachers.items(), ["retinamnist", "breastmnist"])}
    prompts = {m: class_prompt_sets([d], m, shared_data) for m, d in zip(teachers, ["retinamnist", "breastmnist"])}
    shared = shared_text_corpus(shared_data, max_per_source=40, seed=0)
    base = TextFeatures(teachers["retina"])
    scale = teachers["retina"].config.logit_scale

    def choice(model):
        images = item_embeddings(model, data["retina"])
        classes = unit(torch.stack([torch.from_numpy(model.embed_text(e)).mean(0) for e in prompts["retina"][0]]))
        return F.log_softmax(scale * images @ classes.T, dim=-1)

    first = choice(teachers["retina"])
    cfg = StageConfig(steps=15, batch_size=16, shared_batch=32, lr=1e-2, tower_lr=1e-2, align_weight=100.0,
                      tower_head_only=True)

    def drift(class_weight: float) -> float:
        aligned = align(copy.deepcopy(teachers), data, shared, cfg, base_features=base,
                        overrides={"retina": {"class_weight": class_weight}}, class_prompts=prompts)
        return F.kl_div(choice(aligned["retina"]), first, log_target=True, reduction="batchmean").item()

    free, held = drift(0.0), drift(5.0)
    assert held < 0.5 * free, (free, held)
    with pytest.raises(ValueError, match="class_weight"):
        align(copy.deepcopy(teachers), data, shared, cfg, overrides={"retina": {"class_weight": 1.0}})


def test_a_teacher_starts_from_another_teachers_trunk_but_keeps_its_own_head(tiny_config):
    def teacher(modality, widths, seed):
        tower = m3bind.ImageTowerConfig(source=None, image_size=32, vision_cfg={"cnn_widths": widths})
        return new_teacher(modality, tower, tiny_config.dim, tiny_config.text, seed)

    source, target = teacher("xray", [8, 16], 0), teacher("ultrasound", [8, 16], 1)
    head_before = copy.deepcopy(target.tower_for("ultrasound").visual.head.state_dict())
    copy_trunk(target, "ultrasound", source, "xray")
    copied, original = (m.tower_for(x).visual for m, x in ((target, "ultrasound"), (source, "xray")))
    for name, value in original.trunk.state_dict().items():
        torch.testing.assert_close(copied.trunk.state_dict()[name], value, rtol=0, atol=0)
    for name, value in head_before.items():
        torch.testing.assert_close(copied.head.state_dict()[name], value, rtol=0, atol=0)
    with pytest.raises(ValueError, match="layouts differ"):
        copy_trunk(teacher("retina", [8, 32], 2), "retina", source, "xray")


def test_an_ensemble_tower_averages_its_members_and_trains_one_at_a_time_into_the_first_ones_text_space(
        tiny_config):
    def teacher(modality, members, seed):
        vision = {"cnn_widths": [8, 16], "cnn_members": members}
        tower = m3bind.ImageTowerConfig(source=None, image_size=32, vision_cfg=vision)
        return new_teacher(modality, tower, tiny_config.dim, tiny_config.text, seed).eval()

    model = teacher("ultrasound", 2, 0)
    tower = model.tower_for("ultrasound")
    pixels = torch.rand(4, 3, 32, 32)
    members = []
    for member in range(2):
        with training_member(model, "ultrasound", member):
            model.config.logit_scale = 5.0 + member
            trainable = {name for name, p in model.named_parameters() if p.requires_grad}
            assert any(f"parts.{member}." in name for name in trainable)
            assert all(f"parts.{member}." in name or name.startswith("text.") for name in trainable)
            assert any(name.startswith("text.") for name in trainable) == (member == 0)
            members.append(F.normalize(tower(pixels), dim=-1))
    assert model.config.logit_scale == 5.0  # the first member's temperature stands
    assert all(p.requires_grad for p in model.parameters())
    assert not torch.allclose(members[0], members[1])
    torch.testing.assert_close(tower(pixels), (members[0] + members[1]) / 2)

    source = teacher("xray", 1, 1)
    copy_trunk(model, "ultrasound", source, "xray")  # from a single trunk: every member starts from it
    for part in tower.visual.trunk.parts:
        for name, value in source.tower_for("xray").visual.trunk.state_dict().items():
            torch.testing.assert_close(part.state_dict()[name], value, rtol=0, atol=0)


def test_trunk_from_must_name_a_modality_listed_before(tmp_path):
    config = (REPO / "train" / "configs" / "tiny.yaml").read_text()
    later = tmp_path / "later.yaml"
    later.write_text(config.replace("trunk_from: ultrasound", "trunk_from: ecg"))
    with pytest.raises(ValueError, match="trunk_from"):
        PipelineConfig.from_yaml(later)


def test_the_command_line_replaces_the_configs_seed_and_folders(tmp_path):
    tiny = str(REPO / "train" / "configs" / "tiny.yaml")
    assert config_from_args(["--config", tiny]).seed == PipelineConfig.from_yaml(tiny).seed
    cfg = config_from_args(["--config", tiny, "--seed", "7", "--run-dir", str(tmp_path / "r"),
                            "--export-dir", str(tmp_path / "e")])
    assert (cfg.seed, cfg.run_dir, cfg.export_dir) == (7, tmp_path / "r", tmp_path / "e")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("tiny-run")
    cfg = PipelineConfig.from_yaml(REPO / "train" / "configs" / "tiny.yaml", data_root=str(shared_data))
    cfg.run_dir, cfg.export_dir = root / "run", root / "export"
    model = run(cfg)
    return cfg, model


@pytest.mark.slow
def test_tiny_pipeline_runs_every_stage_and_exports_a_loadable_model(tiny_run, shared_data):
    cfg, model = tiny_run
    for stage in ("teachers", "aligned", "student"):
        assert (cfg.run_dir / stage / "DONE").is_file()
    loaded = m3bind.load_model(cfg.export_dir, device="cpu")
    assert sorted(loaded.modalities) == sorted(cfg.modalities)
    assert "demonstration model" in (cfg.export_dir / "README.md").read_text()
    ecg = m3bind.load_input(sorted((shared_data / "ecg" / "ptbxl").rglob("*.hea"))[0])
    np.testing.assert_array_equal(model.embed(ecg), loaded.embed(ecg))
    probs = loaded.classify(ecg, ["normal ECG", "myocardial infarction"])
    assert abs(sum(probs.values()) - 1) < 1e-5


@pytest.mark.slow
def test_tiny_pipeline_resumes_from_its_checkpoints_and_is_deterministic(tiny_run, tmp_path, shared_data):
    cfg, model = tiny_run
    again = run(dataclasses.replace(cfg, export_dir=tmp_path / "resumed"))  # every stage loads from its checkpoint
    assert again.fingerprint == m3bind.load_model(cfg.export_dir, device="cpu").fingerprint
    fresh = run(dataclasses.replace(cfg, run_dir=tmp_path / "fresh", export_dir=tmp_path / "fresh-export"))
    assert fresh.fingerprint == again.fingerprint

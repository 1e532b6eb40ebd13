"""Binding published CLIP models (issue 19): tiny random checkpoints in the three published formats, built
offline, loaded from local folders and from a hub cache with HF_HUB_OFFLINE=1, adapted with LoRA on q/v of
both towers, bound and exported as one model that ``m3bind.load_model`` reads (also on a "second machine")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny teachers of train/configs/published_tiny.yaml, and the hub cache they are read from."""
    from train.published.fixtures import offline_hub, tiny_published_hub

    root = tmp_path_factory.mktemp("published")
    names = tiny_published_hub(root / "hub", root / "work")
    saved = os.environ.get("M3BIND_TINY_PUBLISHED")
    os.environ["M3BIND_TINY_PUBLISHED"] = str(root)
    with offline_hub(root / "hub"):
        yield root, names
    if saved is None:
        os.environ.pop("M3BIND_TINY_PUBLISHED")
    else:
        os.environ["M3BIND_TINY_PUBLISHED"] = saved


def _published_plans():
    """The tiny config's teachers in published formats (its ECG teacher is in M3Bind's own format)."""
    from train.published.pipeline import PublishedConfig

    plans = PublishedConfig.from_yaml(REPO / "train" / "configs" / "published_tiny.yaml").teachers
    return {m: p for m, p in plans.items() if p.type != "m3bind"}


def test_published_formats_load_offline_with_their_own_tokenizers(tiny):
    """Each format loads through hub cache (offline) or local folder with its own tokenizer, context length and
    width; the BiomedCLIP-format repo gives the same embeddings from the hub cache as from its folder."""
    import open_clip
    from huggingface_hub import constants
    from train.published.teachers import TeacherPlan, load_teacher

    root, names = tiny
    assert constants.is_offline_mode()
    plans = _published_plans()
    teachers = {m: load_teacher(m, p, dim=64) for m, p in plans.items()}
    texts = ["Normal chest radiograph.", "Squamous cell carcinoma of the lung, H&E."]
    tokens = {m: t.text.tokenize(texts)["input_ids"] for m, t in teachers.items()}
    assert tokens["xray"].shape == (2, 256) and tokens["retina"].shape == (2, 32)  # WordPiece@256, open_clip BPE@32
    assert tokens["pathology"].shape[1] < 32  # CLIPTokenizer pads to the longest text
    assert len({tuple(t[0, :4].tolist()) for t in tokens.values()}) == 3  # three different vocabularies
    widths = {m: t.towers[m].proj.in_features for m, t in teachers.items()}
    assert widths == {"xray": 64, "retina": 48, "pathology": 24}
    folder = load_teacher("xray", TeacherPlan("open_clip", f"local-dir:{names['open_clip_bert_dir']}", []), 64)
    with torch.no_grad():
        for model in (teachers["xray"], folder):
            model.towers["xray"].proj.weight.copy_(torch.eye(64))
        assert torch.allclose(teachers["xray"].encode_text(texts), folder.encode_text(texts), atol=1e-6)
        for m, model in teachers.items():
            size = model.towers[m].cfg.image_size
            assert model.encode(m, torch.rand(2, 3, size, size)).shape == (2, 64)
    assert open_clip.get_model_preprocess_cfg(open_clip.create_model(names["open_clip_bert"]))["size"] == (160, 160)


def test_qv_lora_on_both_towers_changes_only_query_and_value(tiny):
    """One optimisation step with the stage 1 adapters on every teacher, then merged: the published layout comes
    back (same weight names), only query/value projections changed (the key third of fused q/k/v stays), in both
    towers, and the per-teacher projection stays an isometry (cosines unchanged)."""
    from train.published.align import AlignConfig, AlignStep, TeacherBatch, finish_teacher
    from train.published.teachers import load_teacher

    teachers = {m: load_teacher(m, p, dim=64) for m, p in _published_plans().items()}
    before = {m: {k: v.clone() for k, v in t.state_dict().items()} for m, t in teachers.items()}
    step = AlignStep(teachers, AlignConfig(steps=1, lr=1e-2, proj_lr=1e-2, lora_dropout=0.0), torch.device("cpu"))
    texts = ["normal study", "pneumonia", "benign lung tissue", "moderate retinopathy"]
    batches = {m: TeacherBatch(torch.rand(4, 3, t.towers[m].cfg.image_size, t.towers[m].cfg.image_size),
                               t.text.tokenize(texts), torch.eye(4), t.text.tokenize(texts[::-1]))
               for m, t in teachers.items()}
    own, aligned = step(batches)
    assert torch.isfinite(own) and torch.isfinite(aligned) and float(aligned) > 0
    for m, t in teachers.items():
        proj = t.towers[m].proj.weight.detach()
        assert torch.allclose(proj.T @ proj, torch.eye(proj.shape[1]), atol=1e-5)  # still an isometry
        finish_teacher(t, m)
        after = t.state_dict()
        assert set(after) == set(before[m])
        changed = {k for k in after if not torch.equal(after[k], before[m][k])}
        adapted = changed - {f"towers.{m}.proj.weight", "text.proj.weight"}  # one projection, named twice
        assert any(k.startswith(f"towers.{m}.visual") for k in adapted)  # the image tower adapted
        assert any(k.startswith("text.model") for k in adapted)  # and the text tower
        for k in adapted:
            leaf = k.rsplit(".", 2)
            assert leaf[-1] in ("weight", "in_proj_weight") and leaf[-2] in ("query", "value", "q_proj", "v_proj",
                                                                                "qkv", "attn"), k
            if leaf[-2] in ("qkv", "attn"):  # fused: q and v rows moved, k rows did not
                third = after[k].shape[0] // 3
                assert not torch.equal(after[k][:third], before[m][k][:third])
                assert torch.equal(after[k][third:2 * third], before[m][k][third:2 * third])
                assert not torch.equal(after[k][2 * third:], before[m][k][2 * third:])


def test_alignment_across_widths_pulls_the_teachers_text_spaces_together(tiny):
    """Teachers of widths 64, 48 and 24 start with unrelated text spaces; a few stage 1 steps on one fixed batch
    lower the pairwise MSE of their text embeddings in the shared width, while each projection stays an isometry
    (so the drop comes from the teachers' spaces moving together, not from a projection collapsing)."""
    from train.published.align import AlignConfig, AlignStep, TeacherBatch
    from train.published.teachers import load_teacher

    torch.manual_seed(0)
    teachers = {m: load_teacher(m, p, dim=64) for m, p in _published_plans().items()}
    step = AlignStep(teachers, AlignConfig(steps=8, lr=2e-2, proj_lr=0.1, lora_dropout=0.0, align_weight=10.0),
                     torch.device("cpu"))
    texts = ["normal chest radiograph", "right lower lobe pneumonia", "benign lung tissue", "squamous cell carcinoma",
             "moderate diabetic retinopathy", "no retinopathy"]
    batches = {m: TeacherBatch(torch.rand(6, 3, t.towers[m].cfg.image_size, t.towers[m].cfg.image_size),
                               t.text.tokenize(texts), torch.eye(6), t.text.tokenize(texts))
               for m, t in teachers.items()}
    losses = [float(step(batches)[1]) for _ in range(8)]  # each: the MSE before that step's update
    assert losses[-1] < 0.75 * losses[0]  # 6.1 -> 3.6 when measured
    for m, t in teachers.items():
        proj = t.towers[m].proj.weight.detach()
        assert torch.allclose(proj.T @ proj, torch.eye(proj.shape[1]), atol=1e-5)


@pytest.mark.slow
@pytest.mark.shared_data
def test_pipeline_binds_three_published_teachers_and_exports_a_loadable_model(tiny, tmp_path):
    """The whole pipeline (stage 1, stage 2, export) on the three tiny published teachers and an ECG CLIP in
    M3Bind's format, with real images and ECGs; the export
    loads through ``m3bind.load_model`` (here, and in a fresh process from a hub cache with HF_HUB_OFFLINE=1)
    and embeds images and texts exactly as the trained model did."""
    import m3bind
    from train.data import load_dataset
    from train.published.fixtures import hub_cache_repo
    from train.published.pipeline import PublishedConfig, run

    root, _ = tiny
    cfg = PublishedConfig.from_yaml(REPO / "train" / "configs" / "published_tiny.yaml", export_dir=str(tmp_path / "x"))
    bound = run(cfg, "cpu")
    assert {p.name for p in (tmp_path / "x").iterdir()} >= {"config.json", "model.safetensors", "README.md"}
    saved = json.loads((tmp_path / "x" / "config.json").read_text())
    assert saved["towers"]["pathology"]["type"] == "hf-clip" and saved["towers"]["ecg"]["kind"] == "ecg"
    assert saved["dim"] == 64
    loaded = m3bind.load_model(tmp_path / "x", device="cpu")
    samples = [load_dataset(d, "test", seed=0).pairs[0].load()
               for d in ("pneumoniamnist", "retinamnist", "lc25000_lung", "ptbxl")]
    assert [s.modality for s in samples] == ["xray", "retina", "pathology", "ecg"]
    vectors = loaded.embed(samples)
    assert vectors.shape == (4, 64) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert np.allclose(vectors, bound.embed(samples), atol=1e-5)
    phrase = ["Normal chest radiograph."]
    assert np.allclose(loaded.embed_text(phrase), bound.embed_text(phrase), atol=1e-5)
    probs = loaded.classify(samples[0], ["normal", "pneumonia"])
    assert abs(sum(probs.values()) - 1) < 1e-6

    hub_cache_repo(root / "hub", "tiny-org/m3bind-published-tiny", tmp_path / "x")
    code = ("import json, m3bind; m = m3bind.load_model('hf-hub:tiny-org/m3bind-published-tiny', device='cpu'); "
            f"print(json.dumps(m.embed_text({phrase!r}).tolist()))")
    env = {**os.environ, "HF_HUB_CACHE": str(root / "hub"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert np.allclose(json.loads(out.stdout.strip().splitlines()[-1]), bound.embed_text(phrase), atol=1e-5)


@pytest.mark.slow
@pytest.mark.shared_data
def test_torchrun_binds_the_tiny_teachers_with_two_gloo_ranks_in_step(tiny, tmp_path):
    """Two CPU processes (gloo) stand in for two GPUs: stage 1 (contrastive over both ranks' pairs, the shared
    texts split between them) and stage 2 end with identical weights in both, and rank 0's export loads."""
    import m3bind

    root, _ = tiny
    env = {**os.environ, "HF_HUB_CACHE": str(root / "hub"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "train.published", "--config", str(REPO / "train" / "configs" / "published_tiny.yaml"),
               "--export-dir", str(tmp_path / "ddp")]
    out = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "stage 1 teachers: identical in all 2 processes" in out.stdout
    assert "stage 2 student: identical in all 2 processes" in out.stdout
    model = m3bind.load_model(tmp_path / "ddp", device="cpu")
    assert set(model.modalities) == {"xray", "retina", "pathology", "ecg"}
    assert model.embed_text(["Normal sinus rhythm."]).shape == (1, 64)


def test_unknown_teacher_type_is_refused():
    from train.published.teachers import TeacherPlan

    with pytest.raises(ValueError, match="Unknown teacher type"):
        TeacherPlan("ecg-clip-v9", "somewhere", ["ptbxl"])

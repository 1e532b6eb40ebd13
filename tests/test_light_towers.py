"""The default model's towers in plain torch (``m3bind.bert``, ``m3bind.efficientnet``, the ECG reader's
``resample_poly``) against the libraries they stand in for: the same tokens, the same numbers, and loading the
default model imports none of transformers, open_clip, timm or scipy.signal (the ~10 s they cost every start)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import scipy.signal
import torch

from conftest import REPO
from m3bind.bert import BertEncoder, BertSpec, checkpoint_state, load_tokenizer, tokenize
from m3bind.config import ImageTowerConfig, TextTowerConfig
from m3bind.efficientnet import VISION_CFG
from m3bind.encoders import ImageTower, TextTower
from m3bind.errors import ConfigError
from m3bind.readers.ecg import resample_poly
from m3bind.weights import package_trunk_state, resolve_text_source

TEXTS = ["pneumonia", "Consolidation in the left lower lobe; no pleural effusion.", "", "ÉCG: atrial fibrillation, "
         "rate 120/min", "diabetic retinopathy " * 40, "中文 text and [MASK] tokens"]


@pytest.mark.parametrize("max_length", [16, 64])
def test_minilm_tokens_and_hidden_states_equal_transformers(max_length):
    from transformers import AutoModel, AutoTokenizer

    tower = TextTower(TextTowerConfig(max_length=max_length), 32)
    source = resolve_text_source("package:all-MiniLM-L6-v2")
    expected_tokens = AutoTokenizer.from_pretrained(source)(TEXTS, padding=True, truncation=True,
                                                             max_length=max_length, return_tensors="pt")
    tokens = tower.tokenize(TEXTS)
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(tokens[key], expected_tokens[key]), key
    reference = AutoModel.from_pretrained(source).eval()
    with torch.no_grad():
        expected = reference(**expected_tokens).last_hidden_state
        hidden = tower.model(**tokens)
    real = tokens["attention_mask"].bool()
    assert torch.allclose(hidden[real], expected[real], atol=1e-4)


def test_a_bert_checkpoint_with_a_vocab_file_only_and_old_names_loads(tmp_path):
    """An older checkpoint: ``bert.``-prefixed keys with ``gamma``/``beta`` layer norms and a masked-LM head in a
    ``pytorch_model.bin``, and a ``vocab.txt`` without ``tokenizer.json``: it loads, and encodes as transformers."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "pneumonia", "normal", "ecg", "##s", "chest", "x", "-",
             "ray"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, hidden_act="gelu_new")
    torch.manual_seed(0)
    reference = BertModel(config).eval()
    state = {f"bert.{k}".replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
             for k, v in reference.state_dict().items()}
    state["cls.predictions.bias"] = torch.zeros(len(vocab))
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({**config.to_dict(), "model_type": "bert"}))
    texts = ["Chest X-ray: pneumonia", "normal ECGs", "unknown words"]
    tokenizer = load_tokenizer(tmp_path, 12)
    tokens = tokenize(tokenizer, texts)
    expected_tokens = BertTokenizerFast.from_pretrained(tmp_path)(texts, padding=True, truncation=True,
                                                                             max_length=12, return_tensors="pt")
    assert torch.equal(tokens["input_ids"], expected_tokens["input_ids"])
    encoder = BertEncoder(BertSpec.from_dir(tmp_path))
    encoder.load_state_dict(checkpoint_state(tmp_path, encoder))
    with torch.no_grad():
        assert torch.allclose(encoder.eval()(**tokens), reference(**expected_tokens).last_hidden_state, atol=1e-5)


def test_a_text_source_that_is_not_bert_is_a_config_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "roberta"}))
    with pytest.raises(ConfigError, match="BERT"):
        TextTower(TextTowerConfig(source=str(tmp_path)), 8)
    with pytest.raises(ConfigError, match="neither a folder nor"):
        resolve_text_source(str(tmp_path / "missing"))


@pytest.mark.parametrize("size", [224, 128, 101])
def test_efficientnet_lite0_tower_equals_open_clips(size):
    """Padding, pooling and head as open_clip's timm tower, at sizes that need asymmetric 'same' padding."""
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    cfg = ImageTowerConfig(source="package:efficientnet-lite0", vision_cfg=dict(VISION_CFG), image_size=size)
    tower = ImageTower(cfg, 24).eval()
    reference = _build_vision_tower(24, CLIPVisionCfg(image_size=size, **VISION_CFG)).eval()
    reference.trunk.load_state_dict(package_trunk_state(cfg.source, reference.trunk))
    reference.head.load_state_dict(tower.visual.head.state_dict())
    assert list(reference.state_dict()) == list(tower.visual.state_dict())
    pixels = torch.rand(2, 3, size, size)
    with torch.no_grad():
        assert torch.allclose(tower.visual(pixels), reference(pixels), atol=1e-5)
        # the frozen-stage split training uses gives the same features as the whole trunk
        split = ImageTower(ImageTowerConfig(**{**cfg.__dict__, "frozen_stages": 3}), 24).eval()
        assert torch.allclose(split.body(pixels), tower.body(pixels), atol=1e-5)


@pytest.mark.parametrize("n, up, down", [(5000, 1, 5), (2500, 2, 5), (3600, 5, 18), (1280, 5, 64), (7, 1, 5),
                                         (257, 3, 1), (1000, 1, 1)])
def test_resample_poly_equals_scipys(n, up, down):
    x = np.random.default_rng(n).standard_normal((n, 12))
    expected = scipy.signal.resample_poly(x, up, down, axis=0)
    assert np.allclose(resample_poly(x, up, down), expected, atol=1e-12)
    assert np.allclose(resample_poly(x[:, 0], up, down), expected[:, 0], atol=1e-12)


def test_loading_the_default_model_and_reading_an_ecg_import_no_heavy_library():
    code = ("import sys, m3bind\nfrom pydicom.data import get_testdata_file\n"
            "m = m3bind.load_model()\nm.classify(m3bind.load_input(get_testdata_file('waveform_ecg.dcm')), ['normal ECG', 'atrial fibrillation'])\n"
            "print([k for k in ('transformers', 'open_clip', 'timm', 'torchvision', 'scipy.signal') "
            "if k in sys.modules])")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "[]"

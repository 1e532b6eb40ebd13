"""Shared fixtures: the real data beside the repository and small real models built offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("M3BIND_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_config():
    """A fast model: MiniLM text tower (from its package), a tiny open_clip ViT and a tiny residual CNN as image
    towers, a small ECG CNN."""
    import m3bind

    vit = {"layers": 2, "width": 64, "head_width": 32, "patch_size": 8}
    towers = {
        "xray": m3bind.ImageTowerConfig(source=None, vision_cfg=vit, image_size=32),
        "retina": m3bind.ImageTowerConfig(source=None, vision_cfg={"cnn_widths": (8, 16)}, image_size=32),
        "ecg": m3bind.EcgTowerConfig(widths=(16, 32)),
    }
    return m3bind.ModelConfig(name="tiny", dim=32, towers=towers,
                              modality_towers={"xray": "xray", "ct": "xray", "retina": "retina", "ecg": "ecg"})


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    import torch

    import m3bind

    torch.manual_seed(0)
    return m3bind.M3BindModel(tiny_config)

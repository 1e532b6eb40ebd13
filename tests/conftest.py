"""Shared fixtures: the real data beside the repository and small real models built offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("M3BIND_DATA", REPO.parent / "shared" / "data"))


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def require_shared_data(path: Path = SHARED_DATA) -> Path:
    """``path`` if it is a folder; else skip the test, or fail it where ``CI=true``."""
    if not path.is_dir():
        message = f"real data not found at {path} (set M3BIND_DATA)"
        if in_ci():
            pytest.fail(f"{message}; CI=true, so tests that need it fail instead of skipping", pytrace=False)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data folder (env ``M3BIND_DATA``, default ``../shared/data``). Every test that needs it goes
    through this fixture (or ``@pytest.mark.shared_data``): missing data skips the test on a workstation, but
    fails it where ``CI=true``, so a CI run cannot pass by silently skipping the real-data tests."""
    return require_shared_data(SHARED_DATA)


@pytest.fixture(autouse=True)
def _shared_data_mark(request):
    """``@pytest.mark.shared_data`` (usable where a fixture argument is not, e.g. on one ``pytest.param``)
    routes the test through the ``shared_data`` fixture: skipped without the data, failed in CI."""
    if request.node.get_closest_marker("shared_data") is not None:
        request.getfixturevalue("shared_data")


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

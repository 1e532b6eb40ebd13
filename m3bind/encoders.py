"""The towers: each maps one kind of input into the shared space of dimension D (unnormalised).

Image towers are open_clip vision towers (timm-backed or open_clip's own architectures, or the visual
half of a published open_clip checkpoint) followed by a projection to D, or a compact residual CNN trained
from scratch (for small images, where an upsampled ImageNet trunk gains little), or the mean of several.
The ECG tower is a 1-D residual CNN over the canonical 12-lead form. The text tower is a BERT encoder
(``m3bind.bert``) with pooling and a projection to D.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .bert import BertEncoder, BertSpec, checkpoint_state, load_tokenizer, tokenize
from .efficientnet import VISION_CFG, EfficientNetLite0Tower
from .config import EcgTowerConfig, ImageTowerConfig, TextTowerConfig
from .errors import ConfigError
from .modalities import Modality, get_modality
from .sample import Sample
from .weights import package_name, package_trunk_state, resolve_text_source

_CHANNEL_MEAN = np.full(3, 1 / 3, dtype=np.float32)


class ImageTower(nn.Module):
    def __init__(self, cfg: ImageTowerConfig, dim: int):
        """The tower that ``cfg.architecture`` names (``IMAGE_BACKBONES``), projecting to ``dim``. ``self.cfg``
        is the config the tower runs with (a published checkpoint brings its own size, mean and std); the
        caller's ``cfg`` is never changed, so a model's config and fingerprint stay as given."""
        super().__init__()
        self.visual, self.proj, self.cfg = IMAGE_BACKBONES[cfg.architecture](cfg, dim)
        self.register_buffer("mean", torch.tensor(self.cfg.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.cfg.std).view(1, 3, 1, 1), persistent=False)

    def base_keys(self) -> set[str]:
        """Names of the weights that come from the tower's source (a saved model may omit them)."""
        if self.cfg.architecture == "published":
            return {f"visual.{k}" for k in self.visual.state_dict()}
        if package_name(self.cfg.source):
            return {f"visual.trunk.{k}" for k in self.visual.trunk.state_dict()}
        return set()

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights the tower starts from, reloaded from their source (what a saved model may omit)."""
        if self.cfg.architecture == "published":
            import open_clip

            return {f"visual.{k}": v for k, v in open_clip.create_model(self.cfg.source).visual.state_dict().items()}
        if package_name(self.cfg.source):
            return {f"visual.trunk.{k}": v for k, v in package_trunk_state(self.cfg.source, self.visual.trunk).items()}
        return {}

    def prepare(self, sample: Sample, keep_colour: bool = False) -> torch.Tensor:
        """The tower's input for an image sample: grey for a grey modality unless ``keep_colour`` (the modality
        detector reads colour), fitted on the grid of the file's stored size (see ``preprocess``)."""
        stored = (sample.meta.get("height"), sample.meta.get("width"))
        return self.preprocess(sample.data, None if keep_colour else get_modality(sample.modality),
                               stored if all(stored) else None)

    def preprocess(self, image: np.ndarray, modality: Modality | None,
                   stored_size: tuple[int, int] | None = None) -> torch.Tensor:
        """(H, W, 3) float in [0, 1] -> (3, S, S): grey if the modality is grey (colour kept for None), resized
        to fit, padded square.

        Grey images are reduced to one channel first and padding comes after resizing, so the per-item cost
        stays small next to the encoder even for 512-px inputs. ``stored_size``, the (height, width) of the
        file when ``image`` is a reduced decode of it, sets the fitted size, so that both land on the same
        pixel grid (rounding twice could add a row of padding, and small towers notice).
        """
        image = np.asarray(image, dtype=np.float32)
        if modality is not None and modality.grayscale:
            image = (image @ _CHANNEL_MEAN)[..., None]
        x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        h, w = stored_size or x.shape[1:]
        size = self.cfg.image_size
        scale = size / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        x = F.interpolate(x[None], size=(nh, nw), mode="bilinear", antialias=nh < x.shape[1] or nw < x.shape[2],
                          align_corners=False)[0]
        x = F.pad(x, ((size - nw) // 2, size - nw - (size - nw) // 2, (size - nh) // 2, size - nh - (size - nh) // 2))
        return x.expand(3, -1, -1) if x.shape[0] == 1 else x

    def body(self, pixels: torch.Tensor) -> torch.Tensor:
        """Features below the output head: a timm trunk's pooled features, or a published tower's output."""
        if self.cfg.frozen_stages:
            return self.upper_body(self.lower(pixels))
        x = (pixels - self.mean) / self.std
        trunk = getattr(self.visual, "trunk", None)
        return self.visual(x) if trunk is None else trunk(x)

    def _stages(self) -> nn.Module:
        trunk = getattr(self.visual, "trunk", None)
        if not hasattr(trunk, "blocks") or not hasattr(trunk, "conv_stem"):
            raise ConfigError("frozen_stages needs an EfficientNet-style timm trunk (conv_stem, blocks).")
        return trunk

    def lower(self, pixels: torch.Tensor) -> torch.Tensor:
        """The frozen first ``frozen_stages`` stages: feature maps that training computes once per image."""
        trunk = self._stages()
        x = trunk.bn1(trunk.conv_stem((pixels - self.mean) / self.std))
        return trunk.blocks[:self.cfg.frozen_stages](x)

    def upper_body(self, maps: torch.Tensor) -> torch.Tensor:
        """The trainable rest of the trunk, from ``lower``'s feature maps to pooled features."""
        trunk = self._stages()
        x = trunk.bn2(trunk.conv_head(trunk.blocks[self.cfg.frozen_stages:](maps)))
        return trunk.forward_head(x, pre_logits=True)

    def lower_parameters(self) -> list[nn.Parameter]:
        if not self.cfg.frozen_stages:
            return []
        trunk = self._stages()
        return [p for m in (trunk.conv_stem, trunk.bn1, trunk.blocks[:self.cfg.frozen_stages]) for p in m.parameters()]

    def train(self, mode: bool = True) -> "ImageTower":
        """The frozen stages stay in inference mode (their batch-norm statistics are the base weights')."""
        super().train(mode)
        if self.cfg.frozen_stages:
            trunk = self._stages()
            for m in (trunk.conv_stem, trunk.bn1, trunk.blocks[:self.cfg.frozen_stages]):
                m.eval()
        return self

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """The part that adapts cheaply (stage 1 may train only this, on cached ``body`` features)."""
        if hasattr(self.visual, "trunk"):
            features = self.visual.head(features)
        return self.proj(features)

    def head_parameters(self) -> list[nn.Parameter]:
        own = list(self.visual.head.parameters()) if hasattr(self.visual, "trunk") else []
        return own + list(self.proj.parameters())

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(pixels))


def _cnn_backbone(cfg: ImageTowerConfig, dim: int) -> tuple[nn.Module, nn.Module, ImageTowerConfig]:
    """The compact residual CNN (or an ensemble of ``cnn_members``), from random weights, its head to D."""
    if cfg.source:
        raise ConfigError("A compact CNN tower starts from random weights; its source must be null.")
    widths, members = tuple(cfg.vision_cfg["cnn_widths"]), cfg.vision_cfg.get("cnn_members", 1)
    if not isinstance(members, int) or members < 1:
        raise ConfigError(f"cnn_members must be a whole number of at least 1, not {members!r}.")
    visual = ResidualCnn(widths, dim) if members == 1 else CnnEnsemble(widths, dim, members)
    return visual, nn.Identity(), cfg


def _published_backbone(cfg: ImageTowerConfig, dim: int) -> tuple[nn.Module, nn.Module, ImageTowerConfig]:
    """The visual half of a published open_clip checkpoint and a projection to D; the checkpoint's own
    preprocessing (size, mean, std) replaces the config's, in a copy."""
    import open_clip

    clip = open_clip.create_model(cfg.source)
    preprocess = open_clip.get_model_preprocess_cfg(clip)
    size = preprocess.get("size", cfg.image_size)
    runs_with = dataclasses.replace(cfg, image_size=size if isinstance(size, int) else size[0],
                                    mean=tuple(preprocess.get("mean", cfg.mean)),
                                    std=tuple(preprocess.get("std", cfg.std)))
    out_dim = open_clip.get_model_config(cfg.source)["embed_dim"]
    return clip.visual, nn.Linear(out_dim, dim, bias=False), runs_with


def _open_clip_backbone(cfg: ImageTowerConfig, dim: int) -> tuple[nn.Module, nn.Module, ImageTowerConfig]:
    """An open_clip vision tower built from ``vision_cfg`` (its own head projects to D), its trunk loaded from
    the weights a package ships when ``source`` names one."""
    if cfg.vision_cfg == VISION_CFG:  # the default towers' network, without importing open_clip and timm
        visual = EfficientNetLite0Tower(dim)
    else:
        from open_clip.model import CLIPVisionCfg, _build_vision_tower

        visual = _build_vision_tower(dim, CLIPVisionCfg(image_size=cfg.image_size, **cfg.vision_cfg))
    if package_name(cfg.source):
        visual.trunk.load_state_dict(package_trunk_state(cfg.source, visual.trunk))
    return visual, nn.Identity(), cfg


# ImageTowerConfig.architecture -> (visual module, projection to D, the config the tower runs with)
IMAGE_BACKBONES: dict[str, Callable[[ImageTowerConfig, int], tuple[nn.Module, nn.Module, ImageTowerConfig]]] = {
    "cnn": _cnn_backbone, "published": _published_backbone, "open_clip": _open_clip_backbone}


class _ResidualBlock(nn.Module):
    """Two convolutions and a projected skip, 1-D (ECG) or 2-D (images)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, dims: int = 1):
        super().__init__()
        conv, norm = (nn.Conv1d, nn.BatchNorm1d) if dims == 1 else (nn.Conv2d, nn.BatchNorm2d)
        self.conv1 = conv(c_in, c_out, kernel, stride, kernel // 2, bias=False)
        self.bn1 = norm(c_out)
        self.conv2 = conv(c_out, c_out, kernel, 1, kernel // 2, bias=False)
        self.bn2 = norm(c_out)
        self.skip = nn.Sequential(conv(c_in, c_out, 1, stride, bias=False), norm(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.bn1(self.conv1(x)))
        return F.gelu(self.bn2(self.conv2(y)) + self.skip(x))


class _MeanMaxPool(nn.Module):
    """Mean and max over every position, side by side: a finding may be diffuse or focal."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2)
        return torch.cat([x.mean(-1), x.amax(-1)], dim=1)


class ResidualCnn(nn.Module):
    """A small 2-D ResNet (3x3 stem, then one residual block per width, each halving the resolution).

    Laid out like open_clip's timm towers (``trunk`` to pooled features, ``head`` to D), so the tower's
    ``body``/``head`` split and stage 1's head-only training apply unchanged.
    """

    def __init__(self, widths: tuple[int, ...], out_dim: int):
        super().__init__()
        stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.GELU())
        blocks = [_ResidualBlock(a, b, 3, 2, dims=2) for a, b in zip(widths, widths[1:])]
        self.trunk = nn.Sequential(stem, *blocks, _MeanMaxPool())
        self.head = nn.Linear(2 * widths[-1], out_dim)


class _Members(nn.Module):
    """One part per ensemble member; ``selected`` routes everything through one member only."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.selected: int | None = None


class _MemberTrunks(_Members):
    """The members' trunks side by side (features concatenated), or only the selected one's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.selected is not None:
            return self.parts[self.selected](x)
        return torch.cat([trunk(x) for trunk in self.parts], dim=1)


class _MemberHeads(_Members):
    """The mean of the members' unit outputs, each head reading its own trunk's slice of the features."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.selected is not None:
            return self.parts[self.selected](features)
        chunks = features.chunk(len(self.parts), dim=1)
        return torch.stack([F.normalize(head(c), dim=-1) for head, c in zip(self.parts, chunks)]).mean(0)


class CnnEnsemble(nn.Module):
    """Several compact CNNs behind one tower: the mean of their unit outputs.

    A few hundred small images leave a lot to the seed; members trained one after another into the same
    text space (``select`` one, train it) average out much of it. With none selected the tower is the mean,
    and ``trunk``/``head`` keep the body/head split (stage 1 trains all heads on all members' features).
    """

    def __init__(self, widths: tuple[int, ...], out_dim: int, members: int):
        super().__init__()
        nets = [ResidualCnn(widths, out_dim) for _ in range(members)]
        self.trunk = _MemberTrunks([net.trunk for net in nets])
        self.head = _MemberHeads([net.head for net in nets])

    @property
    def members(self) -> int:
        return len(self.head.parts)

    def select(self, member: int | None) -> None:
        """Route inputs through one member only (to train it), or through all (None)."""
        self.trunk.selected = self.head.selected = member


class EcgTower(nn.Module):
    """A 1-D ResNet over (12 leads + 12 lead-present flags) x 1000 samples.

    The flags let the network tell a missing lead (masked, all zero) from a flat one.
    """

    def __init__(self, cfg: EcgTowerConfig, dim: int):
        super().__init__()
        self.cfg = cfg
        widths = (24,) + tuple(cfg.widths)
        self.blocks = nn.Sequential(*[_ResidualBlock(a, b, cfg.kernel_size, 2) for a, b in zip(widths, widths[1:])])
        self.pool = _MeanMaxPool()
        self.proj = nn.Linear(widths[-1] * 2, dim)

    def base_keys(self) -> set[str]:
        return set()

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def prepare(self, sample: Sample) -> torch.Tensor:
        """The tower's input for an ECG sample: its leads (missing ones zeroed) and their present flags."""
        x = torch.from_numpy(np.ascontiguousarray(sample.data, dtype=np.float32))
        mask = torch.tensor(sample.meta.get("lead_mask", [True] * len(x)), dtype=torch.float32)[:, None].expand_as(x)
        return torch.cat([x * mask, mask])

    def body(self, signals: torch.Tensor) -> torch.Tensor:
        return self.pool(self.blocks(signals))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features)

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.proj.parameters())

    def forward(self, signals: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(signals))


class TextTower(nn.Module):
    """A BERT encoder (``m3bind.bert``), mean or [CLS] pooling, and a projection to D."""

    def __init__(self, cfg: TextTowerConfig, dim: int):
        super().__init__()
        self.cfg = cfg
        self.source = resolve_text_source(cfg.source)
        self.model = BertEncoder(BertSpec.from_dir(self.source))
        self.model.load_state_dict(checkpoint_state(self.source, self.model))
        self.model.eval()  # as loaded by transformers: dropout is off until training asks for it
        self.tokenizer = load_tokenizer(self.source, cfg.max_length)
        self.proj = nn.Linear(self.model.spec.hidden_size, dim, bias=False)

    def base_keys(self) -> set[str]:
        return {f"model.{k}" for k in self.model.state_dict()}

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"model.{k}": v for k, v in checkpoint_state(self.source, self.model).items()}

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return tokenize(self.tokenizer, texts)

    def pool(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """The encoder's sentence vector before the projection (what training caches while the body is frozen)."""
        hidden = self.model(**tokens)
        if self.cfg.pooling == "cls":
            return hidden[:, 0]
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def forward(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.proj(self.pool(tokens))


# Which tower each tower config class builds. A new tower type (e.g. a published teacher's) registers its config
# class here with ``register_tower`` (and in ``m3bind.config.TOWER_CONFIGS`` so saved configs parse back).
TOWER_BUILDERS: dict[type, Callable[[Any, int], nn.Module]] = {ImageTowerConfig: ImageTower, EcgTowerConfig: EcgTower}


def register_tower(config_class: type, builder: Callable[[Any, int], nn.Module]) -> None:
    """Let ``build_tower`` build ``builder(cfg, dim)`` for configs of ``config_class`` (or a subclass)."""
    TOWER_BUILDERS[config_class] = builder


def build_tower(cfg: Any, dim: int) -> nn.Module:
    """The tower a tower config describes, projecting to ``dim``; ``cfg`` is left as it was."""
    for cls in type(cfg).__mro__:
        if cls in TOWER_BUILDERS:
            return TOWER_BUILDERS[cls](cfg, dim)
    raise ConfigError(f"No tower is registered for {type(cfg).__name__}; known: "
                      f"{', '.join(c.__name__ for c in TOWER_BUILDERS)}.")

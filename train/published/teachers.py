"""Published CLIP checkpoints as M3Bind teachers, each with both towers, its tokenizer and its preprocessing.

A teacher is an ``M3BindModel`` whose one image tower is the checkpoint's image tower in its exported form
(``ImageTower`` for open_clip sources, ``m3bind.published.HFClipImageTower`` for a ``CLIPModel``) and whose
text tower is the checkpoint's own text tower behind M3Bind's text interface (``PublishedText``). Both end in
the same per-teacher projection into the shared width D (the tower's ``proj``): a linear isometry while
stage 1 trains (``orthogonal`` parametrisation), so each teacher's cosine geometry is untouched by it and
the text alignment loss can only fall by the teachers' text spaces agreeing, never by the projections
collapsing. Stage 2 and ``bind`` (``train.stages``) then work on these models unchanged.

An M3Bind model directory is a teacher too (type ``m3bind``): the slot for an ECG CLIP (an ECG tower and any
Hugging Face text model) and for the teachers ``train.pipeline`` trains. It keeps its own tower, text tower and
width, which must then be the shared width D (alignment in the width the teachers share).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from m3bind import M3BindModel, ModelConfig, TextTowerConfig, load_model
from m3bind.config import ImageTowerConfig
from m3bind.encoders import build_tower
from m3bind.published import HFClipTowerConfig
from m3bind.weights import resolve_model_dir

TEACHER_TYPES = ("open_clip", "hf_clip", "m3bind")


@dataclass
class TeacherPlan:
    """One published teacher in a config: where it comes from and what it trains on."""

    type: str  # one of TEACHER_TYPES
    # open_clip: "hf-hub:org/repo" or "local-dir:/path"; hf_clip: hub id or folder; m3bind: an M3Bind model
    # directory or hub repo (e.g. an ECG CLIP: ECG tower + any HF text model, or a teacher of train.pipeline)
    source: str
    datasets: list[str]
    max_items: int | None = None
    context_length: int | None = None  # hf_clip: token limit (open_clip configs carry their own)

    def __post_init__(self) -> None:
        if self.type not in TEACHER_TYPES:
            raise ValueError(f"Unknown teacher type {self.type!r}; known: {', '.join(TEACHER_TYPES)}.")
        self.source = os.path.expandvars(self.source)  # configs may name folders through the environment


class PublishedText(nn.Module):
    """A teacher's own text tower: its tokenizer, its encoder (``model``, where LoRA goes) and the projection
    into D that it shares with the teacher's image tower."""

    def __init__(self, model: nn.Module, encode: Callable[[dict[str, torch.Tensor]], torch.Tensor],
                 tokenize: Callable[[list[str]], dict[str, torch.Tensor]], proj: nn.Linear):
        super().__init__()
        self.model, self.proj = model, proj
        self._encode, self._tokenize = encode, tokenize

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self._tokenize(list(texts))

    def forward(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.proj(self._encode(tokens))


def _open_clip_text(source: str, proj: nn.Linear) -> tuple[PublishedText, float]:
    import open_clip

    clip = open_clip.create_model(source)
    clip.visual = None  # the image tower is built on its own (``ImageTower``); only the text half is kept
    tokenizer = open_clip.get_tokenizer(source)
    text = PublishedText(clip, lambda tokens: clip.encode_text(tokens["input_ids"]),
                         lambda texts: {"input_ids": tokenizer(texts)}, proj)
    return text, float(clip.logit_scale.detach().exp())


def _hf_clip_text(source: str, proj: nn.Linear, context_length: int | None) -> tuple[PublishedText, float]:
    from transformers import AutoTokenizer, CLIPModel

    clip = CLIPModel.from_pretrained(source)
    del clip.vision_model, clip.visual_projection
    tokenizer = AutoTokenizer.from_pretrained(source)
    limit = context_length or clip.config.text_config.max_position_embeddings
    encode = lambda tokens: clip.text_projection(clip.text_model(**tokens).pooler_output)  # noqa: E731
    tokenize = lambda texts: dict(tokenizer(texts, padding=True, truncation=True, max_length=limit,  # noqa: E731
                                            return_tensors="pt"))
    return PublishedText(clip, encode, tokenize, proj), float(clip.logit_scale.detach().exp())


def _m3bind_teacher(modality: str, plan: TeacherPlan, dim: int | None) -> M3BindModel:
    """An M3Bind model's tower for ``modality`` and its text tower: it aligns in its own width, which must be D."""
    model = load_model(plan.source, device="cpu")
    if modality not in model.modalities:
        raise ValueError(f"{plan.source} has no {modality} tower; it encodes {', '.join(model.modalities)}.")
    if dim is not None and model.dim != dim:
        raise ValueError(f"{plan.source} embeds in {model.dim} dimensions but the shared width is {dim}: an M3Bind "
                         f"teacher keeps its own width (set dim: {model.dim}).")
    name = model.config.modality_towers[modality]
    config = ModelConfig(name=f"teacher-{modality}", dim=model.dim, text=copy.deepcopy(model.config.text),
                         towers={modality: copy.deepcopy(model.config.towers[name])},
                         modality_towers={modality: modality}, logit_scale=model.config.logit_scale)
    return M3BindModel(config, text=model.text, towers={modality: model.towers[name]})


def load_teacher(modality: str, plan: TeacherPlan, dim: int | None, seed: int = 0) -> M3BindModel:
    """The published checkpoint as an M3Bind teacher; ``dim`` None keeps the checkpoint's own width."""
    torch.manual_seed(seed)
    if plan.type == "m3bind":
        return _m3bind_teacher(modality, plan, dim)
    cfg = (ImageTowerConfig(source=plan.source, vision_cfg={}) if plan.type == "open_clip"
           else HFClipTowerConfig(source=plan.source))
    width = _embed_width(plan)
    tower = build_tower(cfg, dim or width)
    nn.init.orthogonal_(tower.proj.weight)
    if plan.type == "open_clip":
        text, logit_scale = _open_clip_text(plan.source, tower.proj)
    else:
        text, logit_scale = _hf_clip_text(plan.source, tower.proj, plan.context_length)
    config = ModelConfig(name=f"teacher-{modality}", dim=dim or width, text=TextTowerConfig(source=plan.source),
                         towers={modality: copy.deepcopy(tower.cfg)}, modality_towers={modality: modality},
                         logit_scale=logit_scale)
    return M3BindModel(config, text=text, towers={modality: tower})


def _embed_width(plan: TeacherPlan) -> int:
    """The checkpoint's joint embedding width (what its projections output)."""
    if plan.type == "m3bind":
        return ModelConfig.load(resolve_model_dir(plan.source) / "config.json").dim
    if plan.type == "open_clip":
        import open_clip

        return int(open_clip.get_model_config(plan.source)["embed_dim"])
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(plan.source).projection_dim)


def embed_widths(plans: dict[str, TeacherPlan]) -> dict[str, int]:
    return {m: _embed_width(p) for m, p in plans.items()}

"""Bind published CLIP models: teachers from checkpoints -> stage 1 (LoRA + text alignment) -> stage 2 -> export.

    python -m train.published --config train/configs/published.yaml
    torchrun --standalone --nproc_per_node 8 -m train.published --config train/configs/published.yaml   # DDP

Each teacher is a published CLIP-like checkpoint named in the config (open_clip ``hf-hub:``/``local-dir:``
models such as BiomedCLIP or QuiltNet, Hugging Face ``CLIPModel``s such as PLIP), with its own tokenizer,
context length and image preprocessing. Stage 1 adapts both towers of every teacher with LoRA
(``train.published.align``); stage 2 distils every aligned teacher's text tower into one student (any
Hugging Face text model; ``train.stages.distill``); the export is one M3Bind model directory holding each
teacher's adapted image tower (LoRA merged; the config references the checkpoint, the weights file holds
what changed) and the student, which ``m3bind.load_model`` and the app load unchanged. Hub checkpoints come
from the Hugging Face cache, so ``HF_HUB_OFFLINE=1`` works wherever the cache is warm.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from m3bind import M3BindModel, TextTowerConfig

from .. import distributed
from ..captions import modality_texts, shared_text_corpus
from ..stages import StageConfig, bind, distill, item_embeddings, load_modality_data, text_only_model
from .align import AlignConfig, align
from .teachers import TeacherPlan, embed_widths, load_teacher

REPO = Path(__file__).resolve().parents[2]


@dataclass
class PublishedConfig:
    name: str
    export_dir: Path
    teachers: dict[str, TeacherPlan]
    student: TextTowerConfig
    dim: int | None = None  # the shared width D; None: the widest teacher's embedding width
    seed: int = 0
    data_root: str | None = None
    shared_texts: int = 4000
    distill_texts: int | None = None
    align: AlignConfig = field(default_factory=AlignConfig)
    distill: StageConfig = field(default_factory=StageConfig)
    export_dtype: str | None = None  # e.g. "float16" (merged weights rounded to it before saving)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "PublishedConfig":
        raw = {**yaml.safe_load(Path(path).read_text()), **{k: v for k, v in overrides.items() if v is not None}}
        teachers = {m: TeacherPlan(**plan) for m, plan in raw.pop("teachers").items()}
        return cls(export_dir=REPO / Path(raw.pop("export_dir")).expanduser(), teachers=teachers,
                   student=TextTowerConfig(**raw.pop("student")), align=AlignConfig(**raw.pop("align", {})),
                   distill=StageConfig(**raw.pop("distill", {})), **raw)


def distill_texts(data, modality: str, cfg: PublishedConfig, rng: np.random.Generator) -> list[str]:
    """A modality's stage 2 texts: its captions and its real in-domain text, capped at ``distill_texts``."""
    pool = sorted({t for caps in data.captions for t in caps} | set(modality_texts(modality, cfg.data_root)))
    if cfg.distill_texts and len(pool) > cfg.distill_texts:
        pool = [pool[i] for i in sorted(rng.choice(len(pool), cfg.distill_texts, replace=False))]
    return pool


def run(cfg: PublishedConfig, device: str | torch.device | None = None) -> M3BindModel:
    """Train every stage and write the bound model to ``cfg.export_dir``; returns it. Under ``torchrun`` every
    process trains (each its share of every batch; batch sizes are per process) and the first one exports."""
    device = torch.device(device) if device else distributed.device()
    timings: dict[str, float] = {}
    t0 = time.time()
    dim = cfg.dim or max(embed_widths(cfg.teachers).values())
    teachers = {m: load_teacher(m, plan, dim, cfg.seed + i).to(device)
                for i, (m, plan) in enumerate(cfg.teachers.items())}
    data = {m: load_modality_data(teachers[m], m, plan.datasets, "train", cfg.data_root, plan.max_items, cfg.seed)
            for m, plan in cfg.teachers.items()}
    shared = shared_text_corpus(cfg.data_root, max_per_source=max(1, cfg.shared_texts // 5), seed=cfg.seed)
    timings["load"] = time.time() - t0
    t0 = time.time()
    align(teachers, data, shared, cfg.align, cfg.seed)
    distributed.check_in_sync(teachers, "stage 1 teachers")
    timings["stage 1"] = time.time() - t0
    t0 = time.time()
    rng = np.random.default_rng(cfg.seed)
    texts = {m: distill_texts(data[m], m, cfg, rng) for m in teachers}
    student = text_only_model(cfg.student, dim, f"{cfg.name}-student", cfg.seed).to(device)
    images = ({m: item_embeddings(teachers[m], data[m]) for m in teachers}
              if cfg.distill.relational_weight else None)
    distill(student, teachers, texts, cfg.distill, cfg.seed, None, images)
    timings["stage 2"] = time.time() - t0
    distributed.check_in_sync({"student": student}, "stage 2 student")
    bound = bind(teachers, student, cfg.name)
    if cfg.export_dtype:
        bound.round_weights(getattr(torch, cfg.export_dtype))
    if distributed.is_main():
        bound.save_pretrained(cfg.export_dir, card=model_card(cfg, dim, timings),
                              dtype=getattr(torch, cfg.export_dtype) if cfg.export_dtype else None)
        (cfg.export_dir / "training.json").write_text(json.dumps({k: round(v, 1) for k, v in timings.items()}) + "\n")
    distributed.barrier()
    return bound


def model_card(cfg: PublishedConfig, dim: int, timings: dict[str, float]) -> str:
    rows = "\n".join(f"| {m} | `{p.source}` ({p.type}) | {', '.join(p.datasets)} |" for m, p in cfg.teachers.items())
    took = ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
    a = cfg.align
    return f"""# {cfg.name}

An M3Bind model bound from published CLIP models by `python -m train.published`: each modality keeps its
teacher's image tower (LoRA merged into it) and one student text encoder (`{cfg.student.source}`) serves every
modality in a shared {dim}-d space. **Not a clinical device.**

| modality | teacher checkpoint | training data (train split) |
|---|---|---|
{rows}

## How it was bound
- Stage 1 ({a.steps} steps, batch {a.batch_size} per teacher): LoRA (r={a.lora_rank}, alpha={a.lora_alpha:g},
  dropout {a.lora_dropout}) on the query/value projections of both towers of every teacher; each teacher keeps its
  own contrastive loss on its pairs, and {a.shared_batch} shared texts per step, tokenized by each teacher's own
  tokenizer, add the pairwise MSE of the teachers' unit text embeddings (weight {a.align_weight}) after a
  per-teacher isometry into {dim} dimensions (trained with the adapters).
- Stage 2 ({cfg.distill.steps} steps): the student reproduces every aligned teacher's text embeddings on that
  modality's captions and real in-domain text.
- Training time on this run's machine: {took}.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "train" / "configs" / "published.yaml"))
    parser.add_argument("--export-dir")
    parser.add_argument("--data-root")
    parser.add_argument("--device")
    args = parser.parse_args(argv)
    cfg = PublishedConfig.from_yaml(args.config, data_root=args.data_root)
    if args.export_dir:
        cfg.export_dir = Path(args.export_dir)
    distributed.setup()
    try:
        run(cfg, args.device)
        if distributed.is_main():
            print(f"model written to {cfg.export_dir}")
    finally:
        distributed.cleanup()

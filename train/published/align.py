"""Stage 1 as the paper does it, for published teachers.

Every teacher gets LoRA (peft; r=8, alpha=8, dropout 0.1 by default) on the query/value projections of both
of its towers (``lora.add_qv_lora``) and keeps its own contrastive loss on its own (image, caption) pairs; one
batch of shared texts goes to every teacher through its own tokenizer, and the pairwise MSE between the
teachers' unit text embeddings of it, in the shared width D, is added with ``align_weight``. Each teacher's
projection into D is an isometry while it trains (see ``train.published.teachers``), so alignment across
different embedding widths cannot cheat by shrinking or folding a projection.

The step is written for a GPU at the paper's scale: bf16 autocast, fused AdamW, the attention kernels the
towers ship (PyTorch SDPA in timm, open_clip and transformers), optional ``torch.compile`` and gradient
checkpointing. ``AlignStep.__call__`` reads no device value (inputs, soft targets and token ids are prepared on
the host and copied without blocking; losses come back as device tensors), so the host prepares the next batch
while the device computes; on CUDA ``bench/bench_train_step.py`` counts any synchronisation that the towers'
libraries still make inside the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, parametrize
from tqdm.auto import tqdm

from m3bind import M3BindModel

from .. import distributed
from ..losses import gather_across_ranks, match_matrix, pairwise_alignment
from ..stages import Batch, ModalityData, _schedule, augment, fit_centres
from .lora import adaptable, add_qv_lora, merge_qv_lora


@dataclass
class AlignConfig:
    steps: int = 3000  # the authors' defaults: 3,000 iterations, batch 48, lr 2e-5
    batch_size: int = 48
    shared_batch: int = 48
    lr: float = 2e-5  # LoRA adapters
    proj_lr: float = 1e-3  # the per-teacher isometries into D
    weight_decay: float = 1e-4
    align_weight: float = 1.0
    lora_rank: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.1
    bf16: bool = True  # autocast in bfloat16 where the device is a GPU
    compile: bool = False  # torch.compile the loss (pays off for long runs on a GPU)
    checkpointing: bool = False  # gradient checkpointing in both towers (memory for batch size)
    log_every: int = 100  # host reads of the losses (each one waits for the device)


def _adapted_roots(model: M3BindModel, modality: str) -> list[nn.Module]:
    """What gets q/v LoRA: the text body, and the image tower's visual part where it has attention (an ECG or
    CNN tower of an M3Bind teacher has none; its output head trains instead)."""
    visual = getattr(model.tower_for(modality), "visual", None)
    return [model.text.model] + ([visual] if visual is not None and adaptable(visual) else [])


def _isometry(model: M3BindModel, modality: str) -> nn.Linear | None:
    """A published teacher's projection into D, which its two towers share; None for an M3Bind teacher, whose
    own width is D (see ``train.published.teachers``)."""
    proj = model.tower_for(modality).proj
    return proj if proj is model.text.proj else None


def enable_checkpointing(module: nn.Module) -> None:
    """Gradient checkpointing through whichever switch the tower's library offers (a teacher's text root is an
    open_clip model without its image half, whose own switch fails: its parts are switched instead)."""
    for switch in ("set_grad_checkpointing", "gradient_checkpointing_enable"):
        if hasattr(module, switch):
            try:
                getattr(module, switch)()
                return
            except AttributeError:
                break
    for child in module.children():
        enable_checkpointing(child)


def prepare_teacher(model: M3BindModel, modality: str, cfg: AlignConfig) -> list[dict]:
    """LoRA on both towers, the projection made a trainable isometry (or, for an M3Bind teacher, its text
    projection and a tower without attention's head trainable); the optimiser's parameter groups."""
    for p in model.parameters():
        p.requires_grad_(False)
    roots = _adapted_roots(model, modality)
    lora = [p for root in roots for p in add_qv_lora(root, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)]
    proj = _isometry(model, modality)
    if proj is not None:
        parametrizations.orthogonal(proj)
        heads = list(proj.parameters())
    else:
        tower_head = model.tower_for(modality).head_parameters() if len(roots) == 1 else []
        heads = list(model.text.proj.parameters()) + tower_head
        for p in heads:
            p.requires_grad_(True)
    if cfg.checkpointing:
        for root in roots:
            enable_checkpointing(root)
    return [{"params": lora, "lr": cfg.lr}, {"params": heads, "lr": cfg.proj_lr}]


def finish_teacher(model: M3BindModel, modality: str) -> None:
    """Adapters merged into the base weights and the projection a plain linear again: the published layout
    plus what changed, which is what ``M3BindModel.save_pretrained`` stores."""
    for root in _adapted_roots(model, modality):
        merge_qv_lora(root)
    if _isometry(model, modality) is not None:
        parametrize.remove_parametrizations(model.tower_for(modality).proj, "weight", leave_parametrized=True)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()


def soft_contrastive(image: torch.Tensor, text: torch.Tensor, matches: torch.Tensor, scale: float) -> torch.Tensor:
    """Symmetric cross-entropy of unit embeddings against 0/1 ``matches`` (caption j true of item i), spread
    evenly over every true caption (row) and every item a caption is true of (column)."""
    logits = scale * image @ text.T
    return 0.5 * (F.cross_entropy(logits, matches / matches.sum(1, keepdim=True))
                  + F.cross_entropy(logits.T, matches.T / matches.T.sum(1, keepdim=True)))


@dataclass
class TeacherBatch:
    """One teacher's share of a step, already on the device."""

    pixels: torch.Tensor  # this rank's share of the batch
    tokens: dict[str, torch.Tensor]
    matches: torch.Tensor  # (B, B) 0/1, over the whole batch (every rank's share)
    shared: dict[str, torch.Tensor] | None  # the shared texts, in this teacher's tokens (None: no alignment)


class _TeachersLoss(nn.Module):
    """Every teacher's forward behind one module: DDP allows one forward of what it wraps per backward. Under
    torchrun the contrastive losses see every rank's pairs (gathered; ``matches`` spans the whole batch), and the
    MSE of this rank's share of the shared texts, averaged by DDP, is the MSE of all of them."""

    def __init__(self, teachers: dict[str, M3BindModel]):
        super().__init__()
        self.teachers = nn.ModuleDict(teachers)
        self.scales = {m: t.config.logit_scale for m, t in teachers.items()}

    def forward(self, batches: dict[str, TeacherBatch]) -> tuple[torch.Tensor, torch.Tensor]:
        own, shared = [], []
        for m, b in batches.items():
            model = self.teachers[m]
            image = gather_across_ranks(F.normalize(model.tower_for(m)(b.pixels).float(), dim=-1))
            text = gather_across_ranks(F.normalize(model.text(b.tokens).float(), dim=-1))
            own.append(soft_contrastive(image, text, b.matches, self.scales[m]))
            if b.shared is not None:
                shared.append(F.normalize(model.text(b.shared).float(), dim=-1))
        own = torch.stack(own).sum()
        return own, pairwise_alignment(shared) if shared else torch.zeros_like(own)


class AlignStep:
    """One optimisation step over every teacher: own contrastive losses + weighted pairwise text MSE."""

    def __init__(self, teachers: dict[str, M3BindModel], cfg: AlignConfig, device: torch.device):
        self.teachers, self.cfg, self.device = teachers, cfg, device
        groups = [g for m, t in teachers.items() for g in prepare_teacher(t, m, cfg)]
        cuda = device.type == "cuda"
        self.optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, fused=cuda)
        self.scheduler = _schedule(self.optimizer, max(1, cfg.steps))  # warm-up, then cosine: as every stage
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16 and cuda)
        self._loss = distributed.wrap(_TeachersLoss(teachers))
        self.loss = torch.compile(self._loss) if cfg.compile else self._loss

    def __call__(self, batches: dict[str, TeacherBatch]) -> tuple[torch.Tensor, torch.Tensor]:
        """Train one step; the (own, alignment) losses come back as device tensors (reading them waits)."""
        with self.autocast:
            own, aligned = self.loss(batches)
        self.optimizer.zero_grad(set_to_none=True)
        (own + self.cfg.align_weight * aligned).backward()
        self.optimizer.step()
        self.scheduler.step()
        return own.detach(), aligned.detach()


def to_device(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Host tensors on the device without waiting for it (pinned first on CUDA, so the copy is asynchronous)."""
    pin = device.type == "cuda"
    return {k: (v.pin_memory() if pin else v).to(device, non_blocking=True) for k, v in tensors.items()}


def host_batch(model: M3BindModel, data: ModalityData, batch: Batch, shared: Sequence[str],
               generator: torch.Generator, device: torch.device) -> TeacherBatch:
    """Everything one teacher's step needs, prepared on the host (augmentation, tokens, soft targets); ``pixels``
    are an ECG tower's signals for an ECG teacher."""
    mine = distributed.shard(np.arange(len(batch.rows)))  # every rank drew the same batch: this rank's share
    inputs = data.inputs[torch.from_numpy(batch.rows[mine])].float()
    pixels = augment(inputs, "ecg" if inputs.dim() == 3 else "image", generator)
    inputs = to_device({"pixels": pixels, "matches": match_matrix(batch.keys, batch.text_keys, None)}, device)
    texts = [batch.texts[i] for i in mine]
    shared = [shared[i] for i in distributed.shard(np.arange(len(shared)))]
    return TeacherBatch(inputs["pixels"], to_device(model.text.tokenize(texts), device), inputs["matches"],
                        to_device(model.text.tokenize(shared), device))


def align(teachers: dict[str, M3BindModel], data: dict[str, ModalityData], shared_texts: Sequence[str],
          cfg: AlignConfig, seed: int = 0) -> dict[str, M3BindModel]:
    """Stage 1 on published teachers (in place); each teacher ends merged and with its centre fitted."""
    device = next(iter(teachers.values())).device
    for model in teachers.values():
        model.train()
    step = AlignStep(teachers, cfg, device)
    rng = np.random.default_rng(seed)  # the same draws in every process (each takes its share)
    generator = torch.Generator().manual_seed(distributed.rank_seed(seed))
    world = distributed.world_size()
    streams = {m: d.batches(min(cfg.batch_size * world, len(d)), rng) for m, d in data.items()}
    progress = tqdm(range(cfg.steps), desc="stage 1 align (published teachers)", disable=not distributed.is_main())
    for i in progress:
        size = min(cfg.shared_batch * world, len(shared_texts))
        shared = [shared_texts[j] for j in rng.choice(len(shared_texts), size, replace=False)]
        batches = {m: host_batch(teachers[m], data[m], next(streams[m]), shared, generator, device) for m in teachers}
        own, aligned = step(batches)
        if (i + 1) % cfg.log_every == 0 or i + 1 == cfg.steps:
            progress.set_postfix(contrastive=float(own) / len(teachers), align=float(aligned))
    for m, model in teachers.items():
        distributed.sync_buffers(model)  # rank 0's BatchNorm statistics (an ECG or CNN tower) everywhere
        finish_teacher(model, m)
        fit_centres(model, {m: data[m]}, seed=seed)
    return teachers

"""The three objectives of M3Bind training.

* ``class_aware_contrastive``: each modality's own image-text loss. Plain InfoNCE would treat another
  caption of the same class in the batch as a negative; the targets here spread each row's probability
  over every pair that shares the class key.
* ``pairwise_alignment``: stage 1, the sum of pairwise MSEs between the modality text encoders'
  embeddings of one shared text batch (zero when the encoders agree).
* ``distillation``: stage 2, the student text encoder reproduces a teacher's text embeddings (cosine).
"""

from __future__ import annotations

from itertools import combinations
from typing import Hashable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F


def gather_across_ranks(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows (with gradients for the local ones), so batch negatives span every GPU."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def gather_keys(keys: Sequence[Hashable]) -> list[Hashable]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(keys)
    gathered: list[list[Hashable]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, list(keys))
    return [k for part in gathered for k in part]


def same_class_targets(keys: Sequence[Hashable], device: torch.device | None = None) -> torch.Tensor:
    """Row-normalised (N, N) matrix: 1 where two items share the class key."""
    ids = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    codes = torch.tensor([ids[k] for k in keys], device=device)
    same = (codes[:, None] == codes[None, :]).float()
    return same / same.sum(1, keepdim=True)


def class_aware_contrastive(image: torch.Tensor, text: torch.Tensor, keys: Sequence[Hashable],
                            logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric cross-entropy with soft same-class targets over unit-norm (B, D) embeddings."""
    image, text, keys = gather_across_ranks(image), gather_across_ranks(text), gather_keys(keys)
    logits = logit_scale * image @ text.T
    targets = same_class_targets(keys, image.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def pairwise_alignment(text_embeddings: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over pairs of modality text encoders of the MSE between their embeddings of the same texts."""
    pairs = list(combinations(text_embeddings, 2))
    if not pairs:
        return text_embeddings[0].new_zeros(())
    return sum(F.mse_loss(a, b, reduction="sum") / a.shape[0] for a, b in pairs)


def distillation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean (1 - cosine) between student and teacher embeddings of the same texts."""
    return (1 - F.cosine_similarity(student, teacher.detach(), dim=-1)).mean()

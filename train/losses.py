"""The three objectives of M3Bind training.

* ``class_aware_contrastive``: each modality's own image-text loss. Plain InfoNCE would treat another
  caption of the same class in the batch as a negative; the targets here spread each row's probability
  over every pair that shares the class key (or the item's tag, for captions such as "Abnormal study.").
* ``pairwise_alignment``: stage 1, the sum of pairwise MSEs between the modality text encoders'
  embeddings of one shared text batch (zero when the encoders agree).
* ``distillation``: stage 2, the student text encoder reproduces a teacher's text embeddings (cosine).
* ``relational_distillation``: stage 2, the student also reproduces how the teacher's images choose among
  texts, which is what zero-shot classification reads (small cosine errors matter where prompts are close).
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
    matches = match_matrix(keys, keys, None, device)
    return matches / matches.sum(1, keepdim=True)


def match_matrix(keys: Sequence[Hashable], text_keys: Sequence[Hashable], tags: Sequence[Hashable] | None,
                 device: torch.device | None = None) -> torch.Tensor:
    """(N, N) 0/1: caption j is true of item i, because its key is the item's class key or the item's tag."""
    ids = {k: i for i, k in enumerate(dict.fromkeys([*keys, *text_keys, *(tags or ())]))}
    code = lambda values: torch.tensor([ids[v] for v in values], device=device)  # noqa: E731
    captions = code(text_keys)[None, :]
    matches = code(keys)[:, None] == captions
    if tags is not None:
        matches |= code(tags)[:, None] == captions
    return matches.float()


def class_aware_contrastive(image: torch.Tensor, text: torch.Tensor, keys: Sequence[Hashable],
                            logit_scale: torch.Tensor | float, text_keys: Sequence[Hashable] | None = None,
                            tags: Sequence[Hashable] | None = None) -> torch.Tensor:
    """Symmetric cross-entropy with soft targets over unit-norm (B, D) embeddings: row i's probability is
    spread over every caption true of item i (its class's captions, and captions keyed by its ``tags``,
    e.g. a caption that says only "abnormal"), column j's over every item caption j is true of.

    ``text_keys`` defaults to ``keys`` (each caption keyed by its own item's class)."""
    image, text = gather_across_ranks(image), gather_across_ranks(text)
    keys = gather_keys(keys)
    text_keys = keys if text_keys is None else gather_keys(text_keys)
    tags = None if tags is None else gather_keys(tags)
    logits = logit_scale * image @ text.T
    matches = match_matrix(keys, text_keys, tags, image.device)
    return 0.5 * (F.cross_entropy(logits, matches / matches.sum(1, keepdim=True))
                  + F.cross_entropy(logits.T, matches.T / matches.T.sum(1, keepdim=True)))


def pairwise_alignment(text_embeddings: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over pairs of modality text encoders of the MSE between their embeddings of the same texts."""
    pairs = list(combinations(text_embeddings, 2))
    if not pairs:
        return text_embeddings[0].new_zeros(())
    return sum(F.mse_loss(a, b, reduction="sum") / a.shape[0] for a, b in pairs)


def distillation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean (1 - cosine) between student and teacher embeddings of the same texts."""
    return (1 - F.cosine_similarity(student, teacher.detach(), dim=-1)).mean()


def relational_distillation(images: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor,
                            logit_scale: float) -> torch.Tensor:
    """KL divergence from the teacher's to the student's softmax over texts, for each of a batch of the
    teacher's (fixed, unit) image embeddings."""
    images, teacher = images.detach(), teacher.detach()
    return F.kl_div(F.log_softmax(logit_scale * images @ student.T, dim=-1),
                    F.log_softmax(logit_scale * images @ teacher.T, dim=-1), log_target=True, reduction="batchmean")

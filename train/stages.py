"""The three training stages of M3Bind, each a function over ``m3bind.M3BindModel`` teachers.

0. ``train_teacher``: one CLIP-like model per modality (its tower + its own text tower), class-aware
   contrastive loss on that modality's (sample, caption) pairs. Teachers start from the same text base
   but each gets its own randomly initialised projection: their text spaces are unrelated, as with
   independently published modality CLIPs.
1. ``align``: every teacher keeps its own contrastive loss and additionally minimises the pairwise MSE
   between the teachers' embeddings of one shared text batch. Parameter-efficient: the text body stays
   frozen except for optional LoRA adapters (peft) on the attention query/value projections of its top
   ``lora_layers`` layers; the projections and the image/ECG towers' upper parts train.
2. ``distill``: one student text encoder learns to reproduce each aligned teacher's text embeddings on
   that modality's texts; it then serves every modality.

While a text body is frozen its pooled sentence vectors are cached (``TextFeatures``), which is what
makes the CPU budget possible.

Under ``torchrun`` (see ``train/distributed.py``) every stage runs in every process: each draws its own
batches (batch sizes are per process), what trains is wrapped in DistributedDataParallel, which averages
the gradients, and the contrastive loss gathers every process's batch, so its negatives span them all.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Hashable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from m3bind import M3BindModel, ModelConfig, TextTowerConfig
from m3bind.config import EcgTowerConfig, ImageTowerConfig
from m3bind.encoders import CnnEnsemble

from . import distributed
from .captions import STATUS_CAPTIONS, status_reports
from .data import load_dataset
from .losses import class_aware_contrastive, distillation, pairwise_alignment, relational_distillation


# ----------------------------------------------------------------------------------------------- data
@dataclass
class ModalityData:
    """One modality's training pairs, decoded and preprocessed once, held in memory."""

    modality: str
    inputs: torch.Tensor  # (N, ...) tower-ready tensors (float16 to halve memory)
    captions: list[tuple[str, ...]]
    keys: list[Hashable]  # class key per item: items sharing a key are positives of each other
    normal: list[bool | None]  # whether the item is normal (None: unknown), for the shared status captions
    # (views, N, C, h, w) float16: a tower's frozen stages' output per item (``lower_features``), computed once
    # and shared by every stage, since frozen stages are the same base weights in every model of a run
    lower: torch.Tensor | None = None
    # real reports of whole studies of this modality, by normal status (``captions.status_reports``)
    reports: dict[bool, tuple[str, ...]] = field(default_factory=dict)
    # the free text of the datasets' own patients of this split (``Pair.report``: e.g. the clinical notes of
    # COVID-19 patients), by the status of the patient's image, whichever modality that image was
    notes: dict[bool, tuple[str, ...]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)

    def batches(self, batch_size: int, rng: np.random.Generator, status_rate: float = 0.0,
                class_balance: float = 0.0, report_rate: float = 0.0, note_rate: float = 0.0) -> Iterator[Batch]:
        """Endless shuffled batches with one randomly drawn caption per item; with probability
        ``status_rate`` an item's caption is instead a ``STATUS_CAPTIONS`` one (keyed by the status), otherwise
        with probability ``note_rate`` a patient's note of the item's status, and otherwise with probability
        ``report_rate`` a real report of a study of the item's status (both keyed by the item's class: a report
        of another patient with that finding is true of it).

        ``class_balance`` > 0 draws each batch with item weights (its class's item count) ** -class_balance
        instead of passing through epochs: a macro AUC counts a rare class (a retina grade) as much as a common one."""
        weights = None
        if class_balance:
            counts = Counter(self.keys)
            weights = np.array([counts[k] ** -class_balance for k in self.keys])
            weights /= weights.sum()
        while True:
            if weights is None:
                order = rng.permutation(len(self))
                chunks = [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
            else:
                chunks = [np.sort(rng.choice(len(self), batch_size, replace=False, p=weights))]
            for idx in chunks:
                keys = [self.keys[i] for i in idx]
                tags = [("status", self.normal[i]) for i in idx]
                texts, text_keys = [], []
                for i, key, tag in zip(idx, keys, tags):
                    if self.normal[i] is not None and rng.random() < status_rate:
                        options, key = STATUS_CAPTIONS[self.normal[i]], tag
                    elif note_rate and self.notes.get(self.normal[i]) and rng.random() < note_rate:
                        options = self.notes[self.normal[i]]
                    elif report_rate and self.reports.get(self.normal[i]) and rng.random() < report_rate:
                        options = self.reports[self.normal[i]]
                    else:
                        options = self.captions[i]
                    texts.append(options[rng.integers(len(options))])
                    text_keys.append(key)
                yield Batch(idx, texts, keys, text_keys, tags)


@dataclass
class Batch:
    rows: np.ndarray  # item indices into the ModalityData
    texts: list[str]
    keys: list[Hashable]
    text_keys: list[Hashable]
    tags: list[Hashable]


def load_modality_data(model: M3BindModel, modality: str, datasets: Sequence[str], split: str,
                       data_root: str | None, max_items: int | None = None, seed: int = 0,
                       pair_modalities: Sequence[str] | None = None) -> ModalityData:
    """``pair_modalities`` lets one tower learn from several modalities' pairs (e.g. X-ray and CT)."""
    accepted = set(pair_modalities or [modality])
    inputs, captions, keys, normal = [], [], [], []
    notes: dict[bool, list[str]] = {True: [], False: []}
    for name in datasets:
        ds = load_dataset(name, split, data_root=data_root, seed=seed)
        normal_classes = {i for i, c in enumerate(ds.concepts) if c.normal}
        names = ds.class_names
        for pair in ds.pairs:
            if pair.report and pair.classes:
                notes[pair.classes <= normal_classes].append(pair.report)
        pairs = [p for p in ds.pairs if p.modality in accepted]
        if max_items is not None and len(pairs) > max_items:
            keep = np.random.default_rng(seed).choice(len(pairs), max_items, replace=False)
            pairs = [pairs[i] for i in sorted(keep)]
        for pair in tqdm(pairs, desc=f"decode {name}/{modality}/{split}", leave=False):
            sample = pair.load()
            sample.modality = modality  # read by this tower, whichever accepted modality it came from
            inputs.append(model.preprocess(sample).half())
            captions.append(pair.texts)
            classes = pair.classes
            # items of one modality that share their classes' names are positives, whichever dataset they are from
            keys.append((modality, tuple(names[t] for t in sorted(classes))))
            normal.append(classes <= normal_classes if classes else None)
    if not inputs:
        raise ValueError(f"No {split} pairs of modality {modality!r} in {list(datasets)}.")
    return ModalityData(modality, torch.stack(inputs), captions, keys, normal,
                        reports=status_reports(modality, data_root),
                        notes={status: tuple(dict.fromkeys(texts)) for status, texts in notes.items()})


FLIP_DIMS = {"horizontal": -1, "vertical": -2}


def augment(batch: torch.Tensor, kind: str, generator: torch.Generator, flips: Sequence[str] = ()) -> torch.Tensor:
    """Label-preserving jitter: small crops, contrast, black bars (the padding a non-square image gets) and
    the ``flips`` (of ``FLIP_DIMS``) that the modality allows, each for a random half of the images; gain,
    shift and noise for ECGs."""
    n = batch.shape[0]
    if kind == "ecg":
        signal, mask = batch[:, :12], batch[:, 12:]
        gain = 1 + 0.15 * torch.randn(n, 1, 1, generator=generator)
        shift = int(torch.randint(-50, 51, (1,), generator=generator))
        signal = torch.roll(signal * gain, shift, dims=-1) + 0.02 * torch.randn(signal.shape, generator=generator)
        return torch.cat([signal * mask, mask], dim=1)
    size = batch.shape[-1]
    scale = float(torch.empty(1).uniform_(0.8, 1.0, generator=generator))
    crop = max(8, int(size * scale))
    y0, x0 = (int(torch.randint(0, size - crop + 1, (1,), generator=generator)) for _ in range(2))
    out = F.interpolate(batch[:, :, y0:y0 + crop, x0:x0 + crop], size=(size, size), mode="bilinear",
                        align_corners=False)
    if float(torch.rand(1, generator=generator)) < 0.5:  # as a non-square input is padded (see preprocess)
        side = int(size * float(torch.empty(1).uniform_(0.6, 1.0, generator=generator)))
        tall = bool(torch.rand(1, generator=generator) < 0.5)
        out = F.interpolate(out, size=(size, side) if tall else (side, size), mode="bilinear", align_corners=False)
        before = int(torch.randint(0, size - side + 1, (1,), generator=generator))
        out = F.pad(out, (before, size - side - before, 0, 0) if tall else (0, 0, before, size - side - before))
    for flip in flips:
        flipped = torch.rand(n, 1, 1, 1, generator=generator) < 0.5
        out = torch.where(flipped, out.flip(FLIP_DIMS[flip]), out)
    contrast = 1 + 0.2 * (torch.rand(n, 1, 1, 1, generator=generator) - 0.5)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    return ((out - mean) * contrast + mean).clamp(0, 1)


# ----------------------------------------------------------------------------------------------- text
class TextFeatures:
    """Pooled sentence vectors of a frozen text body, computed once per distinct text.

    Every model whose body is still the unchanged base (all teachers before stage 1 LoRA, the student
    without LoRA) can share one instance: only their projections differ.
    """

    def __init__(self, model: M3BindModel, batch_size: int = 128):
        self.model = model
        self.batch_size = batch_size
        self.cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        missing = list(dict.fromkeys(t for t in texts if t not in self.cache))
        body = self.model.text.model
        was_training = body.training
        body.eval()  # the frozen body's features, as at inference: no dropout in what is cached
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start:start + self.batch_size]
            tokens = {k: v.to(self.model.device) for k, v in self.model.text.tokenize(chunk).items()}
            for text, vec in zip(chunk, self.model.text.pool(tokens)):
                self.cache[text] = vec
        body.train(was_training)
        return torch.stack([self.cache[t] for t in texts])


def text_embeddings(model: M3BindModel, texts: Sequence[str], cache: TextFeatures | None) -> torch.Tensor:
    """Unit-norm text embeddings with gradients to whatever part of the text tower trains."""
    if cache is not None:
        return F.normalize(model.text.proj(cache(texts)), dim=-1)
    return model.encode_text(list(texts))


def add_lora(model: M3BindModel, rank: int, layers: int) -> None:
    """LoRA adapters (peft) on the query/value projections of the text body's top ``layers`` layers."""
    from peft import LoraConfig, get_peft_model

    total = model.text.model.spec.num_hidden_layers
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=["query", "value"],
                        layers_to_transform=list(range(total - layers, total)))
    model.text.model = get_peft_model(model.text.model, config)


def merge_lora(model: M3BindModel) -> None:
    if hasattr(model.text.model, "merge_and_unload"):
        model.text.model = model.text.model.merge_and_unload()


def freeze_text_body(model: M3BindModel) -> None:
    for p in model.text.model.parameters():
        p.requires_grad_(False)


def freeze_tower_below_head(model: M3BindModel, modality: str) -> None:
    """Stage 1 keeps a tower's features and adapts only its output head (cheap: its input can be cached)."""
    tower = model.tower_for(modality)
    head = {id(p) for p in tower.head_parameters()}
    if not head:
        raise ValueError(f"The {modality} tower has no separate output head to train alone (timm trunks, "
                         "published towers and the ECG tower have one); set tower_head_only: false.")
    for p in tower.parameters():
        p.requires_grad_(id(p) in head)


@torch.no_grad()
def body_features(model: M3BindModel, data: ModalityData, batch_size: int = 256) -> torch.Tensor:
    """What a tower's frozen body makes of every training item (no augmentation), computed once."""
    tower = model.tower_for(data.modality)
    was_training = tower.training
    tower.eval()
    upper = lambda maps: tower.upper_body(maps)  # noqa: E731
    features = torch.cat([_from_cache(model, data, np.arange(i, min(i + batch_size, len(data))), tower.body, upper)
                          for i in range(0, len(data), batch_size)])
    tower.train(was_training)
    return features


def _from_cache(model: M3BindModel, data: ModalityData, rows: np.ndarray, whole, upper) -> torch.Tensor:
    """``upper`` of the cached frozen-stage maps of ``rows`` (towers with frozen stages), else ``whole`` of
    their pixels: the same result, without running the frozen stages again."""
    if frozen_stages(model, data.modality):
        return upper(lower_features(model, data)[0][torch.from_numpy(rows)].float().to(model.device))
    return whole(data.inputs[torch.from_numpy(rows)].float().to(model.device))


def frozen_stages(model: M3BindModel, modality: str) -> int:
    """How many leading trunk stages of the modality's tower stay at their base weights (0: none)."""
    return getattr(model.config.towers.get(model.config.modality_towers.get(modality, modality)), "frozen_stages", 0)


@torch.no_grad()
def lower_features(model: M3BindModel, data: ModalityData, views: int = 1, generator: torch.Generator | None = None,
                   flips: Sequence[str] = (), batch_size: int = 128) -> torch.Tensor:
    """(views, N, C, h, w) float16: the frozen stages' feature maps of every item, kept in ``data.lower`` and
    computed only once per view. View 0 is the plain image, each further view an augmented one (``augment``),
    so training on cached maps still sees jitter."""
    done = 0 if data.lower is None else len(data.lower)
    if done >= views:
        return data.lower
    tower = model.tower_for(data.modality)
    generator = generator or torch.Generator().manual_seed(0)
    out = [] if data.lower is None else list(data.lower)
    for view in range(done, views):
        maps = []
        for i in tqdm(range(0, len(data), batch_size), desc=f"frozen stages {data.modality} view {view}", leave=False,
                      disable=not distributed.is_main()):
            pixels = data.inputs[i:i + batch_size].float()
            if view:
                pixels = augment(pixels, "image", generator, flips)
            pixels = pixels.to(model.device, memory_format=torch.channels_last)  # faster convolutions on a CPU
            maps.append(tower.lower(pixels).half().cpu().contiguous())
        out.append(torch.cat(maps))
    data.lower = torch.stack(out)
    return data.lower


@torch.no_grad()
def item_embeddings(model: M3BindModel, data: ModalityData, rows: np.ndarray | None = None,
                    batch_size: int = 256) -> torch.Tensor:
    """Unit embeddings of training items (all, or ``rows``; no augmentation), on the CPU."""
    model.eval()
    rows = np.arange(len(data)) if rows is None else np.asarray(rows)
    tower = model.tower_for(data.modality)
    upper = lambda maps: tower.head(tower.upper_body(maps))  # noqa: E731
    return torch.cat([F.normalize(_from_cache(model, data, rows[i:i + batch_size], tower, upper), dim=-1).cpu()
                      for i in range(0, len(rows), batch_size)])


def fit_centres(model: M3BindModel, data: dict[str, ModalityData], max_items: int = 2000, seed: int = 0) -> None:
    """Each tower's centre (``M3BindModel.centre``): its mean embedding over (a sample of) its training items."""
    rng = np.random.default_rng(seed)
    for modality, d in data.items():
        rows = np.sort(rng.choice(len(d), min(max_items, len(d)), replace=False))
        model.set_centre(modality, item_embeddings(model, d, rows))


def _ensemble(model: M3BindModel, modality: str) -> CnnEnsemble | None:
    visual = getattr(model.tower_for(modality), "visual", None)
    return visual if isinstance(visual, CnnEnsemble) else None


@contextmanager
def training_member(model: M3BindModel, modality: str, member: int) -> Iterator[None]:
    """Inputs go through one member of an ensemble tower and only it trains. Members after the first learn
    into the first one's text space: the text projection and the temperature stay as it left them."""
    ensemble = _ensemble(model, modality)
    frozen = [p for j in range(ensemble.members) if j != member
              for part in (ensemble.trunk.parts[j], ensemble.head.parts[j]) for p in part.parameters()]
    if member:
        frozen += list(model.text.parameters())
    trainable = [p.requires_grad for p in frozen]
    logit_scale = model.config.logit_scale
    ensemble.select(member)
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        ensemble.select(None)
        for p, was in zip(frozen, trainable):
            p.requires_grad_(was)
        if member:
            model.config.logit_scale = logit_scale


def _image_trunk(model: M3BindModel, modality: str) -> nn.Module | None:
    """The trunk below the output head of an image tower built on open_clip/timm or the compact CNN."""
    return getattr(getattr(model.tower_for(modality), "visual", None), "trunk", None)


@torch.no_grad()
def copy_trunk(target: M3BindModel, modality: str, source: M3BindModel, source_modality: str) -> None:
    """Start ``modality``'s tower from another teacher's trained trunk (transfer from a larger set of similar
    images); its output head stays new, since it maps into the target's own text space."""
    trunks = [_image_trunk(target, modality), _image_trunk(source, source_modality)]
    if None in trunks:
        raise ValueError(f"Only image towers with a trunk can share one ({modality} from {source_modality}).")
    single_source = _ensemble(source, source_modality) is None
    members = _ensemble(target, modality)
    try:  # every member of an ensemble starts from a single source trunk
        for trunk in members.trunk.parts if members and single_source else trunks[:1]:
            trunk.load_state_dict(trunks[1].state_dict())
    except RuntimeError as error:
        raise ValueError(f"The {modality} tower cannot start from the {source_modality} trunk: their layouts "
                         f"differ ({str(error).splitlines()[0]})") from error


def freeze_tower_bottom(model: M3BindModel, modality: str, trainable_fraction: float) -> None:
    """Train only the top ``trainable_fraction`` of a pretrained trunk's parameter tensors (and its head)."""
    trunk = _image_trunk(model, modality)
    if trunk is None or trainable_fraction >= 1:
        return
    params = list(trunk.parameters())
    for p in params[: int(len(params) * (1 - trainable_fraction))]:
        p.requires_grad_(False)


# ----------------------------------------------------------------------------------------------- stages
@dataclass
class StageConfig:
    steps: int = 100
    batch_size: int = 64
    lr: float = 1e-3
    tower_lr: float = 3e-4
    weight_decay: float = 1e-4
    lora_rank: int = 8
    lora_layers: int = 0  # 0 keeps the text body frozen (its features cached)
    align_weight: float = 1.0  # stage 1: weight of the pairwise text alignment loss
    tower_head_only: bool = False  # stage 1: adapt only the towers' output heads
    shared_batch: int = 64  # stage 1: shared texts per step
    status_captions: float = 0.0  # share of captions replaced by a modality-independent normal/abnormal one
    report_captions: float = 0.0  # stage 3: share of the other captions replaced by a real report (same status)
    note_captions: float = 0.0  # stage 3: share of captions replaced by a training patient's clinical note
    relational_weight: float = 0.0  # stage 2: weight of relational_distillation (needs the teachers' images)
    class_weight: float = 0.0  # stages 1, 2: keep each teacher's choice among its datasets' classes (zero-shot)
    flips: tuple[str, ...] = ()  # image flips (keys of FLIP_DIMS) that keep this modality's labels true
    class_balance: float = 0.0  # batches favour rare classes: item weight (class count) ** -class_balance
    cached_views: int = 2  # towers with frozen stages: cached feature maps per item (1 plain + augmented ones)
    extra: dict = field(default_factory=dict)


def new_teacher(modality: str, tower: ImageTowerConfig | EcgTowerConfig, dim: int, text: TextTowerConfig,
                seed: int) -> M3BindModel:
    torch.manual_seed(seed)
    config = ModelConfig(name=f"teacher-{modality}", dim=dim, text=copy.deepcopy(text),
                         towers={modality: copy.deepcopy(tower)}, modality_towers={modality: modality})
    return M3BindModel(config)


def _optimizer(model: M3BindModel, modality: str, log_scale: nn.Parameter, cfg: StageConfig) -> torch.optim.Optimizer:
    tower_params = [p for p in model.tower_for(modality).parameters() if p.requires_grad]
    tower_ids = {id(p) for p in tower_params}
    other = [p for p in model.parameters() if p.requires_grad and id(p) not in tower_ids]
    return torch.optim.AdamW([{"params": tower_params, "lr": cfg.tower_lr}, {"params": other + [log_scale]}],
                             lr=cfg.lr, weight_decay=cfg.weight_decay)


def _schedule(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


class _TextPath(nn.Module):
    """A model's text path as a module with a forward: what DDP wraps when only text trains (stage 2)."""

    def __init__(self, model: M3BindModel, cache: TextFeatures | None):
        super().__init__()
        self.model, self.cache = model, cache

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        return text_embeddings(self.model, texts, self.cache)


class _PairPath(_TextPath):
    """Tower, text path and temperature of one modality's run behind a single forward, because DDP allows
    one forward of what it wraps per backward."""

    def __init__(self, model: M3BindModel, cache: TextFeatures | None, modality: str, log_scale: nn.Parameter):
        super().__init__(model, cache)
        self.modality, self.log_scale = modality, log_scale

    def forward(self, inputs: torch.Tensor, texts: Sequence[str], head_only: bool = False,
                from_lower: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``head_only``: ``inputs`` are cached body features and only the tower's head runs; ``from_lower``:
        they are the frozen stages' cached feature maps and the rest of the tower runs."""
        tower = self.model.tower_for(self.modality)
        if head_only:
            image = F.normalize(tower.head(inputs.to(self.model.device)), dim=-1)
        elif from_lower:
            image = F.normalize(tower.head(tower.upper_body(inputs.to(self.model.device))), dim=-1)
        else:
            image = self.model.encode(self.modality, inputs)
        return image, super().forward(texts), self.log_scale.exp().clamp(max=100)


class _ModalityRun:
    """One teacher's training state inside a stage: data, optimiser, temperature, text cache."""

    def __init__(self, model: M3BindModel, data: ModalityData, cfg: StageConfig, seed: int,
                 base_features: TextFeatures | None = None, class_prompts: Sequence[list[list[str]]] = ()):
        self.model, self.data, self.cfg = model, data, cfg
        self.kind = "ecg" if data.inputs.dim() == 3 else "image"
        self.cache = (base_features or TextFeatures(model)) if cfg.lora_layers == 0 else None
        self.log_scale = nn.Parameter(torch.tensor(math.log(model.config.logit_scale), device=model.device))
        self.optimizer = _optimizer(model, data.modality, self.log_scale, cfg)
        self.scheduler = _schedule(self.optimizer, cfg.steps)
        seed = distributed.rank_seed(seed)
        self.rng = np.random.default_rng(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.batches = data.batches(min(cfg.batch_size, len(data)), self.rng, cfg.status_captions, cfg.class_balance)
        # a head-only run never changes the body: its features are computed once, without augmentation
        self.features = body_features(model, data) if cfg.tower_head_only else None
        self.lower = (lower_features(model, data, cfg.cached_views, self.generator, cfg.flips)
                      if self.features is None and frozen_stages(model, data.modality) else None)
        self.encoders = distributed.wrap(_PairPath(model, self.cache, data.modality, self.log_scale))
        # with class_weight: each dataset's classes, and how the model chose among them for every item at the start
        self.class_prompts = list(class_prompts) if cfg.class_weight else []
        self.first_choice = self._class_choice() if self.class_prompts else []

    def _class_choice(self) -> list[torch.Tensor]:
        """(items, classes) log-probabilities of zero-shot classification by the model as it is now."""
        training = self.model.training
        self.model.eval()
        with torch.no_grad():
            if self.features is not None:
                images = F.normalize(self.model.tower_for(self.data.modality).head(self.features), dim=-1)
            else:
                images = item_embeddings(self.model, self.data).to(self.model.device)
            choice = [F.log_softmax(self.model.config.logit_scale * images @ _class_means(
                text_embeddings(self.model, [p for e in ensembles for p in e], self.cache), ensembles).T, dim=-1)
                for ensembles in self.class_prompts]
        self.model.train(training)
        return choice

    def _class_drift(self, image: torch.Tensor, prompts: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        """KL divergence from the first choice among each dataset's classes to the current one, on a batch."""
        parts = prompts.split([sum(map(len, ensembles)) for ensembles in self.class_prompts])
        return sum(F.kl_div(F.log_softmax(self.model.config.logit_scale * image @ _class_means(part, ensembles).T, -1),
                            first[torch.as_tensor(rows)], log_target=True, reduction="batchmean")
                   for part, ensembles, first in zip(parts, self.class_prompts, self.first_choice))

    def contrastive_loss(self, shared: Sequence[str] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss on the next batch (with class_weight, plus the drift of its class choice), and the embeddings
        of ``shared`` texts from the same forward."""
        batch = next(self.batches)
        prompts = [p for ensembles in self.class_prompts for e in ensembles for p in e]
        texts = batch.texts + prompts + list(shared)
        if self.features is not None:
            image, text, scale = self.encoders(self.features[batch.rows], texts, head_only=True)
        elif self.lower is not None:
            views = torch.from_numpy(self.rng.integers(len(self.lower), size=len(batch.rows)))
            maps = self.lower[views, torch.from_numpy(batch.rows)].float()
            image, text, scale = self.encoders(maps, texts, from_lower=True)
        else:
            inputs = self.data.inputs[batch.rows].float()
            image, text, scale = self.encoders(augment(inputs, self.kind, self.generator, self.cfg.flips), texts)
        n = len(batch.texts)
        loss = class_aware_contrastive(image, text[:n], batch.keys, scale, batch.text_keys, batch.tags)
        if self.class_prompts:
            loss = loss + self.cfg.class_weight * self._class_drift(image, text[n:n + len(prompts)], batch.rows)
        return loss, text[n + len(prompts):]

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], 5.0)
        self.optimizer.step()
        self.scheduler.step()

    def finish(self) -> None:
        distributed.sync_buffers(self.model)
        self.model.config.logit_scale = float(self.log_scale.detach().exp().clamp(max=100))
        self.model.eval()


def train_teacher(model: M3BindModel, data: ModalityData, cfg: StageConfig, seed: int = 0,
                  trainable_fraction: float = 1.0, base_features: TextFeatures | None = None) -> M3BindModel:
    freeze_text_body(model)
    freeze_tower_bottom(model, data.modality, trainable_fraction)
    for p in getattr(model.tower_for(data.modality), "lower_parameters", list)():
        p.requires_grad_(False)
    ensemble = _ensemble(model, data.modality)
    members = ensemble.members if ensemble else 1
    for member in range(members):
        label = f"teacher {data.modality}" + (f" {member + 1}/{members}" if ensemble else "")
        with training_member(model, data.modality, member) if ensemble else nullcontext():
            model.train()
            run = _ModalityRun(model, data, cfg, seed + 1000 * member, base_features)
            for _ in tqdm(range(cfg.steps), desc=label, disable=not distributed.is_main()):
                run.step(run.contrastive_loss()[0])
            run.finish()
    fit_centres(model, {data.modality: data}, seed=seed)
    return model


def align(teachers: dict[str, M3BindModel], data: dict[str, ModalityData], shared_texts: Sequence[str],
          cfg: StageConfig, seed: int = 0, base_features: TextFeatures | None = None,
          overrides: dict[str, dict] | None = None,
          class_prompts: dict[str, list[list[list[str]]]] | None = None) -> dict[str, M3BindModel]:
    """Stage 1: own contrastive loss per teacher + pairwise MSE of their text embeddings of shared texts.

    ``overrides`` changes a teacher's own run (e.g. its ``status_captions`` share); the shared batch and the
    alignment weight are common to all. With ``cfg.class_weight``, each teacher also keeps how it chose among its
    datasets' ``class_prompts`` (zero-shot classification) before the stage."""
    if class_prompts is None and (cfg.class_weight or any(o.get("class_weight") for o in (overrides or {}).values())):
        raise ValueError("class_weight needs each modality's class prompt ensembles (class_prompts=...).")
    runs = {}
    for i, (modality, model) in enumerate(teachers.items()):
        freeze_text_body(model)
        if cfg.tower_head_only:
            freeze_tower_below_head(model, modality)
        if cfg.lora_layers:
            add_lora(model, cfg.lora_rank, cfg.lora_layers)
        model.train()
        own_cfg = replace(cfg, **(overrides or {}).get(modality, {}))
        runs[modality] = _ModalityRun(model, data[modality], own_cfg, seed + i, base_features,
                                      (class_prompts or {}).get(modality, ()))
    rng = np.random.default_rng(seed)
    size = min(len(shared_texts), cfg.shared_batch * distributed.world_size())
    progress = tqdm(range(cfg.steps), desc="stage 1 align", disable=not distributed.is_main())
    for _ in progress:
        shared = [shared_texts[i] for i in distributed.shard(rng.choice(len(shared_texts), size, replace=False))]
        if cfg.status_captions:  # the status captions are what must mean the same in every modality
            shared += [t for texts in STATUS_CAPTIONS.values() for t in texts]
        if distributed.world_size() > 1:  # DDP: captions and shared texts in one forward per teacher
            own, embedded = zip(*(run.contrastive_loss(shared) for run in runs.values()))
            own = sum(own)
        else:  # one process keeps its order of forwards (and so its dropout draws and results)
            own = sum(run.contrastive_loss()[0] for run in runs.values())
            embedded = [text_embeddings(r.model, shared, r.cache) for r in runs.values()]
        aligned = pairwise_alignment(embedded)
        loss = own + cfg.align_weight * aligned
        for run in runs.values():
            run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for run in runs.values():
            torch.nn.utils.clip_grad_norm_([p for g in run.optimizer.param_groups for p in g["params"]], 5.0)
            run.optimizer.step()
            run.scheduler.step()
        progress.set_postfix(contrastive=own.item() / len(runs), align=aligned.item())
    for modality, run in runs.items():
        merge_lora(run.model)
        run.finish()
        fit_centres(run.model, {modality: data[modality]}, seed=seed)
    return teachers


def distill(student: M3BindModel, teachers: dict[str, M3BindModel], texts: dict[str, Sequence[str]],
            cfg: StageConfig, seed: int = 0, base_features: TextFeatures | None = None,
            images: dict[str, torch.Tensor] | None = None,
            class_prompts: dict[str, list[list[list[str]]]] | None = None) -> M3BindModel:
    """Stage 2: the student's text embeddings reproduce each teacher's on that modality's texts, and with
    ``cfg.relational_weight`` also each teacher's choice among those texts for its ``images`` (its unit
    embeddings of training items, ``item_embeddings``).

    ``base_features`` (pooled vectors of the shared, still frozen text base) lets teachers whose body was
    never adapted be evaluated through their projection alone.
    """
    if (cfg.relational_weight or cfg.class_weight) and not images:
        raise ValueError("relational_weight and class_weight need the teachers' image embeddings (images=...).")
    if cfg.class_weight and class_prompts is None:
        raise ValueError("class_weight needs each modality's class prompt ensembles (class_prompts=...).")
    class_sets = {m: [[p for prompts in ensembles for p in prompts] for ensembles in sets]
                  for m, sets in (class_prompts or {}).items() if m in teachers} if cfg.class_weight else {}
    with torch.no_grad():
        targets = {m: (F.normalize(t.text.proj(base_features(texts[m])), dim=-1) if base_features is not None
                       else torch.from_numpy(t.embed_text(list(texts[m]))).to(student.device))
                   for m, t in teachers.items()}
        class_targets = {m: [_class_means(torch.from_numpy(teachers[m].embed_text(flat)).to(student.device),
                                          class_prompts[m][i]) for i, flat in enumerate(sets)]
                         for m, sets in class_sets.items()}
    freeze_text_body(student)
    if cfg.lora_layers:
        add_lora(student, cfg.lora_rank, cfg.lora_layers)
    student.train()
    cache = base_features if cfg.lora_layers == 0 and base_features is not None else (
        TextFeatures(student) if cfg.lora_layers == 0 else None)
    params = [p for p in student.text.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = _schedule(optimizer, cfg.steps)
    encoder = distributed.wrap(_TextPath(student, cache))
    rng = np.random.default_rng(seed)
    progress = tqdm(range(cfg.steps), desc="stage 2 distill", disable=not distributed.is_main())
    for _ in progress:
        # every rank draws the same batches of world_size * batch_size texts and takes its own share
        idx = {m: distributed.shard(rng.choice(len(t), min(cfg.batch_size * distributed.world_size(), len(t)),
                                               replace=False)) for m, t in targets.items()}
        batches = {m: [texts[m][i] for i in rows] for m, rows in idx.items()}
        batches.update({(m, i): flat for m, sets in class_sets.items() for i, flat in enumerate(sets)})
        if distributed.world_size() > 1:  # DDP: every modality's texts (and class prompts) in one forward
            together = encoder([text for batch in batches.values() for text in batch])
            embedded = dict(zip(batches, together.split([len(b) for b in batches.values()])))
        else:  # one process keeps its order of forwards (and so its dropout draws and results)
            embedded = {key: encoder(batch) for key, batch in batches.items()}
        loss = sum(distillation(embedded[m], target[idx[m]]) for m, target in targets.items())
        if cfg.relational_weight:
            rows = {m: rng.choice(len(images[m]), min(cfg.batch_size, len(images[m])), replace=False) for m in targets}
            loss = loss + cfg.relational_weight * sum(
                relational_distillation(images[m][rows[m]].to(student.device), embedded[m], target[idx[m]],
                                        teachers[m].config.logit_scale) for m, target in targets.items())
        if class_sets:
            rows = {m: rng.choice(len(images[m]), min(cfg.batch_size, len(images[m])), replace=False)
                    for m in class_sets}
            loss = loss + cfg.class_weight * sum(
                relational_distillation(images[m][rows[m]].to(student.device),
                                        _class_means(embedded[m, i], class_prompts[m][i]), class_targets[m][i],
                                        teachers[m].config.logit_scale)
                for m, sets in class_sets.items() for i in range(len(sets)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        progress.set_postfix(distill=loss.item() / len(targets))
    merge_lora(student)
    student.eval()
    return student


class _JointPath(nn.Module):
    """Every modality's tower head, the text path and the temperature behind one forward (for DDP)."""

    def __init__(self, model: M3BindModel, cache: TextFeatures, log_scale: nn.Parameter):
        super().__init__()
        self.model, self.cache, self.log_scale = model, cache, log_scale

    def forward(self, features: dict[str, torch.Tensor],
                texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image = torch.cat([F.normalize(self.model.tower_for(m).head(f), dim=-1) for m, f in features.items()])
        text = F.normalize(self.model.text.proj(self.cache(texts)), dim=-1)
        return image, text, self.log_scale.exp().clamp(max=100)


def joint(model: M3BindModel, data: dict[str, ModalityData], cfg: StageConfig, seed: int = 0,
          base_features: TextFeatures | None = None) -> M3BindModel:
    """Stage 3: one space for every modality. Each step mixes a batch of every modality's items and captions
    into one class-aware contrastive loss with the unified text encoder, so a finding of one modality is a
    negative for the others' items ("diabetic retinopathy" for an ultrasound image) and a typed finding lands
    among its own modality's items. Only the towers' output heads (on cached body features) and the text
    projection adapt; the shared normal/abnormal captions (``status_captions``) keep "abnormal" one direction
    across modalities, which cross-modal image-to-image search reads."""
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    tower_params = list({id(p): p for m in data for p in model.tower_for(m).head_parameters()}.values())
    trainable = tower_params + list(model.text.proj.parameters())
    for p in trainable:
        p.requires_grad_(True)
    features = {m: body_features(model, d) for m, d in data.items()}
    seed = distributed.rank_seed(seed)
    rng = np.random.default_rng(seed)
    batches = {m: d.batches(min(cfg.batch_size, len(d)), rng, cfg.status_captions,
                            report_rate=cfg.report_captions, note_rate=cfg.note_captions) for m, d in data.items()}
    log_scale = nn.Parameter(torch.tensor(math.log(model.config.logit_scale), device=model.device))
    optimizer = torch.optim.AdamW([{"params": tower_params, "lr": cfg.tower_lr},
                                   {"params": list(model.text.proj.parameters()) + [log_scale]}],
                                  lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = _schedule(optimizer, cfg.steps)
    cache = base_features if cfg.lora_layers == 0 and base_features is not None else TextFeatures(model)
    encoders = distributed.wrap(_JointPath(model, cache, log_scale))
    progress = tqdm(range(cfg.steps), desc="stage 3 joint", disable=not distributed.is_main())
    for _ in progress:
        drawn = {m: next(b) for m, b in batches.items()}
        image, text, scale = encoders({m: features[m][b.rows] for m, b in drawn.items()},
                                      [t for b in drawn.values() for t in b.texts])
        keys, text_keys, tags = ([x for b in drawn.values() for x in getattr(b, name)]
                                 for name in ("keys", "text_keys", "tags"))
        loss = class_aware_contrastive(image, text, keys, scale, text_keys, tags)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        progress.set_postfix(joint=loss.item())
    for p in trainable:
        p.requires_grad_(False)
    model.config.logit_scale = float(log_scale.detach().exp().clamp(max=100))
    model.eval()
    fit_centres(model, data, seed=seed)
    return model


def _class_means(embedded: torch.Tensor, ensembles: list[list[str]]) -> torch.Tensor:
    """Unit mean of each class's prompt embeddings (``embedded``: the prompts' rows, class after class)."""
    return F.normalize(torch.stack([part.mean(0) for part in embedded.split([len(e) for e in ensembles])]), dim=-1)


def bind(teachers: dict[str, M3BindModel], student: M3BindModel, name: str,
         extra_modalities: dict[str, str] | None = None) -> M3BindModel:
    """One model: every teacher's aligned tower and the student's text tower.

    ``extra_modalities`` maps modalities without a teacher to the trained tower that serves them.
    """
    first = next(iter(teachers.values()))
    towers = {m: t.config.towers[m] for m, t in teachers.items()}
    config = ModelConfig(name=name, dim=first.config.dim, text=copy.deepcopy(student.config.text),
                         towers=copy.deepcopy(towers), modality_towers={**{m: m for m in towers}, **(extra_modalities or {})},
                         logit_scale=float(np.mean([t.config.logit_scale for t in teachers.values()])))
    bound = M3BindModel(config, text=student.text, towers={m: t.towers[m] for m, t in teachers.items()})
    for m, t in teachers.items():
        bound.centres.get_buffer(m).copy_(t.centres.get_buffer(m))
    return bound.eval()


def text_only_model(text: TextTowerConfig, dim: int, name: str, seed: int) -> M3BindModel:
    """A model with only a text tower: the stage 2 student before it is bound to the towers."""
    torch.manual_seed(seed)
    return M3BindModel(ModelConfig(name=name, dim=dim, text=copy.deepcopy(text)))

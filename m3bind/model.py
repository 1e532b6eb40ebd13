"""``M3BindModel``: every modality's tower and one text encoder in one shared space.

A model is a directory, like a Hugging Face model: ``config.json`` (``ModelConfig``), ``model.safetensors``
(every weight that differs from the base weights the config references) and ``README.md`` (the model card).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .config import ModelConfig, default_config
from .encoders import ImageTower, TextTower, build_tower
from .errors import InputError, WrongModalityError
from .modalities import get_modality
from .sample import Sample
from .weights import resolve_model_dir

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
LABEL_CACHE_SIZE = 256
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "m3bind-default"


def pick_device(device: str | torch.device | None = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class M3BindModel(nn.Module):
    def __init__(self, config: ModelConfig, text: TextTower | None = None, towers: dict[str, nn.Module] | None = None):
        """Build every tower from the config, or assemble already-trained ``text`` / ``towers`` under it."""
        super().__init__()
        self.config = config
        self.text = text if text is not None else TextTower(config.text, config.dim)
        self.towers = nn.ModuleDict(towers if towers is not None else
                                    {name: build_tower(cfg, config.dim) for name, cfg in config.towers.items()})
        self.detector = (ImageTower(config.detector.tower, len(config.detector.modalities))
                         if config.detector else None)
        self.centres = nn.Module()  # per tower: the mean embedding of its training data (zero: not fitted)
        for name in self.towers:
            self.centres.register_buffer(name, torch.zeros(config.dim))
        self._fingerprint: str | None = None
        self._label_cache: dict[tuple[tuple[str, ...], str], np.ndarray] = {}  # emptied whenever weights change
        self.eval()

    # ----- identity -------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.config.dim

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def modalities(self) -> list[str]:
        return [m for m, tower in self.config.modality_towers.items() if tower in self.towers]

    @property
    def fingerprint(self) -> str:
        """A stable id of config and weights: libraries refuse embeddings of another model."""
        if self._fingerprint is None:
            digest = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode())
            for key, tensor in sorted(self.state_dict().items()):
                digest.update(key.encode())
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
            self._fingerprint = f"{self.config.name}-{digest.hexdigest()[:16]}"
        return self._fingerprint

    def tower_for(self, modality: str) -> nn.Module:
        name = self.config.modality_towers.get(get_modality(modality).name)
        if name not in self.towers:
            raise WrongModalityError(f"The model {self.config.name!r} has no encoder for "
                                     f"{get_modality(modality).title}. It encodes: {', '.join(self.modalities)}.")
        return self.towers[name]

    # ----- modality detection ---------------------------------------------------------------------
    @torch.inference_mode()
    def modality_probabilities(self, sample: Sample) -> dict[str, float]:
        """The detector's probability of each modality for an image sample ({} without a detector).

        A largely coloured image gets no grey modality: the classifier only ever saw grey X-rays, CTs and MRIs,
        and extrapolates on stains it never saw (an immunohistochemistry tile came out as an X-ray at 96%).
        """
        if self.detector is None or sample.kind != self.config.detector.tower.kind:
            return {}
        pixels = self.detector.prepare(sample, keep_colour=True)
        probs = torch.softmax(self.detector(pixels[None].to(self.device))[0].float(), dim=0).cpu().numpy()
        names = self.config.detector.modalities
        if colour_share(sample.data) >= self.config.detector.colour_share:
            coloured = np.array([not get_modality(name).grayscale for name in names])
            if coloured.any():
                probs = np.where(coloured, probs, 0.0)
                probs = probs / probs.sum() if probs.sum() > 0 else coloured / coloured.sum()
        return dict(zip(names, map(float, probs)))

    def route(self, sample: Sample) -> Sample:
        """Give a plain image whose modality the reader only guessed from simple pixel rules the detector's
        modality instead, with its confidence (``meta["modality_confidence"]``); files whose header names
        their modality (DICOM) and samples whose modality the user chose keep it. ``preprocess`` and
        ``classify`` route every sample first, so each path into the model settles a guess the same way."""
        if sample.meta.get("modality_source") != "guess":
            return sample
        probs = self.modality_probabilities(sample)
        if probs:
            best = max(probs, key=probs.get)
            sample.modality = best
            sample.meta.update(modality_source="detector", modality_confidence=round(probs[best], 3),
                               modality_unsure=probs[best] < self.config.detector.min_confidence)
        return sample

    # ----- embedding ------------------------------------------------------------------------------
    def preprocess(self, sample: Sample) -> torch.Tensor:
        """The input of the tower of the sample's modality (the sample is routed first, see ``route``)."""
        return self.tower_for(self.route(sample).modality).prepare(sample)

    def encode(self, modality: str, batch: torch.Tensor) -> torch.Tensor:
        """Unit-norm embeddings of a preprocessed batch of one modality (differentiable, for training)."""
        return F.normalize(self.tower_for(modality)(batch.to(self.device)), dim=-1)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        tokens = {k: v.to(self.device) for k, v in self.text.tokenize(texts).items()}
        return F.normalize(self.text(tokens), dim=-1)

    @torch.inference_mode()
    def embed(self, samples: Sample | Sequence[Sample], batch_size: int = 64) -> np.ndarray:
        """np.float32 (D,) for one sample, (N, D) for a list; unit norm; batched per modality."""
        single = isinstance(samples, Sample)
        items = [samples] if single else list(samples)
        out = np.zeros((len(items), self.dim), dtype=np.float32)
        by_modality: dict[str, list[int]] = {}
        for i, sample in enumerate(items):  # routed first: the detector may move a guessed image to another tower
            by_modality.setdefault(self.route(sample).modality, []).append(i)
        for modality, indices in by_modality.items():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start:start + batch_size]
                batch = torch.stack([self.preprocess(items[i]) for i in chunk])
                out[chunk] = self.encode(modality, batch).float().cpu().numpy()
        return out[0] if single else out

    @torch.inference_mode()
    def embed_text(self, texts: str | Sequence[str], batch_size: int = 256) -> np.ndarray:
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        chunks = [self.encode_text(texts[i:i + batch_size]).float().cpu().numpy()
                  for i in range(0, len(texts), batch_size)]
        return np.concatenate(chunks)

    def centre(self, vectors: np.ndarray, modality: str) -> np.ndarray:
        """Unit vectors of ``modality`` with its tower's mean embedding taken out: queries for ranking items
        of *other* modalities. What sets one modality's items apart from another's is a large offset shared
        by all of them; left in, it ranks another modality's items the same way for every query."""
        name = self.config.modality_towers.get(get_modality(modality).name)
        shifted = np.asarray(vectors, dtype=np.float32) - self.centres.get_buffer(name).cpu().numpy()
        return shifted / np.maximum(np.linalg.norm(shifted, axis=-1, keepdims=True), 1e-12)

    @torch.no_grad()
    def set_centre(self, modality: str, embeddings: np.ndarray | torch.Tensor) -> None:
        """Fit the centre of the tower serving ``modality``: the mean of its (unit) training embeddings."""
        name = self.config.modality_towers.get(get_modality(modality).name)
        self.centres.get_buffer(name).copy_(torch.as_tensor(np.asarray(embeddings), dtype=torch.float32).mean(0))
        self._fingerprint = None

    def label_embeddings(self, labels: Sequence[str], modality: str) -> np.ndarray:
        """One unit vector per label: the mean of its prompt ensemble (cached: the app asks again and again)."""
        key = (tuple(labels), get_modality(modality).name)
        cached = self._label_cache.get(key)
        if cached is None:
            prompts = [get_modality(modality).prompts(label) for label in labels]
            flat = self.embed_text([p for group in prompts for p in group])
            per_label = flat.reshape(len(labels), -1, self.dim).mean(1)
            cached = per_label / np.linalg.norm(per_label, axis=1, keepdims=True)
            if len(self._label_cache) >= LABEL_CACHE_SIZE:
                self._label_cache.pop(next(iter(self._label_cache)))
            self._label_cache[key] = cached
        return cached.copy()

    def classify(self, sample: Sample, labels: Sequence[str], embedding: np.ndarray | None = None) -> dict[str, float]:
        """Zero-shot probabilities over the candidate findings (softmax at the calibrated temperature).
        ``embedding``: the sample's embedding when the caller holds it already (the app's cache)."""
        labels = [str(label).strip() for label in labels if str(label).strip()]
        if len(labels) < 2:
            raise InputError("Give at least two different candidate findings to compare.")
        if len(set(labels)) != len(labels):
            raise InputError("The candidate findings contain duplicates.")
        self.route(sample)
        vector = self.embed(sample) if embedding is None else np.asarray(embedding, dtype=np.float32)
        logits = self.config.logit_scale * (self.label_embeddings(labels, sample.modality) @ vector)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        return {label: float(p) for label, p in zip(labels, probs)}

    # ----- persistence ----------------------------------------------------------------------------
    def _base_state(self) -> dict[str, torch.Tensor]:
        base = {f"text.{k}": v for k, v in self.text.base_state_dict().items()}
        for name, tower in self.towers.items():
            base.update({f"towers.{name}.{k}": v for k, v in tower.base_state_dict().items()})
        if self.detector is not None:
            base.update({f"detector.{k}": v for k, v in self.detector.base_state_dict().items()})
        return base

    def round_weights(self, dtype: torch.dtype = torch.float16) -> "M3BindModel":
        """Round every trained floating weight to ``dtype`` precision (kept in float32), so that a model saved
        in ``dtype`` reloads to exactly the same embeddings. Base weights stay as their source has them."""
        base = self._base_state()
        with torch.no_grad():
            for key, tensor in self.state_dict().items():
                if tensor.is_floating_point() and not (key in base and torch.equal(base[key], tensor.cpu())):
                    tensor.copy_(tensor.to(dtype))
        self._fingerprint = None
        self._label_cache.clear()
        return self

    def train(self, mode: bool = True) -> "M3BindModel":
        """Switching modes marks the start or end of training: cached label embeddings may be stale."""
        self._label_cache.clear()
        return super().train(mode)

    def save_pretrained(self, directory: str | Path, card: str | None = None,
                        dtype: torch.dtype | None = None) -> Path:
        """Write config, the weights that differ from the referenced base weights, and a model card.

        ``dtype`` stores floating weights in that precision (see ``round_weights`` for a lossless save).
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        base = self._base_state()
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()
                 if not (k in base and base[k].shape == v.shape and torch.equal(base[k], v.detach().cpu()))}
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "m3bind_format": "1"})
        self.config.save(directory / CONFIG_NAME)
        (directory / CARD_NAME).write_text(card or default_card(self))
        return directory

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, device: str | torch.device | None = "auto") -> "M3BindModel":
        directory = resolve_model_dir(str(name_or_path))
        if not (directory / CONFIG_NAME).is_file() or not (directory / WEIGHTS_NAME).is_file():
            raise InputError(f"{directory} is not an M3Bind model directory (needs {CONFIG_NAME} and {WEIGHTS_NAME}).")
        model = cls(ModelConfig.load(directory / CONFIG_NAME))
        saved = load_file(str(directory / WEIGHTS_NAME))
        missing, unexpected = model.load_state_dict(saved, strict=False)
        base_keys = {f"text.{k}" for k in model.text.base_keys()} | {f"centres.{name}" for name in model.towers}
        for name, tower in model.towers.items():
            base_keys |= {f"towers.{name}.{k}" for k in tower.base_keys()}
        if model.detector is not None:
            base_keys |= {f"detector.{k}" for k in model.detector.base_keys()}
        if unexpected or set(missing) - base_keys:
            raise InputError(f"The weights in {directory} do not match its config "
                             f"(unexpected: {unexpected[:3]}, missing: {sorted(set(missing) - base_keys)[:3]}).")
        return model.to(pick_device(device)).eval()


def colour_share(image: np.ndarray, step: int = 4) -> float:
    """The share of an (H, W, 3) [0, 1] image's pixels whose channels differ by more than 0.1 (every
    ``step``-th row and column: a fixed cost for large images)."""
    pixels = np.asarray(image)[::step, ::step]
    if pixels.ndim != 3 or pixels.shape[-1] < 3:
        return 0.0
    return float((pixels.max(-1) - pixels.min(-1) > 0.1).mean())


def default_card(model: M3BindModel) -> str:
    cfg = model.config
    towers = "\n".join(f"| {m} | {t} | {cfg.towers[t].describe()} |" for m, t in cfg.modality_towers.items())
    return (f"# {cfg.name}\n\nAn M3Bind model: every modality tower and one text encoder in a shared "
            f"{cfg.dim}-d space.\n\nText encoder base: `{cfg.text.source}`.\n\n"
            f"| modality | tower | architecture |\n|---|---|---|\n{towers}\n")


def load_model(name_or_path: str | Path | None = None, device: str | torch.device | None = "auto") -> M3BindModel:
    """A model directory or Hub repo id, or without one the embedded default model (``assets/m3bind-default``,
    trained by ``train/configs/default.yaml``).

    Where that directory is missing (a checkout without its weight files), the untrained default architecture
    (``default_config``) is returned instead, with a warning: its embeddings mean nothing.
    """
    if name_or_path is not None:
        return M3BindModel.from_pretrained(name_or_path, device=device)
    if (DEFAULT_MODEL_DIR / CONFIG_NAME).is_file():
        return M3BindModel.from_pretrained(DEFAULT_MODEL_DIR, device=device)
    warnings.warn("No trained default model in assets/: using an UNTRAINED M3Bind model. "
                  "Its labels and search results are meaningless; train one with train/.", stacklevel=2)
    torch.manual_seed(0)
    return M3BindModel(default_config()).to(pick_device(device)).eval()

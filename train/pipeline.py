"""The whole M3Bind training run from one YAML config: teachers -> stage 1 -> stage 2 -> export.

    python -m train.pipeline --config train/configs/default.yaml

Every stage saves its models (library format) under ``run_dir`` when it completes; a rerun with the
same config loads completed stages instead of training them again, so an interrupted run resumes at
the stage it was in. Runs are deterministic given ``seed``.

Several processes train together with PyTorch DistributedDataParallel when torchrun launches them:

    torchrun --standalone --nproc_per_node 4 -m train.pipeline --config train/configs/default.yaml

Each process then uses its own GPU (nccl), or the CPU (gloo) where CUDA is unavailable; a plain
``python -m`` run trains in one process on the CPU. Batch sizes in the config are per process, so N
processes see N times the batch per step and the contrastive negatives span all of them. Only rank 0
writes checkpoints and the exported model; after every stage the ranks check they hold the same weights.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml

from m3bind import M3BindModel, TextTowerConfig, load_model
from m3bind.config import DetectorConfig, EcgTowerConfig, ImageTowerConfig, tower_config_from_dict
from m3bind.errors import ConfigError

from . import distributed
from .captions import STATUS_CAPTIONS, modality_texts, shared_text_corpus
from .data import load_dataset
from .detector import DetectorPlan, fit_detector
from .stages import (
    ModalityData, StageConfig, TextFeatures, align, bind, copy_trunk, distill, item_embeddings, joint,
    load_modality_data, new_teacher, text_only_model, train_teacher,
)

REPO = Path(__file__).resolve().parents[1]


@dataclass
class ModalityPlan:
    datasets: list[str]
    tower: ImageTowerConfig | EcgTowerConfig
    max_items: int | None = None
    trainable_fraction: float = 1.0  # share of a pretrained trunk's parameter tensors that train
    pair_modalities: list[str] | None = None  # modalities whose pairs this tower learns from (default: its own)
    trunk_from: str | None = None  # a modality listed earlier whose trained teacher trunk this tower starts from
    teacher: dict[str, Any] = field(default_factory=dict)  # this teacher's overrides of the teacher stage config
    align: dict[str, Any] = field(default_factory=dict)  # its overrides of the stage 1 config (e.g. status_captions)


@dataclass
class PipelineConfig:
    name: str
    run_dir: Path
    export_dir: Path
    modalities: dict[str, ModalityPlan]
    dim: int = 256
    seed: int = 0
    data_root: str | None = None
    threads: int | None = None
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    teacher: StageConfig = field(default_factory=StageConfig)
    align: StageConfig = field(default_factory=StageConfig)
    distill: StageConfig = field(default_factory=StageConfig)
    joint: StageConfig = field(default_factory=lambda: StageConfig(steps=0))  # stage 3 (0 steps: no stage 3)
    detector: DetectorPlan | None = None  # the modality detector of plain image files (None: none)
    shared_texts: int = 4000  # size of the shared text corpus of stage 1
    distill_texts: int | None = None  # cap on stage 2 texts per modality (None: all captions + corpus)
    evaluate: bool = True
    export_dtype: str | None = "float16"  # storage precision of the exported model (weights rounded first)
    modality_towers: dict[str, str] = field(default_factory=dict)  # extra modalities served by a trained tower

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "PipelineConfig":
        raw = {**yaml.safe_load(Path(path).read_text()), **{k: v for k, v in overrides.items() if v is not None}}
        modalities = {}
        for name, plan in raw.pop("modalities").items():
            modalities[name] = ModalityPlan(tower=tower_config_from_dict(plan.pop("tower", {})), **plan)
            source = modalities[name].trunk_from
            if source is not None and (source == name or source not in modalities):
                raise ConfigError(f"{name}: trunk_from must name a modality listed before it, not {source!r}.")
        stages = {k: StageConfig(**raw.pop(k, {})) for k in ("teacher", "align", "distill")}
        stages["joint"] = StageConfig(**{"steps": 0, **raw.pop("joint", {})})
        if raw.get("detector") is not None:
            raw["detector"] = DetectorPlan(**raw["detector"])
        return cls(run_dir=REPO / raw.pop("run_dir"), export_dir=REPO / raw.pop("export_dir"),
                   modalities=modalities, text=TextTowerConfig(**raw.pop("text", {})), **stages, **raw)


def _stage_done(directory: Path) -> bool:
    return (directory / "DONE").is_file()


def _save_stage(models: dict[str, M3BindModel], directory: Path, seconds: float) -> None:
    if distributed.is_main():
        for name, model in models.items():
            model.save_pretrained(directory / name)
        (directory / "DONE").write_text(json.dumps({"seconds": round(seconds, 1)}) + "\n")
    distributed.barrier()  # no rank looks for the next checkpoint before this one is complete


def class_prompt_sets(datasets: list[str], modality: str, data_root: Path | None) -> list[list[list[str]]]:
    """Per training dataset with a choice to make (two classes or more): its classes' prompt ensembles."""
    sets = [list(load_dataset(d, "train", data_root).prompts(modality).values()) for d in datasets]
    return [s for s in sets if len(s) > 1]


def _stage_seconds(directory: Path) -> float:
    """How long a stage trained, as recorded when it completed (also when this run only resumed it)."""
    return float(json.loads((directory / "DONE").read_text())["seconds"])


def _load_stage(directory: Path, names: list[str]) -> dict[str, M3BindModel]:
    return {name: load_model(directory / name, device=distributed.device()) for name in names}


class TrainingData:
    """Every modality's training items, decoded once on first use: a resumed run whose remaining stages are all
    done never decodes them. Decoding uses each teacher's tower only to prepare inputs (its config, not its
    weights), so the fresh teachers serve for every stage."""

    def __init__(self, cfg: PipelineConfig, teachers: dict[str, M3BindModel]):
        self.cfg, self.teachers = cfg, teachers
        self._data: dict[str, ModalityData] | None = None

    def __call__(self) -> dict[str, ModalityData]:
        if self._data is None:
            cfg = self.cfg
            self._data = {m: load_modality_data(self.teachers[m], m, plan.datasets, "train", cfg.data_root,
                                                plan.max_items, cfg.seed, plan.pair_modalities)
                          for m, plan in cfg.modalities.items()}
        return self._data


def run_stage(cfg: PipelineConfig, name: str, models: list[str], train: Callable[[], dict[str, M3BindModel]],
              timings: dict[str, float]) -> dict[str, M3BindModel]:
    """Load a completed stage, or train and checkpoint it; its recorded time goes into ``timings`` (for the card).

    A stage's time includes decoding the training data when it is the first to need it.
    """
    directory = cfg.run_dir / name
    if _stage_done(directory):
        trained = _load_stage(directory, models)
    else:
        t0 = time.time()
        trained = train()
        _save_stage(trained, directory, time.time() - t0)
    distributed.check_in_sync(trained, name)
    timings[name] = _stage_seconds(directory)
    return trained


def new_teachers(cfg: PipelineConfig) -> dict[str, M3BindModel]:
    """One untrained CLIP-like model per modality, on this process's device."""
    return {m: new_teacher(m, plan.tower, cfg.dim, cfg.text, cfg.seed + i).to(distributed.device())
            for i, (m, plan) in enumerate(cfg.modalities.items())}


def train_teachers(cfg: PipelineConfig, teachers: dict[str, M3BindModel], data: dict[str, ModalityData],
                   base_features: TextFeatures) -> dict[str, M3BindModel]:
    """Each teacher trained on its own modality's pairs (in place), in the config's order, so that a tower can
    start from the trunk of a teacher trained before it (``trunk_from``)."""
    for i, (m, plan) in enumerate(cfg.modalities.items()):
        if plan.trunk_from:
            copy_trunk(teachers[m], m, teachers[plan.trunk_from], plan.trunk_from)
        train_teacher(teachers[m], data[m], dataclasses.replace(cfg.teacher, **plan.teacher), cfg.seed + i,
                      plan.trainable_fraction, base_features)
    return teachers


def class_prompts(cfg: PipelineConfig, *weights: float) -> dict[str, list[list[list[str]]]] | None:
    """Each modality's class prompt ensembles, when a stage keeps the teachers' class choice (class_weight)."""
    if not any(weights):
        return None
    return {m: class_prompt_sets(plan.datasets, m, cfg.data_root) for m, plan in cfg.modalities.items()}


def train_aligned(cfg: PipelineConfig, teachers: dict[str, M3BindModel], data: dict[str, ModalityData],
                  base_features: TextFeatures) -> dict[str, M3BindModel]:
    """Stage 1 on copies of the teachers (the teachers stay as they were, for the evaluation's comparison)."""
    shared = shared_text_corpus(cfg.data_root, max_per_source=max(1, cfg.shared_texts // 5), seed=cfg.seed)
    prompts = class_prompts(cfg, cfg.align.class_weight,
                            *(plan.align.get("class_weight", 0) for plan in cfg.modalities.values()))
    return align({m: copy.deepcopy(t) for m, t in teachers.items()}, data, shared, cfg.align, cfg.seed,
                 base_features, {m: plan.align for m, plan in cfg.modalities.items()}, prompts)


def distill_texts(cfg: PipelineConfig, data: dict[str, ModalityData]) -> dict[str, list[str]]:
    """Per modality, the texts stage 2 distils on: its captions, its modality's texts and the status captions,
    a seeded sample of ``distill_texts`` of them when the config caps them."""
    rng = np.random.default_rng(cfg.seed)
    texts = {}
    for m in cfg.modalities:
        pool = sorted({t for caps in data[m].captions for t in caps} | set(modality_texts(m, cfg.data_root))
                      | {t for texts in STATUS_CAPTIONS.values() for t in texts})
        if cfg.distill_texts and len(pool) > cfg.distill_texts:
            pool = [pool[i] for i in sorted(rng.choice(len(pool), cfg.distill_texts, replace=False))]
        texts[m] = pool
    return texts


def train_student(cfg: PipelineConfig, aligned: dict[str, M3BindModel], data: dict[str, ModalityData],
                  base_features: TextFeatures) -> M3BindModel:
    """Stage 2: one text encoder distilled from every aligned teacher."""
    texts = distill_texts(cfg, data)
    student = text_only_model(cfg.text, cfg.dim, f"{cfg.name}-student", cfg.seed).to(distributed.device())
    images = ({m: item_embeddings(aligned[m], data[m]) for m in cfg.modalities}
              if cfg.distill.relational_weight or cfg.distill.class_weight else None)
    distill(student, aligned, texts, cfg.distill, cfg.seed, base_features if cfg.align.lora_layers == 0 else None,
            images, class_prompts(cfg, cfg.distill.class_weight))
    return student


def export(cfg: PipelineConfig, bound: M3BindModel, teachers: dict[str, M3BindModel],
           timings: dict[str, float]) -> None:
    """The model directory with its card (and the evaluation against the teachers when the config asks for it),
    written by the main process while the others wait."""
    if distributed.is_main():
        table = ""
        if cfg.evaluate:
            from .evaluate import compare, markdown_table

            results = compare(bound, teachers, data_root=cfg.data_root)
            cfg.export_dir.mkdir(parents=True, exist_ok=True)
            (cfg.export_dir / "evaluation.json").write_text(json.dumps(results, indent=2) + "\n")
            table = markdown_table(results)
            print(table)
        bound.save_pretrained(cfg.export_dir, card=model_card(cfg, timings, table),
                              dtype=getattr(torch, cfg.export_dtype) if cfg.export_dtype else None)
    distributed.barrier()


def run(cfg: PipelineConfig) -> M3BindModel:
    """Every stage in order (each loaded from its checkpoint when done), then the export; the bound model."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    timings: dict[str, float] = {}
    names = list(cfg.modalities)
    fresh = new_teachers(cfg)
    base_features = TextFeatures(next(iter(fresh.values())))  # every teacher starts from the same text base
    data = TrainingData(cfg, fresh)

    teachers = run_stage(cfg, "teachers", names, lambda: train_teachers(cfg, fresh, data(), base_features), timings)
    aligned = run_stage(cfg, "aligned", names, lambda: train_aligned(cfg, teachers, data(), base_features), timings)
    student = run_stage(cfg, "student", ["text"],
                        lambda: {"text": train_student(cfg, aligned, data(), base_features)}, timings)["text"]
    bound = bind(aligned, student, cfg.name, cfg.modality_towers)
    if cfg.joint.steps:
        bound = run_stage(cfg, "joint", ["bound"], lambda: {"bound": joint(
            bound, data(), cfg.joint, cfg.seed, base_features)}, timings)["bound"]
    if cfg.detector:
        image_sets = {m: plan.datasets for m, plan in cfg.modalities.items() if plan.tower.kind == "image"}
        bound = run_stage(cfg, "detector", ["bound"], lambda: {"bound": fit_detector(
            bound, image_sets, cfg.detector, cfg.data_root, cfg.seed)}, timings)["bound"]
    if cfg.export_dtype:
        bound.round_weights(getattr(torch, cfg.export_dtype))
    timings["total"] = sum(timings.values())
    export(cfg, bound, teachers, timings)
    return bound


def model_card(cfg: PipelineConfig, timings: dict[str, float], evaluation: str = "") -> str:
    rows = "\n".join(f"| {m} | {', '.join(p.datasets)} | {p.tower.describe()} |" for m, p in cfg.modalities.items())
    took = ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items())
    held_text = "".join(f" The {m} teacher also keeps its choice among its classes from before the stage (the KL "
                        f"divergence of its zero-shot probabilities, weight {w})." for m, p in cfg.modalities.items()
                        if (w := p.align.get("class_weight", cfg.align.class_weight)))
    joint_text = (f"- Stage 3 ({cfg.joint.steps} steps): every modality's items and captions in one batch, one "
                  "class-aware contrastive loss with the unified text encoder (towers' output heads and the text "
                  "projection adapt), so a finding of one modality is a negative for the others' items and typed "
                  f"findings land among their own modality's items; {cfg.joint.status_captions:.0%} of the captions are "
                  "the shared normal/abnormal ones" + (
                      f", and {cfg.joint.report_captions:.0%} of the others, for chest X-rays, a real IU X-ray report "
                      "(history, findings, impression) of another study with the same status, so that report-like "
                      "text lands among its items" if cfg.joint.report_captions else "") + (
                      f"; {cfg.joint.note_captions:.0%} of the other chest X-ray and CT captions are the clinical note of "
                      "a COVID-19 training patient (covid-chestxray), so that a clinician's free-text note of an "
                      "abnormal chest case lands among abnormal chest images" if cfg.joint.note_captions else "")
                  + ".\n"
                  if cfg.joint.steps else "")
    detector_text = (f"- Modality detector of plain image files: a linear classifier over the frozen ImageNet "
                     f"EfficientNet-Lite0's pooled features at {cfg.detector.image_size} px (colour), fitted on up to "
                     f"{cfg.detector.max_per_dataset} training images per dataset; below "
                     f"{cfg.detector.min_confidence:.0%} confidence the app asks the user to pick. An image whose "
                     f"pixels are largely coloured ({DetectorConfig.colour_share:.0%} or more) gets no grey "
                     "modality (X-ray, CT, MRI, ultrasound). DICOM files keep the modality of their header.\n"
                     if cfg.detector else "")
    return f"""# {cfg.name}

An M3Bind model trained by `python -m train.pipeline` (config `{cfg.name}`): one tower per modality and one
unified text encoder in a shared {cfg.dim}-d space, bound through shared text (teachers, stage 1 alignment,
stage 2 distillation). **A demonstration model, not a clinical device.** It saw small public datasets
(the training splits only) and must not be used for diagnosis.

| modality | training data (train split) | tower |
|---|---|---|
{rows}

Text base: `{cfg.text.source}` (referenced, not copied). Training time on this run's machine: {took}.

## How it was bound
- Teachers: one CLIP-like model per modality (its tower + its own projection of the frozen text base), trained
  with a class-aware contrastive loss on captions written from the labels and the datasets' real free text{
  "".join(f"; {m} batches favour rare classes (item weight: class count ** -{p.teacher['class_balance']})"
          for m, p in cfg.modalities.items() if p.teacher.get("class_balance"))}{
  "".join(f"; the {m} tower starts from the trained {p.trunk_from} teacher's trunk"
          for m, p in cfg.modalities.items() if p.trunk_from)}{
  "".join(f"; the {m} tower's {n} CNNs train one after another (each later one into the first one's text space)"
          for m, p in cfg.modalities.items() if (n := getattr(p.tower, "vision_cfg", {}).get("cnn_members", 1)) > 1)}.
- Stage 1: every teacher keeps its own contrastive loss while the pairwise MSE between the teachers' embeddings
  of a shared batch of real medical text (weight {cfg.align.align_weight}) pulls their text spaces together;
  {"only the towers' output heads adapt" if cfg.align.tower_head_only else "the towers adapt"}. For
  {cfg.align.status_captions:.0%} of the items{"".join(f" ({m}: {p.align['status_captions']:.0%})" for m, p in
  cfg.modalities.items() if "status_captions" in p.align)} the caption is a modality-independent one that says only
  whether the study is normal ("Normal study.", "Abnormal findings.", ...), so that "abnormal" points the same
  way in every tower's part of the space.{held_text}
- Stage 2: one student text encoder reproduces every aligned teacher's text embeddings on that modality's texts{
  f", and how the teacher's images choose among those texts (relational distillation, weight {cfg.distill.relational_weight})"
  if cfg.distill.relational_weight else ""}{
  f", and, with weight {cfg.distill.class_weight}, how they choose among each dataset's class prompt ensembles (what "
  "zero-shot classification reads)" if cfg.distill.class_weight else ""}.
{joint_text}- Each tower's centre (its mean training embedding) is stored: cross-modal image-to-image search centres the
  query with it (`M3BindModel.centre`), which removes the offset that separates modalities.
{detector_text}
## Limits
- Each tower sees its modality at the size in the table (images are fitted into a square and padded); detail
  finer than that is lost (e.g. retinal microaneurysms). {"".join(f"The {m} modality uses the {t} tower. "
  for m, t in cfg.modality_towers.items())}
- What each tower saw is the table's data alone: a few hundred to a few thousand items per modality, from one
  or two collections each (breast ultrasound only as 28-px MedMNIST images; brain MRI only T1/T2 slices of
  tumour patients and controls; CT only axial chest slices, COVID-19 against mostly normal lungs). Figures on
  other hospitals' data will be lower. Probabilities are a softmax over the candidate findings given, not
  calibrated disease risks.
- Cross-modal image-to-image retrieval carries a shared normal/abnormal notion, not specific findings across
  modalities.

## Evaluation (held-out test splits, computed by `train/evaluate.py` at the end of the run)

{evaluation or "Not evaluated in this run."}
"""


def config_from_args(argv: list[str] | None = None) -> PipelineConfig:
    """The config file with the command line's overrides (run and export folders, data, seed)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "train" / "configs" / "default.yaml"))
    parser.add_argument("--run-dir", help="where stage checkpoints go (resumes from it)")
    parser.add_argument("--export-dir", help="where the final model directory goes")
    parser.add_argument("--data-root")
    parser.add_argument("--seed", type=int, help="the config's seed, replaced (e.g. to measure seed-to-seed spread)")
    args = parser.parse_args(argv)
    cfg = PipelineConfig.from_yaml(args.config, data_root=args.data_root, seed=args.seed)
    if args.run_dir:
        cfg.run_dir = Path(args.run_dir)
    if args.export_dir:
        cfg.export_dir = Path(args.export_dir)
    return cfg


def main(argv: list[str] | None = None) -> None:
    cfg = config_from_args(argv)
    distributed.setup()
    try:
        run(cfg)
        if distributed.is_main():
            print(f"model written to {cfg.export_dir}")
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    main()

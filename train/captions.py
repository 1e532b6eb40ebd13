"""The text side of the training data: class concepts, caption templates and the real text corpora.

Captions teach a tower what a finding *looks like in words*, so every class has several clinical
wordings (``Concept.phrases``) put into report-like templates of its modality; the zero-shot prompts
stay those of ``m3bind.modalities`` so training and inference speak the same language.
The corpora (``shared_text_corpus``, ``modality_texts``) are real reports and figure captions from
``<data_root>/text`` for the shared text batches of stage 1 and the distillation texts of stage 2; they
are never captions of evaluation items.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from m3bind.modalities import get_modality

DATA_ENV = "M3BIND_DATA"
MIN_CHARS = 12
MAX_CHARS = 600  # about 128 word pieces: what the text towers keep


def resolve_data_root(data_root: str | os.PathLike | None = None) -> Path:
    """The data folder: the argument, else ``$M3BIND_DATA``, else ``../shared/data`` beside the repository."""
    if data_root is not None:
        return Path(data_root)
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def clean_text(text: object, min_chars: int = MIN_CHARS, max_chars: int = MAX_CHARS) -> str | None:
    """One line of normalised whitespace, cut at a sentence end below ``max_chars``; None if unusable."""
    if text is None or (isinstance(text, float) and np.isnan(text)):
        return None
    s = " ".join(str(text).split())
    if len(s) > max_chars:
        cut = s[:max_chars]
        end = cut.rfind(". ")
        s = cut[:end + 1] if end >= max_chars // 2 else cut[:cut.rfind(" ")].rstrip(",;:")
    if len(s) < min_chars or not re.search(r"[A-Za-z]{3}", s):
        return None
    return s


def unique(texts: Iterable[str | None]) -> list[str]:
    """Drop empties and case/space-insensitive duplicates, keeping the first spelling and the order."""
    seen: set[str] = set()
    out = []
    for t in texts:
        key = t.casefold() if t else ""
        if key and key not in seen:
            seen.add(key)
            out.append(t)
    return out


# --------------------------------------------------------------------------- class concepts and captions

@dataclass(frozen=True)
class Concept:
    """A class: ``name`` is shown and used in zero-shot prompts; ``phrases`` add clinical wordings.
    ``normal`` marks the classes that mean "nothing abnormal" (the notion shared by every modality)."""

    name: str
    phrases: tuple[str, ...] = ()
    normal: bool = False

    @property
    def wordings(self) -> tuple[str, ...]:
        return (self.name, *self.phrases)


# Report-like sentences per modality; the modality's zero-shot prompt templates are used as well.
CAPTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "xray": ("Chest radiograph demonstrating {}.", "Frontal chest x-ray: {}.", "Impression: {}."),
    "ct": ("Axial CT image showing {}.", "CT of the chest: {}.", "Impression: {}."),
    "mri": ("MR image showing {}.", "Impression: {}."),
    "ultrasound": ("Ultrasound image demonstrating {}.", "Sonographic findings: {}.", "Impression: {}."),
    "retina": ("Color fundus photograph with {}.", "Fundus examination: {}.", "Retinal image consistent with {}."),
    "pathology": ("H&E stained section showing {}.", "Histology: {}.", "Microscopic findings consistent with {}."),
    "dermoscopy": ("Dermoscopic image of {}.", "Skin lesion consistent with {}."),
    "ecg": ("12-lead ECG showing {}.", "ECG interpretation: {}.", "Electrocardiogram consistent with {}."),
}


def caption_templates(modality: str) -> tuple[str, ...]:
    return get_modality(modality).prompt_templates + CAPTION_TEMPLATES.get(modality, ())


def concept_captions(concept: Concept, modality: str) -> list[str]:
    """Every wording of the class in every template of the modality (the class name always among them)."""
    return unique(t.format(w) for w in concept.wordings for t in caption_templates(modality))


def statement_captions(findings: list[str], modality: str, n_templates: int = 3) -> list[str]:
    """Captions naming several findings at once (multi-label records)."""
    if not findings:
        return []
    listed = findings[0] if len(findings) == 1 else ", ".join(findings[:-1]) + " and " + findings[-1]
    return [t.format(listed) for t in CAPTION_TEMPLATES[modality][:n_templates]]


# Per-dataset class tables. Keys are the labels as the data stores them.
PNEUMONIAMNIST = (
    Concept("no acute cardiopulmonary abnormality",
            ("normal chest", "clear lungs without focal consolidation", "no evidence of pneumonia",
             "normal study, no abnormality"), normal=True),
    Concept("pneumonia", ("focal consolidation consistent with pneumonia",
                          "airspace opacity suggestive of pneumonia", "pneumonic infiltrate",
                          "abnormal study: pneumonia")),
)
BREASTMNIST = (
    Concept("malignant breast lesion", ("breast cancer", "an irregular hypoechoic mass suspicious for malignancy",
                                        "abnormal study: malignant lesion")),
    Concept("normal or benign breast tissue", ("benign breast lesion", "normal breast parenchyma",
                                               "a circumscribed benign-appearing breast mass",
                                               "normal study, no malignancy"), normal=True),
)
RETINAMNIST = (
    Concept("no diabetic retinopathy", ("a healthy retina", "no signs of diabetic retinopathy",
                                        "normal study, no abnormality"), normal=True),
    Concept("mild diabetic retinopathy", ("mild nonproliferative diabetic retinopathy", "a few microaneurysms", "abnormal study: diabetic retinopathy")),
    Concept("moderate diabetic retinopathy", ("moderate nonproliferative diabetic retinopathy",
                                              "microaneurysms, dot hemorrhages and hard exudates",
                                              "abnormal study: diabetic retinopathy")),
    Concept("severe diabetic retinopathy", ("severe nonproliferative diabetic retinopathy",
                                            "extensive intraretinal hemorrhages and venous beading",
                                            "abnormal study: diabetic retinopathy")),
    Concept("proliferative diabetic retinopathy", ("retinal neovascularization", "neovascularization of the disc",
                                                 "abnormal study: diabetic retinopathy")),
)
LC25000 = {
    "lung_aca": Concept("lung adenocarcinoma", ("adenocarcinoma of the lung with malignant gland formation",
                                                "invasive pulmonary adenocarcinoma", "abnormal study: carcinoma")),
    "lung_n": Concept("benign lung tissue", ("normal lung parenchyma with thin alveolar septa",
                                             "non-neoplastic lung tissue", "normal study, no malignancy"),
                      normal=True),
    "lung_scc": Concept("lung squamous cell carcinoma", ("keratinizing squamous cell carcinoma of the lung",
                                                         "squamous cell carcinoma with keratin pearls",
                                                         "abnormal study: carcinoma")),
    "colon_aca": Concept("colon adenocarcinoma", ("adenocarcinoma of the colon", "malignant colonic glands")),
    "colon_n": Concept("benign colonic tissue", ("normal colonic mucosa", "non-neoplastic colon tissue"), normal=True),
}
# Brain MRI tumour classes (Bhuvaji et al.), keyed by the folder names the data stores.
BRAIN_TUMOR_MRI = {
    "glioma_tumor": Concept("glioma", ("an intra-axial glioma", "a glial tumor of the brain", "abnormal study: tumor")),
    "meningioma_tumor": Concept("meningioma", ("an extra-axial dural-based meningioma", "a meningeal tumor",
                                               "abnormal study: tumor")),
    "pituitary_tumor": Concept("pituitary tumor", ("a pituitary adenoma", "a sellar mass", "abnormal study: tumor")),
    "no_tumor": Concept("no tumor", ("a normal brain", "no intracranial mass", "normal study, no abnormality"),
                        normal=True),
}
# Chest CT slices, COVID-19 against everything else (the non-COVID slices are mostly normal lungs).
COVID_CT = {
    "COVID": Concept("COVID-19 pneumonia", ("ground-glass opacities", "viral pneumonia",
                                            "bilateral peripheral ground-glass opacities and consolidation",
                                            "abnormal study: pneumonia")),
    "NonCOVID": Concept("no COVID-19 pneumonia", ("normal lungs", "clear lungs without ground-glass opacities",
                                                  "normal study, no abnormality"), normal=True),
}
# NIH ChestX-ray8 labels mined from reports, worded as PneumoniaMNIST's classes (the same finding, the same words).
NIH_CXR = {"No_findings": PNEUMONIAMNIST[0], "Pneumonia": PNEUMONIAMNIST[1]}
# IDRiD diabetic retinopathy grades 0-4, worded as RetinaMNIST's grades.
IDRID_GRADES = {str(grade): concept for grade, concept in enumerate(RETINAMNIST)}
# covid-chestxray-dataset findings (the last segment of hierarchical labels such as "Pneumonia/Viral/COVID-19").
COVID_FINDINGS = {
    "covid-19": Concept("COVID-19 pneumonia", ("SARS-CoV-2 pneumonia",
                                               "viral pneumonia with bilateral ground-glass opacities")),
    "sars": Concept("SARS pneumonia", ("severe acute respiratory syndrome pneumonia",)),
    "mers-cov": Concept("MERS pneumonia", ("Middle East respiratory syndrome pneumonia",)),
    "streptococcus": Concept("streptococcal pneumonia", ("Streptococcus pneumoniae pneumonia",
                                                         "bacterial lobar pneumonia")),
    "ards": Concept("acute respiratory distress syndrome", ("ARDS with diffuse bilateral opacities",)),
    "pneumocystis": Concept("Pneumocystis pneumonia", ("Pneumocystis jirovecii pneumonia",)),
    "no finding": Concept("no acute cardiopulmonary abnormality", ("normal chest",), normal=True),
}
# PTB-XL diagnostic superclasses, spelled out as in the ECG modality's default findings.
PTBXL_SUPERCLASSES = {
    "NORM": Concept("normal ECG", ("normal electrocardiogram", "normal study, no abnormality"), normal=True),
    "MI": Concept("myocardial infarction", ("old or acute myocardial infarction", "infarction pattern", "abnormal ECG")),
    "STTC": Concept("ST/T change", ("ST-T abnormality", "ischemic ST-T changes", "abnormal ECG")),
    "CD": Concept("conduction disturbance", ("bundle branch block or atrioventricular block",
                                             "intraventricular conduction delay", "abnormal ECG")),
    "HYP": Concept("hypertrophy", ("ventricular hypertrophy", "atrial or ventricular enlargement", "abnormal ECG")),
}


# Captions that say only whether a study is normal, worded the same for every modality: stage 1 pairs them
# with items of every modality, so "abnormal" points the same way in each tower's part of the shared space
# (what cross-modal image-to-image search relies on).
STATUS_CAPTIONS: dict[bool, tuple[str, ...]] = {
    True: ("Normal study.", "Normal findings.", "Unremarkable study, no disease."),
    False: ("Abnormal study.", "Abnormal findings.", "Disease present, pathological study."),
}


def concept_for(table: dict[str, Concept], key: str, fallback_name: str = "") -> Concept:
    """The table's concept for a label, or a plain one named after it for labels the table lacks."""
    return table.get(key.strip().lower(), table.get(key.strip(), Concept(fallback_name or key.strip().lower())))


# --------------------------------------------------------------------------- real text corpora

def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        return list(csv.DictReader(f))


def _numbered_lines(path: Path) -> list[str]:
    """Caption files with ``<id>\\t<caption>`` lines (ROCO, PathVQA sources); other lines are layout."""
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            head, sep, rest = line.partition("\t")
            if sep and (head.strip().isdigit() or head.startswith("ROCO_")):
                out.append(rest.split("\t")[0])
    return out


def _iu_xray(text_dir: Path) -> list[str]:
    """Findings + impression; sentences with the dataset's "XXXX" anonymisation marks are dropped."""
    path = text_dir / "iu_xray_reports.csv"
    if not path.is_file():
        return []
    out = []
    for row in read_csv(path):
        report = f"{row.get('findings') or ''} {row.get('impression') or ''}"
        sentences = [s for s in re.split(r"(?<=\.)\s+", report) if "XXXX" not in s]
        out.append(clean_text(" ".join(sentences)))
    return unique(out)


# IU X-ray report problems of the lung parenchyma, the findings the X-ray classes' pneumonias share.
PARENCHYMAL_PROBLEMS = frozenset({"opacity", "pneumonia", "consolidation", "infiltrate", "airspace disease",
                                  "pulmonary edema"})


def _iu_reports_by_status(text_dir: Path) -> dict[bool, list[str]]:
    """Whole IU X-ray reports (indication, findings, impression) of normal studies and of studies with a
    parenchymal finding; sentences with the "XXXX" anonymisation marks or spreadsheet debris are dropped, and
    so is a text found under both statuses."""
    path = text_dir / "iu_xray_reports.csv"
    out: dict[bool, list[str | None]] = {True: [], False: []}
    for row in read_csv(path) if path.is_file() else []:
        problems = {p.strip().lower() for p in (row.get("Problems") or "").split(";")}
        normal = problems == {"normal"}
        if normal or problems & PARENCHYMAL_PROBLEMS:
            parts = [(row.get(k) or "").strip().rstrip(".;") for k in ("indication", "findings", "impression")]
            sentences = re.split(r"(?<=[.;])\s+", ". ".join(p for p in parts if p) + ".")
            out[normal].append(clean_text(" ".join(s for s in sentences if s[:1].isalpha() and "XXXX" not in s)))
    both = {t.casefold() for t in unique(out[True])} & {t.casefold() for t in unique(out[False])}
    return {status: [t for t in unique(texts) if t.casefold() not in both] for status, texts in out.items()}


# Real reports of whole studies per modality, keyed by whether the study was normal: stage 3 pairs them with
# that modality's items of the same status, so report-like text (a history, findings) lands among them.
STATUS_REPORT_SOURCES: dict[str, Callable[[Path], dict[bool, list[str]]]] = {"xray": _iu_reports_by_status}


@lru_cache(maxsize=16)
def status_reports(modality: str, data_root: str | None = None) -> dict[bool, tuple[str, ...]]:
    """``STATUS_REPORT_SOURCES``' reports of one modality (empty for a modality without a source)."""
    source = STATUS_REPORT_SOURCES.get(modality)
    found = source(resolve_data_root(data_root) / "text") if source else {}
    return {status: tuple(found.get(status, ())) for status in (True, False)}


def _roco(kind: str) -> Callable[[Path], list[str]]:
    def load(text_dir: Path) -> list[str]:
        files = sorted((text_dir / "roco").glob(f"*_{kind}_captions.txt"))
        return unique(clean_text(c) for f in files for c in _numbered_lines(f))
    return load


def _pathology(text_dir: Path) -> list[str]:
    folder = text_dir / "pathology"
    texts = [c for f in sorted(folder.glob("*.txt")) for c in _numbered_lines(f)]
    if (folder / "patchgastric_captions.csv").is_file():
        texts += [row.get("text", "") for row in read_csv(folder / "patchgastric_captions.csv")]
    return unique(clean_text(t) for t in texts)


def _ptbxl_statements(text_dir: Path) -> list[str]:
    path = text_dir / "ptbxl_scp_statements.csv"
    descriptions = [row.get("description") for row in read_csv(path)] if path.is_file() else []
    return unique(clean_text(t.format(d)) for d in descriptions if d for t in caption_templates("ecg"))


def _odir(text_dir: Path) -> list[str]:
    """Each eye's diagnostic keywords (ODIR-5K separates them with full-width commas) as a fundus caption."""
    path = text_dir / "odir_fundus_keywords.csv"
    if not path.is_file():
        return []
    keyword_sets = unique(
        ", ".join(k.strip() for k in re.split(r"[，,]", row.get(col) or "") if k.strip())
        for row in read_csv(path) for col in ("Left-Diagnostic Keywords", "Right-Diagnostic Keywords"))
    return unique(clean_text(t.format(k)) for k in keyword_sets for t in caption_templates("retina"))


TEXT_SOURCES: dict[str, Callable[[Path], list[str]]] = {
    "iu_xray": _iu_xray,
    "roco_radiology": _roco("radiology"),
    "roco_non_radiology": _roco("non-radiology"),
    "pathology": _pathology,
    "ptbxl_statements": _ptbxl_statements,
    "odir_fundus": _odir,
}

# In-domain text per modality: (source, pattern a text must match, or None for all of the source).
MODALITY_SOURCES: dict[str, tuple[tuple[str, str | None], ...]] = {
    "xray": (("iu_xray", None), ("roco_radiology", r"(?i:x-?ray|radiograph)")),
    "ct": (("roco_radiology", r"\bCT\b|(?i:computed tomograph)"),),
    "mri": (("roco_radiology", r"\bMRI?\b|(?i:magnetic resonance)|\bT[12]-weighted|\bFLAIR\b"),),
    "ultrasound": (("roco_radiology", r"(?i:ultraso|sonograph|doppler)"),),
    "retina": (("odir_fundus", None), ("roco_non_radiology", r"(?i:fundus|retina)")),
    "pathology": (("pathology", None),
                  ("roco_non_radiology", r"(?i:histolog|hematoxylin|H&E|microscop|biopsy|staining)")),
    "dermoscopy": (("roco_non_radiology", r"(?i:dermoscop|dermatoscop|skin lesion|nevus|melanoma)"),),
    "ecg": (("ptbxl_statements", None), ("roco_non_radiology", r"\bECG\b|(?i:electrocardiogra)")),
}


@lru_cache(maxsize=32)
def load_source(name: str, data_root: str | None = None) -> tuple[str, ...]:
    """One named text source, cleaned and deduplicated (empty when its files are absent)."""
    return tuple(TEXT_SOURCES[name](resolve_data_root(data_root) / "text"))


def shared_text_corpus(data_root: str | os.PathLike | None = None, max_per_source: int = 2000,
                       seed: int = 0) -> list[str]:
    """A mixed, shuffled corpus of real medical text: up to ``max_per_source`` texts of each source.

    Capping per source keeps the 16k ROCO radiology captions from drowning ECG and fundus wording.
    """
    rng = np.random.default_rng(seed)
    picked: list[str] = []
    for name in TEXT_SOURCES:
        texts = load_source(name, _key(data_root))
        take = rng.choice(len(texts), size=min(max_per_source, len(texts)), replace=False) if texts else []
        picked += [texts[i] for i in sorted(take)]
    corpus = unique(picked)
    if not corpus:
        raise FileNotFoundError(f"No text corpus found under {resolve_data_root(data_root) / 'text'}.")
    return [corpus[i] for i in rng.permutation(len(corpus))]


def modality_texts(modality: str, data_root: str | os.PathLike | None = None) -> list[str]:
    """Real in-domain text for one modality (reports, captions, statements), in a fixed order."""
    get_modality(modality)  # unknown names fail with the registry's message
    texts: list[str] = []
    for source, pattern in MODALITY_SOURCES.get(modality, ()):
        regex = re.compile(pattern) if pattern else None
        texts += [t for t in load_source(source, _key(data_root)) if regex is None or regex.search(t)]
    return unique(texts)


def _key(data_root: str | os.PathLike | None) -> str:
    return str(resolve_data_root(data_root))

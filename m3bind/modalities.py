"""The modality registry: each modality is declared once, here.

A modality says which reader kind produces its samples, how its images are prepared, which DICOM
Modality codes announce it, how a finding is phrased as text prompts, and which findings the app offers
by default. Adding a modality is one ``register(Modality(...))`` call; a model then needs a tower for it
(``ModelConfig.modality_towers``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import WrongModalityError
from .kinds import input_kind


@dataclass(frozen=True)
class Modality:
    name: str
    title: str
    kind: str  # an input kind of ``m3bind.kinds`` ("image", "ecg"): which reader family and which tower family
    grayscale: bool = False  # images are collapsed to one grey channel (replicated x3) before the tower
    dicom_codes: tuple[str, ...] = ()  # DICOM (0008,0060) Modality values that announce it
    prompt_templates: tuple[str, ...] = ("{}",)
    default_labels: tuple[str, ...] = ()

    def prompts(self, label: str) -> list[str]:
        """The prompt ensemble for one finding (its embeddings are averaged)."""
        return [t.format(label) for t in self.prompt_templates]


_REGISTRY: dict[str, Modality] = {}


def register(modality: Modality) -> Modality:
    """Declare a modality (``ConfigError`` if its kind is not one of ``m3bind.kinds``)."""
    input_kind(modality.kind)
    _REGISTRY[modality.name] = modality
    return modality


def get_modality(name: str) -> Modality:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise WrongModalityError(f"Unknown modality {name!r}. Known modalities: {known}.") from None


def modality_names() -> list[str]:
    return list(_REGISTRY)


def modality_for_dicom_code(code: str) -> Modality | None:
    code = (code or "").strip().upper()
    for modality in _REGISTRY.values():
        if code in modality.dicom_codes:
            return modality
    return None


register(Modality(
    name="xray", title="Chest X-ray", kind="image", grayscale=True,
    dicom_codes=("CR", "DX", "DR", "RG", "PX"),
    prompt_templates=("a chest x-ray showing {}", "chest radiograph: {}", "{} on a chest x-ray", "findings: {}"),
    default_labels=("no acute cardiopulmonary abnormality", "pneumonia", "pleural effusion", "cardiomegaly",
                    "pneumothorax", "pulmonary edema"),
))
register(Modality(
    name="ct", title="CT", kind="image", grayscale=True,
    dicom_codes=("CT",),
    prompt_templates=("a CT scan showing {}", "computed tomography: {}", "{} on CT", "findings: {}"),
    default_labels=("normal lungs", "COVID-19 pneumonia", "ground-glass opacities", "consolidation",
                    "pulmonary nodule"),
))
register(Modality(
    name="mri", title="MRI", kind="image", grayscale=True,
    dicom_codes=("MR",),
    prompt_templates=("an MRI showing {}", "magnetic resonance image: {}", "{} on MRI", "findings: {}"),
    default_labels=("no tumor", "glioma", "meningioma", "pituitary tumor", "infarct", "hemorrhage",
                    "white matter lesions"),
))
register(Modality(
    name="ultrasound", title="Ultrasound", kind="image", grayscale=True,
    dicom_codes=("US", "IVUS"),
    prompt_templates=("an ultrasound image showing {}", "sonography: {}", "{} on ultrasound", "findings: {}"),
    default_labels=("normal tissue", "benign lesion", "malignant lesion", "cyst"),
))
register(Modality(
    name="retina", title="Retina fundus", kind="image",
    dicom_codes=("OP", "OPT", "OPM"),
    prompt_templates=("a fundus photograph showing {}", "retinal image: {}", "{} on fundoscopy", "findings: {}"),
    default_labels=("no diabetic retinopathy", "mild diabetic retinopathy", "moderate diabetic retinopathy",
                    "severe diabetic retinopathy", "proliferative diabetic retinopathy"),
))
register(Modality(
    name="pathology", title="Pathology (H&E)", kind="image",
    dicom_codes=("SM",),
    prompt_templates=("a histopathology image of {}", "H&E stained slide showing {}", "microscopy: {}",
                      "{} tissue"),
    default_labels=("benign tissue", "adenocarcinoma", "squamous cell carcinoma", "inflammation", "necrosis"),
))
# Declared for models that bring a dermoscopy tower; the default model has none (no dermoscopy data here), so
# the app and the API do not offer it with that model.
register(Modality(
    name="dermoscopy", title="Dermoscopy", kind="image",
    dicom_codes=("XC", "DMS"),
    prompt_templates=("a dermoscopy image of {}", "skin lesion: {}", "dermatoscopic image showing {}"),
    default_labels=("benign nevus", "melanoma", "basal cell carcinoma", "seborrheic keratosis"),
))
register(Modality(
    name="ecg", title="12-lead ECG", kind="ecg",
    dicom_codes=("ECG", "HD"),
    prompt_templates=("an ECG showing {}", "electrocardiogram: {}", "12-lead ECG with {}", "ECG report: {}"),
    default_labels=("normal ECG", "myocardial infarction", "ST/T change", "conduction disturbance",
                    "hypertrophy", "atrial fibrillation"),
))

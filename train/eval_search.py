"""What users do with search: typed findings over ONE library that mixes every modality's held-out items.

``search_suite`` scores, over the mixed library of test items (``evaluate``'s balanced subsets):
  * ``queries``: realistic free-text queries (``SEARCH_QUERIES``, written from the datasets' report
    language, some naming the modality and some not). An item is relevant when it is of the query's modality
    and carries one of the query's classes. Per query: precision@10, recall@10 (a relevant item in the top
    10), the share of the top 10 in the query's modality, and landing (the query's embedding is nearest to
    its own modality's item centroid); means over the queries.
  * ``notes``: free-text clinical notes of the covid-chestxray test patients (their own images are left out
    of the library, so a note cannot find its own image); the share of the top 10 that are abnormal chest
    images (X-ray or CT).
Ranking is the plain cosine ranking of the shared space, as the library's default search.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from .eval_sets import item_labels

if TYPE_CHECKING:
    from .eval_sets import Embedder, EvalSet

PNEUMONIAS = ("pneumonia", "COVID-19 pneumonia", "SARS pneumonia", "MERS pneumonia", "streptococcal pneumonia",
              "Pneumocystis pneumonia", "acute respiratory distress syndrome")
DR_GRADES = ("mild diabetic retinopathy", "moderate diabetic retinopathy", "severe diabetic retinopathy",
             "proliferative diabetic retinopathy")
TUMOURS = ("glioma", "meningioma", "pituitary tumor")

# (query, modality, classes that make an item of that modality relevant)
SEARCH_QUERIES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("pneumonia", "xray", PNEUMONIAS),
    ("consolidation in the left lower lobe", "xray", PNEUMONIAS),
    ("chest x-ray with airspace opacity suspicious for pneumonia", "xray", PNEUMONIAS),
    ("frontal chest radiograph: lungs are clear, no acute cardiopulmonary process", "xray",
     ("no acute cardiopulmonary abnormality",)),
    ("bilateral peripheral ground-glass opacities", "ct", ("COVID-19 pneumonia",)),
    ("axial chest CT consistent with COVID-19 pneumonia", "ct", ("COVID-19 pneumonia",)),
    ("normal chest CT without ground-glass opacity", "ct", ("no COVID-19 pneumonia",)),
    ("glioma", "mri", ("glioma",)),
    ("brain MRI with an enhancing extra-axial dural-based mass", "mri", ("meningioma",)),
    ("pituitary macroadenoma", "mri", ("pituitary tumor",)),
    ("intracranial tumor on MRI", "mri", TUMOURS),
    ("normal brain MRI", "mri", ("no tumor",)),
    ("malignant breast mass", "ultrasound", ("malignant breast lesion",)),
    ("irregular hypoechoic breast lesion on sonography", "ultrasound", ("malignant breast lesion",)),
    ("benign-appearing circumscribed breast lesion", "ultrasound", ("normal or benign breast tissue",)),
    ("diabetic retinopathy", "retina", DR_GRADES),
    ("fundus photograph with hemorrhages and hard exudates", "retina", DR_GRADES[1:]),
    ("proliferative diabetic retinopathy with neovascularization", "retina", DR_GRADES[2:]),
    ("normal fundus, no retinopathy", "retina", ("no diabetic retinopathy",)),
    ("adenocarcinoma", "pathology", ("lung adenocarcinoma",)),
    ("squamous cell carcinoma with keratin pearls", "pathology", ("lung squamous cell carcinoma",)),
    ("H&E section of benign lung parenchyma", "pathology", ("benign lung tissue",)),
    ("myocardial infarction", "ecg", ("myocardial infarction",)),
    ("12-lead ECG with left bundle branch block", "ecg", ("conduction disturbance",)),
    ("ST depression and T wave inversion", "ecg", ("ST/T change",)),
    ("left ventricular hypertrophy by voltage criteria", "ecg", ("hypertrophy",)),
    ("normal ECG, sinus rhythm", "ecg", ("normal ECG",)),
)
CHEST = ("xray", "ct")
K = 10


def _top(similarity: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-similarity, axis=1, kind="stable")[:, :k]


def search_suite(embed: "Embedder", library: Sequence["EvalSet"],
                 queries: Sequence[tuple[str, str, tuple[str, ...]]] = SEARCH_QUERIES) -> dict:
    """Free-text queries and clinical notes over the mixed library (see the module docstring)."""
    pairs = [p for s in library for p in s.pairs]
    modality, classes = item_labels(library)
    items = embed(pairs)
    centroids = {m: items[modality == m].mean(0) for m in dict.fromkeys(modality)}
    names = list(centroids)
    covered = [q for q in queries if q[1] in centroids]
    out: dict = {"n_library": len(pairs), "modalities": names}
    if covered:
        q = embed.texts([text for text, _, _ in covered])
        top = _top(q @ items.T, K)
        nearest = np.array(names)[np.argmax(q @ np.stack([centroids[m] for m in names]).T, axis=1)]
        per_query = []
        for row, (text, m, wanted), land in zip(top, covered, nearest):
            relevant = np.array([modality[i] == m and bool(classes[i] & set(wanted)) for i in row])
            per_query.append({"query": text, "modality": m, "p@10": float(relevant.mean()),
                              "r@10": float(relevant.any()), "modality@10": float((modality[row] == m).mean()),
                              "landing": bool(land == m), "nearest_modality": str(land)})
        out["queries"] = {"n": len(per_query), **{key: float(np.mean([r[key] for r in per_query]))
                                                  for key in ("p@10", "r@10", "modality@10", "landing")},
                          "per_query": per_query}
    out["notes"] = _clinical_notes(embed, library, pairs, items, modality, classes)
    return out


def _clinical_notes(embed: "Embedder", library: Sequence["EvalSet"], pairs: list, items: np.ndarray,
                    modality: np.ndarray, classes: list[set[str]]) -> dict:
    """Clinical notes of abnormal chest cases (covid-chestxray) against the rest of the mixed library."""
    notes = list(dict.fromkeys((p.report, p.group) for s in library if s.dataset == "covid_cxr"
                               for p in s.pairs if p.report))
    if not notes:
        return {"n": 0}
    normal = {c for s in library for c in s.normal_classes}
    abnormal_chest = np.array([m in CHEST and bool(c) and not c <= normal for m, c in zip(modality, classes)])
    groups = np.array([p.group for p in pairs])
    shares = []
    for vector, (_, group) in zip(embed.texts([n for n, _ in notes]), notes):
        similarity = items @ vector
        similarity[groups == group] = -np.inf  # the note's own patient's images are not searched
        shares.append(float(abnormal_chest[_top(similarity[None], K)[0]].mean()))
    return {"n": len(notes), "abnormal_chest@10": float(np.mean(shares)),
            "chance": float(abnormal_chest.mean())}


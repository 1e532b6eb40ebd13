"""The evaluation's results as the model card's markdown tables: one function per suite, the bound model's
figures with its counterparts' (and the unbound cross-modal baseline) beside them where they were run."""

from __future__ import annotations

import math
from typing import Any, Sequence

from .eval_sets import CORE_CROSS_MODAL
from .suites import FEW_SHOT_METHODS


def markdown_table(results: dict) -> str:
    """Markdown tables of ``evaluate`` results, or of ``compare`` results with the counterparts beside."""
    bound = results.get("bound", results)
    counterparts = results.get("counterparts", {})
    named = ", ".join(f"{m} = `{r['model']['name']}`" for m, r in counterparts.items())
    lines = [f"Model `{bound['model']['name']}`, split `{bound['split']}`"
             + (f"; counterparts: {named}" if counterparts else "") + "."]
    lines += _zero_shot_lines(bound, counterparts)
    lines += _few_shot_lines(bound, counterparts)
    lines += _retrieval_lines(bound, counterparts)
    lines += _cross_modal_lines(bound, results.get("unbound_cross_modal", {}))
    lines += _search_lines(bound)
    return "\n".join(lines) + "\n"


def _zero_shot_lines(bound: dict, counterparts: dict) -> list[str]:
    if "zero_shot" not in bound:
        return []
    cols = _columns(counterparts)
    lines = ["", "### Zero-shot classification (prompt ensembles; AUC with its 95% bootstrap interval over items)", "",
             _row(["dataset", "modality", "n", *[f"AUC {c}" for c in cols], *[f"ACC {c}" for c in cols]]),
             _row(["---"] * (3 + 2 * len(cols)))]
    for key, r in bound["zero_shot"].items():
        d, m = key.split("/")
        aucs = _beside(r, counterparts, m, "zero_shot", key)
        accs = _beside(r.get("accuracy"), counterparts, m, "zero_shot", key, "accuracy")
        lines.append(_row([d, m, r["n"], *map(_fmt_ci, aucs), *map(_fmt, accs)]))
        if "binary" in r:
            views = _beside(r["binary"], counterparts, m, "zero_shot", key, "binary")
            lines.append(_row([f"{d}: {r['binary']['name']}", m, r["n"], *map(_fmt_ci, views), *["–"] * len(cols)]))
    return lines


def _few_shot_lines(bound: dict, counterparts: dict) -> list[str]:
    if "few_shot" not in bound:
        return []
    cols = _columns(counterparts)
    lines = ["", f"### Few-shot (k per class from train; mean ± std over {len(bound['config']['seeds'])} seeds)", "",
             _row(["dataset", "method", "k", *[f"AUC {c}" for c in cols], *[f"ACC {c}" for c in cols]]),
             _row(["---"] * (3 + 2 * len(cols)))]
    for key, r in bound["few_shot"].items():
        m = key.split("/")[1]
        for method in FEW_SHOT_METHODS:
            for k, stats in r.get(method, {}).items():
                runs = _beside(stats, counterparts, m, "few_shot", key, method, k)
                lines.append(_row([key, method, k, *[_fmt_ms(s, "auc") for s in runs],
                                   *[_fmt_ms(s, "accuracy") for s in runs]]))
    return lines


def _retrieval_lines(bound: dict, counterparts: dict) -> list[str]:
    if "retrieval" not in bound:
        return []
    cols = _columns(counterparts)
    ks = bound["config"]["recall_at"]
    lines = ["", "### Text-to-image retrieval (Recall@K, mean over class prompt queries; relevant: an item of the "
                 "prompt's modality and class, from any dataset)", "",
             _row(["library", "queries", *[f"R@{k} {c}" for k in ks for c in cols]]),
             _row(["---"] * (2 + len(ks) * len(cols)))]
    everything = bound["retrieval"]["all"]  # counterparts encode one modality each: no library of all modalities
    for name, r in (("all modalities", everything),
                    ("all modalities, only the prompt's own dataset relevant", everything.get("same_dataset"))):
        if r:
            lines.append(_row([name, r.get("n_queries"),
                               *[v for k in ks for v in [_fmt(r.get(f"R@{k}"))] + ["–"] * (len(cols) - 1)]]))
    for m, r in bound["retrieval"].get("per_modality", {}).items():
        runs = _beside(r, counterparts, m, "retrieval", "per_modality", m)
        lines.append(_row([m, r.get("n_queries"), *[_fmt((run or {}).get(f"R@{k}")) for k in ks for run in runs]]))
    return lines


def _cross_modal_lines(bound: dict, unbound: dict) -> list[str]:
    if "cross_modal" not in bound:
        return []
    cm, k = bound["cross_modal"], bound["config"]["precision_at"]
    ucols = ["bound"] + (["unbound"] if unbound else [])
    lines = ["", "### Cross-modal image-to-image retrieval (same normal/abnormal status as the query; means balanced "
             "over normal and abnormal queries; queries centred by their modality's mean; the core mean with its 95% "
             "bootstrap interval over items)", "",
             _row(["query -> library", *[f"AUC {c}" for c in ucols], *[f"P@{k} {c}" for c in ucols], f"chance P@{k}"]),
             _row(["---"] * (2 + 2 * len(ucols)))]
    mean_row = "**mean**"
    rows = list(cm["pairs"].items()) + [(mean_row, cm["mean"])]
    fair = cm.get("mean_on_counterpart_pairs")
    if fair and 0 < fair["n_pairs"] != cm["mean"]["n_pairs"]:  # compare means over equal pairs
        mean_row = "**mean over the pairs with counterparts**"
        rows.append((mean_row, fair))
    core_row, raw_row = f"**mean over {', '.join(CORE_CROSS_MODAL)}**", "mean, uncentred queries"
    for row, key in ((core_row, "core_mean"), (raw_row, "raw_mean")):
        if (cm.get(key) or {}).get("n_pairs"):
            rows.append((row, cm[key]))
    means = {mean_row: unbound.get("mean"), raw_row: unbound.get("raw_mean"), core_row: unbound.get("core_mean")}
    for pair, r in rows:
        u = (means[pair] if pair in means else unbound.get("pairs", {}).get(pair)) or {}
        lines.append(_row([pair, _fmt_ci(r), *([_fmt_ci(u)] if unbound else []),
                           _fmt(r.get(f"p@{k}")), *([_fmt(u.get(f"p@{k}"))] if unbound else []),
                           _fmt(r.get(f"chance_p@{k}"))]))
    return lines


def _search_lines(bound: dict) -> list[str]:
    """The mixed-library search and the modality detector, bound model only (counterparts cannot do either)."""
    lines = []
    search = bound.get("search", {})
    if search.get("queries"):
        q, notes = search["queries"], search.get("notes", {})
        lines += ["", f"### Search over one library of every modality ({search['n_library']} test items; plain "
                  "cosine ranking)", "", _row(["what", "n", "P@10", "R@10", "right modality in top 10", "landing"]),
                  _row(["---"] * 6),
                  _row(["free-text queries (`train/eval_search.py`)", q["n"], _fmt(q["p@10"]), _fmt(q["r@10"]),
                        _fmt(q["modality@10"]), _fmt(q["landing"])])]
        if notes.get("n"):
            lines.append(_row(["covid-chestxray clinical notes: abnormal chest images in top 10", notes["n"],
                               _fmt(notes["abnormal_chest@10"]), "–", f"chance {_fmt(notes['chance'])}", "–"]))
    if bound.get("detection"):
        d = bound["detection"]
        per = ", ".join(f"{m} {v:.3f}" for m, v in d["per_modality"].items())
        lines += ["", f"### Modality detection of plain image files: {d['accuracy']:.3f} right over {d['n']} test "
                  f"images ({per})"]
    return lines


def _columns(counterparts: dict) -> list[str]:
    return ["bound"] + (["counterpart"] if counterparts else [])


def _beside(mine: Any, counterparts: dict, modality: str, *path: str) -> list[Any]:
    """The bound model's value, then (when there are counterparts) the one at ``path`` in ``modality``'s
    counterpart's results (None where that counterpart has none)."""
    if not counterparts:
        return [mine]
    node = counterparts.get(modality)
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    return [mine, node]


def _row(cells: Sequence) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _fmt(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _fmt_ci(result: dict | None) -> str:
    """An AUC with its interval, e.g. "0.895 (0.84–0.94)"."""
    result = result or {}
    ci = result.get("auc_ci95")
    return _fmt(result.get("auc")) + (f" ({ci[0]:.2f}–{ci[1]:.2f})" if ci else "")


def _fmt_ms(stats: dict | None, key: str) -> str:
    if not stats or stats.get(f"{key}_mean") is None:
        return "–"
    return f"{stats[f'{key}_mean']:.3f} ± {stats[f'{key}_std']:.3f}"

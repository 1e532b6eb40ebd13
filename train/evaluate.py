"""Evaluation of the paper's tasks on held-out test splits, for the bound model and its counterparts.

    python -m train.evaluate --model assets/m3bind-default --teachers runs/default/teachers/*/ --out eval.json

Where each part lives: the held-out sets and the embedding cache in ``train.eval_sets``, the metrics in
``train.metrics``, the tasks (what each scores and how) in ``train.suites`` and ``train.eval_search``, the
markdown tables in ``train.report``; this module runs the suites over a model (``evaluate``), beside its
counterparts (``compare``), and from the command line.

Only ``split`` items are scored (``test`` by default; ``val`` serves choices elsewhere); seeds are fixed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from m3bind import M3BindModel, load_model

from .detector import detector_accuracy
from .eval_search import search_suite
from .eval_sets import EVAL_SETS, NORMAL_CLASS, Embedder, EvalSet, load_eval_set
from .metrics import pair_mean
from .report import markdown_table
from .suites import FULL, QUICK, SUITES, EvalConfig, cross_modal, cross_modal_sets, few_shot, retrieval, zero_shot

log = logging.getLogger(__name__)


def evaluate(model: M3BindModel, suites: Sequence[str] = SUITES, data_root: str | Path | None = None,
             split: str = "test", config: EvalConfig = FULL, modalities: Sequence[str] | None = None,
             embedder: Embedder | None = None) -> dict:
    """Every task of ``suites`` on the ``split`` items of each dataset whose modality the model encodes.

    ``modalities`` narrows the sets (a counterpart is evaluated on its own modality only).
    """
    unknown = set(suites) - set(SUITES)
    if unknown:
        raise ValueError(f"Unknown suite(s) {sorted(unknown)}; suites are {', '.join(SUITES)}.")
    if split == "train":
        raise ValueError("Evaluating on the train split would score items the model was fitted on.")
    covered = [m for m in model.modalities if modalities is None or m in modalities]
    embed = embedder or Embedder(model, config.batch_size)
    tests = {f"{d}/{m}": load_eval_set(d, m, split, data_root) for d, m in EVAL_SETS if m in covered}
    tests = {key: s for key, s in tests.items() if s.pairs}
    library = {key: s.subset(config.max_library, config.subsample_seed) for key, s in tests.items()}
    results: dict = {"model": _model_info(model), "split": split, "config": asdict(config),
                     "sets": {key: {"n": len(s.pairs), "n_library": len(library[key].pairs)}
                              for key, s in tests.items()}}
    started = time.perf_counter()
    for suite in SUITES:
        if suite in suites:
            found = _run_suite(suite, model, embed, tests, library, covered, split, data_root, config)
            if found is not None:
                results[suite] = found
            log.info("%s done (%.0f s)", suite.replace("_", "-"), time.perf_counter() - started)
    return _json_safe(results)


def _run_suite(suite: str, model: M3BindModel, embed: Embedder, tests: dict[str, EvalSet],
               library: dict[str, EvalSet], covered: Sequence[str], split: str, data_root: str | Path | None,
               config: EvalConfig) -> dict | None:
    """One suite's results (None where it does not apply: one modality only, or no detector)."""
    if suite == "zero_shot":
        return {key: zero_shot(embed, s.subset(config.max_test, config.subsample_seed)) for key, s in tests.items()}
    if suite == "few_shot":
        return {key: few_shot(embed, load_eval_set(s.dataset, s.modality, "train", data_root),
                              s.subset(config.max_test, config.subsample_seed), config) for key, s in tests.items()}
    sets = list(library.values())
    if suite == "retrieval":
        return {"all": retrieval(embed, sets, config.recall_at),
                "per_modality": {m: retrieval(embed, [s for s in sets if s.modality == m], config.recall_at)
                                 for m in covered if any(s.modality == m for s in sets)}}
    if suite == "cross_modal":
        cm_sets = cross_modal_sets(library, covered)
        return cross_modal({m: embed for m in cm_sets}, cm_sets, config.precision_at)
    if suite == "search":
        return search_suite(embed, sets) if len({s.modality for s in sets}) > 1 else None
    return _detection(model, split, data_root)


def _detection(model: M3BindModel, split: str, data_root: str | Path | None) -> dict | None:
    """The modality detector's accuracy on the image sets of the modalities it tells apart (None without one)."""
    if model.detector is None:
        return None
    image_sets: dict[str, list[str]] = {}
    for d, m in EVAL_SETS:
        if m in model.config.detector.modalities:
            image_sets.setdefault(m, []).append(d)
    return detector_accuracy(model, image_sets, split, data_root)


def compare(bound: M3BindModel, teachers: dict[str, M3BindModel], suites: Sequence[str] = SUITES,
            data_root: str | Path | None = None, split: str = "test", config: EvalConfig = FULL) -> dict:
    """The bound model beside each modality's own model (its counterpart), on the same items.

    Cross-modal retrieval of the counterparts pairs two unrelated spaces: counterpart A embeds A's items,
    counterpart B embeds B's items (the unbound baseline).
    """
    results = {"bound": evaluate(bound, suites, data_root, split, config), "counterparts": {}}
    embedders: dict[int, Embedder] = {}
    for modality, teacher in teachers.items():
        if modality not in teacher.modalities:
            raise ValueError(f"The counterpart given for {modality!r} encodes only {teacher.modalities}.")
        embed = embedders.setdefault(id(teacher), Embedder(teacher, config.batch_size))
        own = [s for s in SUITES if s in suites and s not in ("cross_modal", "search", "detection")]
        results["counterparts"][modality] = evaluate(teacher, own, data_root, split, config, [modality], embed)
    if "cross_modal" in suites:
        library = {f"{d}/{m}": load_eval_set(d, m, split, data_root).subset(config.max_library, config.subsample_seed)
                   for d, m in EVAL_SETS if m in teachers and m in NORMAL_CLASS}
        cm_sets = cross_modal_sets(library, list(teachers))
        unbound = cross_modal({m: embedders[id(teachers[m])] for m in cm_sets}, cm_sets, config.precision_at)
        results["unbound_cross_modal"] = unbound
        if "cross_modal" in results["bound"]:  # the bound model's mean over the same pairs, for a fair row
            results["bound"]["cross_modal"]["mean_on_counterpart_pairs"] = pair_mean(
                results["bound"]["cross_modal"]["pairs"], unbound["pairs"])
    return _json_safe(results)


def _model_info(model: M3BindModel) -> dict:
    return {"name": model.config.name, "fingerprint": model.fingerprint, "modalities": model.modalities,
            "dim": model.dim}


def _json_safe(node: Any) -> Any:
    """Plain JSON: NaN becomes null, numpy scalars become Python numbers, tuples become lists."""
    if isinstance(node, dict):
        return {str(k): _json_safe(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_json_safe(v) for v in node]
    if isinstance(node, (np.floating, float)):
        return None if math.isnan(node) else float(node)
    if isinstance(node, np.integer):
        return int(node)
    return node


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m train.evaluate``: print the tables, optionally write the results as JSON."""
    parser = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model directory (default: the embedded default model)")
    parser.add_argument("--teachers", nargs="*", default=[], metavar="DIR",
                        help="counterpart model directories; each serves the modalities it encodes")
    parser.add_argument("--data-root", help="data folder (default: $M3BIND_DATA or ../shared/data)")
    parser.add_argument("--split", default="test", choices=("test", "val"))
    parser.add_argument("--suites", nargs="*", default=list(SUITES), choices=SUITES)
    parser.add_argument("--quick", action="store_true", help="small subsets, fewer shots and seeds (CI)")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    config = QUICK if args.quick else FULL
    bound = load_model(args.model, device=args.device)
    teachers: dict[str, M3BindModel] = {}
    for directory in args.teachers:
        teacher = load_model(directory, device=args.device)
        for modality in teacher.modalities:
            if modality in teachers:
                parser.error(f"two counterparts encode {modality!r}")
            teachers[modality] = teacher
    if teachers:
        results = compare(bound, teachers, args.suites, args.data_root, args.split, config)
    else:
        results = evaluate(bound, args.suites, args.data_root, args.split, config)
    print(markdown_table(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

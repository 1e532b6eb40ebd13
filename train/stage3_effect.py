"""What stage 3 (the joint space) changes, on the validation splits: the bound model before it (the aligned
towers with the student text encoder, as ``bind`` assembles them) beside the model after it.

    python -m train.stage3_effect --run-dir runs/default
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from m3bind import load_model

from .evaluate import evaluate
from .pipeline import REPO, PipelineConfig
from .report import markdown_table
from .stages import bind
from .suites import EvalConfig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "train" / "configs" / "default.yaml"))
    parser.add_argument("--run-dir", default=str(REPO / "runs" / "default"))
    parser.add_argument("--suites", nargs="*", default=["zero_shot", "cross_modal", "retrieval", "search"])
    parser.add_argument("--out", help="write both results as JSON here")
    args = parser.parse_args(argv)
    cfg, run = PipelineConfig.from_yaml(args.config), Path(args.run_dir)
    aligned = {m: load_model(run / "aligned" / m, device="cpu") for m in cfg.modalities}
    models = {"before stage 3": bind(aligned, load_model(run / "student" / "text", device="cpu"), cfg.name,
                                     cfg.modality_towers),
              "after stage 3": load_model(run / "joint" / "bound", device="cpu")}
    results = {}
    for name, model in models.items():
        results[name] = evaluate(model, args.suites, cfg.data_root, "val", EvalConfig(max_library=200))
        print(f"## {name}\n\n{markdown_table(results[name])}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()

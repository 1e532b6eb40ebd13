"""Throughput of batch embedding from files (``m3bind.batch.embed_files``) against the bare encoder on
already-decoded, already-preprocessed tensors. The ratio says how much decoding costs the pipeline
(target: at least 80 %). On the CPU embed_files encodes whole batches side by side in one-thread lanes
(``m3bind.batch.encoder_lanes``), which at the towers' small inputs beats one batch on all threads;
"bare, in lanes" is the bare encoder run that way, and "vs lanes" what decoding alone costs.

Inputs, written to a temporary folder at run time from ../shared/data (never into the repository):
  * 28-px PNGs: PneumoniaMNIST images;
  * 512-px JPEGs: the covid-chestxray images, repeated (as links) to reach ``--n`` files.

    python bench/bench_embed.py                                   # default model, CPU, 2 threads
    python bench/bench_embed.py --device cuda --arch vitb16       # ViT-B/16 towers, bf16 autocast
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import m3bind  # noqa: E402
from m3bind.batch import collect_inputs, default_workers, embed_files, encoder_lanes  # noqa: E402

DATA = Path(os.environ.get("M3BIND_DATA", REPO.parent / "shared" / "data"))
VIT_B16 = {"layers": 12, "width": 768, "patch_size": 16, "head_width": 64}


def build_model(arch: str, device: str) -> m3bind.M3BindModel:
    if arch == "default":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the untrained-default warning: throughput does not care
            return m3bind.load_model(device=device)
    config = m3bind.default_config()
    config.name = "vit-b16"
    tower = m3bind.ImageTowerConfig(source=None, vision_cfg=dict(VIT_B16), image_size=224)
    config.towers = {m: tower for m in config.towers if config.towers[m].kind == "image"} | {
        "ecg": config.towers["ecg"]}
    torch.manual_seed(0)
    return m3bind.M3BindModel(config).to(device).eval()


def write_pngs(folder: Path, n: int) -> Path:
    images = np.load(DATA / "medmnist" / "pneumoniamnist.npz")["train_images"][:n]
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"pneumonia_{i:05d}.png")
    return folder


def link_jpegs(folder: Path, n: int) -> Path:
    sources = sorted((DATA / "covid_cxr" / "images").iterdir())
    folder.mkdir()
    for i in range(n):
        os.symlink(sources[i % len(sources)], folder / f"{i:05d}_{sources[i % len(sources)].name}")
    return folder


def decoded(model: m3bind.M3BindModel, folder: Path) -> dict[str, torch.Tensor]:
    """Every file decoded and preprocessed once, stacked per modality, on the model's device."""
    by_modality: dict[str, list[torch.Tensor]] = {}
    for record in collect_inputs(folder)[0]:
        sample = m3bind.load_input(record[0])
        by_modality.setdefault(sample.modality, []).append(model.preprocess(sample))
    return {m: torch.stack(ts).to(model.device) for m, ts in by_modality.items()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_encoder(model: m3bind.M3BindModel, tensors: dict[str, torch.Tensor], batch_size: int) -> int:
    with torch.inference_mode():
        for modality, x in tensors.items():
            for start in range(0, len(x), batch_size):
                model.encode(modality, x[start:start + batch_size]).float().cpu()
    return sum(len(x) for x in tensors.values())


def bare_lanes(model: m3bind.M3BindModel, tensors: dict[str, torch.Tensor], batch_size: int, workers: int) -> int:
    """The bare encoder as embed_files runs it: whole batches side by side in its encoder lanes."""
    from concurrent.futures import ThreadPoolExecutor

    from m3bind.batch import _encode, _torch_threads

    lanes, threads = encoder_lanes(model.device, workers)
    amp = {"device_type": model.device.type, "enabled": torch.is_autocast_enabled(model.device.type),
           "dtype": torch.get_autocast_dtype(model.device.type)}
    batches = [(m, x[s:s + batch_size]) for m, x in tensors.items() for s in range(0, len(x), batch_size)]
    with _torch_threads(threads), ThreadPoolExecutor(lanes) as pool:
        list(pool.map(lambda batch: _encode(model, *batch, amp), batches))
    return sum(len(x) for x in tensors.values())


def from_files(model: m3bind.M3BindModel, folder: Path, batch_size: int, workers: int | None) -> int:
    result = embed_files(model, folder, batch_size=batch_size, num_workers=workers, progress=False)
    assert not result.refused, result.refused[:3]
    return len(result.items)


def throughputs(runs: list[Callable[[], int]], device: torch.device, repeats: int) -> list[float]:
    """Median images/s of each run, timed in alternation (so drifting clocks affect all alike), after
    one warm-up of each."""
    for run in runs:
        run()
    rates: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for run, out in zip(runs, rates):
            sync(device)
            start = time.perf_counter()
            n = run()
            sync(device)
            out.append(n / (time.perf_counter() - start))
    return [statistics.median(r) for r in rates]


def machine_info(device: torch.device, workers: int) -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lanes, threads = encoder_lanes(device, workers)
    lines = [f"python {platform.python_version()}, torch {torch.__version__}, {platform.machine()}, "
             f"{platform.processor() or platform.platform()}",
             f"cores available: {cores}, torch threads: {torch.get_num_threads()} (bare encoder); from files: "
             f"{workers} decoding workers, {lanes} encoder lanes x {threads} threads"]
    if device.type == "cuda":
        lines.append(f"GPU: {torch.cuda.get_device_name(device)}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arch", choices=("default", "vitb16"), default="default",
                        help="the default model (EfficientNet-Lite0 towers) or ViT-B/16 image towers")
    parser.add_argument("--n", type=int, default=256, help="files per input kind")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the encoder (CPU)")
    parser.add_argument("--workers", type=int, default=None, help="decoding workers (default: embed_files' choice)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build_model(args.arch, args.device)
    workers = default_workers(args.n, args.batch_size, device) if args.workers is None else args.workers
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    print(machine_info(device, workers))
    print(f"model: {model.config.name} ({args.arch}), device {device}, batch {args.batch_size}, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'float32'}, median of {args.repeats} runs\n")
    print(f"{'input':<14} {'files':>6} {'bare encoder':>14} {'bare, in lanes':>15} {'from files':>12} {'ratio':>7} "
          f"{'vs lanes':>9}")
    with tempfile.TemporaryDirectory(prefix="m3bind-bench-") as tmp, amp:
        for name, folder in (("28-px PNG", write_pngs(Path(tmp) / "png", args.n)),
                             ("512-px JPEG", link_jpegs(Path(tmp) / "jpeg", args.n))):
            tensors = decoded(model, folder)
            bare, lanes, files = throughputs([lambda: bare_encoder(model, tensors, args.batch_size),
                                              lambda: bare_lanes(model, tensors, args.batch_size, workers),
                                              lambda: from_files(model, folder, args.batch_size, args.workers)],
                                             device, args.repeats)
            print(f"{name:<14} {args.n:>6} {bare:>10.1f} im/s {lanes:>10.1f} im/s {files:>8.1f} im/s "
                  f"{files / bare:>6.0%} {files / lanes:>8.0%}")
            del tensors


if __name__ == "__main__":
    main()

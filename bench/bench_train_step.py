"""Throughput of one stage-1 training step on published-format teachers (``train.published.align.AlignStep``).

The teacher is a BiomedCLIP-format open_clip checkpoint (timm ViT + HF BERT, MLP text projection) with random
weights, written to a temporary hub cache by ``train.published.fixtures`` and loaded offline exactly as a
published one would be; LoRA (r=8) goes on q/v of both towers. Default shapes are the paper's scale: ViT-B/16
at 224 px + BERT-base at context 256, batch 256. Inputs are random tensors already on the device: this
measures the step (forward, backward, optimiser), not data loading.

The step runs bf16 autocast and fused AdamW on CUDA, the towers' SDPA attention, optionally ``torch.compile``
(``--compile``) and gradient checkpointing (``--checkpointing``); nothing in it reads a device value, and on
CUDA the script counts the host-device synchronisations of one step (``torch.cuda.set_sync_debug_mode``).
It prints one line: pairs/s, peak memory and, on a GPU, the share of the card's dense bf16 peak (FLOPs of one
step counted by ``torch.utils.flop_counter``).

    python bench/bench_train_step.py --tiny                # CPU, toy shapes (CI)
    python bench/bench_train_step.py --compile             # GPU, paper scale
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from train.published.align import AlignConfig, AlignStep, TeacherBatch  # noqa: E402
from train.published.fixtures import (  # noqa: E402
    bert_folder, hub_cache_repo, offline_hub, open_clip_bert_folder,
)
from train.published.teachers import TeacherPlan, load_teacher  # noqa: E402

# dense bf16 tensor-core peaks (no sparsity), FLOP/s, by a substring of the device name
BF16_PEAK = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L4": 121e12}


def build_teacher(root: Path, tiny: bool, context: int, dim: int, device: torch.device):
    """A BiomedCLIP-format teacher (toy or ViT-B/16 + BERT-base) from a hub cache written under ``root``."""
    bert = (bert_folder(root / "bert", hidden=32, layers=2, heads=2) if tiny else
            bert_folder(root / "bert", hidden=768, layers=12, heads=12, intermediate=3072, vocab_size=30522))
    hub_cache_repo(root / "hub", "bench/bert", bert)
    with offline_hub(root / "hub"):
        folder = open_clip_bert_folder(root / "clip", "bench/bert", embed_dim=64 if tiny else 512,
                                       context_length=context, vision="test_vit" if tiny else "vit_base_patch16_224",
                                       image_size=160 if tiny else 224)
        hub_cache_repo(root / "hub", "bench/biomedclip-format", folder)
        model = load_teacher("xray", TeacherPlan("open_clip", "hf-hub:bench/biomedclip-format", []), dim)
    return model.to(device)


def make_batch(model, batch: int, context: int, shared: int, device: torch.device) -> TeacherBatch:
    size = model.towers["xray"].cfg.image_size
    vocab = model.text.model.text.transformer.config.vocab_size
    tokens = lambda n: {"input_ids": torch.randint(5, vocab, (n, context), device=device)}  # noqa: E731
    return TeacherBatch(torch.rand(batch, 3, size, size, device=device), tokens(batch),
                        torch.eye(batch, device=device), tokens(shared) if shared else None)


def step_flops(step: AlignStep, batches: dict) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    compiled, step.loss = step.loss, step._loss  # counted eagerly: the compiled graph does the same work
    try:
        with FlopCounterMode(display=False) as counter:
            step(batches)
    finally:
        step.loss = compiled
    return float(counter.get_total_flops())


def count_syncs(step: AlignStep, batches: dict) -> int:
    """How many operations of one step wait for the device (CUDA only)."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step(batches)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="toy shapes (test ViT + 2-layer BERT), for the CPU")
    parser.add_argument("--batch", type=int, help="pairs per step (default 256; --tiny 8)")
    parser.add_argument("--context", type=int, help="text tokens (default 256; --tiny 32)")
    parser.add_argument("--shared", type=int, default=0, help="shared alignment texts per step")
    parser.add_argument("--steps", type=int, help="timed steps (default 20; --tiny 3)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    batch, context = args.batch or (8 if args.tiny else 256), args.context or (32 if args.tiny else 256)
    steps = args.steps or (3 if args.tiny else 20)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    with tempfile.TemporaryDirectory() as tmp:
        model = build_teacher(Path(tmp), args.tiny, context, 64 if args.tiny else 512, device)
    model.train()
    step = AlignStep({"xray": model}, AlignConfig(steps=steps + args.warmup + 2, compile=args.compile,
                                                  checkpointing=args.checkpointing), device)
    batches = {"xray": make_batch(model, batch, context, args.shared, device)}
    for _ in range(args.warmup):
        step(batches)
    flops = step_flops(step, batches)
    syncs = count_syncs(step, batches) if cuda else None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step(batches)
    float(loss[0])  # the only read of a device value: waits for the last step
    seconds = (time.perf_counter() - start) / steps
    shape = "tiny" if args.tiny else "ViT-B/16 + BERT-base"
    print(f"stage-1 step, {shape}, batch {batch}, context {context}, shared {args.shared}, compile={args.compile}, "
          f"checkpointing={args.checkpointing} on {report(device, batch / seconds, flops / seconds, syncs)}")


def report(device: torch.device, pairs: float, flop_rate: float, syncs: int | None) -> str:
    """The device, pairs/s, peak memory and (on a GPU) the share of the card's dense bf16 peak."""
    if device.type != "cuda":
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return f"CPU: {pairs:,.1f} pairs/s, peak RSS {rss:.2f} GiB, {flop_rate / 1e9:.1f} GFLOP/s (no bf16 peak)"
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in BF16_PEAK.items() if k in name), None)
    share = f"{flop_rate / peak:.0%} of bf16 peak" if peak else "bf16 peak unknown for this card"
    memory = torch.cuda.max_memory_allocated(device) / 2**30
    return f"{name}: {pairs:,.1f} pairs/s, peak GPU memory {memory:.1f} GiB, {share}, {syncs} host-device syncs/step"


if __name__ == "__main__":
    main()

"""Distributed training: two gloo processes on the CPU stand in for two GPUs.

The contrastive loss over ranks equals the loss over their concatenated batches (so DDP's averaged
gradient is the full-batch gradient), and ``torchrun`` trains every stage of the tiny pipeline with the
ranks in step, exports a loadable model and resumes from its checkpoints.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import m3bind
from train import distributed
from train.losses import class_aware_contrastive

pytestmark = pytest.mark.slow  # each test spawns ranks: 11 s and 92 s on the 2-core machine

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
SCALE = 20.0


def _batch() -> tuple[torch.Tensor, torch.Tensor, list]:
    """Eight pairs, with classes spread over both halves so that positives cross ranks."""
    gen = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(8, 16, generator=gen), dim=-1)
    text = F.normalize(torch.randn(8, 16, generator=gen), dim=-1)
    keys = [("a", (0,)), ("b", (1,)), ("a", (0,)), ("c", (2,)), ("b", (1,)), ("a", (0,)), ("d", (3,)), ("c", (2,))]
    return image, text, keys


def _rank_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        image, text, keys = _batch()
        rows = slice(rank * 4, rank * 4 + 4)
        image, text = image[rows].clone().requires_grad_(), text[rows].clone().requires_grad_()
        loss = class_aware_contrastive(image, text, keys[rows], SCALE)
        loss.backward()
        torch.save({"loss": loss.detach(), "image_grad": image.grad, "text_grad": text.grad,
                    "shard": distributed.shard(np.arange(5)), "seed": distributed.rank_seed(7)},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_contrastive_loss_over_two_gloo_ranks_is_the_loss_over_their_whole_batch(tmp_path):
    mp.spawn(_rank_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    image, text, keys = _batch()
    image.requires_grad_()
    text.requires_grad_()
    whole = class_aware_contrastive(image, text, keys, SCALE)
    whole.backward()
    for r, got in enumerate(ranks):
        torch.testing.assert_close(got["loss"], whole.detach())
        # each rank's local rows receive every rank's gradient: DDP's mean over ranks is the full-batch gradient
        rows = slice(r * 4, r * 4 + 4)
        torch.testing.assert_close(got["image_grad"] / WORLD, image.grad[rows])
        torch.testing.assert_close(got["text_grad"] / WORLD, text.grad[rows])
    np.testing.assert_array_equal(np.concatenate([got["shard"] for got in ranks]), np.arange(5))
    assert ranks[0]["seed"] != ranks[1]["seed"]  # each rank draws its own batches


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    torchrun = shutil.which("torchrun")
    launcher = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}  # gloo on the CPU, even beside a GPU
    done = subprocess.run([*launcher, "--standalone", "--nproc_per_node", str(WORLD), "-m", "train.pipeline", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


def test_torchrun_trains_the_tiny_pipeline_with_ranks_in_step_and_resumes(tmp_path, shared_data):
    args = ["--config", str(REPO / "train" / "configs" / "tiny.yaml"), "--data-root", str(shared_data),
            "--run-dir", str(tmp_path / "run")]
    out = _torchrun(*args, "--export-dir", str(tmp_path / "export")).stdout
    for stage in ("teachers", "aligned", "student", "joint", "detector"):  # the pipeline compares weight digests
        assert f"{stage}: identical in all {WORLD} processes" in out, out
    assert out.count("model written to") == 1  # rank 0 alone exports
    for stage in ("teachers", "aligned", "student", "joint", "detector"):
        assert (tmp_path / "run" / stage / "DONE").is_file()

    model = m3bind.load_model(tmp_path / "export", device="cpu")
    assert sorted(model.modalities) == ["ct", "ecg", "mri", "retina", "ultrasound", "xray"]
    ecg = m3bind.load_input(sorted((shared_data / "ecg" / "ptbxl").rglob("*.hea"))[0])
    assert np.isfinite(model.embed(ecg)).all()

    _torchrun(*args, "--export-dir", str(tmp_path / "resumed"))  # every rank loads the same checkpoints
    assert m3bind.load_model(tmp_path / "resumed", device="cpu").fingerprint == model.fingerprint

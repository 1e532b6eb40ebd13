"""Batch indexing at scale (issue 18): 2,000 inputs of three real formats made from ../shared/data (PNG and
DICOM X-rays from PneumoniaMNIST, PTB-XL WFDB records linked in place), 10 % of them corrupt, indexed by a
child process that is SIGKILLed mid-run and then resumed. Every good input must end in the library exactly
once, every corrupt one must be reported with its error type, the library's index and items must agree,
and no file name may reach the library, the result or the output."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file

import m3bind
from m3bind.batch import input_sha256
from m3bind.library import Library

REPO = Path(__file__).resolve().parents[1]
N_PNG, N_DICOM, N_ECG = 1000, 450, 350  # good inputs
N_BAD = 200  # 10 % of the 2,000 inputs
SURNAME = "Smithers"  # in every file name: must appear nowhere afterwards

pytestmark = pytest.mark.slow  # two child processes indexing 2,000 inputs: ~1-3 min

RUNNER = """
import json, sys
from pathlib import Path
import m3bind
from m3bind.batch import embed_files
from m3bind.library import Library

model_dir, inputs, lib = sys.argv[1:4]
model = m3bind.load_model(model_dir)
library = Library.load(lib, model.fingerprint) if Path(lib).exists() else Library.for_model(model)
result = embed_files(model, inputs, batch_size=32, num_workers=0, library=library, save_to=lib, save_every=1.0)
print(json.dumps({"added": len(result.items), "skipped": result.skipped, "refused": result.refused,
                  "items": result.items}))
"""


@pytest.fixture(scope="module")
def model_dir(tiny_config, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return m3bind.M3BindModel(tiny_config).save_pretrained(tmp_path_factory.mktemp("model"))


def xray_dicom(template: pydicom.Dataset, pixels: np.ndarray, path: Path) -> None:
    """A DX DICOM whose pixels are a real X-ray (12 bits stored in 16)."""
    ds = template.copy()
    ds.Modality, ds.Rows, ds.Columns = "DX", *pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = (pixels.astype(np.uint16) * 16).tobytes()
    for keyword in ("WindowCenter", "WindowWidth", "RescaleIntercept", "RescaleSlope"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.save_as(path)


@pytest.fixture(scope="module")
def corpus(shared_data, tmp_path_factory) -> dict:
    """The input folder, the SHA-256s of the good inputs (and how many repeat another's bytes: PneumoniaMNIST
    holds a few identical images), and the expected error type of each corrupt one."""
    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(18)
    xrays = np.load(shared_data / "medmnist" / "pneumoniamnist.npz")["train_images"]
    ptbxl = shared_data / "ecg" / "ptbxl" / "records100"
    headers = sorted(ptbxl.glob("0[01]000/*.hea"))[:N_ECG + N_BAD // 5]
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for sub in ("png", "dcm", "ecg", "bad"):
        (root / sub).mkdir()
    for i in range(N_PNG):
        Image.fromarray(xrays[i]).save(root / "png" / f"{SURNAME}_{i:04d}.png")
    for i in range(N_DICOM):
        xray_dicom(template, xrays[N_PNG + i], root / "dcm" / f"{SURNAME}_{i:04d}.dcm")
    for header in headers[:N_ECG]:
        for f in (header, header.with_suffix(".dat")):
            os.symlink(f, root / "ecg" / f"{SURNAME}_{f.name}")
    good = [r for sub in ("png", "dcm") for r in ((p,) for p in sorted((root / sub).iterdir()))]
    good += [(h, h.with_suffix(".dat")) for h in sorted((root / "ecg").glob("*.hea"))]

    bad: dict[Path, str] = {}
    for i in range(N_BAD):
        path = root / "bad" / f"{SURNAME}_bad_{i:04d}"
        kind = i % 5
        if kind in (0, 1):  # truncated PNG / DICOM
            source = good[i] if kind == 0 else good[N_PNG + i]
            data = source[0].read_bytes()
            path = path.with_suffix(source[0].suffix)
            path.write_bytes(data[: len(data) // 2] if kind == 0 else data[:-700])  # a DICOM's header is shared
            bad[path] = "CorruptFileError"
        elif kind == 2:  # random bytes named as a PNG
            path = path.with_suffix(".png")
            path.write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
            bad[path] = "UnsupportedFormatError"
        elif kind == 3:  # a WFDB header whose signal file is missing
            path = path.with_suffix(".hea")
            os.symlink(headers[N_ECG + i // 5], path)
            bad[path] = "MissingFileError"
        else:  # a DICOM with its pixel data cut off
            ds = pydicom.dcmread(good[N_PNG + i][0])
            del ds.PixelData
            ds.InstanceNumber = i  # else these headers would all be the same bytes
            path = path.with_suffix(".dcm")
            ds.save_as(path)
            bad[path] = "CorruptFileError"
    assert len(good) + len(bad) == 2000 and len({input_sha256((p,)) for p in bad}) == len(bad)
    hashes = [input_sha256(r) for r in good]
    return {"root": root, "good": set(hashes), "copies": len(hashes) - len(set(hashes)),
            "bad": {"sha256:" + input_sha256((p,))[:16]: error for p, error in bad.items()}}


def start(model_dir: Path, inputs: Path, lib: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RUNNER, str(model_dir), str(inputs), str(lib)], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=open(log, "w"), text=True)


def saved_count(lib: Path) -> int:
    try:
        return json.loads((lib / "library.json").read_text())["count"]
    except (OSError, ValueError, KeyError):
        return 0


def test_a_killed_index_resumes_without_duplicates_or_losses(model_dir, corpus, tmp_path):
    lib, good, bad = tmp_path / "lib", corpus["good"], corpus["bad"]
    first = start(model_dir, corpus["root"], lib, tmp_path / "first.log")
    deadline = time.time() + 600
    while saved_count(lib) < len(good) // 4 and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert first.poll() is None, f"the first run ended before it was killed:\n{(tmp_path / 'first.log').read_text()}"
    first.send_signal(signal.SIGKILL)
    first.wait()

    with Library.load(lib) as killed:  # the last checkpoint: a consistent part of the run
        before = len(killed)
    assert 0 < before < len(good)

    second = start(model_dir, corpus["root"], lib, tmp_path / "second.log")
    out, _ = second.communicate(timeout=900)
    log = (tmp_path / "second.log").read_text()
    assert second.returncode == 0, log
    report = json.loads(out)
    # skipped: what the killed run saved, and copies of an input met earlier in this run
    assert len(report["skipped"]) == before + corpus["copies"] and report["added"] + before == len(good)
    assert {source: error for source, _, error in report["refused"]} == bad
    assert len(report["refused"]) == len(bad) and all(reason for _, reason, _ in report["refused"])

    with Library.load(lib) as library:
        ids, vectors = library.vectors()
        items = [library.item(int(i)) for i in ids]
        assert len(library) == len(ids) == library.stats()["count"] == len(good)
    hashes = [item["sha256"] for item in items]
    assert len(set(hashes)) == len(hashes) and set(hashes) == good  # each good input exactly once
    assert all(item["source"] is None for item in items)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    (store,) = lib.glob("*.sqlite")  # the items on disk agree with the index
    with sqlite3.connect(store) as db:
        assert sorted(row[0] for row in db.execute("SELECT id FROM items")) == ids.tolist()

    on_disk = b"".join(f.read_bytes() for f in lib.iterdir())
    seen = out + log + (tmp_path / "first.log").read_text()
    assert SURNAME.encode() not in on_disk and SURNAME not in seen and str(corpus["root"]) not in seen

"""Batch embedding of folders and file lists: worker decoding, per-modality batches, refused files,
resumability and WFDB record grouping, on real files read in place from ../shared/data.
(Sharding across processes is tested end to end through the CLI under torchrun, in test_cli.py.)"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import m3bind
from m3bind.batch import collect_inputs, decode_size, embed_files
from m3bind.library import Library

RNG = np.random.default_rng(0)


@pytest.fixture(scope="module")
def model(tiny_config):
    """The tiny model, with pathology tiles sent to its colour image tower."""
    config = dataclasses.replace(tiny_config, modality_towers={**tiny_config.modality_towers, "pathology": "retina"})
    torch.manual_seed(0)
    return m3bind.M3BindModel(config)


def link(files, folder: Path) -> list[Path]:
    """Symbolic links to real files (the data is read in place, never copied)."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        os.symlink(f, folder / f.name)
    return [folder / f.name for f in files]


@pytest.fixture(scope="module")
def image_folder(shared_data, tmp_path_factory) -> Path:
    """30 chest X-ray/CT JPEGs (up to 512 px) and 30 lung pathology tiles, in two sub-folders."""
    root = tmp_path_factory.mktemp("images")
    link(sorted((shared_data / "covid_cxr" / "images").iterdir())[:30], root / "cxr")
    tiles = shared_data / "pathology" / "lc25000_lung"
    link(sorted((tiles / "lung_aca").iterdir())[:15] + sorted((tiles / "lung_n").iterdir())[:15], root / "tiles")
    return root


def test_folder_in_workers_matches_model_embed(model, image_folder):
    result = embed_files(model, image_folder, batch_size=16, num_workers=2, progress=False, keep_names=True)
    assert result.refused == [] and result.skipped == []
    sources = [Path(item["source"]) for item in result.items]
    assert sources == sorted(sources) and len(sources) == 60
    assert sum(item["modality"] == "pathology" for item in result.items) == 30
    assert {item["modality"] for item in result.items if "cxr" in item["source"]} <= {"xray", "ct"}
    # workers decode at twice the towers' input size (tests/test_batch_decode.py: as good as a full decode)
    expected = model.embed([m3bind.load_input(s, decode_size=decode_size(model, False)) for s in sources])
    np.testing.assert_allclose(result.embeddings, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(result.embeddings, axis=1), 1.0, atol=1e-5)
    assert result.items[0]["sha256"] == hashlib.sha256(sources[0].read_bytes()).hexdigest()


def test_bad_files_are_refused_with_their_reasons(model, shared_data, tmp_path):
    good = link(sorted((shared_data / "covid_cxr" / "images").iterdir())[:3]
                + sorted((shared_data / "pathology" / "lc25000_lung" / "lung_scc").iterdir())[:2], tmp_path)
    (tmp_path / "noise.png").write_bytes(RNG.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (tmp_path / "empty.dcm").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("patient seen, x-ray to follow\n")
    (tmp_path / "truncated.jpg").write_bytes(good[0].read_bytes()[:3000])
    link([shared_data / "ecg" / "ptbxl" / "records100" / "00000" / "00008_lr.dat"], tmp_path)  # no header

    result = embed_files(model, tmp_path, batch_size=4, num_workers=2, progress=False, keep_names=True)
    assert [Path(item["source"]) for item in result.items] == sorted(good)
    reasons = {Path(source).name: (reason, error) for source, reason, error in result.refused}
    assert sorted(reasons) == ["00008_lr.dat", "empty.dcm", "noise.png", "notes.jpg", "truncated.jpg"]
    for name in ("noise.png", "empty.dcm", "notes.jpg", "truncated.jpg"):
        with pytest.raises(m3bind.InputError) as caught:
            m3bind.load_input(tmp_path / name)
        assert reasons[name] == (str(caught.value), type(caught.value).__name__) and reasons[name][0]
    assert "00008_lr.hea" in reasons["00008_lr.dat"][0] and reasons["00008_lr.dat"][1] == "MissingFileError"

    # without the opt-in: no path or name anywhere, inputs named by their content
    anonymous = embed_files(model, tmp_path, batch_size=4, num_workers=2, progress=False)
    assert [r.error for r in anonymous.refused] == [r.error for r in result.refused]
    assert {r.source for r in anonymous.refused} == {
        "sha256:" + hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()[:16] for name in reasons}
    assert all("source" not in item for item in anonymous.items) and len(anonymous.items) == len(good)
    text = repr(anonymous)
    for name in [*reasons, *(p.name for p in good)]:
        assert Path(name).stem not in text, name
    assert str(tmp_path) not in text


def test_resumes_by_content_hash(model, image_folder, tmp_path):
    library = Library.for_model(model)
    first = embed_files(model, image_folder / "cxr", library=library, num_workers=0, progress=False, keep_names=True)
    assert len(first.items) == len(library) == 30
    library.save(tmp_path / "lib")

    reopened = Library.load(tmp_path / "lib", model.fingerprint)
    second = embed_files(model, image_folder, library=reopened, batch_size=16, num_workers=2, progress=False,
                         keep_names=True)
    assert {Path(i["source"]).parent.name for i in second.items} == {"tiles"} and len(second.items) == 30
    assert sorted(second.skipped) == sorted(str(image_folder / "cxr" / n) for n in os.listdir(image_folder / "cxr"))
    assert len(reopened) == 60

    renamed = tmp_path / "again" / "renamed.jpg"  # same bytes under another name: already embedded
    renamed.parent.mkdir()
    os.symlink(image_folder / "tiles" / sorted(os.listdir(image_folder / "tiles"))[0], renamed)
    third = embed_files(model, [image_folder, renamed], library=reopened, num_workers=2, progress=False,
                        keep_names=True)
    assert third.items == [] and len(third.skipped) == 61 and len(reopened) == 60
    ids, _ = reopened.vectors()
    stored = reopened.item(int(ids[-1]))
    assert stored["sha256"] == second.items[-1]["sha256"] and stored["thumbnail"].startswith(b"\x89PNG")


def test_wfdb_records_are_grouped_into_one_input(model, shared_data, tmp_path):
    ptbxl = shared_data / "ecg" / "ptbxl" / "records100" / "00000"
    stems = ["00003_lr", "00008_lr", "00014_lr"]
    link([ptbxl / f"{s}.{ext}" for s in stems for ext in ("hea", "dat")], tmp_path / "ptbxl")
    link([shared_data / "ecg" / "cinc2021" / f"E07500.{ext}" for ext in ("hea", "mat")], tmp_path / "cinc")
    link([shared_data / "ecg" / "wfdb" / f"100.{ext}" for ext in ("hea", "dat", "atr")], tmp_path / "mitbih")

    records, refused = collect_inputs(tmp_path)
    assert refused == [] and [r[0].name for r in records] == ["E07500.hea", "100.hea", *(f"{s}.hea" for s in stems)]
    assert [sorted(p.suffix for p in r) for r in records[:2]] == [[".hea", ".mat"], [".atr", ".dat", ".hea"]]
    assert collect_inputs([tmp_path / "ptbxl" / "00008_lr.dat"])[0] == [records[3]]  # a signal file finds its header

    result = embed_files(model, tmp_path, batch_size=2, num_workers=2, progress=False, keep_names=True)
    assert result.refused == [] and [i["source"] for i in result.items] == [str(r[0]) for r in records]
    assert {i["modality"] for i in result.items} == {"ecg"}
    expected = model.embed([m3bind.load_input(list(r)) for r in records])
    np.testing.assert_allclose(result.embeddings, expected, atol=1e-5)


def test_names_stay_out_of_the_library_and_copies_are_embedded_once(model, image_folder, tmp_path):
    """Without the opt-in the library holds no file name; the same bytes under two names in one run are
    one input, and the checkpointed library on disk matches the one in memory."""
    folder = tmp_path / "Doe_John"
    files = link(sorted((image_folder / "cxr").iterdir())[:5], folder)
    os.symlink(files[0].resolve(), folder / "Doe_John_copy.jpg")
    library = Library.for_model(model)
    result = embed_files(model, folder, library=library, num_workers=0, progress=False,
                         save_to=tmp_path / "lib", save_every=0.0)
    assert len(result.items) == len(library) == 5
    assert result.skipped == ["sha256:" + hashlib.sha256(files[0].read_bytes()).hexdigest()[:16]]
    saved = Library.load(tmp_path / "lib", model.fingerprint)
    ids, _ = saved.vectors()
    assert len(saved) == 5 and all(saved.item(int(i))["source"] is None for i in ids)
    raw = (tmp_path / "lib" / "items.sqlite").read_bytes() + json.dumps(result.items).encode()
    assert b"Doe" not in raw and not any(f.stem.encode() in raw for f in files)
    with pytest.raises(m3bind.ConfigError, match="save_to needs a library"):  # a developer's fault
        embed_files(model, folder, save_to=tmp_path / "lib2", progress=False)

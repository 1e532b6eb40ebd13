"""The workspace keeps no file names unless its owner asks, and survives a home it cannot write (issue 18,
points 2 and 8)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import m3bind
from m3bind.library import Library
from m3bind.workspace import Workspace


def patient_named_png(folder: Path, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"Doe_John_{seed}.png"
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def frozen(tmp_path):
    """Makes a folder tree unwritable, even for root (chattr +i), and undoes it afterwards."""
    frozen_dirs = []

    def freeze(folder: Path) -> None:
        if os.geteuid() == 0:
            if shutil.which("chattr") is None or subprocess.run(["chattr", "-R", "+i", str(folder)]).returncode:
                pytest.skip("cannot make a folder read-only for root here (chattr)")
        else:
            for p in [folder, *folder.rglob("*")]:
                p.chmod(p.stat().st_mode & ~0o222)
        frozen_dirs.append(folder)

    yield freeze
    for folder in frozen_dirs:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-R", "-i", str(folder)])
        else:
            for p in [folder, *folder.rglob("*")]:
                p.chmod(p.stat().st_mode | 0o200)


def test_file_names_are_stored_only_when_the_owner_opts_in(tiny_model, tmp_path):
    png = patient_named_png(tmp_path / "uploads")
    ws = Workspace(tiny_model, tmp_path / "home")
    assert ws.add_files([png], "pneumonia", "xray")["added"] == 1
    item_id = max(int(i) for i in ws.library.vectors()[0])
    item = ws.library.item(item_id)
    assert item["source"] is None and item["label"] == "pneumonia" and len(item["sha256"]) == 64
    assert ws.shown_source("Doe_John_0.png", item["sha256"]) is None
    for file in ws.library_dir.iterdir():
        assert b"Doe_John" not in file.read_bytes()
    example = next(int(i) for i in ws.library.vectors()[0] if ws.is_example(int(i)))
    shown = ws.library.item(example)
    assert ws.shown_source(shown["source"], shown["sha256"]) == shown["source"]  # public example names stay

    mine = Workspace(tiny_model, tmp_path / "my-home", keep_names=True)
    mine.add_files([png], None, "xray")
    hit = max(int(i) for i in mine.library.vectors()[0])
    assert mine.library.item(hit)["source"] == "Doe_John_0.png"
    assert mine.shown_source("Doe_John_0.png", mine.library.item(hit)["sha256"]) == "Doe_John_0.png"


def test_a_read_only_home_opens_its_library_read_only(tiny_model, tmp_path, frozen):
    home = tmp_path / "home"
    ws = Workspace(tiny_model, home)
    ws.add_files([patient_named_png(tmp_path / "up")], None, "xray")
    count = len(ws.library)
    ws.library.close()
    frozen(home)

    ro = Workspace(tiny_model, home)  # used to die with a PermissionError
    assert ro.read_only and ro.persistent and "read-only" in ro.notice and len(ro.library) == count
    with pytest.raises(m3bind.InputError, match="read-only"):
        ro.add_files([patient_named_png(tmp_path / "up", 1)], None, "xray")
    with pytest.raises(m3bind.InputError, match="read-only"):
        ro.remove_item(0)
    with pytest.raises(m3bind.InputError, match="read-only"):
        ro.reset_library()
    assert len(ro.library) == count
    on_disk = Library.load(ro.library_dir, tiny_model.fingerprint)
    assert len(on_disk) == count
    on_disk.close()


def test_an_unwritable_home_without_a_library_gives_an_in_memory_one(tiny_model, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    ws = Workspace(tiny_model, blocker / "home")  # nothing can be made there, not even by root
    assert ws.read_only and not ws.persistent and "in memory" in ws.notice
    assert all(p.is_file() for p in ws.examples.values()) and not ws.examples_dir.is_relative_to(blocker)
    before = len(ws.library)
    assert ws.add_files([patient_named_png(tmp_path / "up")], None, "xray")["added"] == 1
    assert len(ws.library) == before + 1


def test_a_failed_save_leaves_memory_as_on_disk(tiny_model, tmp_path, monkeypatch):
    ws = Workspace(tiny_model, tmp_path / "home")
    before = len(ws.library)

    def refuse(self, path):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Library, "save", refuse)
    with pytest.raises(m3bind.InputError, match="could not be saved.*nothing was added"):
        ws.add_files([patient_named_png(tmp_path / "up")], None, "xray")
    assert len(ws.library) == before  # used to hold the new item that disk did not
    with pytest.raises(m3bind.InputError, match="could not be saved.*not reset"):
        ws.reset_library()


def test_the_app_starts_with_an_unwritable_home(tiny_model, tmp_path, frozen):
    import app

    home = tmp_path / "home"
    Workspace(tiny_model, home).library.close()
    frozen(home)
    demo = app.build_app(tiny_model, home)  # used to end in a traceback
    ws = demo.m3bind_workspace
    assert ws.read_only and "read-only" in ws.notice
    texts = [getattr(b, "value", None) for b in demo.blocks.values()]
    assert any(isinstance(t, str) and "read-only" in t for t in texts)  # the page says so

"""How the app's workspace groups uploads into inputs: each upload sits in its own temporary folder."""

from __future__ import annotations

import shutil

import pytest

import m3bind
from m3bind.workspace import _records


@pytest.fixture
def uploads(tmp_path, shared_data):
    """Two PTB-XL records and a PNG, each file in its own folder as Gradio stores uploads."""
    folder = shared_data / "ecg" / "ptbxl" / "records100" / "00000"
    originals = [p for h in sorted(folder.glob("*.hea"))[:2] for p in (h, h.with_suffix(".dat"))]
    files = []
    for i, src in enumerate(originals):
        (tmp_path / str(i)).mkdir()
        files.append(tmp_path / str(i) / src.name)
        shutil.copyfile(src, files[-1])
    return files


def test_a_wfdb_record_uploaded_file_by_file_is_one_input(uploads, tmp_path):
    before = sorted(tmp_path.rglob("*"))
    records, refused = _records([str(p) for p in reversed(uploads)])
    assert refused == []
    assert sorted(records) == [(uploads[0], uploads[1]), (uploads[2], uploads[3])]
    assert sorted(tmp_path.rglob("*")) == before  # grouping reads names only
    sample = m3bind.load_input(list(records[0]))
    assert sample.modality == "ecg" and sample.data.shape == (12, 1000)


def test_same_named_uploads_stay_apart_and_a_lone_signal_file_is_refused(uploads, tmp_path):
    twin = tmp_path / "twin" / uploads[0].name  # the same header name again, in another upload folder
    twin.parent.mkdir()
    shutil.copyfile(uploads[0], twin)
    records, refused = _records([uploads[0], uploads[1], twin, uploads[3]])
    assert sorted(records) == [(uploads[0], uploads[1]), (twin,)]
    assert refused == [(uploads[3].name, f"{uploads[3].name} is the signal file of a WFDB record, but its header "
                                         f"({uploads[3].stem}.hea) is not beside it.")]


def test_a_vanished_upload_is_a_readable_error(tmp_path):
    with pytest.raises(m3bind.InputError, match="gone.png is no longer available; upload it again"):
        _records([tmp_path / "gone.png"])
    with pytest.raises(m3bind.InputError, match="Upload a file first"):
        _records([])

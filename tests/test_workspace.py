"""The app's workspace: how it groups uploads into inputs (each upload sits in its own temporary folder), and
that its searches go through the one search service."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest

import m3bind
from m3bind import search as service
from m3bind.sample import Sample
from m3bind.workspace import ReadOptions, UploadCache, Workspace, _records


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


def test_a_vanished_upload_is_a_readable_error_without_its_name(tmp_path):
    """File names can be patient names: the message for an expired upload never quotes one."""
    gone = tmp_path / "Doe_John.png"
    for read in (lambda: _records([gone]), lambda: Workspace._key([gone], ReadOptions())):
        with pytest.raises(m3bind.InputError, match="no longer available") as refused:
            read()
        assert "Doe" not in str(refused.value) and "John" not in str(refused.value)
    with pytest.raises(m3bind.InputError, match="Upload a file first"):
        _records([])


def test_searches_go_through_the_one_search_service(tiny_model, shared_data, tmp_path, monkeypatch):
    ws = Workspace(tiny_model, tmp_path / "home")  # the examples the tiny model reads: CT, ECG, retina
    xrays = sorted((shared_data / "covid_cxr" / "images").iterdir())[:4]
    assert ws.add_files([str(p) for p in xrays])["added"] == 4
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return service.search(*args, **kwargs)

    monkeypatch.setattr("m3bind.workspace.search", spy)
    # default: the plain ranking of the shared space, as the library ranks the text's embedding
    plain = ws.search_text("pleural effusion", 5)
    assert [h.id for h in plain] == [h.id for h in ws.library.search(tiny_model.embed_text(["pleural effusion"])[0], 5)]
    # the app's "best of each modality"
    each = ws.search_text("pleural effusion", 4, None, True)
    assert sorted(h.modality for h in each) == ["ct", "ecg", "retina", "xray"]
    assert ws.search_text("pleural effusion", 3, ["xray"], True) == ws.search_text("pleural effusion", 3, ["xray"])
    # by an upload, in other modalities: its query centred, the best of each other modality
    sample, similar = ws.search_similar(str(xrays[0]), k=3)
    assert sample.modality == "xray" and sorted(h.modality for h in similar) == ["ct", "ecg", "retina"]
    query = tiny_model.centre(tiny_model.embed(sample), "xray")
    want = sorted((h.score for m in ("ct", "ecg", "retina") for h in ws.library.search(query, 1, m)), reverse=True)
    assert [h.score for h in similar] == pytest.approx(want, abs=1e-5)
    assert [c["per_modality"] for c in calls] == [False, True, True, False, True]
    assert calls[-1]["exclude_modality"] == "xray" and calls[-1]["query_modality"] == "xray"
    with pytest.raises(m3bind.InputError, match="Type a finding"):
        ws.search_text("  ")


def test_classify_and_find_similar_reuse_the_uploads_embedding(tiny_model, tmp_path, monkeypatch):
    """A Classify click runs ClassifyTab.classify -> Workspace.classify -> M3BindModel.classify with the cached
    embedding: after the upload was read, neither Classify nor "find similar" runs the image tower again."""
    from pydicom.data import get_testdata_file

    from ui.classify import ClassifyTab
    from ui.search import SearchTab

    ws = Workspace(tiny_model, tmp_path / "home")
    tab, ct = ClassifyTab(ws), [get_testdata_file("CT_small.dcm")]
    status, _, probs = tab.classify(ct, "auto", "normal lungs\nnodule", None, None, None)
    assert status.startswith("**CT** (from the DICOM header) · DICOM · 128 x 128 px")
    embedded = []
    real = tiny_model.embed
    monkeypatch.setattr(tiny_model, "embed", lambda *a, **k: embedded.append(a) or real(*a, **k))
    again = tab.classify(ct, "auto", "normal lungs\nnodule", None, None, None)[2]
    results = tmp_path / "results"
    results.mkdir()
    SearchTab(ws, lambda: results).search_similar(ct, "auto", None, None, None, 3, True)
    assert embedded == [] and again == probs
    assert probs == pytest.approx(tiny_model.classify(m3bind.load_input(ct[0]), ["normal lungs", "nodule"]))


def test_every_reader_kind_has_a_view_and_an_explanation(tiny_model, tmp_path):
    from PIL import Image
    from pydicom.data import get_testdata_file

    from m3bind.workspace import KIND_VIEWS

    assert set(KIND_VIEWS) == {m3bind.get_modality(m).kind for m in m3bind.modality_names()}
    ws = Workspace(tiny_model, tmp_path / "home")
    ct, ecg = get_testdata_file("CT_small.dcm"), get_testdata_file("waveform_ecg.dcm")
    preview = ws.preview(ws.read(ct))
    assert isinstance(preview, Image.Image) and preview.size == (384, 384)  # 128 px enlarged x3
    assert "all 12 leads" in ws.describe(ws.read(ecg)) and "window" not in " ".join(ws.describe(ws.read(ecg)))
    explanation, shown = ws.explain(ct, ["normal lungs", "nodule"])
    assert isinstance(shown, Image.Image) and shown.size == preview.size
    explanation, shown = ws.explain(ecg, ["normal <b>ECG</b>", "<a href='x'>atrial fibrillation</a>"])
    shaded = [s for s in shown.layout.shapes if s.type == "rect"]
    assert len(shaded) == int((explanation.importance > 0).sum())
    assert "<" not in shown.layout.title.text.replace("<br>", "") and "&lt;" in shown.layout.title.text


def test_untrained_is_told_by_the_weights_not_the_name(tiny_model, tmp_path):
    import copy

    ws = Workspace(tiny_model, tmp_path / "home")
    assert not ws.trained  # never went through train/: no tower centre fitted
    fitted = copy.deepcopy(tiny_model)
    fitted.set_centre("xray", fitted.embed([ws.read(str(ws.example_path("ct")))]))
    assert Workspace(fitted, tmp_path / "home2").trained and fitted.config.name == tiny_model.config.name


def image_of(megabytes: int) -> Sample:
    side = int((megabytes * 2**20 / 12) ** 0.5)  # float32 RGB data, no preview
    return Sample("xray", np.zeros((side, side, 3), np.float32), np.zeros((0, 0, 3), np.uint8))


def test_the_upload_cache_is_bounded_by_bytes_entries_and_time():
    """Decoded uploads do not pile up (the soak's memory grew 32 %): least recently used out past the byte or
    entry bound, and every entry unused for the TTL dropped (its upload is swept by then)."""
    cache = UploadCache(max_bytes=10 * 2**20, max_entries=3, ttl_s=0.5)
    for i in range(4):
        cache.put((f"a{i}",), image_of(4), None)
    assert len(cache) == 2 and cache.nbytes() <= 10 * 2**20  # 4 MB each: the third pushed the first out
    assert cache.get(("a3",)) is not None and cache.get(("a0",)) is None
    cache.put(("big",), image_of(40), None)  # larger than the bound: kept alone (it is the one in use)
    assert len(cache) == 1 and cache.get(("big",)) is not None
    for i in range(5):
        cache.put((f"ecg{i}",), Sample("ecg", np.zeros((12, 1000), np.float32), np.zeros((12, 1000), np.float32)),
                  np.ones(8, np.float32))
    assert len(cache) == 3 and cache.get(("ecg0",)) is None and cache.get(("ecg4",))[1].shape == (8,)
    time.sleep(0.3)
    cache.get(("ecg3",))  # used: its time starts again
    time.sleep(0.3)
    assert cache.expire() == 2 and len(cache) == 1 and cache.get(("ecg3",)) is not None
    assert UploadCache().expire() == 0  # no TTL (the library and CLI): entries go by the bounds only

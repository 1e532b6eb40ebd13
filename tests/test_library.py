"""m3bind.Library: add/search/remove, persistence (crash-safe), modality filters, exact vs approximate."""

from __future__ import annotations

import copy

import csv
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
from PIL import Image

from m3bind.errors import (ConfigError, CorruptFileError, InputError, M3BindError, OptionError, UnknownItemError,
                           WrongModalityError)
from m3bind.library import Hit, Library, LibraryMismatchError

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_search", REPO / "bench" / "bench_search.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)
clustered_vectors = bench.clustered_vectors  # the benchmark's structured vectors, shared


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def exact_top(x: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = x @ q
    order = np.argsort(-scores, kind="stable")[:k]
    return ids[order], scores[order]


def recall(lib: Library, x: np.ndarray, queries: np.ndarray, keep: np.ndarray | None = None, **kw) -> float:
    mask = np.ones(len(x), bool) if keep is None else keep
    _, truth = faiss.knn(queries, x[mask], 10, faiss.METRIC_INNER_PRODUCT)
    truth = np.flatnonzero(mask)[truth]
    found = lib.search(queries, 10, **kw)
    return float(np.mean([len({h.id for h in hits} & set(t.tolist())) / 10 for hits, t in zip(found, truth)]))


@pytest.fixture
def small_lib():
    rng = np.random.default_rng(0)
    x = unit(rng, 300, 32)
    mods = ["xray"] * 150 + ["ct"] * 100 + ["ecg"] * 50
    items = [{"modality": m, "label": f"l{i % 3}", "source": f"/srv/hospital/patient{i}/scan{i}.dcm",
              "notes": "n" if i % 2 else None} for i, m in enumerate(mods)]
    lib = Library(32, "model-A")
    ids = lib.add(x[:200], items[:200]) + lib.add(x[200:], items[200:])
    yield lib, x, np.array(ids), np.array(mods)
    lib.close()


def test_add_search_remove_save_load_round_trip(small_lib, tmp_path):
    lib, x, ids, mods = small_lib
    assert ids.tolist() == list(range(300)) and len(lib) == 300
    hit = lib.search(x[7], k=3)[0]
    assert isinstance(hit, Hit) and hit.id == 7 and hit.score == pytest.approx(1.0, abs=1e-5)
    assert (hit.modality, hit.label, hit.notes) == ("xray", "l1", "n")
    assert hit.source == "scan7.dcm"  # the directory (which may name a patient) is never stored
    assert lib.stats()["per_modality"] == {"xray": 150, "ct": 100, "ecg": 50}

    # Exact while small: same ids and scores as brute force, for a single query and a batch.
    q = unit(np.random.default_rng(1), 4, 32)
    batch = lib.search(q, k=10)
    for row, query in zip(batch, q):
        want_ids, want_scores = exact_top(x, ids, query, 10)
        assert [h.id for h in row] == want_ids.tolist()
        np.testing.assert_allclose([h.score for h in row], want_scores, atol=1e-5)

    removed = [7, 299, 120]
    assert lib.remove(removed + [12345]) == 3 and len(lib) == 297
    assert lib.remove(removed) == 0
    assert all(h.id not in removed for h in lib.search(x[7], k=20))
    with pytest.raises(UnknownItemError, match="no item 7") as refused:
        lib.item(7)
    assert isinstance(refused.value, KeyError)  # callers that catch KeyError keep working
    with pytest.raises(UnknownItemError):
        lib.vectors([0, 7])

    before = lib.search(q, k=10)
    lib.save(tmp_path / "lib")
    assert sorted(p.name for p in (tmp_path / "lib").iterdir()) == ["index.faiss", "items.sqlite", "library.json"]
    loaded = Library.load(tmp_path / "lib", expected_fingerprint="model-A")
    assert len(loaded) == 297 and loaded.stats() == lib.stats()
    after = loaded.search(q, k=10)
    assert [[h.id for h in r] for r in after] == [[h.id for h in r] for r in before]
    np.testing.assert_allclose([[h.score for h in r] for r in after], [[h.score for h in r] for r in before])
    # ids stay stable and are never reused, even the removed last one (299)
    assert loaded.add(x[:2], [{"modality": "ct"}, {"modality": "ecg"}]) == [300, 301]
    got_ids, got = loaded.vectors([0, 300])
    np.testing.assert_allclose(got, x[[0, 0]], atol=1e-6)
    loaded.close()


def test_add_refuses_bad_vectors_and_items(small_lib):
    lib, x, _, _ = small_lib
    with pytest.raises(LibraryMismatchError, match="32-dimensional"):
        lib.add(np.ones((1, 16), np.float32), [{"modality": "ct"}])
    with pytest.raises(LibraryMismatchError):
        lib.search(np.ones(16, np.float32))
    with pytest.raises(InputError):
        lib.add(np.full((1, 32), np.nan, np.float32), [{"modality": "ct"}])
    with pytest.raises(WrongModalityError):
        lib.add(x[:1], [{"modality": "sonar"}])
    with pytest.raises(ConfigError, match="unknown item fields"):
        lib.add(x[:1], [{"modality": "ct", "patient_name": "X"}])
    assert len(lib) == 300  # nothing half-added
    # Non-unit vectors are normalised, so scores stay cosines.
    new = lib.add(3 * x[:1], [{"modality": "ct", "source": r"C:\\Users\\dr\\scan.png"}])
    assert lib.item(new[0])["source"] == "scan.png"
    assert lib.search(x[0], k=2)[0].score == pytest.approx(1.0, abs=1e-5)


def test_errors_say_who_caused_them(small_lib):
    """A developer's misuse is a ConfigError, never an InputError that the app would show as the user's fault."""
    from m3bind.search import query_vector

    lib, x, _, _ = small_lib
    assert issubclass(ConfigError, M3BindError) and issubclass(InputError, M3BindError)
    assert not issubclass(ConfigError, InputError) and not issubclass(InputError, ConfigError)
    with pytest.raises(OptionError, match="at least one result"):
        lib.search(x[0], k=0)
    with pytest.raises(ConfigError, match="2 embeddings but 1 items"):
        lib.add(x[:2], [{"modality": "ct"}])
    with pytest.raises(ConfigError, match="exact_threshold"):
        Library(32, "m", exact_threshold=10)
    with pytest.raises(ConfigError, match="IVF"):
        Library(32, "m", index_factory="HNSW32")
    with pytest.raises(ConfigError, match="needs its model"):
        query_vector(lib, None, x[0], exclude_modality="xray", query_modality="xray")
    assert len(lib) == 300


def test_modality_filter_with_rare_modality_exact_and_approximate():
    """A rare modality far from the query still returns its exact top-k, with a flat and an IVF index."""
    dim = 64
    x, cluster = clustered_vectors(20_000, dim, seed=5)
    mods = np.where(cluster % 2 == 0, "xray", "ct").astype(object)
    rare = np.flatnonzero(cluster == 63)[:12]  # the rare cluster, and only 12 of its items
    mods[cluster == 63] = "ct"
    mods[rare] = "ecg"
    items = [{"modality": m} for m in mods]
    queries, query_cluster = clustered_vectors(100, dim, seed=6)
    for threshold in (50_000, 2_000):
        lib = Library(dim, "m", exact_threshold=threshold)
        lib.add(x, items)
        assert ("IVF" in lib.stats()["index"]) == (threshold < len(x))
        for q in queries[:10]:
            hits = lib.search(q, k=10, modality="ecg")
            want_ids, want_scores = exact_top(x[rare], rare, q, 10)
            assert [h.id for h in hits] == want_ids.tolist() and {h.modality for h in hits} == {"ecg"}
            np.testing.assert_allclose([h.score for h in hits], want_scores, atol=1e-5)
        both = lib.search(queries[0], k=30, modality=["ecg", "ct"])
        assert {h.modality for h in both} <= {"ecg", "ct"} and len(both) == 30
        assert all(h.modality != "xray" for h in lib.search(queries[1], k=30, exclude_modality="xray"))
        assert lib.search(queries[0], k=5, modality="retina") == []  # none in the library
        # A common modality is searched approximately (nprobe scaled by 1/its share) with queries of its own.
        own, other = queries[query_cluster % 2 == 0], queries[query_cluster % 2 == 1]
        assert recall(lib, x, own, keep=mods == "xray", modality="xray") >= 0.95
        # exact=True is exact for queries far from the modality too (cross-modal), filtered or not.
        xray = np.flatnonzero(mods == "xray")
        for q in other[:5]:
            want_ids, _ = exact_top(x[xray], xray, q, 10)
            assert [h.id for h in lib.search(q, k=10, modality="xray", exact=True)] == want_ids.tolist()
            assert [h.id for h in lib.search(q, k=10, exact=True)] == exact_top(x, np.arange(len(x)), q, 10)[0].tolist()
        lib.close()


def test_filtered_search_keeps_its_recall_for_queries_far_from_the_modality(tmp_path):
    """20k structured vectors in an IVF index, four modalities of ~5k items: a search filtered to any one of
    them finds >= 0.95 of its exact filtered top 10, for queries from every modality (most of them far from
    the filter's items: the cross-modal case), without scanning every list that holds the modality."""
    dim = 64
    x, cluster = clustered_vectors(20_000, dim, seed=21)
    names = np.array(["xray", "ct", "ecg", "retina"])
    mods = names[cluster % 4]
    queries, _ = clustered_vectors(1_000, dim, seed=22)  # many: a few far queries weigh on recall
    lib = Library(dim, "m", exact_threshold=1_000)
    lib.add(x, [{"modality": m} for m in mods])
    assert lib.stats()["index"].startswith("IVF")
    for name in names:
        assert recall(lib, x, queries, keep=mods == name, modality=name) >= 0.95
        assert recall(lib, x, queries, keep=mods != name, exclude_modality=name) >= 0.95
    assert recall(lib, x, queries, keep=np.isin(mods, ["ct", "ecg"]), modality=["ct", "ecg"]) >= 0.95
    # approximate all the same: the probed lists are fewer than those holding the modality
    params, lists, gap = lib._vectors._plan("xray", None, False)
    coarse = queries @ faiss.extract_index_ivf(lib._vectors._index).quantizer.reconstruct_batch(lists).T
    probed = (coarse >= coarse.max(axis=1, keepdims=True) - gap).sum(axis=1)
    assert probed.mean() < 0.8 * len(lists)

    # The calibration is saved; a library saved before it existed is calibrated when loaded, alike.
    lib.save(tmp_path / "lib")
    meta = json.loads((tmp_path / "lib" / "library.json").read_text())
    assert set(meta["filter_gap"]) == set(names)
    del meta["filter_gap"]
    (tmp_path / "lib" / "library.json").write_text(json.dumps(meta))
    old = Library.load(tmp_path / "lib")
    assert old._vectors._filter_gap.keys() == lib._vectors._filter_gap.keys() == set(names)
    for name, (gap, count) in lib._vectors._filter_gap.items():
        assert old._vectors._filter_gap[name] == (pytest.approx(gap, abs=1e-6), count) and count == (mods == name).sum()
    assert recall(old, x, queries, keep=mods == "ct", modality="ct") >= 0.95
    # A modality that grows past exact_threshold without a rebuild is calibrated as it does.
    extra, _ = clustered_vectors(1_500, dim, seed=23)
    old.add(extra, [{"modality": "pathology"}] * len(extra))
    assert "IVF" in old.stats()["index"] and "pathology" in old._vectors._filter_gap
    both = np.concatenate([x, extra])
    keep = np.arange(len(both)) >= len(x)
    assert recall(old, both, queries, keep=keep, modality="pathology") >= 0.95
    old.close()
    lib.close()

    # Modalities each small enough to be searched exactly, several of them together large enough not to be
    lib = Library(dim, "m", exact_threshold=6_000)
    lib.add(x, [{"modality": m} for m in mods])
    assert lib.stats()["index"].startswith("IVF")
    assert recall(lib, x, queries, keep=mods != "xray", exclude_modality="xray") >= 0.95
    lib.close()


@pytest.mark.slow
def test_approximate_index_agrees_with_exact_after_crossing_threshold(tmp_path):
    """60k structured vectors added in batches cross the threshold (IVF), regrow, then shrink back to exact."""
    dim = 128
    x, cluster = clustered_vectors(60_000, dim, seed=11)
    queries, _ = clustered_vectors(200, dim, seed=12)
    items = [{"modality": ("xray", "ct", "retina", "ecg")[c % 4]} for c in cluster]
    lib = Library(dim, "m", exact_threshold=5_000)
    for start in range(0, len(x), 10_000):
        lib.add(x[start:start + 10_000], items[start:start + 10_000])
        if start == 0:
            assert lib.stats()["index"].startswith("IVF")
    stats = lib.stats()
    assert stats["index"] == f"IVF{int(4 * np.sqrt(50_000))},Flat"  # retrained at 50k (4x the first 10k)
    assert 1 <= stats["nprobe"] < int(4 * np.sqrt(50_000))
    assert recall(lib, x, queries) >= 0.95

    lib.save(tmp_path / "big")
    loaded = Library.load(tmp_path / "big")
    assert loaded.stats() == stats
    assert [h.id for h in loaded.search(queries[0])] == [h.id for h in lib.search(queries[0])]
    loaded.close()

    keep = np.zeros(len(x), bool)
    keep[:2_000] = True
    lib.remove(np.flatnonzero(~keep).tolist())
    assert len(lib) == 2_000 and lib.stats()["index"] == "Flat (exact)"
    assert recall(lib, x, queries, keep=keep) == 1.0
    lib.close()


_CHILD = """
import os, sys, numpy as np
sys.path.insert(0, {repo!r})
from m3bind.library import Library
n = 1500  # with 128 kB thumbnails: ~200 MB to write, seconds of saving to be killed in
x = np.random.default_rng(0).standard_normal((n, 128), dtype=np.float32)
lib = Library(128, "model-A")
lib.add(x, [{{"modality": "ecg", "thumbnail": os.urandom(128 * 1024)}} for _ in range(n)])
print("ready", flush=True)
lib.save({path!r})
print("saved", flush=True)
"""


def test_killed_save_leaves_previous_library_loadable(small_lib, tmp_path):
    lib, x, _, _ = small_lib
    libraries, scratch = tmp_path / "libraries", tmp_path / "scratch"
    scratch.mkdir()
    target = libraries / "lib"
    lib.save(target)
    child = subprocess.Popen([sys.executable, "-c", _CHILD.format(repo=str(REPO), path=str(target))],
                             stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "TMPDIR": str(scratch)})  # its working copy dies with tmp_path
    try:
        assert child.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 60
        while not list(libraries.glob(".lib.tmp-*")):  # the save has begun writing
            assert time.monotonic() < deadline and child.poll() is None
            time.sleep(0.001)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert list(libraries.glob(".lib.tmp-*")), "killed before the rename: its temporary directory is left"
    old = Library.load(target, expected_fingerprint="model-A")
    assert len(old) == 300 and old.search(x[42], k=1)[0].id == 42
    old.save(target)  # a later save clears what the killed one left
    assert sorted(p.name for p in libraries.iterdir()) == ["lib"]
    old.close()


def test_load_recovers_from_a_crash_between_the_renames(small_lib, tmp_path):
    lib, x, _, _ = small_lib
    target = tmp_path / "lib"
    lib.save(target)
    os.rename(target, tmp_path / ".lib.backup")  # the state between "old -> backup" and "new -> target"
    recovered = Library.load(target)
    assert len(recovered) == 300 and target.is_dir() and not (tmp_path / ".lib.backup").exists()
    recovered.close()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="not an M3Bind library"):
        lib.save(tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"


def test_load_refuses_other_model_and_damaged_libraries(small_lib, tmp_path):
    lib, _, _, _ = small_lib
    target = tmp_path / "lib"
    lib.save(target)
    with pytest.raises(LibraryMismatchError, match="built with model model-A; the loaded model is model-B"):
        Library.load(target, expected_fingerprint="model-B")
    assert issubclass(LibraryMismatchError, InputError)
    with pytest.raises(InputError, match="No M3Bind library"):
        Library.load(tmp_path / "missing")
    data = (target / "index.faiss").read_bytes()
    (target / "index.faiss").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="damaged"):
        Library.load(target)
    meta = json.loads((target / "library.json").read_text())
    (target / "library.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(InputError, match="version 99"):
        Library.load(target)


# ------------------------------------------------------------------------ helpers with a real model
def _real_samples(shared_data: Path):
    import m3bind

    rows = list(csv.DictReader(open(shared_data / "covid_cxr" / "metadata.csv", newline="")))
    xrays = [r for r in rows if r["modality"] == "X-ray"][:4]
    samples = [m3bind.load_input(shared_data / "covid_cxr" / r["filename"], "xray") for r in xrays]
    headers = sorted((shared_data / "ecg" / "ptbxl" / "records100").rglob("*.hea"))[:3]
    samples += [m3bind.load_input([h, h.with_suffix(".dat")]) for h in headers]
    names = [Path(r["filename"]).name for r in xrays] + [h.stem for h in headers]
    labels = [r["finding"] for r in xrays] + ["ecg"] * len(headers)
    return samples, names, labels


def test_model_helpers_embed_thumbnail_and_refuse_other_models(tiny_model, shared_data):
    samples, names, labels = _real_samples(shared_data)
    lib = Library.for_model(tiny_model)
    ids = lib.add_samples(tiny_model, samples, [{"source": str(shared_data / n), "label": l}
                                                for n, l in zip(names, labels)], batch_size=3)
    assert ids == list(range(len(samples)))
    first = lib.item(ids[0])
    assert first["source"] == names[0] and len(first["sha256"]) == 64
    thumb = Image.open(io.BytesIO(first["thumbnail"]))
    assert thumb.format == "PNG" and max(thumb.size) <= 128
    ecg_thumb = Image.open(io.BytesIO(lib.item(ids[-1])["thumbnail"]))
    assert ecg_thumb.size == (128, 48) and np.asarray(ecg_thumb).std() > 0  # a trace was drawn

    self_hit = lib.search_sample(tiny_model, samples[0], k=1)[0]
    assert self_hit.id == ids[0] and self_hit.score == pytest.approx(1.0, abs=1e-4)
    cross = lib.search_sample(tiny_model, samples[0], k=10, exclude_modality="xray")
    assert [h.modality for h in cross] == ["ecg"] * 3
    # cross-modal: the query is centred by its modality's centre (here fitted on these X-rays)
    centred_model = copy.deepcopy(tiny_model)
    centred_model.set_centre("xray", tiny_model.embed(samples[:4]))
    lib.fingerprint = centred_model.fingerprint
    query = centred_model.centre(tiny_model.embed(samples[0]), "xray")
    cross = lib.search_sample(centred_model, samples[0], k=10, exclude_modality="xray")
    np.testing.assert_allclose([h.score for h in cross], np.sort(query @ tiny_model.embed(samples[4:]).T)[::-1],
                               atol=1e-4)
    assert lib.search_sample(centred_model, samples[0], k=1)[0].id == ids[0]  # own modality: not centred
    lib.fingerprint = tiny_model.fingerprint
    text_hits = lib.search_text(tiny_model, "pneumonia", k=5, modality="xray")
    assert len(text_hits) == 4 and {h.modality for h in text_hits} == {"xray"}
    want = tiny_model.embed_text(["pneumonia"])[0] @ tiny_model.embed(samples[:4]).T
    np.testing.assert_allclose(sorted((h.score for h in text_hits), reverse=True), np.sort(want)[::-1], atol=1e-4)

    with pytest.raises(WrongModalityError):
        lib.add_samples(tiny_model, samples[:1], [{"modality": "ct"}])

    other = Library(tiny_model.dim, "another-model")
    with pytest.raises(LibraryMismatchError, match="another-model"):
        other.search_text(tiny_model, "pneumonia")
    with pytest.raises(LibraryMismatchError):
        other.add_samples(tiny_model, samples[:1])
    assert len(other) == 0
    other.close()
    lib.close()


def test_ecg_thumbnail_falls_back_when_lead_ii_is_missing(shared_data):
    import m3bind
    from m3bind.kinds import thumbnail_png

    header = sorted((shared_data / "ecg" / "ptbxl" / "records100").rglob("*.hea"))[0]
    sample = m3bind.load_input([header, header.with_suffix(".dat")])
    sample.preview[1] = 0
    sample.meta["lead_mask"] = [i != 1 for i in range(12)]
    drawn = np.asarray(Image.open(io.BytesIO(thumbnail_png(sample))))
    assert drawn.std() > 0
    sample.meta["lead_mask"] = [False] * 12
    assert thumbnail_png(sample) is None

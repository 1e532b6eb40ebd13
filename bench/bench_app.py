"""Benchmark of the web app as a user meets it: start-up, classify, search, map, memory.

``python bench/bench_app.py`` (``--runs N`` repetitions per timing, medians reported). Measures:

* cold start of ``python app.py`` to a served page, with an empty ``M3BIND_HOME`` (first start: the
  example library is built) and again with a 10,000-item library on disk;
* classify through HTTP as a page does (upload, then /classify in the page's session) for PNGs (the 512 px
  IHC tile, the 1411 px retina photo), a DICOM (CT_small) and an ECG (a PTB-XL WFDB record, two files),
  targets p50 <= 150 / 300 / 300 ms; the same as API calls without a session (each opens one), through
  ``gradio_client``, and the in-process ``model.classify`` time for comparison;
* text search over 10,000 library items (real images and ECGs from ../shared/data, embedded with the
  app's model; cached under ``--cache`` so reruns skip the embedding), target p50 <= 50 ms in process,
  plus the whole /search_text round trip (thumbnails included);
* a UMAP map of 5,000 of those items (target <= 30 s) and placing a new query into it (<= 300 ms);
* the app's resident memory (target <= 2 GiB).
Timings depend on the machine and its load; both are printed first.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import m3bind  # noqa: E402
from m3bind import explore  # noqa: E402
from m3bind.examples import example_files  # noqa: E402
from m3bind.library import Library  # noqa: E402

DATA = REPO.parent / "shared" / "data"
LIBRARY_ITEMS = 10_000
MAP_ITEMS = 5_000
# (dataset, how many): every image of the real data sets, the rest PTB-XL ECGs
SOURCES = (("pneumoniamnist", None), ("breastmnist", None), ("retinamnist", None), ("covid_cxr", None),
           ("lc25000_lung", None), ("ptbxl", None))
QUERIES = ("pneumonia", "pleural effusion", "lung adenocarcinoma", "proliferative diabetic retinopathy",
           "myocardial infarction", "malignant breast lesion", "normal ECG", "consolidation in the left lower lobe")


def machine() -> str:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))) / 2**20
    cores = len(os.sched_getaffinity(0))
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    import gradio
    return (f"{cpu}, {cores} cores available, {mem:.0f} GiB RAM, GPU: {gpu}; load average "
            f"{os.getloadavg()[0]:.1f}; Python {platform.python_version()}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), gradio {gradio.__version__}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(home: Path) -> tuple[subprocess.Popen, str, float]:
    """Starts ``python app.py``; returns (process, url, seconds until the page was served)."""
    import httpx

    port = free_port()
    env = {**os.environ, "M3BIND_HOME": str(home), "GRADIO_SERVER_PORT": str(port), "PYTHONWARNINGS": "ignore"}
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(REPO / "app.py")], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    while True:
        if proc.poll() is not None:
            raise RuntimeError("app.py exited during start-up")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return proc, url, time.perf_counter() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.1)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def rss_gib(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory of a process in GiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return (int(fields["VmRSS"].split()[0]) / 2**20, int(fields["VmHWM"].split()[0]) / 2**20)


def timed(fn, runs: int, warmup: int = 2) -> np.ndarray:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return np.array(out) * 1000


def report(name: str, ms: np.ndarray, target_ms: float | None = None) -> None:
    verdict = "" if target_ms is None else ("  PASS" if np.median(ms) <= target_ms else "  MISS") + \
        f" (target p50 <= {target_ms:g} ms)"
    print(f"{name:<52} p50 {np.median(ms):8.1f} ms   p90 {np.percentile(ms, 90):8.1f} ms   n={len(ms)}{verdict}",
          flush=True)


def http_call(http, url: str, api: str, data: list, session: str | None = None) -> None:
    """One call without gradio_client: post the call, read its event stream. A page makes its calls in one
    session (``session``); an API call without one opens a session of its own on the server."""
    body = {"data": data} if session is None else {"data": data, "session_hash": session}
    event = http.post(f"{url}gradio_api/call/{api}", json=body).json()["event_id"]
    stream = http.get(f"{url}gradio_api/call/{api}/{event}", timeout=60).text
    if "event: complete" not in stream:
        raise RuntimeError(f"/{api} failed: {stream[:300]}")


def upload(http, url: str, files: list[Path]) -> list[dict]:
    uploaded = []
    for path in files:
        with open(path, "rb") as fh:
            server_path = http.post(f"{url}gradio_api/upload", files={"files": (path.name, fh)}).json()[0]
        uploaded.append({"path": server_path, "orig_name": path.name, "meta": {"_type": "gradio.FileData"}})
    return uploaded


def build_library(model, cache: Path, items: int) -> Library:
    """10,000 real items embedded by ``model``, built once per model and kept in ``cache``."""
    path = cache / model.fingerprint / f"library-{items}"
    if path.exists():
        return Library.load(path, model.fingerprint)
    from train.data import SPLITS, load_dataset

    pairs = [p for name, _ in SOURCES for p in load_dataset(name, SPLITS).pairs][:items]
    library = Library.for_model(model)
    started = time.perf_counter()
    for start in range(0, len(pairs), 256):
        chunk = pairs[start:start + 256]
        samples = [p.load() for p in chunk]
        library.add_samples(model, samples, [{"source": Path(p.source).name, "label": p.class_name} for p in chunk])
        done = start + len(chunk)
        print(f"  embedded {done}/{len(pairs)} items ({done / (time.perf_counter() - started):.0f}/s)", flush=True)
    library.save(path)
    return library


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--items", type=int, default=LIBRARY_ITEMS)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "m3bind-bench")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    import httpx
    from gradio_client import Client, handle_file
    from pydicom.data import get_testdata_file

    import torch

    import app

    print("machine:", machine(), flush=True)
    model = m3bind.load_model()
    library = build_library(model, args.cache, args.items)  # with every core: the one slow step, done once
    torch.set_num_threads(app.serving_threads())  # as app.main() does, so in-process numbers compare
    print(f"model {model.config.name}; torch threads per request (app and in-process timings): "
          f"{torch.get_num_threads()}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="m3bind-bench-"))
    try:
        proc, _, seconds = start_app(work / "fresh")
        stop(proc)
        print(f"{'cold start, empty M3BIND_HOME (builds example library)':<52} {seconds:8.1f} s", flush=True)

        home = work / "big"
        shutil.copytree(args.cache / model.fingerprint / f"library-{args.items}",
                        home / "libraries" / model.fingerprint)
        proc, url, seconds = start_app(home)
        try:
            print(f"{f'cold start, {len(library):,}-item library on disk':<52} {seconds:8.1f} s", flush=True)
            client = Client(url, verbose=False, download_files=False)
            http = httpx.Client()
            page = uuid.uuid4().hex  # one page's session, as a browser tab keeps it
            stats = client.predict(api_name="/library_stats")
            assert f"{len(library)} items" in stats, f"the app did not load the benchmark library: {stats}"

            examples = example_files(home / "examples")
            ecg_header = sorted((DATA / "ecg" / "ptbxl" / "records100" / "00000").glob("*.hea"))[0]
            inputs = {"PNG (IHC tile 512 px)": ([examples["pathology"]], 150),
                      "PNG (retina 1411 px)": ([examples["retina"]], 150),
                      "DICOM (CT_small)": ([Path(get_testdata_file("CT_small.dcm"))], 300),
                      "ECG (PTB-XL WFDB .hea + .dat)": ([ecg_header, ecg_header.with_suffix(".dat")], 300)}
            for name, (files, target) in inputs.items():
                sample = m3bind.load_input(files if len(files) > 1 else files[0])
                labels = list(m3bind.get_modality(sample.modality).default_labels)
                options = ["auto", "\n".join(labels), None, None, None]  # modality, findings, window, rate
                report(f"classify {name}, HTTP upload + /classify",
                       timed(lambda: http_call(http, url, "classify", [upload(http, url, files), *options], page),
                             args.runs), target)
                report("  the same, a new session per call (API use)",
                       timed(lambda: http_call(http, url, "classify", [upload(http, url, files), *options]),
                             args.runs))
                report("  the same through gradio_client",
                       timed(lambda: client.predict([handle_file(f) for f in files], *options, api_name="/classify"),
                             args.runs))
                report("  in process: read + model.classify",
                       timed(lambda: model.classify(m3bind.load_input(files if len(files) > 1 else files[0]), labels),
                             args.runs))

            queries = iter(QUERIES * (args.runs + 10))
            report(f"text search, {len(library):,} items, in process (k=12)",
                   timed(lambda: library.search_text(model, next(queries), 12), args.runs * 4), 50)
            vectors = model.embed_text(list(QUERIES))
            report("  of which faiss search only", timed(lambda: library.search(vectors[0], 12), args.runs * 4))
            report(f"text search, {len(library):,} items, /search_text via HTTP",
                   timed(lambda: http_call(http, url, "search_text", [next(queries), [], 12, True], page), args.runs))
            report("  gradio_client round trip of a trivial call (/library_stats)",
                   timed(lambda: client.predict(api_name="/library_stats"), args.runs))
            current, peak = rss_gib(proc.pid)
            print(f"{'app resident memory (now / peak)':<52} {current:6.2f} / {peak:.2f} GiB"
                  f"  {'PASS' if peak <= 2 else 'MISS'} (target <= 2 GiB)", flush=True)
        finally:
            stop(proc)

        ids, x = library.vectors()
        pick = np.random.default_rng(0).choice(len(x), min(MAP_ITEMS, len(x)), replace=False)
        for label in ("first in a process, numba compiling", "warm"):
            started = time.perf_counter()
            coords, pca, reducer, method, note = explore.fit_map(x[pick])
            seconds = time.perf_counter() - started
            print(f"{f'{method} of {len(pick):,} items ({label})':<52} {seconds:8.1f} s"
                  f"  {'PASS' if seconds <= 30 else 'MISS'} (target <= 30 s)", flush=True)
        lmap = explore.LibraryMap(ids=ids[pick], coords=coords, modalities=[], labels=[], sources=[], method=method,
                                  note=note, _pca=pca, _umap=reducer)
        query = model.embed(m3bind.load_input(examples["retina"]))
        report("place a new query into the map", timed(lambda: lmap.place(query), args.runs), 300)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

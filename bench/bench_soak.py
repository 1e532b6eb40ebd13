"""Soak test of the served app (issue 18): many concurrent ``gradio_client`` clients for minutes, on loopback.

``python bench/bench_soak.py`` (default: 20 clients for 300 s; ``--clients N --seconds S``) starts
``python app.py`` with an empty home (so its example library), then every client loops over a weighted
mix of calls on real files read in place from ../shared/data: classify (45 %), text search (20 %), search
by an upload (15 %), add to the library (15 %) and the Explore map (5 %). Reported: per endpoint the
calls, errors, p50/p95 latency (queueing in the app included, since that is what a user waits for);
the server's resident memory, sampled every second: its peak, and its growth from the level after the warm-up
(a tenth of the run, and every endpoint answered once) to the level of the last 30 s, each level the median
of 30 s of samples (targets: peak < 2.5 GiB, growth < 10 %, 0 failures).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_app import DATA, machine, rss_gib, start_app, stop  # noqa: E402

PEAK_TARGET_GIB, GROWTH_TARGET = 2.5, 0.10
QUERIES = ("pneumonia", "pleural effusion", "lung adenocarcinoma", "proliferative diabetic retinopathy",
           "myocardial infarction", "glioma", "ground-glass opacities", "normal ECG")
FINDINGS = "normal\npneumonia\nmass"


def real_inputs(data: Path) -> list[list[Path]]:
    """Inputs of every kind: chest X-rays, CT, MRI, fundus photographs, pathology tiles, PTB-XL records."""
    def some(folder: str, n: int, pattern: str = "**/*.jpg") -> list[Path]:
        files = sorted((data / folder).glob(pattern))
        return files[:: max(1, len(files) // n)][:n]  # spread over the folder's classes

    images = [some(folder, n) for folder, n in (("cxr_nih", 40), ("covid_cxr/images", 40), ("ct/covid_ct", 40),
                                                ("mri/brain_tumor", 40), ("retina/idrid", 20),
                                                ("pathology/lc25000_lung", 40))]
    headers = some("ecg/ptbxl/records100", 40, "00000/*.hea")
    return [[f] for folder in images for f in folder] + [[h, h.with_suffix(".dat")] for h in headers]


def calls(rng: random.Random, inputs: list[list[Path]]) -> tuple[str, list]:
    """One call of the mix: (endpoint, arguments)."""
    from gradio_client import handle_file

    files = [handle_file(f) for f in rng.choice(inputs)]
    roll = rng.random()
    if roll < 0.45:
        return "/classify", [files, "auto", FINDINGS, None, None, None]
    if roll < 0.65:
        return "/search_text", [rng.choice(QUERIES), [], 12, False]
    if roll < 0.80:
        return "/search_similar", [files, "auto", None, None, None, 10, False]
    if roll < 0.95:
        return "/add_to_library", [files, "", "auto"]
    return "/explore", ["modality", "", False, None, "auto", None, None, None]


def client_loop(url: str, inputs: list[list[Path]], seed: int, until: float, results: dict, lock: threading.Lock
                ) -> None:
    from gradio_client import Client

    client, rng = None, random.Random(seed)
    while time.time() < until:
        # connecting fetches the API description, which a busy server may not give in time: counted, retried
        name, args = ("(connect)", None) if client is None else calls(rng, inputs)
        began = time.perf_counter()
        try:
            if client is None:
                client = Client(url, verbose=False)
            else:
                client.predict(*args, api_name=name)
            outcome = None
        except Exception as exc:  # every failure is counted and its first words kept
            outcome = f"{type(exc).__name__}: {str(exc)[:160]}"
        with lock:
            results[name].append((time.perf_counter() - began, outcome, time.time()))


def sample_rss(pid: int, stop_at: threading.Event, samples: list) -> None:
    while not stop_at.is_set():
        try:
            samples.append((time.time(), rss_gib(pid)[0]))
        except (OSError, KeyError):
            return
        stop_at.wait(1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--data", type=Path, default=DATA, help="the real data folder (default ../shared/data)")
    args = parser.parse_args()
    print(machine(), flush=True)
    print(f"command: python bench/bench_soak.py --clients {args.clients} --seconds {args.seconds:g}", flush=True)
    inputs = real_inputs(args.data)
    with tempfile.TemporaryDirectory(prefix="m3bind-soak-") as home:
        proc, url, start_s = start_app(Path(home))
        print(f"app served after {start_s:.1f} s; {len(inputs)} real inputs; {args.clients} clients for "
              f"{args.seconds:g} s", flush=True)
        results: dict[str, list] = defaultdict(list)
        lock, done, samples = threading.Lock(), threading.Event(), []
        sampler = threading.Thread(target=sample_rss, args=(proc.pid, done, samples), daemon=True)
        sampler.start()
        began = time.time()
        threads = [threading.Thread(target=client_loop, args=(url, inputs, i, began + args.seconds, results, lock))
                   for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        done.set()
        peak_hwm = rss_gib(proc.pid)[1]
        stop(proc)
    report(results, samples, warmed_up(results, began + args.seconds / 10), peak_hwm, time.time() - began)


def warmed_up(results: dict, earliest: float) -> float:
    """When the warm-up ends: a tenth of the run in, and not before every endpoint has answered once (the first
    Explore map compiles UMAP's code, a one-time cost that is not growth)."""
    firsts = [min((end for _, error, end in calls if not error), default=earliest) for calls in results.values()]
    return max([earliest, *firsts])


def level(samples: list, start: float, seconds: float = 30.0) -> float:
    """The server's memory level from ``start``: the median RSS over the next ``seconds`` (one large decode
    in flight is a peak, not a level)."""
    window = [rss for t, rss in samples if start <= t < start + seconds]
    return float(np.median(window)) if window else float("nan")


def report(results: dict, samples: list, warm: float, peak_hwm: float, wall: float) -> None:
    print(f"\n{'endpoint':<18} {'calls':>6} {'errors':>6} {'p50 ms':>8} {'p95 ms':>8}")
    failures = 0
    for name in sorted(results):
        ms = np.array([t for t, _, _ in results[name]]) * 1000
        errors = [e for _, e, _ in results[name] if e]
        failures += len(errors)
        print(f"{name:<18} {len(ms):>6} {len(errors):>6} {np.median(ms):>8.0f} {np.percentile(ms, 95):>8.0f}")
        for message in sorted(set(errors))[:3]:
            print(f"    {message}")
    total = sum(len(r) for r in results.values())
    end = samples[-1][0] if samples else warm
    at_warm, at_end = level(samples, warm), level(samples, end - 30.0)
    growth = (at_end - at_warm) / at_warm
    highest = max((rss for t, rss in samples if t >= warm), default=float("nan"))
    print(f"\n{total} calls in {wall:.0f} s ({total / wall:.1f}/s), {failures} failed")
    verdicts = ["PASS" if ok else "MISS" for ok in (peak_hwm < PEAK_TARGET_GIB, growth < GROWTH_TARGET)]
    print(f"server RSS: peak {peak_hwm:.2f} GiB (VmHWM; target < {PEAK_TARGET_GIB} GiB: {verdicts[0]}); "
          f"warm-up ended {warm - samples[0][0]:.0f} s in. Level (median of 30 s) {at_warm:.2f} GiB after the "
          f"warm-up, {at_end:.2f} GiB in the last 30 s: growth {100 * growth:.1f} % (target < "
          f"{100 * GROWTH_TARGET:.0f} %: {verdicts[1]}); highest sample after the warm-up {highest:.2f} GiB "
          f"({100 * (highest - at_warm) / at_warm:+.1f} % on the level)")


if __name__ == "__main__":
    main()

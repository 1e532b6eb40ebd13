"""Search benchmark of ``m3bind.Library``: latency, recall, save/load time and memory.

Rerunnable: ``python bench/bench_search.py`` (full: 100k exact, 1M approximate; several minutes, ~4 GB
RAM) or ``--quick`` (20k / 200k). Vectors are unit-norm draws from a mixture of Gaussian clusters
(one cluster per modality x finding, one rare modality), queries come from the same mixture but are not
in the library. Targets: exact p50 <= 20 ms at 100k, approximate p50 <= 10 ms at 1M with recall@10
>= 0.95, unfiltered and filtered to each modality alike, save and load <= 10 s each, peak RSS while
searching <= 1.5x the index size.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from m3bind.library import Library  # noqa: E402

MODALITIES = ("xray", "ct", "mri", "ultrasound", "retina", "pathology", "ecg")
RARE_MODALITY = "dermoscopy"  # one cluster holding ~0.2 % of the items


def clustered_vectors(n: int, dim: int, seed: int, n_clusters: int = 64,
                      centers_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) unit vectors from a fixed mixture of Gaussian clusters, and each one's cluster.

    The mixture (centres, spreads, weights) depends only on ``centers_seed``, so draws with another
    ``seed`` are new points of the same distribution. The last cluster is rare (weight 0.002).
    """
    mix = np.random.default_rng(centers_seed)
    centers = mix.standard_normal((n_clusters, dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    spread = mix.uniform(0.6, 1.2, n_clusters).astype(np.float32)  # cosine to centre ~0.65-0.85
    weights = np.full(n_clusters, 0.998 / (n_clusters - 1))
    weights[-1] = 0.002
    rng = np.random.default_rng(seed)
    cluster = rng.choice(n_clusters, n, p=weights / weights.sum())
    x = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        c = cluster[start:start + 100_000]
        block = rng.standard_normal((len(c), dim), dtype=np.float32)
        block *= (spread[c] / np.sqrt(dim))[:, None]
        block += centers[c]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        x[start:start + len(c)] = block
    return x, cluster


def modality_of(cluster: np.ndarray, n_clusters: int = 64) -> list[str]:
    return [RARE_MODALITY if c == n_clusters - 1 else MODALITIES[c % len(MODALITIES)] for c in cluster]


def build(n: int, dim: int, exact_threshold: int) -> tuple[Library, np.ndarray, list[str], float]:
    x, cluster = clustered_vectors(n, dim, seed=1)
    mods = modality_of(cluster)
    items = [{"modality": m, "source": f"item{i:07d}.png", "label": f"finding {c}"}
             for i, (m, c) in enumerate(zip(mods, cluster))]
    lib = Library(dim, "bench", exact_threshold=exact_threshold)
    start = time.perf_counter()
    lib.add(x, items)
    return lib, x, mods, time.perf_counter() - start


def latency(lib: Library, queries: np.ndarray, runs: int, **kwargs: object) -> str:
    """Median over runs of the p50 single-query latency of ``Library.search`` (metadata included).

    Wall time, and the thread's CPU time beside it: on a shared machine the first includes waiting for
    a core, the second is what the search itself costs.
    """
    wall, cpu = [], []
    for _ in range(runs):
        times = []
        for q in queries:
            start, start_cpu = time.perf_counter(), time.thread_time()
            lib.search(q, 10, **kwargs)
            times.append((time.perf_counter() - start, time.thread_time() - start_cpu))
        wall.append(np.median([t[0] for t in times]) * 1e3)
        cpu.append(np.median([t[1] for t in times]) * 1e3)
    return f"{np.median(wall):.2f} ms (CPU {np.median(cpu):.2f} ms)"


def recall_at_10(lib: Library, x: np.ndarray, queries: np.ndarray, mods: np.ndarray | None = None,
                 modality: str | list[str] | None = None, exact: bool = False) -> float:
    """Recall@10 of the library against exact search over x (ids are positions in x), optionally filtered."""
    keep = np.ones(len(x), bool) if modality is None else np.isin(mods, modality)
    _, truth = faiss.knn(queries, x[keep], 10, faiss.METRIC_INNER_PRODUCT)
    truth = np.flatnonzero(keep)[truth]
    hits = 0
    for q, want in zip(queries, truth):
        found = {h.id for h in lib.search(q, 10, modality=modality, exact=exact)}
        hits += len(found & set(want.tolist()))
    return hits / (10 * len(queries))


def _memory(field: str) -> int:
    """VmRSS / VmHWM of this process in bytes (Linux); ru_maxrss elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def rss_probe(path: str, dim: int, n_queries: int) -> None:
    """Run in a fresh process: load a saved library, search, report peak RSS against the index size."""
    baseline = _memory("VmRSS")  # interpreter, numpy, faiss, m3bind (which imports torch)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # restart the peak count: import transients excluded
    except OSError:
        pass
    lib = Library.load(path)
    queries, _ = clustered_vectors(n_queries, dim, seed=3)
    for q in queries:
        lib.search(q, 10)
        lib.search(q, 10, modality=RARE_MODALITY)
    index_bytes = os.path.getsize(Path(path) / "index.faiss")
    print(f"{baseline} {_memory('VmHWM')} {index_bytes}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=256, help="embedding dimension (the default model's: 256)")
    parser.add_argument("--quick", action="store_true", help="20k exact / 200k approximate instead of 100k / 1M")
    parser.add_argument("--runs", type=int, default=5, help="repetitions; medians are reported")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="faiss OpenMP threads")
    parser.add_argument("--workdir", default=None, help="where the big library is saved (default: a temp dir)")
    parser.add_argument("--rss-probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)
    if args.rss_probe:
        rss_probe(args.rss_probe, args.dim, args.queries)
        return

    n_exact, n_approx = (20_000, 200_000) if args.quick else (100_000, 1_000_000)
    print(f"machine: {platform.machine()} | cpus {os.cpu_count()} | load average {os.getloadavg()[0]:.1f} | "
          f"python {platform.python_version()} | numpy {np.__version__} | faiss {faiss.__version__} | "
          f"faiss threads {faiss.omp_get_max_threads()}")
    print(f"vectors: dim {args.dim}, 64 Gaussian clusters (1 rare), unit norm; {args.queries} held-out queries; "
          f"medians of {args.runs} runs")
    queries, query_cluster = clustered_vectors(args.queries, args.dim, seed=2)

    lib, x, _, build_s = build(n_exact, args.dim, exact_threshold=n_exact)
    print(f"\n[exact] {n_exact:,} items, {lib.stats()['index']}, built in {build_s:.1f} s")
    print(f"  p50 single query: {latency(lib, queries, args.runs)} (target <= 20 ms)")
    lib.close()
    del lib, x

    lib, x, mods, build_s = build(n_approx, args.dim, exact_threshold=50_000)
    stats = lib.stats()
    print(f"\n[approximate] {n_approx:,} items, {stats['index']}, nprobe {stats['nprobe']}, "
          f"built (train + add + calibrate) in {build_s:.1f} s")
    print(f"  p50 single query: {latency(lib, queries, args.runs)} (target <= 10 ms)")
    print(f"  recall@10 vs exact: {recall_at_10(lib, x, queries):.4f} (target >= 0.95)")
    mods = np.array(mods)
    print("  filtered to each modality (all queries, most of them from other modalities: the cross-modal case):")
    worst_recall, worst_p50 = 1.0, 0.0
    for name in (RARE_MODALITY, *MODALITIES):
        p50 = latency(lib, queries, args.runs, modality=name)
        found = recall_at_10(lib, x, queries, mods, name)
        worst_recall, worst_p50 = min(worst_recall, found), max(worst_p50, float(p50.split()[0]))
        print(f"    modality={name} ({(mods == name).sum():,} items): p50 {p50}, recall@10 {found:.4f}")
    print(f"    every modality: recall@10 >= {worst_recall:.4f} (target >= 0.95), p50 <= {worst_p50:.2f} ms "
          "(target <= 10 ms)")
    exact_p50 = latency(lib, queries, args.runs, modality=MODALITIES[0], exact=True)
    print(f"    modality={MODALITIES[0]} exact=True: p50 {exact_p50}, "
          f"recall@10 {recall_at_10(lib, x, queries, mods, MODALITIES[0], exact=True):.4f}")
    own = queries[np.array(modality_of(query_cluster)) == MODALITIES[0]]
    print(f"    modality={MODALITIES[0]}, its own {len(own)} queries: p50 "
          f"{latency(lib, own, args.runs, modality=MODALITIES[0])}, "
          f"recall@10 {recall_at_10(lib, x, own, mods, MODALITIES[0]):.4f}")
    others = [m for m in (RARE_MODALITY, *MODALITIES) if m != MODALITIES[0]]  # what the exclusion searches
    print(f"    exclude_modality={MODALITIES[0]}, its own {len(own)} queries (cross-modal search by an input): p50 "
          f"{latency(lib, own, args.runs, exclude_modality=MODALITIES[0])}, "
          f"recall@10 {recall_at_10(lib, x, own, mods, others):.4f}")
    del x

    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        path = Path(work) / "library"
        save_s, load_s = [], []
        for _ in range(max(1, min(args.runs, 3))):
            start = time.perf_counter()
            lib.save(path)
            save_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            Library.load(path).close()
            load_s.append(time.perf_counter() - start)
        size = sum(f.stat().st_size for f in path.iterdir())
        print(f"\n[persistence] {n_approx:,} items, {size / 2**20:.0f} MiB on disk: "
              f"save {np.median(save_s):.2f} s, load {np.median(load_s):.2f} s (targets <= 10)")
        lib.close()
        del lib
        out = subprocess.run([sys.executable, __file__, "--rss-probe", str(path), "--dim", str(args.dim),
                              "--threads", str(args.threads), "--queries", str(args.queries)],
                             check=True, capture_output=True, text=True).stdout.split()
        baseline, peak, index_bytes = (int(v) for v in out[-3:])
        print(f"[memory] fresh process, load + {2 * args.queries} searches: peak RSS {peak / 2**20:.0f} MiB "
              f"(of which {baseline / 2**20:.0f} MiB before loading: interpreter and imports), "
              f"index file {index_bytes / 2**20:.0f} MiB")
        print(f"  peak / index {peak / index_bytes:.2f}; (peak - imports) / index "
              f"{(peak - baseline) / index_bytes:.2f} (target <= 1.5)")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f} (other processes compete for the {os.cpu_count()} cpus "
          "when it exceeds that)")


if __name__ == "__main__":
    main()

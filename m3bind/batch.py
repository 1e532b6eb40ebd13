"""Embedding many files at once: folders, file lists, resumable, sharded across processes.

Why it is built this way:

* **Decoding runs beside the encoder.** A torch ``DataLoader`` runs ``load_input`` *and* the model's
  ``preprocess`` (grey conversion, padding, resize), in worker processes or, on a CPU of few cores,
  in the main process (``default_workers``); encoder *lanes*, threads that each encode whole batches,
  run beside it (``encoder_lanes``). Workers are forked, so the model is not pickled into them.
* **Images are read only as large as the towers need** (``decode_size``: for 64-px towers a 512-px
  JPEG is decoded at 1/8 scale, previews included), which keeps embeddings within a cosine of 0.99 of
  a full decode's (tests/test_batch_decode.py) and decoding cheap next to encoding.
* **Batches are per modality.** Workers take small tasks (``_TASK`` inputs, so a few hundred files
  keep every worker busy); the collate splits a task by modality and the main process gathers the
  pieces into encoder batches of exactly ``batch_size`` inputs of one modality.
* **Bad files never abort a run.** Each refused input is kept as a ``Refusal``: its ``InputError``
  subclass and message.
* **File names are patient data.** Unless the caller opts in (``keep_names``), no path or file name
  is stored, returned or written: items carry no ``source``, refused and skipped inputs are named by
  their content's SHA-256 (``sha256sum`` finds the file), and names quoted in messages are replaced.
* **Resumable.** An input's identity is the SHA-256 of its file bytes (all files of a WFDB record,
  in name order), stored as the library item's ``sha256``; with ``skip_existing`` the workers hash
  each input first and skip those already in the library, before decoding them, and the same bytes
  met twice in one run are embedded once. With ``save_to`` the library is saved while the run goes
  on (``_Checkpoints``), so a killed run resumes from its last save.
* **WFDB records are one input.** A ``.hea`` header is grouped with the files of the same stem beside
  it (``.dat``/``.mat`` signals, annotations); a signal file without its header is refused.
* **Sharding.** Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) or an initialised
  ``torch.distributed``, rank r embeds inputs r, r + W, ...; each rank writes its shard to a shared
  folder and rank 0 merges the shards, in the single-process order, into the result and the library.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .errors import ConfigError, InputError
from .inputs import PathLike, Record, Refusal, collect_inputs, input_sha256, name_input, refusal
from .inputs import group_records  # noqa: F401  (re-exported: m3bind.batch.group_records)
from .readers import load_input

# Inputs per worker task: small enough that a few hundred files keep every worker busy, large enough
# that the per-task hand-over cost stays negligible. Tasks are gathered into encoder batches.
_TASK = 16
# Encoder lanes at most: each holds a batch's activations.
_LANES = 8
@dataclass
class EmbedResult:
    """``embeddings`` (N, D) float32, row i belongs to ``items[i]`` (``modality``, ``sha256``, and
    ``source``, its path, only where names are kept).

    ``refused`` lists the inputs that could not be embedded; ``skipped`` names (as ``Refusal.source``
    does) those already in the library or met earlier in the run. Under sharding only rank 0
    (``primary``) holds the merged result.
    """

    embeddings: np.ndarray
    items: list[dict[str, Any]]
    refused: list[Refusal] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    primary: bool = True


class _InputDataset(Dataset):
    """Reads, checks and preprocesses one input per item (in a worker process)."""

    def __init__(self, model: Any, records: Sequence[Record], numbers: Sequence[int], modality: str | None,
                 known: frozenset[str], thumbnails: bool, keep_names: bool):
        self.model, self.records, self.numbers, self.modality = model, records, numbers, modality
        self.known, self.thumbnails, self.keep_names = known, thumbnails, keep_names
        self.decode_size = decode_size(model, thumbnails)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[str, int, Any]:
        record, sha = self.records[i], None
        try:
            sha = input_sha256(record)
            if sha in self.known:
                return "skipped", i, name_input(record, sha, self.keep_names, self.numbers[i])
            sample = load_input(list(record) if len(record) > 1 else record[0], self.modality,
                                decode_size=self.decode_size)
            tensor = self.model.preprocess(sample)
        except InputError as exc:
            return "refused", i, refusal(record, sha, self.numbers[i], str(exc), type(exc).__name__,
                                         self.keep_names)
        except Exception as exc:  # a reader bug must not end a long run; it is reported with the file
            # (only the error's type: a third-party message might quote a header value)
            return "refused", i, refusal(record, sha, self.numbers[i], f"Unexpected error while reading it "
                                         f"({type(exc).__name__}); please report it.", type(exc).__name__,
                                         self.keep_names)
        item = {"modality": sample.modality, "sha256": sha}
        if self.keep_names:
            item["source"] = str(record[0])
        if self.thumbnails:
            from .kinds import thumbnail_png

            item["thumbnail"] = thumbnail_png(sample)
        return "ok", i, (tensor, item)


def _collate(rows: list[tuple[str, int, Any]]) -> dict[str, Any]:
    """One loader batch: a stacked sub-batch per modality, plus the refused and skipped inputs."""
    groups: dict[str, tuple[list[int], list[torch.Tensor], list[dict]]] = {}
    refused, skipped = [], []
    for status, i, payload in rows:
        if status == "ok":
            tensor, item = payload
            indices, tensors, items = groups.setdefault(item["modality"], ([], [], []))
            indices.append(i)
            tensors.append(tensor)
            items.append(item)
        elif status == "refused":
            refused.append(payload)
        else:
            skipped.append(payload)
    return {"groups": {m: (idx, torch.stack(ts), items) for m, (idx, ts, items) in groups.items()},
            "refused": refused, "skipped": skipped}


def embed_files(
    model: Any,
    paths_or_folder: PathLike | Iterable[PathLike],
    modality: str | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    device: str | torch.device | None = None,
    library: Any = None,
    skip_existing: bool = True,
    progress: bool = True,
    shard_dir: PathLike | None = None,
    *,
    keep_names: bool = False,
    save_to: PathLike | None = None,
    save_every: float = 60.0,
) -> EmbedResult:
    """Embeds every input under the given files/folders; adds them to ``library`` when one is given.

    ``num_workers`` None picks from the CPU count; ``device`` moves the model there (default: where it
    is). ``shard_dir`` is the folder all ranks share when sharded (default: a temporary folder of rank
    0, which suffices on one machine). On the CPU, torch's thread count is changed while it runs
    (``encoder_lanes``), then restored. ``keep_names`` is the user's opt-in to paths and file names in
    the result and the library. ``save_to`` saves ``library`` there during the run (see ``_Checkpoints``)
    and at its end, where anything was added.
    """
    if batch_size < 1:
        raise ConfigError("batch_size must be at least 1")
    if save_to is not None and library is None:
        raise ConfigError("save_to needs a library")
    if device is not None:
        model.to(device)
    if library is not None:
        library.check_model(model)
    rank, world, group = _distributed()
    records, unpaired = collect_inputs(paths_or_folder)
    if not keep_names:
        unpaired = [refusal((Path(r.source),), _sha_or_none((Path(r.source),)), -1, r.reason, r.error, False)
                    for r in unpaired]
    positions = list(range(rank, len(records), world))
    known = frozenset(library_hashes(library)) if library is not None and skip_existing else frozenset()
    checkpoints = _Checkpoints(library, save_to, save_every if world == 1 else float("inf"))
    embeddings, items, refused, skipped = _run(
        model, [records[p] for p in positions], positions, modality, batch_size, num_workers, known,
        thumbnails=library is not None, library=library if world == 1 else None, progress=progress and rank == 0,
        keep_names=keep_names, checkpoints=checkpoints)
    if world == 1:
        if items:
            checkpoints.save()
        return EmbedResult(embeddings, _strip(items), unpaired + refused, skipped)
    result = _merge_shards(rank, world, group, shard_dir, library, positions, embeddings, items,
                           unpaired + refused if rank == 0 else refused, skipped, model.dim)
    if result.primary and result.items:
        checkpoints.save()
    return result


def _sha_or_none(record: Record) -> str | None:
    try:
        return input_sha256(record)
    except InputError:
        return None


class _Checkpoints:
    """Saves the library to ``path`` while a run adds to it, so that a killed run loses at most the
    inputs embedded since the last save (its resume skips the saved ones by their hashes): at most every
    ``every`` seconds, and at most a tenth of the run's time (a save rewrites the whole library)."""

    def __init__(self, library: Any, path: PathLike | None, every: float):
        self.library, self.path, self.every = library, path, every
        self.due = time.monotonic() + every

    def maybe(self) -> None:
        if self.path is not None and time.monotonic() >= self.due:
            self.save()

    def save(self) -> None:
        if self.path is None:
            return
        began = time.monotonic()
        self.library.save(self.path)
        self.due = time.monotonic() + max(self.every, 9 * (time.monotonic() - began))


def _run(model: Any, records: list[Record], numbers: list[int], modality: str | None, batch_size: int,
         num_workers: int | None, known: frozenset[str], thumbnails: bool, library: Any, progress: bool,
         keep_names: bool, checkpoints: _Checkpoints) -> tuple[np.ndarray, list[tuple[int, dict]], list[Refusal],
                                                                list[str]]:
    """Encodes the records; returns embeddings with their (record position, item), refused, skipped."""
    from tqdm.auto import tqdm

    from .readers import dicom, ecg, image  # noqa: F401  (imported once here, not again in every worker)

    device = model.device
    workers = default_workers(len(records), batch_size, device) if num_workers is None else num_workers
    task = min(batch_size, _TASK)
    # Workers decode up to two encoder batches ahead.
    ahead = {"multiprocessing_context": _fork(),
             "prefetch_factor": max(2, -(-2 * batch_size // (task * workers)))} if workers else {}
    dataset = _InputDataset(model, records, numbers, modality, known, thumbnails, keep_names)
    loader = DataLoader(dataset, batch_size=task, num_workers=workers, collate_fn=_collate,
                        pin_memory=device.type == "cuda", **ahead)
    chunks: list[np.ndarray] = []
    items: list[tuple[int, dict]] = []
    refused: list[Refusal] = []
    skipped: list[str] = []
    seen: set[str] = set()
    pending = _Batcher(batch_size)
    lanes, lane_threads = encoder_lanes(device, workers)
    running: deque[tuple[Future, list[int], list[dict]]] = deque()
    autocast = {"device_type": device.type, "enabled": torch.is_autocast_enabled(device.type),
                "dtype": torch.get_autocast_dtype(device.type)}

    def finish(keep: int) -> None:
        """Collects finished batches, in order, until at most ``keep`` are still encoding."""
        while len(running) > keep:
            future, indices, group_items = running.popleft()
            vectors = future.result()
            if library is not None:
                library.add(vectors, group_items)
                checkpoints.maybe()
            chunks.append(vectors)
            items.extend(zip(indices, group_items))

    def encode(group_modality: str, tensor: torch.Tensor, indices: list[int], group_items: list[dict]) -> None:
        running.append((pool.submit(_encode, model, group_modality, tensor, autocast), indices, group_items))
        finish(2 * lanes)  # every lane busy, and a batch waiting for each

    with tqdm(total=len(records), unit="file", disable=not progress, desc="Embedding") as bar, \
            torch.inference_mode(), _torch_threads(lane_threads), ThreadPoolExecutor(lanes) as pool:
        for done in loader:
            for group_modality, group in done["groups"].items():
                indices, tensor, group_items, repeats = _first_seen(seen, *group)
                skipped += [name_input(records[i], item["sha256"], keep_names, numbers[i]) for i, item in repeats]
                for full in pending.add(group_modality, indices, tensor.to(device, non_blocking=True), group_items):
                    encode(*full)
            refused += done["refused"]
            skipped += done["skipped"]
            bar.set_postfix(refused=len(refused), skipped=len(skipped), refresh=False)
            bar.update(sum(len(g[0]) for g in done["groups"].values()) + len(done["refused"]) + len(done["skipped"]))
        for rest in pending.drain():
            encode(*rest)
        finish(0)
    embeddings = np.concatenate(chunks) if chunks else np.zeros((0, model.dim), dtype=np.float32)
    order = sorted(range(len(items)), key=lambda j: items[j][0])  # modality groups back into input order
    return embeddings[order], [items[j] for j in order], refused, skipped


def _first_seen(seen: set[str], indices: list[int], tensor: torch.Tensor, items: list[dict]
                ) -> tuple[list[int], torch.Tensor, list[dict], list[tuple[int, dict]]]:
    """Keeps the inputs whose content this run has not met yet (the same bytes under two names are one
    input); returns them and the (position, item) of the repeats."""
    keep = []
    for j, item in enumerate(items):
        if item["sha256"] not in seen:
            seen.add(item["sha256"])
            keep.append(j)
    if len(keep) == len(items):
        return indices, tensor, items, []
    repeats = [(indices[j], items[j]) for j in range(len(items)) if j not in set(keep)]
    return [indices[j] for j in keep], tensor[keep], [items[j] for j in keep], repeats


class _Batcher:
    """Gathers the small per-worker tasks into encoder batches of exactly ``batch_size`` per modality."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.parts: dict[str, tuple[list[int], list[torch.Tensor], list[dict]]] = {}

    def add(self, modality: str, indices: list[int], tensor: torch.Tensor, items: list[dict]) -> list[tuple]:
        indices_so_far, tensors, items_so_far = self.parts.setdefault(modality, ([], [], []))
        indices_so_far += indices
        tensors.append(tensor)
        items_so_far += items
        return self._take(modality, len(indices_so_far) - len(indices_so_far) % self.batch_size)

    def drain(self) -> list[tuple]:
        """Whatever is left, in batches of at most ``batch_size``."""
        return [batch for modality in list(self.parts)
                for batch in self._take(modality, len(self.parts[modality][0]))]

    def _take(self, modality: str, n: int) -> list[tuple]:
        """The first n pending inputs of a modality, as (modality, tensor, indices, items) batches."""
        if n == 0:
            return []
        indices, tensors, items = self.parts.pop(modality)
        x = torch.cat(tensors) if len(tensors) > 1 else tensors[0]
        if n < len(indices):
            self.parts[modality] = (indices[n:], [x[n:]], items[n:])
        return [(modality, x[s:min(s + self.batch_size, n)], indices[s:min(s + self.batch_size, n)],
                 items[s:min(s + self.batch_size, n)]) for s in range(0, n, self.batch_size)]


def decode_size(model: Any, thumbnails: bool) -> int:
    """How large images are read: the largest image tower's input (the reader resamples as the towers
    do, so the tower's own resize then changes nothing). Where thumbnails are made, twice their size:
    the tower's resize from an image only a little larger than its input blurs more than one from the
    full image does (a cosine to the full decode's embedding down to 0.990 at 128 px, 0.996 at 256)."""
    size = max((tower.image_size for tower in model.config.towers.values() if tower.kind == "image"), default=0)
    if thumbnails:
        from .kinds import THUMBNAIL_PX

        size = max(size, 2 * THUMBNAIL_PX)
    return size


def default_workers(n_inputs: int, batch_size: int, device: str | torch.device = "cpu") -> int:
    """Decoding processes: none for a single batch; on a GPU one per core (at most 16), since decoding is
    then the bottleneck; on the CPU a quarter of the cores, taken from the encoder lanes.

    On the CPU, decoding to the towers' size costs a fraction of encoding, and below 4 cores a worker
    costs more than it saves (forking and ending a process holding the model, handing tensors over):
    the main process then decodes while the lanes encode.
    """
    if n_inputs <= batch_size:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(16, cores) if torch.device(device).type != "cpu" else cores // 4


def encoder_lanes(device: torch.device, workers: int) -> tuple[int, int]:
    """(lanes, torch threads per lane): encoder threads that each encode whole batches, side by side.

    On the CPU the caller's torch threads, less one per decoding worker, are shared out among at most
    ``_LANES`` lanes, one thread each where they suffice. At the towers' small inputs a one-thread
    batch wastes nothing, while the threads of one batch wait for each other at every layer, all the
    more when decoding shares their cores: on 2 cores two one-thread lanes encode about 1.25 times as
    fast as one two-thread batch, and several times as fast under load. On a GPU one lane keeps the
    threads.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu":
        return 1, threads
    spare = max(1, threads - workers)
    per_lane = -(-spare // _LANES)
    return spare // per_lane, per_lane


@contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads set for the run (lanes started inside inherit it), then given back."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _encode(model: Any, modality: str, tensor: torch.Tensor, autocast: dict[str, Any]) -> np.ndarray:
    """One batch, in a lane thread: inference mode and the caller's autocast are per thread."""
    with torch.inference_mode(), torch.autocast(**autocast):
        return model.encode(modality, tensor).float().cpu().numpy()


def library_hashes(library: Any) -> set[str]:
    """The SHA-256 of every item already in the library."""
    return library.sha256s()


def _fork() -> Any:
    import multiprocessing

    return multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None


def _strip(items: list[tuple[int, dict]]) -> list[dict]:
    """Items as returned: without their record positions and thumbnails (those live in the library)."""
    return [{k: v for k, v in item.items() if k != "thumbnail"} for _, item in items]


# -------------------------------------------------------------------------------------- sharding
def _distributed() -> tuple[int, int, Any]:
    """(rank, world size, gloo process group) of this process; (0, 1, None) when not sharded."""
    import torch.distributed as dist

    if not (dist.is_available() and (dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) > 1)):
        return 0, 1, None
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return dist.get_rank(), dist.get_world_size(), group


def _merge_shards(rank: int, world: int, group: Any, shard_dir: PathLike | None, library: Any,
                  positions: list[int], embeddings: np.ndarray, items: list[tuple[int, dict]],
                  refused: list[Refusal], skipped: list[str], dim: int) -> EmbedResult:
    """Every rank writes its shard; rank 0 merges them in input order (and into the library)."""
    import torch.distributed as dist

    owned = shard_dir is None
    where = [tempfile.mkdtemp(prefix="m3bind-shards-") if owned and rank == 0 else shard_dir]
    dist.broadcast_object_list(where, src=0, group=group)
    folder = Path(where[0])
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"shard-{rank}.npy", embeddings)
    shard = {"items": [[positions[i], _jsonable(item)] for i, item in items], "refused": refused, "skipped": skipped}
    (folder / f"shard-{rank}.json").write_text(json.dumps(shard))
    dist.barrier(group=group)
    if rank != 0:
        return EmbedResult(embeddings, _strip(items), refused, skipped, primary=False)
    rows, vectors, all_refused, all_skipped = [], [], [], []
    for r in range(world):
        shard = json.loads((folder / f"shard-{r}.json").read_text())
        vectors.append(np.load(folder / f"shard-{r}.npy"))
        rows += [(pos, _from_json(item)) for pos, item in shard["items"]]
        all_refused += [Refusal(*x) for x in shard["refused"]]
        all_skipped += shard["skipped"]
    if owned:
        shutil.rmtree(folder, ignore_errors=True)
    merged = np.concatenate(vectors) if vectors else np.zeros((0, dim), dtype=np.float32)
    order = sorted(range(len(rows)), key=lambda j: rows[j][0])
    merged, rows = merged[order], [rows[j] for j in order]
    if library is not None and rows:
        library.add(merged, [item for _, item in rows])
    return EmbedResult(merged, _strip(rows), sorted(all_refused), sorted(all_skipped))


def _jsonable(item: dict) -> dict:
    thumbnail = item.get("thumbnail")
    return {**item, "thumbnail": None if thumbnail is None else base64.b64encode(thumbnail).decode()}


def _from_json(item: dict) -> dict:
    thumbnail = item.get("thumbnail")
    return {**item, "thumbnail": None if thumbnail is None else base64.b64decode(thumbnail)}

"""The inputs of a batch run, found, grouped, hashed and named without torch.

The CLI reports files it refuses (and ``batch`` names every input) through these functions; they live
apart from ``batch`` so that refusing a bad file does not import torch (seconds at start).
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

from .errors import MissingFileError

PathLike = str | os.PathLike
Record = tuple[Path, ...]  # one input: a file, or a WFDB header followed by the files of its record

_WFDB_SIGNALS = (".dat", ".mat")
# Suffixes of files that stand alone even when a WFDB header of the same stem lies beside them.
_STANDALONE = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif", ".dcm", ".dicom",
               ".csv", ".tsv", ".txt", ".npy")
# A file name with the suffix of an input (messages quote them; see ``refusal``).
_FILE_NAME = re.compile(r"[\w.~-]*\w\.(?:%s|hea|atr)(?![\w-])" % "|".join(s[1:] for s in _STANDALONE + _WFDB_SIGNALS),
                        re.IGNORECASE)


class Refusal(NamedTuple):
    """An input that could not be embedded. ``source`` names it: its path where names are kept, else
    ``sha256:`` and the first 16 hex digits of its content's SHA-256 (``input N`` if unreadable);
    ``reason`` says why, for a person; ``error`` is the name of the ``InputError`` subclass."""

    source: str
    reason: str
    error: str


def collect_inputs(paths_or_folder: PathLike | Iterable[PathLike]) -> tuple[list[Record], list[Refusal]]:
    """The inputs under the given files and folders (recursively, hidden files left out), sorted.

    Returns (records, refused): a WFDB signal file whose header is missing is refused here.
    """
    roots = [paths_or_folder] if isinstance(paths_or_folder, (str, os.PathLike)) else list(paths_or_folder)
    files: list[Path] = []
    for root in map(Path, roots):
        if root.is_dir():
            for folder, dirs, names in os.walk(root):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                files += [Path(folder) / n for n in names if not n.startswith(".")]
        elif root.suffix.lower() in (".hea", *_WFDB_SIGNALS):  # with the rest of its record
            files += [root, *(f for f in root.parent.glob(glob.escape(root.stem) + ".*")
                              if f.suffix.lower() not in _STANDALONE)]
        else:
            files.append(root)  # a missing file is refused by load_input with a readable message
    return group_records(files)


def group_records(files: Sequence[Path]) -> tuple[list[Record], list[Refusal]]:
    """Groups each WFDB header with the files of its stem beside it; every other file is its own input."""
    unique = sorted(set(files))
    headers = {(f.parent, f.stem): f for f in unique if f.suffix.lower() == ".hea"}
    members: dict[Path, list[Path]] = {h: [] for h in headers.values()}
    records: list[Path] = []
    refused: list[Refusal] = []
    for f in unique:
        header = headers.get((f.parent, f.stem))
        if header is not None and f != header and f.suffix.lower() not in _STANDALONE:
            members[header].append(f)
        elif header is None and f.suffix.lower() in _WFDB_SIGNALS:
            refused.append(Refusal(str(f), f"{f.name} is the signal file of a WFDB record, but its header "
                                           f"({f.stem}.hea) is not beside it.", MissingFileError.__name__))
        else:
            records.append(f)
    return [(f, *members.get(f, ())) for f in records], refused


def input_sha256(record: Record) -> str:
    """The identity of an input: the SHA-256 of its files' bytes, in name order."""
    digest = hashlib.sha256()
    for path in sorted(record, key=lambda p: p.name):
        try:
            with open(path, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    digest.update(chunk)
        except OSError as exc:
            raise MissingFileError(f"Cannot read {path.name}: {exc.strerror or exc}") from None
    return digest.hexdigest()


def name_input(record: Record, sha: str | None, keep_names: bool, number: int) -> str:
    """How an input is named in reports: its path where names are kept, else by its content (or, when its
    files cannot be read, by its place among the sorted inputs, counted from 1)."""
    if keep_names:
        return str(record[0])
    return f"sha256:{sha[:16]}" if sha else f"input {number + 1}"


def refusal(record: Record, sha: str | None, number: int, reason: str, error: str, keep_names: bool) -> Refusal:
    """A refused input, named as ``name_input`` does. Without names, the file names a reason quotes become
    "the file": the record's paths, names and stem (a missing header's name too), and any name with an
    input's suffix (a WFDB header names its signal files after the original record)."""
    if not keep_names:
        for path in record:
            reason = reason.replace(str(path), "the file")
        stems = "|".join(sorted({re.escape(p.stem) for p in record if p.stem}, key=len, reverse=True))
        if stems:
            reason = re.sub(rf"(?<![\w.-])(?:{stems})(?:\.[\w-]+)*(?![\w-])", "the file", reason)
        reason = _FILE_NAME.sub("the file", reason)
    return Refusal(name_input(record, sha, keep_names, number), reason, error)

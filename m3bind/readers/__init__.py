"""``load_input``: any supported file, bytes or WFDB record in, one checked ``Sample`` out.

The format is sniffed from the content (magic bytes), never trusted from the extension alone; each
format has one reader module (``image``, ``dicom``, ``ecg``). Every failure is an ``InputError``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

from ..errors import (CorruptFileError, InputTooLargeError, MissingFileError, UnsupportedFormatError,
                      WrongModalityError)
from ..kinds import input_kind
from ..modalities import get_modality
from ..sample import Sample

Source = Union[str, os.PathLike, bytes, bytearray, Sequence[Union[str, os.PathLike]]]


@dataclass(frozen=True)
class Limits:
    """Ceilings that keep hostile inputs from exhausting memory or time."""

    max_bytes: int = 512 * 1024 * 1024
    max_pixels: int = 120_000_000  # per decoded frame (also caps PIL's decompression-bomb check)
    # Per decoded image or DICOM frame, from the header before decoding: width x height x channels x bytes
    # per sample. A small file can decode huge (a 233 KB 16-bit PNG of 10950 x 10950 is 240 MB decoded,
    # and some 3 GB while it is turned into a Sample). 48 MiB admits a 4288 x 2848 RGB photograph
    # (35 MiB), a 4096 x 4096 RGB tile (48 MiB), a 3000 x 3000 16-bit DICOM (17 MiB), and keeps an 8-bit
    # colour image under about 400 MB of working memory (a Sample is 12 bytes a pixel).
    max_decoded_bytes: int = 48 * 1024 * 1024
    max_frames: int = 2_000
    max_ecg_samples: int = 20_000_000  # samples per lead before resampling
    max_ecg_leads: int = 64


DEFAULT_LIMITS = Limits()

IMAGE_FORMATS = ("png", "jpeg", "tiff", "bmp", "webp", "gif")


def check_decoded_size(width: int, height: int, channels: int, bytes_per_sample: float, limits: Limits,
                       what: str = "The image") -> None:
    """Refuse, before decoding, an item whose decoded pixels would exceed ``limits.max_decoded_bytes``."""
    size = width * height * channels * bytes_per_sample
    if size > limits.max_decoded_bytes:
        depth = f"{channels} channel{'s' if channels != 1 else ''} of {round(bytes_per_sample * 8)} bits"
        raise InputTooLargeError(
            f"{what} is {width} x {height} pixels with {depth}: {size / 2**20:.0f} MB once decoded; the limit "
            f"is {limits.max_decoded_bytes / 2**20:.0f} MB. It was refused before decoding.")


def sniff_format(head: bytes, name: str = "") -> str | None:
    """Name the format from the first bytes (and, for text formats, the file name)."""
    suffix = Path(name).suffix.lower()
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head.startswith(b"BM") and suffix in ("", ".bmp", ".dib"):
        return "bmp"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if suffix == ".hea":
        return "wfdb"
    if suffix in (".dat", ".mat"):
        return "wfdb"  # the signal file of a WFDB record: its header is read beside it
    if suffix in (".csv", ".txt", ".tsv"):
        return "csv"
    if suffix == ".dcm" or suffix == ".dicom":
        return "dicom"  # DICOM without the 128-byte preamble; the DICOM reader verifies it
    return None


def _read_bytes(path: Path, limits: Limits) -> bytes:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise MissingFileError(f"File not found: {path.name}") from None
    except OSError as exc:
        raise MissingFileError(f"Cannot read {path.name}: {exc.strerror or exc}") from None
    if not path.is_file():
        raise MissingFileError(f"{path.name} is not a file.")
    if size > limits.max_bytes:
        raise InputTooLargeError(
            f"{path.name} is {size / 2**20:.0f} MB; the limit is {limits.max_bytes / 2**20:.0f} MB.")
    return path.read_bytes()


def load_input(
    source: Source,
    modality: str | None = None,
    *,
    name: str = "",
    sampling_rate: float | None = None,
    window: tuple[float, float] | None = None,
    limits: Limits = DEFAULT_LIMITS,
    decode_size: int | None = None,
) -> Sample:
    """Read one image, DICOM object or ECG record into a ``Sample``.

    ``source`` is a path, raw bytes (``name`` then gives the original file name, which matters only for
    text formats such as CSV), or the list of files of one WFDB record (header plus signal file).
    ``modality`` overrides detection; it must be of the same reader kind as the file.
    ``sampling_rate`` applies to CSV/NPY ECGs that carry none. ``window`` = (centre, width) overrides
    the DICOM VOI window. ``decode_size`` is for callers that shrink images anyway (batch embedding): larger
    images (plain 8-bit and 16-bit grey files, and DICOM grey frames once windowed) come back with their long
    side at ``decode_size``.
    """
    from . import ecg, image

    if modality is not None:
        get_modality(modality)  # unknown names fail before any decoding
    if isinstance(source, (list, tuple)):
        paths = [Path(p) for p in source]
        if not paths:
            raise MissingFileError("No file was given.")
        headers = [p for p in paths if p.suffix.lower() == ".hea"]
        if len(paths) == 1 or not headers:
            return load_input(paths[0], modality, name=name, sampling_rate=sampling_rate, window=window,
                              limits=limits, decode_size=decode_size)
        sample = ecg.read_wfdb(headers[0], limits, files=paths)
        return _apply_modality(sample, modality)

    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if len(data) > limits.max_bytes:
            raise InputTooLargeError(
                f"The upload is {len(data) / 2**20:.0f} MB; the limit is {limits.max_bytes / 2**20:.0f} MB.")
        path = None
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = name or path.name
        fmt = sniff_format(b"", name)
        if fmt == "wfdb":
            return _apply_modality(ecg.read_wfdb(path, limits), modality)
        data = _read_bytes(path, limits)
    else:
        raise UnsupportedFormatError(f"Cannot read an input of type {type(source).__name__}.")

    if not data:
        raise CorruptFileError(f"{name or 'The file'} is empty.")
    fmt = sniff_format(data[:512], name)
    if fmt == "dicom":
        from . import dicom  # only here: pydicom takes ~0.7 s to import

        sample = dicom.read_dicom(data, limits, window=window, decode_size=decode_size)
    elif fmt in IMAGE_FORMATS:
        sample = image.read_image(data, limits, decode_size)
    elif fmt in ("npy", "csv"):
        sample = ecg.read_ecg_array(data, fmt, limits, sampling_rate=sampling_rate)
    elif fmt == "wfdb":
        raise UnsupportedFormatError(
            "A WFDB record needs its header (.hea) and signal file together; upload both files.")
    else:
        raise UnsupportedFormatError(
            f"{name or 'This file'} is not a supported format. Supported: PNG, JPEG, TIFF, BMP, WebP, "
            "DICOM images and ECG waveforms, WFDB records (.hea with .dat or .mat), CSV and NPY ECGs.")
    sample.meta.setdefault("format", fmt)
    return _apply_modality(sample, modality)


def _apply_modality(sample: Sample, modality: str | None) -> Sample:
    """The caller's modality replaces the file's own (``modality_source`` "user"; what the file suggested,
    if it differs, stays in ``detected_modality``), so no detector overrides it later."""
    if modality is None:
        return sample
    wanted = get_modality(modality)
    if wanted.kind != sample.kind:
        raise WrongModalityError(f"This file is {input_kind(sample.kind).description}, "
                                 f"not a {wanted.title} {input_kind(wanted.kind).item_word}.")
    if wanted.name != sample.modality:
        sample.meta["detected_modality"] = sample.modality
    sample.modality = wanted.name
    sample.meta["modality_source"] = "user"
    return sample

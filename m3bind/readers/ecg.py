"""ECG readers: WFDB records and CSV/NPY arrays, all made canonical by ``sample_from_signal``.

Canonical form (``m3bind.sample.Sample``): float32 (12, 1000) in mV, the leads of ``LEADS`` in that
order, 100 Hz, 10 s. Every source (WFDB, CSV, NPY, DICOM waveform) goes through the same rules, so an
ECG means the same to the model whatever file it came in:

* **Window.** The first 10 s are used (``meta["window_s"]``); a shorter record (at least 2 s) is
  zero-padded at the end (``meta["padded_s"]``). ``meta["duration_s"]`` is the whole record's length.
* **Resampling.** Polyphase resampling to 100 Hz (``resample_poly``: scipy's method and default filter, whose
  FIR low-pass is the anti-aliasing filter); the per-lead median is subtracted first; no other filtering.
* **Leads by name.** Case, "Lead"/"ECG" words, separators and bracketed qualifiers are ignored
  ("Lead I (Einthoven)", "lead_ii", "AVR" all match). The modified limb leads MLI/MLII/MLIII (e.g.
  MIT-BIH) and the DI/DII/DIII notation count as I/II/III. Anything else (Frank X/Y/Z, "V", V7-V9,
  right-sided V3R/V4R, an inverted "-aVR") is dropped and listed in ``meta["dropped_leads"]``; a lead
  named twice keeps its first channel. Exactly 12 unnamed channels (headerless CSV, NPY, "ch1".."ch12")
  are taken in the standard order (``meta["standard_order_assumed"]``).
* **Missing leads** are zeros with ``meta["lead_mask"]`` False; they are never derived from other leads.
* **Gaps and flat leads.** Within the samples used, a lead that is all NaN, or constant (a flat line:
  unconnected or zero-filled), is missing (``meta["flat_leads"]`` names the flat ones). NaN runs up to
  40 ms are linearly interpolated (``meta["interpolated_leads"]``); longer runs are set to the lead's
  baseline, zero (``meta["zeroed_leads"]``); a lead with under half its samples present is missing
  (``meta["gappy_leads"]``). A record with no usable lead is refused. Infinite values are refused.
* **Units.** WFDB values are converted to mV from the header's units (channels in mmHg etc. are
  dropped); CSV/NPY values are taken as mV unless a CSV column name says otherwise ("V1 (uV)").
* **WFDB frames.** A header may leave out the signal length (it then comes from the signal file's size).
  A channel with several samples per frame is read at its own rate, fs x samps_per_frame
  (``meta["samples_per_frame"]``), never as frame averages. The header's fields are checked before wfdb
  reads it: a truncated header, a count of signal lines other than declared, a non-numeric or non-positive
  rate or length, or an unknown storage format is a ``CorruptFileError`` (or ``UnsupportedFormatError``).
* **CSV** lines starting with ``#`` are comments, skipped before anything else (the delimiter included).
* **Sampling rate** of a CSV/NPY: given by the caller, else from a CSV time column; else only a
  10-s length at a common rate is recognised (1000/1250/2500/5000/10000 samples = 100/125/250/500/
  1000 Hz, ``meta["fs_source"]``); anything else is refused with a request for the rate.
* **Privacy.** WFDB header comments (age, sex, diagnoses, dates) are never read into ``meta``.
"""

from __future__ import annotations

import io
import math
import os
import re
import shutil
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from ..errors import (CorruptFileError, InputError, InputTooLargeError, MissingFileError, OptionError,
                      UnsupportedFormatError, WrongModalityError)
from ..sample import Sample
from . import Limits

if TYPE_CHECKING:
    import wfdb  # imported when a WFDB record is read: it is slow to import

LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
CANONICAL_FS = 100
CANONICAL_SECONDS = 10
CANONICAL_SAMPLES = CANONICAL_FS * CANONICAL_SECONDS
MIN_SECONDS = 2.0
FS_RANGE = (50.0, 20_000.0)
MAX_INTERPOLATED_GAP_S = 0.04  # NaN runs up to this long are interpolated; longer ones are set to the baseline
MIN_PRESENT_FRACTION = 0.5  # a lead with fewer of its samples present (not NaN) is missing
FLAT_PTP_MV = 1e-6  # a lead whose peak-to-peak amplitude is at most this (1 nV) is a flat line
# Rates a 10-s array without a stated rate may be assumed to have (length = 10 s x rate).
STANDARD_RATES = (100, 125, 250, 500, 1000)

_MARGIN_S = 1.0  # read past the window so the resampling filter has no artificial edge at 10 s
_MAX_HEADER_BYTES = 1 << 20
_LEAD_KEYS = {**{lead.lower(): i for i, lead in enumerate(LEADS)},
              "mli": 0, "mlii": 1, "mliii": 2, "di": 0, "dii": 1, "diii": 2}
_NOISE_TOKENS = {"lead", "leads", "ecg", "ekg"}
_UNIT_SCALE = {"mv": 1.0, "millivolt": 1.0, "millivolts": 1.0,
               "uv": 1e-3, "µv": 1e-3, "μv": 1e-3, "microvolt": 1e-3, "microvolts": 1e-3}
_WFDB_UNIT_SCALE = {**_UNIT_SCALE, "v": 1e3, "volt": 1e3, "volts": 1e3, "nv": 1e-6}
_GENERIC_NAME = re.compile(r"(ch|chan|channel|sig|signal|col|column|unnamed|var|field)?\d*")
_TIME_TOKENS = {"time", "t", "sec", "secs", "second", "seconds", "s", "timestamp"}
_MS_TOKENS = {"ms", "msec", "msecs", "millisecond", "milliseconds"}
# Bytes per sample of the fixed-width WFDB signal formats (used to spot truncated files before reading).
_WFDB_BYTES_PER_SAMPLE = {"8": 1.0, "80": 1.0, "16": 2.0, "61": 2.0, "160": 2.0, "212": 1.5, "24": 3.0,
                          "32": 4.0, "310": 4 / 3, "311": 4 / 3}
_WFDB_FORMATS = {*_WFDB_BYTES_PER_SAMPLE, "508", "516", "524"}  # the fixed-width ones and FLAC
# The fields of a WFDB header's record and signal lines, as the spec writes them (checked before wfdb parses).
_WFDB_RECORD_NAME = re.compile(r"[-\w]+(?:/(\d+))?")
_WFDB_FS = re.compile(r"(\d+\.?\d*|\.\d+)(?:/[-\d.]*(?:\([-\d.]*\))?)?")
_WFDB_SIGNAL_FORMAT = re.compile(r"(\d+)(?:x(\d+))?(?::\d+)?(?:\+\d+)?")
_WFDB_FILE_NAME = re.compile(r"~|[-\w]+(?:\.\w+)?")
_UNREADABLE = "Not a readable WFDB header: "


def _tokens(name: str) -> list[str]:
    return re.findall(r"[^\W_]+", name.lower())


def _lead_key(name: str) -> str:
    """A channel name reduced to its lead designation ("Lead I (Einthoven)" -> "i")."""
    without_brackets = re.sub(r"[(\[{][^)\]}]*[)\]}]", " ", "" if name is None else str(name))
    key = "".join(t for t in _tokens(without_brackets) if t not in _NOISE_TOKENS and t not in _UNIT_SCALE)
    return re.sub(r"^(?:ecg|ekg|leads?)+", "", key)  # "LeadII", "ECG_LeadV1"


def _lead_index(name: str) -> int | None:
    if str(name or "").strip().startswith(("-", "−", "–")):
        return None  # an inverted lead (e.g. -aVR) is not the lead itself
    return _LEAD_KEYS.get(_lead_key(name))


def _check_fs(fs: object, error: type[InputError] = CorruptFileError) -> float:
    """The rate as a float; ``error`` says whose it is: the file's (default) or the caller's (``OptionError``)."""
    try:
        value = float(fs)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise error(f"The sampling rate {fs!r} is not a number.") from None
    if not (math.isfinite(value) and FS_RANGE[0] <= value <= FS_RANGE[1]):
        raise error(f"A sampling rate of {value:g} Hz is not plausible for an ECG; "
                    f"expected {FS_RANGE[0]:g} to {FS_RANGE[1]:g} Hz.")
    return value


def _match_leads(names: Sequence[str]) -> tuple[dict[int, int], list[str], bool]:
    """Map lead index -> column; also the dropped channel names and whether standard order was assumed."""
    columns: dict[int, int] = {}
    dropped: list[str] = []
    for col, name in enumerate(names):
        lead = _lead_index(name)
        if lead is None or lead in columns:
            dropped.append(str(name))
        else:
            columns[lead] = col
    if columns:
        return columns, dropped, False
    if all(_GENERIC_NAME.fullmatch(_lead_key(n)) for n in names):
        if len(names) == len(LEADS):
            return dict(enumerate(range(len(LEADS)))), [], True
        raise UnsupportedFormatError(
            f"The ECG has {len(names)} unnamed channels. Without lead names it must have exactly 12, in the "
            "standard order I, II, III, aVR, aVL, aVF, V1-V6; otherwise name the leads in a header row.")
    shown = ", ".join(str(n) for n in names[:20]) + (", ..." if len(names) > 20 else "")
    raise WrongModalityError(
        f"No standard ECG lead (I, II, III, aVR, aVL, aVF, V1-V6) was found among the channels: {shown}.")


def _nan_runs(nan: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of each run of True in a 1-D boolean array."""
    edges = np.flatnonzero(np.diff(np.concatenate(([False], nan, [False])).astype(np.int8)))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def _fill_gaps(segment: np.ndarray, names: list[str], n_window: int,
               fs: float) -> tuple[list[bool], dict[str, list[str]]]:
    """Interpolate short NaN runs in place (longer runs stay NaN, for the baseline later); say which leads
    are usable and, by name, which were interpolated, zeroed, too gappy or flat."""
    usable: list[bool] = []
    found: dict[str, list[str]] = {"interpolated": [], "zeroed": [], "gappy": [], "flat": []}
    index = np.arange(segment.shape[0])
    longest = max(1, int(round(MAX_INTERPOLATED_GAP_S * fs)))
    for j, name in enumerate(names):
        column = segment[:, j]
        nan = np.isnan(column)
        present = ~nan[:n_window]
        if not present.any():
            column[:] = 0.0
            usable.append(False)
            continue
        if present.mean() < MIN_PRESENT_FRACTION:
            column[:] = 0.0
            usable.append(False)
            found["gappy"].append(name)
            continue
        if np.ptp(column[:n_window][present]) <= FLAT_PTP_MV:
            column[:] = 0.0
            usable.append(False)
            found["flat"].append(name)
            continue
        usable.append(True)
        if not nan.any():
            continue
        short = np.zeros_like(nan)
        for start, stop in _nan_runs(nan):
            if stop - start <= longest:
                short[start:stop] = True
        if short.any():
            column[short] = np.interp(index[short], index[~nan], column[~nan])
            found["interpolated"].append(name)
        if (nan & ~short).any():
            found["zeroed"].append(name)
    return usable, found


def _no_usable_lead(found: dict[str, list[str]], n_leads: int) -> CorruptFileError:
    flat, gappy = len(found["flat"]), len(found["gappy"])
    if not flat and not gappy:
        return CorruptFileError("None of the ECG leads holds a usable signal: all values are missing (NaN).")
    if flat == n_leads:
        return CorruptFileError("None of the ECG leads holds a usable signal: every lead is a flat line "
                                "(constant values, as from unconnected electrodes or an empty recording).")
    parts = [f"{flat} {'is a flat line' if flat == 1 else 'are flat lines'} (constant values)" if flat else "",
             f"{gappy} {'has' if gappy == 1 else 'have'} more than half of {'its' if gappy == 1 else 'their'} "
             "values missing" if gappy else ""]
    rest = n_leads - flat - gappy
    parts.append(f"{rest} {'is' if rest == 1 else 'are'} entirely missing (NaN)" if rest else "")
    return CorruptFileError("None of the ECG leads holds a usable signal: of the "
                            f"{n_leads} matched leads, " + ", ".join(p for p in parts if p) + ".")


def resample_poly(x: np.ndarray, up: int, down: int) -> np.ndarray:
    """``scipy.signal.resample_poly(x, up, down, axis=0)`` with its default Kaiser (beta 5) low-pass, in numpy.

    Written out because importing scipy.signal takes ~2 s, paid by the first ECG an app or CLI call reads;
    ``tests/test_ecg_readers.py`` checks it against scipy.
    """
    g = math.gcd(up, down)
    up, down = up // g, down // g
    x = np.asarray(x, dtype=np.float64)
    if up == down == 1:
        return x.copy()
    n_in = x.shape[0]
    n_out = -(-n_in * up // down)
    rate = max(up, down)
    half = 10 * rate
    taps = np.arange(2 * half + 1) - half
    h = np.sinc(taps / rate) / rate * np.kaiser(2 * half + 1, 5.0)
    h *= up / h.sum()  # unit gain at DC, times the zeros that upsampling inserts
    pre = down - half % down
    skip = (half + pre) // down
    post = 0
    while ((n_in - 1) * up + len(h) + pre + post - 1) // down + 1 < n_out + skip:
        post += 1
    h = np.concatenate([np.zeros(pre), h, np.zeros(post)])
    stuffed = np.zeros((((n_in - 1) * up + 1),) + x.shape[1:])
    stuffed[::up] = x
    columns = stuffed.reshape(stuffed.shape[0], -1)
    y = np.stack([np.convolve(c, h)[::down] for c in columns.T], axis=1)
    return y[skip:skip + n_out].reshape((n_out,) + x.shape[1:])


def sample_from_signal(signal: np.ndarray, fs: float, lead_names: Sequence[str], meta: dict,
                       limits: Limits) -> Sample:
    """Turn any decoded ECG (samples x leads, mV) into the canonical ``Sample``; the only place that does.

    ``meta`` carries the caller's facts (format, ...); a reader that passes only the start of a long
    record gives the full length as ``meta["n_samples_original"]``.
    """
    signal = np.asarray(signal)
    if signal.ndim != 2:
        raise CorruptFileError(
            f"An ECG must be a table of samples x leads; this one has shape {tuple(signal.shape)}.")
    if not (np.issubdtype(signal.dtype, np.number) or signal.dtype == bool) \
            or np.issubdtype(signal.dtype, np.complexfloating):
        raise CorruptFileError("The ECG values are not real numbers.")
    n_samples, n_leads = signal.shape
    if len(lead_names) != n_leads:
        raise ValueError(f"{len(lead_names)} lead names for {n_leads} channels")
    if n_samples == 0 or n_leads == 0:
        raise CorruptFileError("The ECG holds no samples.")
    if n_leads > limits.max_ecg_leads:
        raise InputTooLargeError(f"The ECG has {n_leads} channels; at most {limits.max_ecg_leads} are accepted.")
    if n_samples > limits.max_ecg_samples:
        raise InputTooLargeError(
            f"The ECG has {n_samples} samples per lead; at most {limits.max_ecg_samples} are accepted.")
    fs = _check_fs(fs)
    if n_samples / fs < MIN_SECONDS:
        raise CorruptFileError(f"The ECG lasts only {n_samples / fs:.2f} s; at least {MIN_SECONDS:g} s are needed.")

    columns, dropped, assumed = _match_leads(lead_names)
    leads = sorted(columns)
    n_window = min(n_samples, int(round(CANONICAL_SECONDS * fs)))
    n_read = min(n_samples, n_window + int(math.ceil(_MARGIN_S * fs)))
    segment = signal[:n_read, [columns[k] for k in leads]].astype(np.float64)
    if np.isinf(segment).any():
        raise CorruptFileError("The ECG contains infinite values; the file is damaged or was exported wrongly.")
    usable, found = _fill_gaps(segment, [LEADS[k] for k in leads], n_window, fs)
    if not any(usable):
        raise _no_usable_lead(found, len(leads))

    segment -= np.nanmedian(segment[:n_window], axis=0)
    segment[np.isnan(segment)] = 0.0  # the gaps too long to interpolate: at the baseline
    ratio = Fraction(CANONICAL_FS / fs).limit_denominator(1000)
    if ratio != 1:
        segment = resample_poly(segment, ratio.numerator, ratio.denominator)
    n_valid = min(CANONICAL_SAMPLES, int(round(n_window * ratio)))
    data = np.zeros((len(LEADS), CANONICAL_SAMPLES), dtype=np.float32)
    mask = [False] * len(LEADS)
    for j, lead in enumerate(leads):
        if usable[j]:
            data[lead, :n_valid] = segment[:n_valid, j]
            mask[lead] = True

    n_total = int(meta.get("n_samples_original", n_samples))
    out = dict(meta)
    out.update(
        fs=CANONICAL_FS, units="mV", fs_original=fs, n_samples_original=n_total, n_leads_original=n_leads,
        duration_s=round(n_total / fs, 3), window_s=(0.0, round(n_window / fs, 3)),
        padded_s=round((CANONICAL_SAMPLES - n_valid) / CANONICAL_FS, 2),
        lead_mask=mask, leads_present=[LEADS[k] for k in range(len(LEADS)) if mask[k]],
        leads_missing=[LEADS[k] for k in range(len(LEADS)) if not mask[k]],
        dropped_leads=list(meta.get("dropped_leads", [])) + dropped,
        interpolated_leads=found["interpolated"], zeroed_leads=found["zeroed"], gappy_leads=found["gappy"],
        flat_leads=found["flat"], standard_order_assumed=assumed,
    )
    return Sample(modality="ecg", data=data, preview=data.copy(), meta=out)


# --------------------------------------------------------------------------------------------- WFDB


def _find_header(path: Path, files: Sequence[Path]) -> Path:
    if path.suffix.lower() == ".hea":
        return path
    candidates = [f for f in files if f.suffix.lower() == ".hea"] + [path.with_suffix(".hea")]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise MissingFileError(f"{path.name} is the signal file of a WFDB record; its header ({path.stem}.hea) "
                           "is missing. Upload the .hea file together with it.")


def _find_signal_file(name: str, header: Path, files: Sequence[Path]) -> Path:
    """Where the signal file the header names lies: among the uploads, else beside the header."""
    if not name or name == "~" or name != Path(name).name or name in (".", ".."):
        raise CorruptFileError(f"The WFDB header {header.name} names an invalid signal file ({name!r}).")
    for f in files:
        if f.name == name:
            return f
    if (header.parent / name).is_file():
        return header.parent / name
    suffix = Path(name).suffix.lower()
    same_kind = [f for f in files if f.suffix.lower() == suffix]
    if len(same_kind) == 1:
        return same_kind[0]  # an upload renamed on the way (e.g. by the browser)
    raise MissingFileError(f"The {suffix or 'signal'} file {name} named in the header {header.name} is missing; "
                           "upload it together with the header.")


def _link(src: Path, dst: Path) -> None:
    try:
        os.symlink(src.resolve(), dst)
    except OSError:  # file systems without symlinks
        shutil.copyfile(src, dst)


def _frames_in_file(header: wfdb.Record, name: str, path: Path) -> int | None:
    """How many frames the signal file holds, or None for compressed formats."""
    channels = [i for i, f in enumerate(header.file_name) if f == name]
    per_sample = _WFDB_BYTES_PER_SAMPLE.get(str(header.fmt[channels[0]]))
    if per_sample is None:
        return None
    frame = sum((header.samps_per_frame[i] or 1) for i in channels)
    offset = (header.byte_offset[channels[0]] or 0) if header.byte_offset else 0
    return max(0, int((path.stat().st_size - offset) / (per_sample * frame)))


def _check_record_line(fields: list[str]) -> int | None:
    """The number of signals a header's record line declares (None for a multi-segment record), after
    checking its fields; wfdb itself accepts odd values silently (a rate of -100 read as 250 Hz)."""
    name = _WFDB_RECORD_NAME.fullmatch(fields[0])
    if name is None or len(fields) < 2 or not fields[1].isdigit():
        raise CorruptFileError(_UNREADABLE + "its first line must give the record name and the number of "
                               "signals (e.g. \"100 2 360 650000\").")
    if len(fields) > 2:
        fs = _WFDB_FS.fullmatch(fields[2])
        if fs is None or not 0 < float(fs.group(1)) < math.inf:
            raise CorruptFileError(_UNREADABLE + f"its sampling frequency ({fields[2][:20]!r}) is not a "
                                   "positive decimal number (e.g. 500).")
    if len(fields) > 3 and not fields[3].isdigit():
        raise CorruptFileError(_UNREADABLE + f"its signal length ({fields[3][:20]!r}) is not a whole number "
                               "of samples.")
    return None if name.group(1) else int(fields[1])


def _check_signal_line(fields: list[str], number: int) -> None:
    fmt = _WFDB_SIGNAL_FORMAT.fullmatch(fields[1]) if len(fields) > 1 else None
    if not _WFDB_FILE_NAME.fullmatch(fields[0]) or fmt is None:
        raise CorruptFileError(_UNREADABLE + f"its signal line {number} does not start with a signal file "
                               "name and a storage format (e.g. \"100.dat 212\").")
    if fmt.group(1) not in _WFDB_FORMATS:
        raise UnsupportedFormatError(f"Signal line {number} of the WFDB header uses storage format "
                                     f"{fmt.group(1)[:10]}, which is not a WFDB format.")
    if fmt.group(2) is not None and int(fmt.group(2)) < 1:
        raise CorruptFileError(_UNREADABLE + f"its signal line {number} gives 0 samples per frame.")


def _check_header_text(text: str, limits: Limits) -> None:
    """Refuse a truncated or malformed header with a readable ``CorruptFileError`` before wfdb reads it
    (wfdb fails on those with bare Python errors, or reads them wrongly)."""
    lines = [line.split("#", 1)[0].split() for line in text.splitlines()]
    lines = [fields for fields in lines if fields]
    if not lines:
        raise CorruptFileError(_UNREADABLE + "it is empty (no record line).")
    n_sig = _check_record_line(lines[0])
    if n_sig is None:
        return  # a multi-segment record: refused once wfdb has read it
    if n_sig > limits.max_ecg_leads:
        raise InputTooLargeError(f"The record has {n_sig} channels; at most {limits.max_ecg_leads} are accepted.")
    if len(lines) - 1 != n_sig:
        raise CorruptFileError(_UNREADABLE + f"it declares {n_sig} signal{'s' if n_sig != 1 else ''} but "
                               f"describes {len(lines) - 1}: the header is truncated or damaged.")
    for number, fields in enumerate(lines[1:], start=1):
        _check_signal_line(fields, number)


def _check_length(sig_len: int, limits: Limits) -> None:
    if sig_len > limits.max_ecg_samples:
        raise InputTooLargeError(f"The record has {sig_len} samples per lead; at most "
                                 f"{limits.max_ecg_samples} are accepted.")


def _header_with_length(text: str, sig_len: int, fs: float) -> str:
    """The header text with the signal length written into its record line.

    The length may be left out of a header (the WFDB spec then takes it from the signal file's size), but
    wfdb cannot read part of such a record; the length is the one counted from the file. A record line
    without a length may also lack the sampling frequency, which comes before it (wfdb's default, 250).
    """
    lines = text.splitlines()
    for i, line in enumerate(lines):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) == 2:
            fields.append(f"{fs:g}")
        lines[i] = " ".join(fields[:3] + [str(sig_len)])
        break
    return "\n".join(lines) + "\n"


def _read_record_start(header_file: Path, uploads: Sequence[Path], limits: Limits) -> tuple[wfdb.Record, int]:
    """Check the header against the limits and the files, then decode the first seconds with wfdb.

    The header and signal files are linked into one private directory under the names the header
    expects, so uploads spread over several directories (or renamed) still form one record.
    Returns the wfdb record, read with each channel at its own rate (``e_p_signal``: channel j has
    ``samps_per_frame[j]`` samples per frame of ``fs``), and the record's full length in frames.
    """
    import wfdb

    with tempfile.TemporaryDirectory(prefix="m3bind-wfdb-") as tmp:
        record = Path(tmp) / (header_file.stem or "record")
        linked_header = Path(tmp) / f"{record.name}.hea"  # not with_suffix: a record name may hold a dot
        _link(header_file, linked_header)
        try:
            header = wfdb.rdheader(str(record))
        except Exception as exc:
            raise CorruptFileError(f"{header_file.name} is not a readable WFDB header ({exc}).") from exc
        if isinstance(header, wfdb.MultiRecord):
            raise UnsupportedFormatError(
                "Multi-segment WFDB records are not supported; upload a single-segment record.")
        if not header.n_sig:
            raise CorruptFileError(f"The WFDB header {header_file.name} declares no signals.")
        per_frame = max(int(n or 1) for n in header.samps_per_frame)
        fs = _check_fs(header.fs * per_frame)  # the rate of the fastest channel: frames may hold several samples
        sig_len = header.sig_len
        if sig_len is not None:
            _check_length(sig_len * per_frame, limits)
        for name in dict.fromkeys(header.file_name):
            source = _find_signal_file(name, header_file, uploads)
            frames = _frames_in_file(header, name, source)
            if frames is not None and sig_len is not None and frames < sig_len:
                raise CorruptFileError(f"The signal file {name} is truncated: the header declares {sig_len} "
                                       f"samples per lead but the file holds only {frames}.")
            sig_len = frames if sig_len is None else sig_len
            _link(source, Path(tmp) / name)
        if not sig_len:
            raise CorruptFileError(f"The WFDB record {header_file.stem} holds no samples.")
        _check_length(sig_len * per_frame, limits)
        if header.sig_len is None:  # a valid header without the length: write it in from the file's size
            linked_header.unlink()
            linked_header.write_text(
                _header_with_length(header_file.read_text(errors="replace"), sig_len, header.fs))
        sampto = min(sig_len, int(math.ceil((CANONICAL_SECONDS + _MARGIN_S) * fs / per_frame)))
        try:
            rec = wfdb.rdrecord(str(record), sampto=sampto, physical=True, return_res=64, smooth_frames=False)
        except Exception as exc:
            raise CorruptFileError(f"The WFDB record {header_file.stem} could not be read ({exc}).") from exc
    channels = rec.e_p_signal
    if channels is None or len(channels) != rec.n_sig or any(
            len(x) < sampto * int(n or 1) for x, n in zip(channels, rec.samps_per_frame)):
        raise CorruptFileError(f"The WFDB record {header_file.stem} holds fewer samples than its header declares.")
    return rec, int(sig_len)


def read_wfdb(header_path: Path, limits: Limits, files: Sequence[Path] | None = None) -> Sample:
    """Read a WFDB record (.hea with .dat/.mat); only the first seconds are decoded, after size checks.

    ``header_path`` may be the signal file: the header is looked for beside it and among ``files``
    (the uploaded files of the record, possibly each in its own directory). Values are converted to
    mV from the header's units; channels in other units (mmHg, ...) are dropped.
    """
    uploads = [Path(f) for f in files or ()]
    header_file = _find_header(Path(header_path), uploads)
    if not header_file.is_file():
        raise MissingFileError(f"File not found: {header_file.name}")
    if header_file.stat().st_size > _MAX_HEADER_BYTES:
        raise CorruptFileError(f"{header_file.name} is too large to be a WFDB header.")
    _check_header_text(header_file.read_text(errors="replace"), limits)
    rec, sig_len = _read_record_start(header_file, uploads, limits)

    keep, dropped = [], []
    for j, (name, unit) in enumerate(zip(rec.sig_name, rec.units)):
        scale = _WFDB_UNIT_SCALE.get(str(unit or "mV").strip().lower())
        if scale is None:
            dropped.append(str(name))
        else:
            keep.append((j, name, scale))
    if not keep:
        raise WrongModalityError("The WFDB record holds no voltage channel, so it is not an ECG.")
    # Each channel at its true rate, samps_per_frame x the frame rate; channels slower than the fastest
    # voltage channel are brought up to its rate (rare: leads of one ECG share a rate).
    per_frame = [int(rec.samps_per_frame[j] or 1) for j, _, _ in keep]
    top = max(per_frame)
    columns = []
    for (j, _, scale), n in zip(keep, per_frame):
        values = np.asarray(rec.e_p_signal[j], dtype=np.float64) * scale
        if n != top:
            step = Fraction(top, n)
            values = resample_poly(values, step.numerator, step.denominator)
        columns.append(values)
    length = min(len(c) for c in columns)
    signal = np.stack([c[:length] for c in columns], axis=1)
    meta = {"format": "wfdb", "n_samples_original": sig_len * top, "dropped_leads": dropped}
    if top > 1:
        meta["samples_per_frame"] = top
    return sample_from_signal(signal, rec.fs * top, [name for _, name, _ in keep], meta, limits)


# ------------------------------------------------------------------------------------------ CSV / NPY


def _samples_by_leads(array: np.ndarray) -> tuple[np.ndarray, bool]:
    """Leads are columns; an array with more columns than rows holds them as rows (time is the long axis)."""
    if array.ndim == 2 and array.shape[0] < array.shape[1]:
        return array.T, True
    return array, False


def _check_table_size(rows: int, cols: int, limits: Limits) -> None:
    if max(rows, cols) > limits.max_ecg_samples + 1 or min(rows, cols) > limits.max_ecg_leads + 1:
        raise InputTooLargeError(
            f"The ECG table is {rows} x {cols}; at most {limits.max_ecg_leads} leads of "
            f"{limits.max_ecg_samples} samples are accepted.")


def _load_npy(data: bytes, limits: Limits) -> np.ndarray:
    buffer = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buffer)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) \
            else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(buffer)
    except Exception as exc:
        raise CorruptFileError(f"The NPY file has a damaged header ({exc}).") from exc
    if dtype.hasobject:
        raise UnsupportedFormatError("The NPY file holds Python objects, which are not loaded for safety; "
                                     "save the ECG as a plain numeric array.")
    if not (np.issubdtype(dtype, np.number) or dtype == bool) or np.issubdtype(dtype, np.complexfloating):
        raise UnsupportedFormatError(f"The NPY file holds {dtype} values, not real numbers.")
    if len(shape) != 2:
        raise CorruptFileError(f"An NPY ECG must be a 2-D array (samples x leads); this one has shape {shape}.")
    _check_table_size(shape[0], shape[1], limits)
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:
        raise CorruptFileError(f"The NPY file is damaged or truncated ({exc}).") from exc


def _split(line: str, delimiter: str | None) -> list[str]:
    return [cell.strip().strip('"').strip() for cell in line.split(delimiter)]


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _table_error(exc: ValueError, line_numbers: list[int]) -> CorruptFileError:
    """The numpy parse error, told with the file's own line numbers."""
    text = str(exc)
    bad = re.search(r"could not convert string '(.*)' to \w+ at row (\d+), column (\d+)", text)
    if bad:
        cell, row, col = bad.group(1), int(bad.group(2)), int(bad.group(3))  # numpy: row from 0, column from 1
        what = "an empty cell" if not cell.strip() else f"'{cell[:40]}'"
        return CorruptFileError(f"The CSV file has {what} at line {line_numbers[row]}, column {col}, "
                                "where a number is expected.")
    ragged = re.search(r"from (\d+) to (\d+) at row (\d+)", text)
    if ragged:
        before, after, row = ragged.groups()  # numpy: row from 1
        return CorruptFileError(f"The CSV file has {after} columns at line {line_numbers[int(row) - 1]} "
                                f"where the lines before have {before}.")
    return CorruptFileError(f"The CSV file could not be read as a table of numbers ({text}).")


def _time_fs(times: np.ndarray, name: str) -> float:
    """The sampling rate implied by an evenly spaced time column (seconds, or ms when its name says so)."""
    seconds = times / 1000.0 if set(_tokens(name)) & _MS_TOKENS else times
    steps = np.diff(seconds)
    if len(seconds) < 2 or not np.all(np.isfinite(seconds)) or np.any(steps <= 0):
        raise CorruptFileError(f"The time column '{name}' does not increase steadily from row to row.")
    step = (seconds[-1] - seconds[0]) / (len(seconds) - 1)
    drift = np.abs(seconds - (seconds[0] + step * np.arange(len(seconds))))
    if drift.max() > 0.6 * step:
        raise CorruptFileError(f"The time column '{name}' is not evenly spaced; the recording has gaps.")
    fs = 1.0 / step
    return float(round(fs)) if abs(fs - round(fs)) < 1e-3 * fs else fs


def _parse_csv(data: bytes, limits: Limits) -> tuple[np.ndarray, list[str], float | None]:
    """Numbers, column names ('' when there is no header row) and the rate a time column implies."""
    first_line = next((line for line in data[:1 << 20].splitlines()
                       if line.strip() and not line.lstrip().startswith(b"#")), b"")  # comments skipped first
    delimiter = next((d for d in ("\t", ";", ",") if d.encode() in first_line), None)
    _check_table_size(data.count(b"\n") + 1, len(first_line.split(delimiter.encode() if delimiter else None)),
                      limits)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise CorruptFileError("The CSV file is not plain text (UTF-8); it may be a binary file.") from None
    rows = [(number, line) for number, line in enumerate(text.splitlines(), 1)
            if line.strip() and not line.lstrip().startswith("#")]
    if not rows:
        raise CorruptFileError("The CSV file holds no data.")
    first = _split(rows[0][1], delimiter)
    names = [""] * len(first)
    if not all(_is_number(cell) for cell in first):
        names, rows = first, rows[1:]
        if not rows:
            raise CorruptFileError("The CSV file has a header row but no data rows.")
    lines = [line for _, line in rows]
    if delimiter != ",":
        lines = [line.replace(",", ".") for line in lines]  # decimal commas beside ';' or tab separators
    try:
        table = np.loadtxt(lines, delimiter=delimiter, dtype=np.float64, ndmin=2, comments=None, quotechar='"')
    except ValueError as exc:
        raise _table_error(exc, [number for number, _ in rows]) from exc
    if any(names) and table.shape[1] != len(names):
        raise CorruptFileError(f"The CSV header names {len(names)} columns but the rows have {table.shape[1]}.")

    time_fs = None
    if any(names) and len(names) > 1 and set(_tokens(names[0])) & (_TIME_TOKENS | _MS_TOKENS):
        time_fs = _time_fs(table[:, 0], names[0])
        table, names = table[:, 1:], names[1:]
    scales = [next((_UNIT_SCALE[t] for t in _tokens(n) if t in _UNIT_SCALE), 1.0) for n in names]
    return table * np.asarray(scales), names, time_fs


def _resolve_fs(sampling_rate: float | None, time_fs: float | None, n_samples: int) -> tuple[float, str]:
    if sampling_rate is not None:
        fs = _check_fs(sampling_rate, OptionError)
        if time_fs is not None and abs(time_fs - fs) > 0.01 * fs:
            raise OptionError(f"The sampling rate given ({fs:g} Hz) disagrees with the file's time column "
                              f"({time_fs:g} Hz).")
        return fs, "given"
    if time_fs is not None:
        return _check_fs(time_fs), "time column"
    by_length = {CANONICAL_SECONDS * rate: rate for rate in STANDARD_RATES}
    if n_samples in by_length:
        return float(by_length[n_samples]), "assumed from a 10-s length"
    raise OptionError(
        "The ECG file does not state its sampling rate; please enter it (for example 500 Hz). Without it only "
        "a 10-s record is recognised: " + ", ".join(f"{10 * r} samples = {r} Hz" for r in STANDARD_RATES) + ".")


def read_ecg_array(data: bytes, fmt: str, limits: Limits, sampling_rate: float | None = None) -> Sample:
    """Read an ECG saved as CSV or NPY: leads as columns (a (12, N) array is read as 12 leads), values in mV.

    A CSV may have a header row of lead names (units in the name, e.g. "I (uV)", are converted) and a
    first time column (seconds, or ms when named so) that gives the sampling rate.
    """
    if fmt == "npy":
        array, names, time_fs = _load_npy(data, limits), [], None
    elif fmt == "csv":
        array, names, time_fs = _parse_csv(data, limits)
    else:
        raise UnsupportedFormatError(f"'{fmt}' is not an ECG array format; use CSV or NPY.")
    transposed = False
    if not any(names):
        array, transposed = _samples_by_leads(array)
        names = [""] * array.shape[1]
    fs, fs_source = _resolve_fs(sampling_rate, time_fs, array.shape[0])
    meta = {"format": fmt, "fs_source": fs_source, "transposed": transposed}
    return sample_from_signal(array, fs, names, meta, limits)

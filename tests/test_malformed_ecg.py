"""Broken, hostile or unusable ECG inputs: each must end in a readable ``InputError``, never a traceback or a hang."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest

import m3bind
from m3bind import (CorruptFileError, InputError, InputTooLargeError, MissingFileError, OptionError,
                    UnsupportedFormatError, WrongModalityError)
from m3bind.readers.ecg import LEADS

from conftest import SHARED_DATA

MITBIH = SHARED_DATA / "ecg" / "wfdb"
PTBXL = SHARED_DATA / "ecg" / "ptbxl" / "records100" / "00000" / "00158_lr"  # 12 leads, 100 Hz, 1000 samples
CINC = SHARED_DATA / "ecg" / "cinc2021"


def _wave(fs: float, seconds: float, n_leads: int = 12) -> np.ndarray:
    t = np.arange(int(round(fs * seconds))) / fs
    return np.stack([np.sin(2 * np.pi * 1.2 * t + k) for k in range(n_leads)], axis=1)


def _npy(path: Path, array: np.ndarray, allow_pickle: bool = False) -> Path:
    np.save(path, array, allow_pickle=allow_pickle)
    return path


def _csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _table(signal: np.ndarray, header: str | None = None) -> str:
    rows = "\n".join(",".join(f"{v:.4f}" for v in row) for row in signal)
    return (header + "\n" if header else "") + rows + "\n"


def _truncated_npy(tmp: Path) -> Path:
    buffer = io.BytesIO()
    np.save(buffer, _wave(500, 10))
    (tmp / "cut.npy").write_bytes(buffer.getvalue()[:5000])
    return tmp / "cut.npy"


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _csv_with_text_cell(tmp: Path) -> Path:
    lines = _table(_wave(100, 10), ",".join(LEADS)).splitlines()
    lines[7] = "n/a" + lines[7][lines[7].index(","):]
    return _csv(tmp / "e.csv", "\n".join(lines))


def _cinc_with_random_mat(tmp: Path) -> list[Path]:
    header = Path(shutil.copy(CINC / "E07500.hea", tmp / "E07500.hea"))
    return [header, _bytes(tmp / "E07500.mat", np.random.default_rng(0).bytes(4096))]


def _frank_only(tmp: Path) -> Path:
    import wfdb

    wfdb.wrsamp("frank", fs=500, units=["mV"] * 3, sig_name=["vx", "vy", "vz"], p_signal=_wave(500, 10, 3),
                fmt=["16"] * 3, adc_gain=[1000.0] * 3, baseline=[0] * 3, write_dir=str(tmp))
    return tmp / "frank.hea"


def _mitbih_header(old: str = "", new: str = "") -> str:
    return (MITBIH / "100.hea").read_text().replace(old, new)


def _ptbxl(tmp: Path, edit) -> list[Path]:
    """A real PTB-XL record whose header text went through ``edit`` (its signal file read in place)."""
    header = tmp / "00158_lr.hea"
    header.write_text(edit(PTBXL.with_suffix(".hea").read_text()))
    return [header, PTBXL.with_suffix(".dat")]


def _record_line(fields: str):
    """An edit that replaces a PTB-XL header's record line ("00158_lr 12 100 1000") by ``fields``."""
    return lambda text: text.replace("00158_lr 12 100 1000", fields, 1)


needs_data = pytest.mark.shared_data  # through the shared_data fixture: skipped without the data, failed in CI
TIMED = np.column_stack([np.arange(1000) / 100, _wave(100, 10)])


def case(case_id: str, build, error: type[InputError], words: str, data: bool = False):
    """build(tmp) -> (source, load_input keyword arguments); the message must contain ``words``."""
    return pytest.param(build, error, words, id=case_id, marks=[needs_data] if data else [])


CASES = [
    case("empty_csv", lambda t: (_csv(t / "e.csv", ""), {}), CorruptFileError, "empty"),
    case("csv_header_without_rows", lambda t: (_csv(t / "e.csv", ",".join(LEADS) + "\n"), {}), CorruptFileError,
         "no data rows"),
    case("csv_text_cells", lambda t: (_csv_with_text_cell(t), {}), CorruptFileError, "'n/a' at line 8"),
    case("csv_ragged_rows", lambda t: (_csv(t / "e.csv", _table(_wave(100, 10)) + "1,2,3\n"), {}),
         CorruptFileError, "3 columns at line 1001"),
    case("csv_binary_garbage", lambda t: (_bytes(t / "e.csv", b"\xff\xfe\x00\x81" * 500), {}), CorruptFileError,
         "not plain text"),
    case("csv_one_column_unknown_rate", lambda t: (_csv(t / "e.csv", _table(_wave(100, 30, 1))), {}), OptionError,
         "sampling rate"),
    case("csv_time_column_backwards", lambda t: (_csv(t / "e.csv", _table(TIMED[::-1], "time," + ",".join(LEADS))),
                                                 {}), CorruptFileError, "time column"),
    case("csv_rate_disagrees_with_time", lambda t: (_csv(t / "e.csv", _table(TIMED, "time," + ",".join(LEADS))),
                                                    {"sampling_rate": 500}), OptionError, "disagrees"),
    case("csv_40_unnamed_columns", lambda t: (_csv(t / "e.csv", _table(_wave(100, 10, 40))), {}), UnsupportedFormatError,
         "exactly 12"),
    case("csv_200_columns", lambda t: (_csv(t / "e.csv", _table(_wave(100, 10, 200))), {}), InputTooLargeError,
         "at most"),
    case("npy_object_array", lambda t: (_npy(t / "o.npy", np.array([{"lead": "I"}, [1, 2]], dtype=object),
                                             allow_pickle=True), {}), UnsupportedFormatError, "Python objects"),
    case("npy_string_array", lambda t: (_npy(t / "s.npy", np.array([["I", "II"]] * 1000)), {}),
         UnsupportedFormatError, "not real numbers"),
    case("npy_3d", lambda t: (_npy(t / "c.npy", np.zeros((2, 1000, 12))), {}), CorruptFileError, "2-D"),
    case("npy_all_nan", lambda t: (_npy(t / "n.npy", np.full((1000, 12), np.nan)), {}), CorruptFileError,
         "missing"),
    case("npy_inf", lambda t: (_npy(t / "i.npy", np.where(np.eye(1000, 12) > 0, np.inf, _wave(100, 10))), {}),
         CorruptFileError, "infinite"),
    case("npy_truncated", lambda t: (_truncated_npy(t), {"sampling_rate": 500}), CorruptFileError, "truncated"),
    case("too_short_half_second", lambda t: (_npy(t / "h.npy", _wave(500, 0.5)), {"sampling_rate": 500}),
         CorruptFileError, "at least 2 s"),
    case("rate_zero", lambda t: (_npy(t / "r.npy", _wave(500, 10)), {"sampling_rate": 0}), OptionError,
         "not plausible"),
    case("rate_negative", lambda t: (_npy(t / "r.npy", _wave(500, 10)), {"sampling_rate": -500}), OptionError,
         "not plausible"),
    case("rate_1e9", lambda t: (_npy(t / "r.npy", _wave(500, 10)), {"sampling_rate": 1e9}), OptionError,
         "not plausible"),
    case("rate_nan", lambda t: (_npy(t / "r.npy", _wave(500, 10)), {"sampling_rate": float("nan")}), OptionError,
         "not plausible"),
    case("frank_leads_only", lambda t: (_frank_only(t), {}), WrongModalityError, "No standard ECG lead"),
    case("rate_not_a_number", lambda t: (_npy(t / "r.npy", _wave(500, 10)), {"sampling_rate": "fast"}), OptionError,
         "not a number"),
    case("hea_rate_implausible", lambda t: (_csv(t / "100.hea", _mitbih_header(" 360 ", " 1 ")), {}), CorruptFileError,
         "1 Hz is not plausible", data=True),
    case("hea_without_dat", lambda t: (_csv(t / "100.hea", _mitbih_header()), {}), MissingFileError,
         "100.dat named in the header 100.hea is missing", data=True),
    case("dat_without_hea", lambda t: (Path(shutil.copy(MITBIH / "100.dat", t / "100.dat")), {}), MissingFileError,
         "header (100.hea) is missing", data=True),
    case("hea_garbage_text", lambda t: (_csv(t / "100.hea", "this is not a header\nat all\n"), {}),
         CorruptFileError, "not a readable WFDB header"),
    case("hea_declares_10e12_samples", lambda t: ([_csv(t / "100.hea", _mitbih_header("650000", "1000000000000")),
                                                   _bytes(t / "100.dat", b"\0" * 30)], {}),
         InputTooLargeError, "at most", data=True),
    case("hea_declares_no_signals", lambda t: (_csv(t / "100.hea", "100 0 360 1000\n"), {}), CorruptFileError,
         "no signals"),
    case("hea_names_file_outside_record", lambda t: (_csv(t / "100.hea", _mitbih_header("100.dat", "../../x.dat")),
                                                     {}), CorruptFileError, "not a readable WFDB header", data=True),
    case("hea_names_null_signal_file", lambda t: (_csv(t / "100.hea", _mitbih_header("100.dat 212", "~ 212")), {}),
         CorruptFileError, "invalid signal file", data=True),
    case("dat_truncated", lambda t: ([_csv(t / "100.hea", _mitbih_header()),
                                      _bytes(t / "100.dat", (MITBIH / "100.dat").read_bytes()[:3000])], {}),
         CorruptFileError, "truncated", data=True),
    case("mat_random_bytes", lambda t: (_cinc_with_random_mat(t), {}), CorruptFileError, "truncated", data=True),
    # Truncated or odd WFDB headers of a real PTB-XL record: each a readable refusal, never a bare Python error
    # (a header cut to its first bytes raised TypeError) nor a silently wrong reading (a rate of -100 read as 250 Hz).
    case("hea_cut_after_signal_count", lambda t: (_ptbxl(t, lambda h: "00003_lr 1"), {}), CorruptFileError,
         "declares 1 signal but describes 0", data=True),
    case("hea_cut_mid_signal_lines", lambda t: (_ptbxl(t, lambda h: h[:300]), {}), CorruptFileError,
         "declares 12 signals but describes 6", data=True),
    case("hea_record_name_only", lambda t: (_ptbxl(t, lambda h: "00158_lr\n"), {}), CorruptFileError,
         "number of signals", data=True),
    case("hea_empty", lambda t: (_ptbxl(t, lambda h: ""), {}), CorruptFileError, "empty", data=True),
    case("hea_more_signals_than_lines", lambda t: (_ptbxl(t, _record_line("00158_lr 13 100 1000")), {}),
         CorruptFileError, "describes 12", data=True),
    case("hea_signal_count_not_a_number", lambda t: (_ptbxl(t, _record_line("00158_lr twelve 100 1000")), {}),
         CorruptFileError, "number of signals", data=True),
    case("hea_rate_text", lambda t: (_ptbxl(t, _record_line("00158_lr 12 fast 1000")), {}), CorruptFileError,
         "sampling frequency ('fast')", data=True),
    case("hea_rate_zero", lambda t: (_ptbxl(t, _record_line("00158_lr 12 0 1000")), {}), CorruptFileError,
         "sampling frequency ('0') is not a positive", data=True),
    case("hea_rate_negative", lambda t: (_ptbxl(t, _record_line("00158_lr 12 -100 1000")), {}), CorruptFileError,
         "sampling frequency ('-100') is not a positive", data=True),
    case("hea_rate_nan", lambda t: (_ptbxl(t, _record_line("00158_lr 12 nan 1000")), {}), CorruptFileError,
         "sampling frequency ('nan')", data=True),
    case("hea_length_text", lambda t: (_ptbxl(t, _record_line("00158_lr 12 100 long")), {}), CorruptFileError,
         "signal length ('long')", data=True),
    case("hea_length_negative", lambda t: (_ptbxl(t, _record_line("00158_lr 12 100 -1000")), {}), CorruptFileError,
         "signal length ('-1000')", data=True),
    case("hea_length_10e40", lambda t: (_ptbxl(t, _record_line("00158_lr 12 100 1" + "0" * 40)), {}),
         InputTooLargeError, "at most", data=True),
    case("hea_10e11_channels", lambda t: (_ptbxl(t, _record_line("00158_lr 99999999999 100 1000")), {}),
         InputTooLargeError, "at most 64", data=True),
    case("hea_signal_line_without_format", lambda t: (_ptbxl(t, lambda h: h.replace(".dat 16 ", ".dat ")), {}),
         CorruptFileError, "signal line 1 does not start", data=True),
    case("hea_unknown_storage_format", lambda t: (_ptbxl(t, lambda h: h.replace(".dat 16 ", ".dat 999 ")), {}),
         UnsupportedFormatError, "storage format 999", data=True),
    case("hea_zero_samples_per_frame", lambda t: (_ptbxl(t, lambda h: h.replace(".dat 16 ", ".dat 16x0 ")), {}),
         CorruptFileError, "0 samples per frame", data=True),
]


@pytest.mark.parametrize("build, error, words", CASES)
def test_malformed_ecg_is_refused_readably(tmp_path, build, error, words):
    source, kwargs = build(tmp_path)
    with pytest.raises(error) as caught:
        m3bind.load_input(source, **kwargs)
    message = str(caught.value)
    assert isinstance(caught.value, InputError)
    assert type(caught.value) is not InputError, "a refusal names its kind: one of the InputError subclasses"
    assert words.lower() in message.lower(), message
    assert len(message) > 10 and "Traceback" not in message and "Errno" not in message


@pytest.mark.shared_data
def test_intact_ptbxl_header_still_reads(tmp_path):
    """The header checks refuse only broken headers: the same record, unedited and with a comment, reads."""
    sample = m3bind.load_input(_ptbxl(tmp_path, lambda h: "# a comment line\n" + h + "# age: 56\n"))
    assert sample.meta["fs_original"] == 100 and sample.meta["leads_present"] == list(LEADS)


def test_readers_never_raise_the_bare_input_error():
    """Every refusal in the readers is one of the named kinds (README: Inputs), never the bare base class."""
    readers = Path(m3bind.__file__).parent / "readers"
    offenders = [f"{path.name}:{number}" for path in sorted(readers.glob("*.py"))
                 for number, line in enumerate(path.read_text().splitlines(), 1) if "raise InputError(" in line]
    assert not offenders, offenders

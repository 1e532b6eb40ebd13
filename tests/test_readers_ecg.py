"""ECG readers on real PhysioNet records (PTB-XL, CinC 2021, MIT-BIH, PTB) and on CSV/NPY exports of them."""

from __future__ import annotations

import importlib.util
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.signal
import wfdb

import m3bind
from m3bind.readers import DEFAULT_LIMITS, Limits
from m3bind.readers.ecg import CANONICAL_SAMPLES, LEADS, read_ecg_array, read_wfdb, sample_from_signal

from conftest import SHARED_DATA

ECG_DATA = SHARED_DATA / "ecg"
needs_data = pytest.mark.shared_data  # through the shared_data fixture: skipped without the data, failed in CI


def _ptbxl_headers() -> list[Path]:
    return sorted((ECG_DATA / "ptbxl" / "records100").glob("*/*.hea"))


def _reference(record: Path) -> tuple[np.ndarray, float]:
    """The record's signal straight from wfdb, columns put in LEADS order by name, median removed."""
    rec = wfdb.rdrecord(str(record.with_suffix("")))
    names = [name.lower() for name in rec.sig_name]
    signal = rec.p_signal[:, [names.index(lead.lower()) for lead in LEADS]]
    return signal - np.median(signal[: int(10 * rec.fs)], axis=0), rec.fs


def _synthetic(fs: float, seconds: float, freqs=(5.0,), n_leads: int = 12) -> np.ndarray:
    t = np.arange(int(round(fs * seconds))) / fs
    wave = sum(np.sin(2 * np.pi * f * t) for f in freqs)
    return np.stack([wave * (1 + 0.1 * k) for k in range(n_leads)], axis=1)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------- real records


@needs_data
def test_ptbxl_sample_matches_wfdb_in_lead_order():
    headers = _ptbxl_headers()
    assert len(headers) >= 1000
    for header in headers[:: len(headers) // 50][:50]:
        sample = read_wfdb(header, DEFAULT_LIMITS)
        reference, fs = _reference(header)
        assert fs == 100
        assert sample.modality == "ecg" and sample.data.dtype == np.float32
        assert sample.data.shape == (12, CANONICAL_SAMPLES)
        assert sample.meta["lead_mask"] == [True] * 12
        np.testing.assert_allclose(sample.data, reference.T, atol=1e-5, err_msg=header.name)
        np.testing.assert_array_equal(sample.preview, sample.data)


@needs_data
def test_all_cinc2021_records_resampled_from_500hz():
    headers = sorted((ECG_DATA / "cinc2021").glob("*.hea"))
    assert len(headers) == 40
    band = scipy.signal.butter(4, 35, fs=100)
    with_flat_leads = set()
    for header in headers:
        sample = read_wfdb(header, DEFAULT_LIMITS)
        reference, fs = _reference(header)
        assert fs == 500 and sample.meta["fs_original"] == 500
        flat = [lead for k, lead in enumerate(LEADS) if np.ptp(reference[:5000, k]) == 0]  # all-zero leads
        assert sample.meta["flat_leads"] == flat and sample.meta["duration_s"] == 10.0
        assert sample.meta["lead_mask"] == [lead not in flat for lead in LEADS]
        if flat:
            with_flat_leads.add(header.stem)
        # An independent (FFT) resampler must agree in the ECG band (< 35 Hz), away from the record's edges;
        # the two differ only in how sharply they cut between 35 and 50 Hz.
        expected = scipy.signal.resample(reference[:5000], CANONICAL_SAMPLES, axis=0).T
        got, want = (scipy.signal.filtfilt(*band, x, axis=1)[:, 50:950] for x in (sample.data, expected))
        error = np.sqrt(np.mean((got - want) ** 2, axis=1))
        assert np.all(error <= 0.01 * np.std(want, axis=1) + 1e-4), header.name
        assert "Age" not in repr(sample.meta) and "Dx" not in repr(sample.meta)
    assert with_flat_leads == {"JS20004", "JS20008"}  # V2, V4 and V6 recorded as zeros: masked, not "present"


@needs_data
def test_mitbih_100_has_only_ii_and_v5():
    record = ECG_DATA / "wfdb" / "100.hea"
    sample = read_wfdb(record, DEFAULT_LIMITS)
    present = [lead for lead, ok in zip(LEADS, sample.meta["lead_mask"]) if ok]
    assert present == ["II", "V5"]
    assert sample.meta["fs_original"] == 360 and sample.meta["n_samples_original"] == 650000
    assert sample.meta["duration_s"] == pytest.approx(650000 / 360, abs=0.01)
    assert sample.meta["window_s"] == (0.0, 10.0) and sample.meta["padded_s"] == 0
    missing = [i for i, ok in enumerate(sample.meta["lead_mask"]) if not ok]
    assert not sample.data[missing].any()
    rec = wfdb.rdrecord(str(record.with_suffix("")), sampto=3600)
    mlii = rec.p_signal[:, rec.sig_name.index("MLII")]
    expected = scipy.signal.resample(mlii - np.median(mlii), CANONICAL_SAMPLES)
    assert np.corrcoef(sample.data[LEADS.index("II"), 50:950], expected[50:950])[0, 1] > 0.99


@needs_data
def test_ptb_record_drops_frank_leads_and_header_comments():
    sample = read_wfdb(ECG_DATA / "wfdb" / "s0010_re.hea", DEFAULT_LIMITS)
    assert sample.meta["lead_mask"] == [True] * 12
    assert sample.meta["dropped_leads"] == ["vx", "vy", "vz"]
    assert sample.meta["fs_original"] == 1000 and sample.meta["duration_s"] == 38.4
    text = repr(sample.meta)
    for private in ("female", "infarct", "Diabetes", "1990", "age:"):
        assert private not in text
    reference, _ = _reference(ECG_DATA / "wfdb" / "s0010_re.hea")
    expected = scipy.signal.resample(reference[:10000], CANONICAL_SAMPLES, axis=0).T
    for lead in range(12):
        assert np.corrcoef(sample.data[lead, 50:950], expected[lead, 50:950])[0, 1] > 0.99


@needs_data
@pytest.mark.parametrize("given", ["E07500.hea", "E07500.mat"])
def test_signal_file_path_finds_its_header(given):
    sample = read_wfdb(ECG_DATA / "cinc2021" / given, DEFAULT_LIMITS)
    via_loader = m3bind.load_input(ECG_DATA / "cinc2021" / given)
    np.testing.assert_array_equal(sample.data, read_wfdb(ECG_DATA / "cinc2021" / "E07500.hea", DEFAULT_LIMITS).data)
    np.testing.assert_array_equal(via_loader.data, sample.data)
    assert via_loader.meta["format"] == "wfdb"


@needs_data
def test_uploaded_files_in_separate_directories(tmp_path):
    """Browsers upload each file into its own temp dir; the record must still be put together."""
    expected = read_wfdb(ECG_DATA / "wfdb" / "s0010_re.hea", DEFAULT_LIMITS)
    uploads = []
    for i, name in enumerate(["s0010_re.xyz", "s0010_re.hea", "s0010_re.dat"]):
        (tmp_path / str(i)).mkdir()
        uploads.append(Path(shutil.copy(ECG_DATA / "wfdb" / name, tmp_path / str(i) / name)))
    sample = m3bind.load_input(uploads)
    np.testing.assert_array_equal(sample.data, expected.data)
    assert sample.meta["dropped_leads"] == ["vx", "vy", "vz"]
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == sorted(p.name for p in uploads)


@needs_data
def test_renamed_signal_upload_is_matched_by_suffix(tmp_path):
    header = Path(shutil.copy(ECG_DATA / "cinc2021" / "E07503.hea", tmp_path / "E07503.hea"))
    (tmp_path / "up").mkdir()
    signal = Path(shutil.copy(ECG_DATA / "cinc2021" / "E07503.mat", tmp_path / "up" / "upload_1.mat"))
    sample = m3bind.load_input([signal, header])
    np.testing.assert_array_equal(sample.data, read_wfdb(ECG_DATA / "cinc2021" / "E07503.hea", DEFAULT_LIMITS).data)


def test_wfdb_units_are_converted_and_non_voltage_channels_dropped(tmp_path):
    signal = _synthetic(250, 10, freqs=(3.0,), n_leads=3)
    uv = np.column_stack([signal[:, 0] * 1000, signal[:, 1], signal[:, 2] * 40 + 80])
    wfdb.wrsamp("rec", fs=250, units=["uV", "mV", "mmHg"], sig_name=["I", "V2", "ABP"], p_signal=uv,
                fmt=["16", "16", "16"], adc_gain=[10.0, 1000.0, 100.0], baseline=[0, 0, 0], write_dir=str(tmp_path))
    sample = read_wfdb(tmp_path / "rec.hea", DEFAULT_LIMITS)
    assert sample.meta["leads_present"] == ["I", "V2"] and sample.meta["dropped_leads"] == ["ABP"]
    reference = sample_from_signal(signal[:, :2], 250, ["I", "V2"], {}, DEFAULT_LIMITS)
    np.testing.assert_allclose(sample.data, reference.data, atol=2e-3)


@pytest.mark.parametrize("record_line", ["rec 3 250", "rec 3"], ids=["no_length", "no_rate_no_length"])
def test_wfdb_header_without_signal_length_is_read(tmp_path, record_line):
    """The length may be left out of a header (as in wfdb's 100-no-len.hea); it comes from the .dat size.
    Without a rate the WFDB default, 250 Hz, applies."""
    signal = _synthetic(250, 12, freqs=(3.0,), n_leads=3)
    wfdb.wrsamp("rec", fs=250, units=["mV"] * 3, sig_name=["I", "II", "V1"], p_signal=signal, fmt=["212"] * 3,
                adc_gain=[200.0] * 3, baseline=[0] * 3, write_dir=str(tmp_path))
    full = read_wfdb(tmp_path / "rec.hea", DEFAULT_LIMITS)
    lines = (tmp_path / "rec.hea").read_text().splitlines()
    assert lines[0] == "rec 3 250 3000"
    (tmp_path / "rec.hea").write_text("\n".join(["# length left out", record_line] + lines[1:]) + "\n")
    sample = m3bind.load_input(tmp_path / "rec.hea")
    assert sample.meta["n_samples_original"] == 3000 and sample.meta["duration_s"] == 12.0
    assert sample.meta["fs_original"] == 250 and sample.meta["leads_present"] == ["I", "II", "V1"]
    np.testing.assert_array_equal(sample.data, full.data)


def test_header_renamed_with_a_dot_is_read(tmp_path):
    """An upload renamed on the way ("rec.1.hea") keeps working: the header is not cut at its last dot."""
    signal = _synthetic(250, 10, freqs=(3.0,), n_leads=2)
    wfdb.wrsamp("rec", fs=250, units=["mV"] * 2, sig_name=["I", "II"], p_signal=signal, fmt=["16"] * 2,
                adc_gain=[1000.0] * 2, baseline=[0] * 2, write_dir=str(tmp_path))
    renamed = (tmp_path / "rec.hea").rename(tmp_path / "rec.1.hea")
    sample = m3bind.load_input(renamed)
    assert sample.meta["leads_present"] == ["I", "II"]


@pytest.mark.parametrize("frame_rate, per_frame", [(125, 4), (1, 500)])
def test_wfdb_frames_of_several_samples_are_read_at_the_channel_rate(tmp_path, frame_rate, per_frame):
    """Records such as wfdb's 041s01 hold several samples of a channel per frame: the channel's rate is
    fs x samps_per_frame (500 Hz here), not the frame rate (125 Hz averages, or an implausible 1 Hz)."""
    fs = frame_rate * per_frame
    t = np.arange(10 * fs) / fs
    ecg = np.sin(2 * np.pi * 7.0 * t)
    slow = 80 + 10 * np.sin(2 * np.pi * 1.2 * np.arange(10 * frame_rate) / frame_rate)
    wfdb.wrsamp("mf", fs=frame_rate, units=["mV", "mV", "mmHg"], sig_name=["II", "V2", "ABP"],
                e_p_signal=[ecg, ecg * 0.5, slow], samps_per_frame=[per_frame, per_frame, 1], fmt=["16"] * 3,
                adc_gain=[1000.0, 1000.0, 10.0], baseline=[0, 0, 0], write_dir=str(tmp_path))
    sample = m3bind.load_input(tmp_path / "mf.hea")
    assert sample.meta["fs_original"] == 500 and sample.meta["samples_per_frame"] == per_frame
    assert sample.meta["duration_s"] == 10.0 and sample.meta["n_samples_original"] == 5000
    assert sample.meta["leads_present"] == ["II", "V2"] and sample.meta["dropped_leads"] == ["ABP"]
    expected = np.sin(2 * np.pi * 7.0 * np.arange(CANONICAL_SAMPLES) / 100)
    lead_ii = sample.data[LEADS.index("II")]
    np.testing.assert_allclose(lead_ii[50:950], expected[50:950], atol=0.02)
    np.testing.assert_allclose(sample.data[LEADS.index("V2")], 0.5 * lead_ii, atol=1e-3)


@needs_data
@pytest.mark.skipif(importlib.util.find_spec("m3bind.readers.dicom") is None, reason="DICOM reader not written yet")
def test_dicom_waveform_ecg_ends_canonical():
    from pydicom.data import get_testdata_file

    sample = m3bind.load_input(get_testdata_file("waveform_ecg.dcm"))
    assert sample.modality == "ecg" and sample.data.shape == (12, CANONICAL_SAMPLES)
    assert sample.meta["lead_mask"] == [True] * 12
    assert np.mean(np.abs(sample.data) < 10) > 0.99 and np.abs(sample.data).max() > 0.1


# --------------------------------------------------------------------------------- canonicalisation


def test_anti_aliasing_keeps_10hz_and_removes_180hz():
    fs, t_out = 500, np.arange(CANONICAL_SAMPLES) / 100
    signal = _synthetic(fs, 10, freqs=(10.0, 180.0))
    naive = signal[::5, 0]  # plain decimation folds 180 Hz onto 20 Hz: the test can tell the difference
    spectrum = np.abs(np.fft.rfft(naive)) / (len(naive) / 2)
    assert spectrum[200] > 0.9  # 20 Hz bin of a 10-s signal
    sample = sample_from_signal(signal, fs, LEADS, {}, DEFAULT_LIMITS)
    out = sample.data[0].astype(np.float64)
    spectrum = np.abs(np.fft.rfft(out)) / (len(out) / 2)
    assert spectrum[100] == pytest.approx(1.0, abs=0.02)  # 10 Hz survives at full amplitude
    assert spectrum[200] < 0.01
    inner = slice(50, 950)
    np.testing.assert_allclose(out[inner], np.sin(2 * np.pi * 10 * t_out[inner]), atol=0.02)


@pytest.mark.parametrize("name, lead", [
    ("Lead I (Einthoven)", "I"), ("lead_ii", "II"), ("III", "III"), ("AVR", "aVR"), ("Lead aVL", "aVL"),
    ("avf", "aVF"), ("MLII", "II"), ("ECG V1", "V1"), ("v2", "V2"), ("V3 (uV)", "V3"), ("LeadV4", "V4"),
    ("V5-lead", "V5"), ("V6", "V6"), ("DIII", "III"),
])
def test_lead_names_are_matched(name, lead):
    signal = _synthetic(500, 10, n_leads=2)
    sample = sample_from_signal(signal, 500, [name, "vx"], {}, DEFAULT_LIMITS)
    assert sample.meta["leads_present"] == [lead]
    assert sample.meta["dropped_leads"] == ["vx"]


@pytest.mark.parametrize("name", ["vx", "vy", "V", "V4R", "V7", "-aVR", "X", "Pleth"])
def test_unknown_leads_are_dropped(name):
    sample = sample_from_signal(_synthetic(500, 10, n_leads=2), 500, ["II", name], {}, DEFAULT_LIMITS)
    assert sample.meta["leads_present"] == ["II"] and sample.meta["dropped_leads"] == [name]


def test_duplicate_lead_keeps_first_channel():
    signal = _synthetic(100, 10, n_leads=2)
    sample = sample_from_signal(signal, 100, ["MLII", "II"], {}, DEFAULT_LIMITS)
    np.testing.assert_allclose(sample.data[1], signal[:, 0] - np.median(signal[:, 0]), atol=1e-6)
    assert sample.meta["dropped_leads"] == ["II"]


@pytest.mark.parametrize("names", [[""] * 12, [f"ch{i}" for i in range(1, 13)], [str(i) for i in range(12)]])
def test_twelve_unnamed_channels_take_standard_order(names):
    signal = _synthetic(100, 10)
    sample = sample_from_signal(signal, 100, names, {}, DEFAULT_LIMITS)
    assert sample.meta["standard_order_assumed"] and sample.meta["lead_mask"] == [True] * 12
    np.testing.assert_allclose(sample.data, (signal - np.median(signal, axis=0)).T, atol=1e-6)


def test_nan_gaps_interpolated_or_masked():
    signal = _synthetic(500, 10)
    signal[:, 0] = np.nan  # lead I all missing
    signal[25::50, 1] = np.nan  # 2 % of lead II, single samples: interpolated
    signal[::8, 2] = np.nan  # 12.5 % of lead III, single samples: interpolated too
    signal[: 3000, 3] = np.nan  # 60 % of aVR: too little left, masked
    sample = sample_from_signal(signal, 500, LEADS, {}, DEFAULT_LIMITS)
    assert sample.meta["lead_mask"] == [False, True, True, False] + [True] * 8
    assert sample.meta["interpolated_leads"] == ["II", "III"] and sample.meta["gappy_leads"] == ["aVR"]
    assert sample.meta["zeroed_leads"] == [] and sample.meta["flat_leads"] == []
    assert np.isfinite(sample.data).all() and not sample.data[[0, 3]].any()
    clean = sample_from_signal(_synthetic(500, 10), 500, LEADS, {}, DEFAULT_LIMITS)
    np.testing.assert_allclose(sample.data[1], clean.data[1], atol=0.01)
    np.testing.assert_allclose(sample.data[2], clean.data[2], atol=0.03)


def test_mostly_nan_record_keeps_the_leads_with_data():
    """Half the leads all NaN, the others with a 40-ms gap (interpolated) and 1-s gaps (set to the
    baseline): once refused as 'all values are missing', now read with the NaN-only leads masked."""
    signal = _synthetic(500, 10, freqs=(2.0,)) + 0.3
    signal[:, :6] = np.nan
    signal[1000:1020, 6:] = np.nan  # 40 ms
    for start in (2000, 3500, 4200):  # 3 x 0.5 s = 15 % of each lead
        signal[start:start + 250, 6:] = np.nan
    sample = m3bind.load_input(_npy_bytes(signal), name="e.npy", sampling_rate=500)
    assert sample.meta["lead_mask"] == [False] * 6 + [True] * 6
    assert sample.meta["interpolated_leads"] == sample.meta["zeroed_leads"] == list(LEADS[6:])
    assert sample.meta["gappy_leads"] == [] and np.isfinite(sample.data).all()
    clean = sample_from_signal(_synthetic(500, 10, freqs=(2.0,)), 500, LEADS, {}, DEFAULT_LIMITS)
    assert not sample.data[:6].any()
    np.testing.assert_allclose(sample.data[6:, 100:190], clean.data[6:, 100:190], atol=0.02)  # away from the gaps
    assert np.abs(sample.data[6:, 410:440]).max() < 1e-2 and np.abs(sample.data[6:, 710:740]).max() < 1e-2


def test_flat_leads_are_missing():
    signal = _synthetic(250, 11)
    signal[:, 0] = 0.0  # unconnected, exported as zeros
    signal[:, 7] = 1.5  # stuck at a constant offset
    sample = sample_from_signal(signal, 250, LEADS, {}, DEFAULT_LIMITS)
    assert sample.meta["lead_mask"] == [i not in (0, 7) for i in range(12)]
    assert sample.meta["flat_leads"] == ["I", "V2"] and not sample.data[[0, 7]].any()


def test_flat_record_is_refused(tmp_path):
    """An all-zero 11-s ECG used to load with every lead marked present."""
    with pytest.raises(m3bind.CorruptFileError, match="every lead is a flat line"):
        m3bind.load_input(_npy_bytes(np.zeros((5500, 12))), name="e.npy", sampling_rate=500)
    wfdb.wrsamp("flat", fs=500, units=["mV"] * 12, sig_name=list(LEADS), p_signal=np.zeros((5500, 12)),
                fmt=["16"] * 12, adc_gain=[1000.0] * 12, baseline=[0] * 12, write_dir=str(tmp_path))
    with pytest.raises(m3bind.CorruptFileError, match="every lead is a flat line"):
        m3bind.load_input(tmp_path / "flat.hea")
    mixed = np.zeros((5500, 12))
    mixed[:, 6:] = np.nan
    with pytest.raises(m3bind.CorruptFileError, match="6 are flat lines .* 6 are entirely missing"):
        m3bind.load_input(_npy_bytes(mixed), name="e.npy", sampling_rate=500)


def test_short_record_is_padded_at_the_end():
    sample = sample_from_signal(_synthetic(500, 4.5), 500, LEADS, {}, DEFAULT_LIMITS)
    assert sample.meta["padded_s"] == 5.5 and sample.meta["window_s"] == (0.0, 4.5)
    assert sample.meta["duration_s"] == 4.5
    assert not sample.data[:, 450:].any() and sample.data[:, 100:440].std() > 0.1


def test_long_record_uses_first_ten_seconds_and_removes_offset():
    signal = _synthetic(250, 30, freqs=(2.0,))
    signal[2500:] = 7.0  # after the window: must not leak in
    shifted = sample_from_signal(signal + 3.0, 250, LEADS, {}, DEFAULT_LIMITS)
    assert shifted.meta["window_s"] == (0.0, 10.0) and shifted.meta["duration_s"] == 30.0
    t = np.arange(CANONICAL_SAMPLES) / 100
    expected = np.sin(2 * np.pi * 2 * t) * (1 + 0.1 * np.arange(12))[:, None]
    np.testing.assert_allclose(shifted.data[:, 20:980], expected[:, 20:980], atol=0.02)


def test_limits_are_enforced_before_work():
    small = Limits(max_ecg_leads=4, max_ecg_samples=2000)
    with pytest.raises(m3bind.InputTooLargeError, match="channels"):
        sample_from_signal(_synthetic(100, 10, n_leads=5), 100, ["I", "II", "III", "V1", "V2"], {}, small)
    with pytest.raises(m3bind.InputTooLargeError, match="samples"):
        sample_from_signal(_synthetic(500, 10, n_leads=2), 500, ["I", "II"], {}, small)


# ----------------------------------------------------------------------------------- CSV / NPY


def _write_csv(path: Path, signal: np.ndarray, header: list[str] | None, times: np.ndarray | None = None,
               delimiter: str = ",") -> Path:
    table = signal if times is None else np.column_stack([times, signal])
    np.savetxt(path, table, fmt="%.6f", delimiter=delimiter,
               header=delimiter.join(header) if header else "", comments="")
    return path


@needs_data
@pytest.mark.parametrize("layout", ["header", "header_time_s", "header_time_ms", "no_header", "no_header_no_rate",
                                    "npy", "npy_leads_as_rows"])
def test_csv_and_npy_round_trip_equal_wfdb(tmp_path, layout):
    header = _ptbxl_headers()[7]
    expected = read_wfdb(header, DEFAULT_LIMITS)
    rec = wfdb.rdrecord(str(header.with_suffix("")))
    signal, names, t = rec.p_signal, rec.sig_name, np.arange(rec.sig_len) / rec.fs
    rate = None if "time" in layout or layout in ("no_header_no_rate", "npy") else 100
    path = {
        "header": lambda: _write_csv(tmp_path / "e.csv", signal, names),
        "header_time_s": lambda: _write_csv(tmp_path / "e.csv", signal, ["time"] + names, t),
        "header_time_ms": lambda: _write_csv(tmp_path / "e.csv", signal, ["Time (ms)"] + names, t * 1000),
        "no_header": lambda: _write_csv(tmp_path / "e.csv", signal, None),
        "no_header_no_rate": lambda: _write_csv(tmp_path / "e.csv", signal, None),
        "npy": lambda: (np.save(tmp_path / "e.npy", signal), tmp_path / "e.npy")[1],
        "npy_leads_as_rows": lambda: (np.save(tmp_path / "e.npy", signal.T.astype(np.float32)), tmp_path / "e.npy")[1],
    }[layout]()
    sample = m3bind.load_input(path, sampling_rate=rate)
    assert sample.modality == "ecg" and sample.meta["format"] == path.suffix[1:]
    assert sample.meta["lead_mask"] == [True] * 12
    np.testing.assert_allclose(sample.data, expected.data, atol=1e-4)
    assert sample.meta["fs_original"] == 100
    assert sample.meta["standard_order_assumed"] == (layout.startswith(("no_header", "npy")))
    assert sample.meta["transposed"] == (layout == "npy_leads_as_rows")


@needs_data
def test_csv_time_column_gives_500hz_and_units_in_names(tmp_path):
    header = ECG_DATA / "cinc2021" / "JS20001.hea"
    expected = read_wfdb(header, DEFAULT_LIMITS)
    rec = wfdb.rdrecord(str(header.with_suffix("")))
    shuffled = list(reversed(range(12)))  # column order must not matter when leads are named
    path = _write_csv(tmp_path / "js.csv", rec.p_signal[:, shuffled] * 1000,
                      ["t"] + [f"{rec.sig_name[i]} [uV]" for i in shuffled], np.arange(rec.sig_len) / 500)
    sample = read_ecg_array(path.read_bytes(), "csv", DEFAULT_LIMITS)
    assert sample.meta["fs_original"] == 500 and sample.meta["fs_source"] == "time column"
    np.testing.assert_allclose(sample.data, expected.data, atol=1e-3)


def test_semicolon_csv_with_decimal_commas(tmp_path):
    signal = _synthetic(250, 10, freqs=(1.5,))
    text = ";".join(LEADS) + "\n" + "\n".join(";".join(f"{v:.5f}".replace(".", ",") for v in row) for row in signal)
    sample = read_ecg_array(text.encode(), "csv", DEFAULT_LIMITS, sampling_rate=250)
    reference = sample_from_signal(signal, 250, LEADS, {}, DEFAULT_LIMITS)
    np.testing.assert_allclose(sample.data, reference.data, atol=1e-4)


@pytest.mark.parametrize("delimiter", [",", "\t", ";"])
def test_csv_starting_with_comment_lines(tmp_path, delimiter):
    """Comment lines (any separators in them) are skipped before the delimiter is worked out."""
    signal = _synthetic(250, 10, freqs=(1.5,))
    comments = "# exported by the cart; 250 Hz, 10 s\t(filtered)\n#\n\n# units: mV\n"
    path = _write_csv(tmp_path / "e.csv", signal, list(LEADS), delimiter=delimiter)
    path.write_text(comments + path.read_text())
    sample = m3bind.load_input(path, sampling_rate=250)
    assert sample.meta["lead_mask"] == [True] * 12
    np.testing.assert_allclose(sample.data, sample_from_signal(signal, 250, LEADS, {}, DEFAULT_LIMITS).data,
                               atol=1e-4)


def test_npy_rate_assumed_only_from_a_ten_second_length():
    sample = read_ecg_array(_npy_bytes(_synthetic(500, 10)), "npy", DEFAULT_LIMITS)
    assert sample.meta["fs_original"] == 500 and sample.meta["fs_source"] == "assumed from a 10-s length"
    with pytest.raises(m3bind.InputError, match="sampling rate"):
        read_ecg_array(_npy_bytes(_synthetic(500, 9)), "npy", DEFAULT_LIMITS)
    given = read_ecg_array(_npy_bytes(_synthetic(500, 9)), "npy", DEFAULT_LIMITS, sampling_rate=500)
    assert given.meta["fs_source"] == "given" and given.meta["padded_s"] == 1.0
